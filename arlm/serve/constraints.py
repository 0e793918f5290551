"""What a request's fields constrain its answer to: ``response_format`` (OpenAI's
``json_object`` and ``json_schema``), vLLM's ``structured_outputs``, and the tools a
``tool_choice`` forces; at most one of them, as a ``StructuredOutputs``."""

from __future__ import annotations

from arlm.sampling.structured import StructuredOutputs
from arlm.serve.errors import APIError

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def response_format_spec(response_format: dict) -> StructuredOutputs | None:
    """OpenAI's ``response_format`` as a constraint (None for ``text``)."""
    kind = response_format.get("type")
    if kind not in RESPONSE_FORMATS:
        raise APIError.bad_request(
            f"response_format.type={kind!r} is not allowed; it must be one of "
            f"{', '.join(RESPONSE_FORMATS)}",
            "response_format.type",
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputs(json_object=True)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise APIError.bad_request(
            'response_format json_schema needs "json_schema": {"name": ..., "schema": {...}, '
            '"strict": true|false}',
            "response_format.json_schema",
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise APIError.bad_request(
            "response_format.json_schema.strict must be true or false",
            "response_format.json_schema.strict",
        )
    # without strict, OpenAI follows the schema loosely; here the schema still holds, and
    # only whitespace and extra properties loosen (StructuredOutputs.strict)
    return StructuredOutputs(json=spec.get("schema", {}), strict=bool(strict))


def structured_outputs_spec(value: dict) -> StructuredOutputs:
    try:
        return StructuredOutputs.from_value(value)
    except (TypeError, ValueError) as e:
        raise APIError.bad_request(e, "structured_outputs") from None


def one_constraint(given: dict[str, StructuredOutputs | None]) -> StructuredOutputs | None:
    """The one constraint among ``given`` (field name -> constraint or None); a 400 when more
    than one field constrains the answer."""
    named = {k: v for k, v in given.items() if v is not None}
    if len(named) > 1:
        raise APIError.bad_request(
            f"{' and '.join(named)} both constrain the answer; give one of them",
            next(iter(named)),
        )
    return next(iter(named.values()), None)

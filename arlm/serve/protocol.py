"""The request bodies of ``/v1/completions`` and ``/v1/chat/completions``, checked field by
field, and their ``SamplingParams``.

The models check JSON types only; ranges and rules are ``SamplingParams``' (one validator for
the CLI, the Python API and the server). Every field is None unless the client sent it, so a
default lives in one place: ``SamplingParams``, or the server's own (``--loop-policy``).
Unknown fields are refused by name rather than ignored: a misspelt ``temprature`` would
otherwise sample at the default without a word.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from arlm.sampling.params import MAX_N, SamplingParams
from arlm.sampling.structured import StructuredOutputs
from arlm.serve.constraints import one_constraint, response_format_spec, structured_outputs_spec
from arlm.serve.errors import APIError
from arlm.serve.tools import check_tools, choice_constraint

# Sequences one request may start (prompts x n): each holds a slot or a queue place.
MAX_SEQUENCES_PER_REQUEST = 256
# Messages of one chat: each is parsed, checked and rendered by the template.
MAX_CHAT_MESSAGES = 2048
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class _Body(BaseModel):
    # strict: no "0.5" for a float or 1 for a bool; an int is still a float
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class RepetitionDetection(_Body):
    """vLLM's repetition-detection fields, plus arlm's ``min_span``."""

    max_pattern_size: int | None = None
    min_pattern_size: int | None = None
    min_count: int | None = None
    min_span: int | None = None


class NearRepetitionDetection(_Body):
    """arlm's near-duplicate loop rule (``arlm.loops.near.NearLoopConfig``)."""

    window: int | None = None
    ngram: int | None = None
    min_overlap: float | None = None


class _Request(_Body):
    """The fields both endpoints take: OpenAI's, then vLLM's and llama.cpp's extensions and
    arlm's loop handling, under ``SamplingParams``' names."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # the client's end-user id; accepted, not used
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    penalty_last_n: int | None = None
    no_repeat_ngram_size: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    dry_multiplier: float | None = None
    dry_base: float | None = None
    dry_allowed_length: int | None = None
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: list[str] | None = None
    repetition_detection: RepetitionDetection | None = None
    near_repetition_detection: NearRepetitionDetection | None = None
    loop_policy: str | None = None
    max_loop_breaks: int | None = None
    loop_break_hold: int | None = None
    structured_outputs: dict | None = None  # vLLM's: json, regex, choice, grammar, json_object
    response_format: dict | None = None  # OpenAI's: text, json_object, json_schema

    def constraints(self) -> dict[str, StructuredOutputs | None]:
        """The fields that constrain the answer, by name (see ``arlm.serve.constraints``)."""
        return {
            "response_format": response_format_spec(self.response_format)
            if self.response_format is not None
            else None,
            "structured_outputs": structured_outputs_spec(self.structured_outputs)
            if self.structured_outputs is not None
            else None,
        }

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        loop_policy: str | None = None,
        repetition_detection: dict | None = None,
        defaults: dict | None = None,
    ) -> SamplingParams:
        """The request's ``SamplingParams`` (``max_tokens`` None: their default);
        ``loop_policy`` and ``repetition_detection`` are the server's defaults, used where the
        request gives none; ``defaults`` the model's (``LM.sampling_defaults``), for the fields
        the request does not set."""
        kwargs: dict[str, Any] = dict(defaults or {})
        kwargs |= {
            name: value
            for name in SamplingParams.__dataclass_fields__
            if name in type(self).model_fields and (value := getattr(self, name)) is not None
        }
        kwargs["logprobs"] = logprobs
        kwargs["structured_outputs"] = one_constraint(self.constraints())
        if isinstance(self, CompletionRequest) and self.echo and logprobs is not None:
            # the echoed prompt's tokens get their log-probabilities too, from the prefill
            kwargs["prompt_logprobs"] = max(kwargs.get("prompt_logprobs") or 0, logprobs)
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if kwargs.get("top_k") == -1:  # vLLM's "off"
            kwargs["top_k"] = 0
        if kwargs.get("n", 1) > MAX_N:
            raise APIError.bad_request(f"n={self.n} is not allowed; at most {MAX_N}", "n")
        prompts = len(self.prompts()) if isinstance(self, CompletionRequest) else 1
        if prompts * kwargs.get("n", 1) > MAX_SEQUENCES_PER_REQUEST:
            raise APIError.bad_request(
                f"{prompts} prompts with n={kwargs.get('n', 1)} make "
                f"{prompts * kwargs.get('n', 1)} sequences; one request may start at most "
                f"{MAX_SEQUENCES_PER_REQUEST}",
                "n",
            )
        if self.repetition_detection is not None:
            kwargs["repetition_detection"] = self.repetition_detection.model_dump(exclude_none=True)
        elif repetition_detection is not None:
            kwargs["repetition_detection"] = repetition_detection
        if self.near_repetition_detection is not None:
            near = self.near_repetition_detection.model_dump(exclude_none=True)
            kwargs["near_repetition_detection"] = near
        if self.loop_policy is None and loop_policy is not None:
            kwargs["loop_policy"] = loop_policy
        try:
            return SamplingParams(**kwargs)
        except ValueError as e:
            raise APIError.bad_request(e) from None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    logprobs: int | None = None
    echo: bool = False
    prompt_logprobs: int | None = None  # vLLM's: the prompt tokens' logprobs, echo or not
    suffix: None = None  # refused when given: arlm has no fill-in-the-middle
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: one text or token-id list each."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise APIError.bad_request("prompt is empty; give a string or token ids", "prompt")
        return list(prompt)


class ChatMessage(BaseModel):
    # roles and content are checked by ``chat_messages``; other fields (name, tool_calls,
    # tool_call_id) go to the chat template as they are
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_CHAT_MESSAGES)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    agent_loop_guard: dict | None = None  # arlm's: {"preset": ..., GuardConfig fields}

    def tool_mode(self) -> tuple[str, StructuredOutputs | None]:
        """(``none``, ``auto``, ``required`` or ``named``; the constraint it puts on the
        answer), the tools checked (see ``arlm.serve.tools``)."""
        schemas = check_tools(self.tools) if self.tools else {}
        parallel = True if self.parallel_tool_calls is None else self.parallel_tool_calls
        return choice_constraint(schemas, self.tool_choice, parallel)

    def constraints(self) -> dict[str, StructuredOutputs | None]:
        return {**super().constraints(), "tool_choice": self.tool_mode()[1]}

    def chat_messages(self) -> list[dict]:
        """The messages as plain dicts for the template, their content as text."""
        out = []
        for i, message in enumerate(self.messages):
            if message.role not in CHAT_ROLES:
                raise APIError.bad_request(
                    f"messages[{i}].role={message.role!r} is not allowed; it must be one of "
                    f"{', '.join(CHAT_ROLES)}",
                    f"messages.{i}.role",
                )
            record = message.model_dump(exclude_none=True)
            record["content"] = _text_content(message.content, i)
            if record.get("tool_calls"):
                record["tool_calls"] = _template_tool_calls(record["tool_calls"], i)
            out.append(record)
        return out

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError.bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None


def _template_tool_calls(calls: object, i: int) -> list:
    """An assistant message's ``tool_calls`` as chat templates read them: each call's
    ``arguments`` parsed from JSON text to an object (as vLLM and Hugging Face pass them)."""
    if not isinstance(calls, list):
        raise APIError.bad_request(
            f"messages[{i}].tool_calls must be a list", f"messages.{i}.tool_calls"
        )
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError.bad_request(
                f"messages[{i}].tool_calls has a call without function.name",
                f"messages.{i}.tool_calls",
            )
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments or "{}")
            except json.JSONDecodeError:
                raise APIError.bad_request(
                    f"messages[{i}].tool_calls: the arguments of {function['name']!r} are not JSON",
                    f"messages.{i}.tool_calls",
                ) from None
        out.append({**call, "function": {**function, "arguments": arguments}})
    return out


def _text_content(content: str | list[dict] | None, i: int) -> str:
    """A message's text: a string, or OpenAI's list of ``{"type": "text", "text": ...}``."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError.bad_request(
                f"messages[{i}].content has a part that is not text ({json.dumps(part)[:80]}); "
                'this server takes text only: {"type": "text", "text": "..."}',
                f"messages.{i}.content",
            )
        texts.append(part["text"])
    return "".join(texts)


def parse(model: type[BaseModel], body: bytes) -> Any:
    """``body`` as ``model``, or a 400 naming the first wrong field and what it must be."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError.bad_request(f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError.bad_request("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError.bad_request(f"the body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _explain(model, e) from None
    except RecursionError:
        raise APIError.bad_request("the body is nested too deeply") from None


def _explain(model: type[BaseModel], error: ValidationError) -> APIError:
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    field = loc[0] if loc else None
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(sorted(model.model_fields))
        return APIError.bad_request(
            f"unknown field {'.'.join(loc)!r}; allowed fields: {allowed}", ".".join(loc)
        )
    if first["type"] == "missing":
        return APIError.bad_request(f"{'.'.join(loc)} is required", ".".join(loc))
    value = first.get("input")
    shown = json.dumps(value, default=str)[:80] if not _is_nan(value) else "NaN"
    annotation = model.model_fields[field].annotation if field in model.model_fields else None
    if annotation is not None and len(loc) > 1 and not loc[1].isdigit():
        # a union: pydantic names the member it tried; say what any member would be
        expected = str(annotation).replace("typing.", "").replace("NoneType", "null")
        return APIError.bad_request(f"{field}={shown} is not allowed; it must be {expected}", field)
    where = ".".join(p for p in loc if p not in {"str", "list[str]", "list[int]"})
    return APIError.bad_request(f"{where}={shown} is not allowed: {first['msg']}", where)


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)

"""Chat templates rendered in a Jinja sandbox with size limits.

A chat template is code from a model folder, and the messages it loops over come from clients,
so rendering is untrusted work. Jinja's sandbox already refuses attribute tricks and ranges over
100,000 items; this one also refuses, before they allocate, the operations that build one huge
value (``'x' * 10**9``, ``s + s``, ``2 ** 10**9``, ``'x'.ljust(10**9)``) and stops the output
once it passes ``max_chars``. Nested loops can still take a long time: a caller that must stay
responsive renders in a process it can kill (``arlm.serve.workers``).
"""

from __future__ import annotations

from collections.abc import Sized

# a power whose result would have more bits than this is refused (2 ** 65536 has 19,729 digits)
MAX_POWER_BITS = 65536


def _environment(max_chars: int):
    """A sandbox that refuses values over ``max_chars`` items (Jinja is imported here, on
    first use, so that importing arlm does not import it)."""
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def too_big(size: int) -> SecurityError:
        return SecurityError(
            f"the chat template builds a value of {size} items; the limit is {max_chars}"
        )

    class LimitedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**"})

        def call_binop(self, context, op: str, left, right):
            if op == "*":
                for seq, times in ((left, right), (right, left)):
                    if _sized(seq) and isinstance(times, int) and len(seq) * times > max_chars:
                        raise too_big(len(seq) * times)
            elif op == "+" and _sized(left) and _sized(right):
                if len(left) + len(right) > max_chars:
                    raise too_big(len(left) + len(right))
            elif op == "**" and _huge_power(left, right):
                raise SecurityError(
                    f"the chat template raises {left} to the power {right}; results over "
                    f"{MAX_POWER_BITS} bits are refused"
                )
            return super().call_binop(context, op, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (Jinja's signature)
            # a string method given a number over the limit can only build a string that would
            # not fit in it (ljust, center, zfill, expandtabs)
            if isinstance(getattr(__obj, "__self__", None), str):
                for value in (*args, *kwargs.values()):
                    if isinstance(value, int) and value > max_chars:
                        raise too_big(value)
            return super().call(__context, __obj, *args, **kwargs)

    return LimitedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )


def _sized(value: object) -> bool:
    return isinstance(value, Sized) and not isinstance(value, dict)


def _huge_power(base: object, exponent: object) -> bool:
    if not (isinstance(base, int) and isinstance(exponent, int)) or abs(base) <= 1:
        return False
    return exponent * abs(base).bit_length() > MAX_POWER_BITS


def render_chat(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str,
    max_chars: int,
    tools: list[dict] | None = None,
) -> str:
    """``template`` rendered on ``messages`` as Hugging Face's ``apply_chat_template`` does.
    Raises ``ValueError`` when the template refuses the conversation (``raise_exception``),
    fails on it in any way (a ``tool_calls`` of the wrong type meets a loop, say), or would
    write or build more than ``max_chars`` characters. ``tools``: the request's tool
    definitions (OpenAI's ``{"type": "function", "function": {...}}``), for templates that
    render them."""
    import jinja2

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = _environment(max_chars)
    env.globals["raise_exception"] = raise_exception
    pieces: list[str] = []
    size = 0
    try:
        compiled = env.from_string(template)
        for piece in compiled.generate(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            tools=tools,  # as Hugging Face passes them: the request's dicts, or None
        ):
            size += len(piece)
            if size > max_chars:
                raise ValueError(
                    f"the chat template writes more than {max_chars} characters for these "
                    "messages; that could not fit in the model's context"
                )
            pieces.append(piece)
    except ValueError:
        raise
    except jinja2.TemplateError as e:
        raise ValueError(f"the chat template failed on these messages: {e}") from None
    except (ArithmeticError, LookupError, TypeError, AttributeError, RecursionError) as e:
        # the template is code the client's messages drive: what it raises is the request's
        raise ValueError(
            f"the chat template failed on these messages: {type(e).__name__}: {e}"
        ) from None
    except MemoryError:
        raise ValueError("the chat template ran out of memory on these messages") from None
    return "".join(pieces)

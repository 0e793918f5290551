"""Agent steps in canonical form: what the step guard compares, and trace files to read them from.

A step is one message of an agent's conversation in the OpenAI chat shape, as a plain dict:

- an assistant message with ``tool_calls`` (each ``{"id", "function": {"name", "arguments"}}``,
  the arguments a JSON string): one *call* per tool call; its ``content`` is narration and is
  not compared (models word it differently each time while repeating the same calls);
- a ``tool`` message (``tool_call_id``, ``content``): the *result* of the call it answers;
- an assistant message without tool calls: a *message* (its text);
- ``user``, ``system`` and ``developer`` messages: the environment speaking, not the agent,
  so nothing is compared (the guard's own warnings arrive this way).

or one line of a plain step log: ``{"action": NAME, "arguments": {...}}`` (a call), with
``"observation": ...`` or ``"error": ...`` beside it for the call and its result in one step,
``{"observation": ...}`` / ``{"error": ...}`` alone (a result), or ``{"message": TEXT}``.
Other fields (ids, timestamps) are never compared.

Canonical forms make equal steps compare equal: arguments become compact JSON with sorted keys
(so key order and formatting do not matter) with the ``ignore`` fields dropped at any depth;
text has its whitespace runs collapsed; a ``key`` function (``mask_numbers``, say) maps
near-duplicates onto one form. A result is an error when its message says so (``"is_error":
true``, the plain log's ``"error"``), when its JSON content has a truthy ``"error"`` field, or
when its text starts with one of ``error_prefixes`` (case ignored).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# Compared texts longer than this keep a head and a digest of the whole: equal texts still
# compare equal, and a tool that returns a large file costs the guard a bounded key.
MAX_KEY_CHARS = 256
_HEAD_CHARS = 200

_WHITESPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

AGENT_ROLES = ("assistant",)
RESULT_ROLES = ("tool", "function")  # "function" is the legacy shape of a tool result
ENVIRONMENT_ROLES = ("user", "system", "developer")


@dataclass(frozen=True, slots=True)
class Call:
    """A tool call: ``key`` is ``name(canonical arguments)``; ``id`` its tool-call id, if any."""

    key: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Result:
    """A tool's result; the guard pairs it with its call by ``call_id``, or else with the
    oldest call of the turn still unanswered."""

    text: str
    error: bool
    call_id: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """Text the agent says without calling a tool."""

    text: str


Event = Call | Result | Message


def mask_numbers(text: str) -> str:
    """Every run of digits (with a decimal part) as ``#``: ``page=3`` and ``page=4`` become one
    form, as do two error messages that differ only in a line number."""
    return _NUMBER.sub("#", text)


def canonical_text(text: str) -> str:
    """``text`` with whitespace runs collapsed to one space and the ends stripped."""
    return _WHITESPACE.sub(" ", text).strip()


def _drop(value: object, ignore: frozenset[str]) -> object:
    if isinstance(value, dict):
        return {k: _drop(v, ignore) for k, v in value.items() if k not in ignore}
    if isinstance(value, list):
        return [_drop(v, ignore) for v in value]
    return value


def canonical_json(value: object, ignore: Iterable[str] = ()) -> str:
    """Compact JSON with sorted keys, the ``ignore`` keys dropped from objects at any depth."""
    return json.dumps(
        _drop(value, frozenset(ignore)), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def canonical_arguments(arguments: object, ignore: Iterable[str] = ()) -> str:
    """A call's arguments, given as a JSON string (the OpenAI shape) or already parsed, in
    canonical JSON; a string that is not JSON (a model's malformed call) is compared as text."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return canonical_text(arguments)
    return canonical_json(arguments, ignore)


def _bounded(text: str) -> str:
    if len(text) <= MAX_KEY_CHARS:
        return text
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
    return f"{text[:_HEAD_CHARS]}... [{len(text)} chars, sha1 {digest}]"


@dataclass(frozen=True)
class Canon:
    """How steps become events: the fields to ignore inside arguments and JSON results, the
    prefixes that mark an error result, and an optional near-duplicate ``key`` applied to every
    compared text (call keys, results, messages)."""

    ignore: frozenset[str] = frozenset()
    error_prefixes: tuple[str, ...] = ("error", "exception", "traceback")
    key: Callable[[str], str] | None = None

    def _finish(self, text: str) -> str:
        return _bounded(self.key(text) if self.key is not None else text)

    def call(self, name: object, arguments: object, call_id: object = None) -> Call:
        if not isinstance(name, str) or not name:
            raise ValueError(f"a tool call needs a non-empty string name, not {name!r}")
        args = canonical_arguments({} if arguments is None else arguments, self.ignore)
        return Call(self._finish(f"{name}({args})"), None if call_id is None else str(call_id))

    def result(self, content: object, flagged: bool, call_id: object = None) -> Result:
        """A result from its content; ``flagged``: the step marks it as an error."""
        error = flagged
        if isinstance(content, str):
            try:
                parsed = json.loads(content)
            except json.JSONDecodeError:
                parsed = None
            # a JSON object or array in the text is compared as JSON ("[]" is not empty parts)
            structured = isinstance(parsed, dict | list)
            content = parsed if structured else content
        else:
            structured = content is not None and not _is_parts(content)
        if structured:
            error = error or (isinstance(content, dict) and bool(content.get("error")))
            text = canonical_json(content, self.ignore)
        else:
            text = canonical_text(_text_of(content))
        low = text.lower()
        error = error or any(low.startswith(p) for p in self.error_prefixes)
        return Result(self._finish(text), error, None if call_id is None else str(call_id))

    def message(self, content: object) -> Message:
        return Message(self._finish(canonical_text(_text_of(content))))

    def events(self, step: object) -> tuple[bool, list[Event]]:
        """(whether ``step`` is the agent's own move, its events in order). Raises
        ``ValueError`` for a step of neither accepted shape, saying what is accepted."""
        if not isinstance(step, dict):
            raise ValueError(
                f"a step is a JSON object (an OpenAI chat message or a plain step), not "
                f"{type(step).__name__}"
            )
        if "role" in step:
            return self._chat(step)
        return self._plain(step)

    def _chat(self, step: dict) -> tuple[bool, list[Event]]:
        role = step["role"]
        if role in ENVIRONMENT_ROLES:
            return False, []
        if role in RESULT_ROLES:  # a legacy "function" result has no id: it answers in order
            call_id = step.get("tool_call_id")
            return False, [self.result(step.get("content"), bool(step.get("is_error")), call_id)]
        if role not in AGENT_ROLES:
            allowed = AGENT_ROLES + RESULT_ROLES + ENVIRONMENT_ROLES
            raise ValueError(f"role {role!r} is not one of {', '.join(allowed)}")
        calls = step.get("tool_calls") or []
        if not isinstance(calls, list):
            raise ValueError(f"tool_calls must be a list, not {type(calls).__name__}")
        if step.get("function_call"):  # the legacy single-call shape
            calls = [{"function": step["function_call"]}]
        if not calls:
            return True, [self.message(step.get("content"))]
        events: list[Event] = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                raise ValueError(f"a tool call needs a 'function' object, not {call!r}")
            events.append(
                self.call(function.get("name"), function.get("arguments"), call.get("id"))
            )
        return True, events

    def _plain(self, step: dict) -> tuple[bool, list[Event]]:
        has_result = "observation" in step or "error" in step
        error = step.get("error")
        flagged = bool(error)
        # "error": true flags the observation; any other truthy value is the error itself
        content = step.get("observation") if error is True or not flagged else error
        if "action" in step:
            call = self.call(step["action"], step.get("arguments"))
            if not has_result:
                return True, [call]
            return True, [call, self.result(content, flagged)]
        if has_result:
            return False, [self.result(content, flagged)]
        if "message" in step:
            return True, [self.message(step["message"])]
        raise ValueError(
            "a step needs 'role' (an OpenAI chat message), or 'action', 'observation', 'error' "
            f"or 'message' (a plain step); this one has {sorted(step) or 'no fields'}"
        )


def _is_parts(content: object) -> bool:
    return isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in content
    )


def _text_of(content: object) -> str:
    """The text of a message's content: a string, OpenAI content parts, or nothing."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if _is_parts(content):
        return "\n".join(str(p.get("text", "")) for p in content)
    return canonical_json(content)


def read_trace(path: str | os.PathLike) -> list[tuple[int, object]]:
    """The steps of a JSON-lines trace as (1-based line number, step); blank lines skipped.
    A missing file or a line that is not JSON raises an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from e
    steps = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            steps.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number} is not a JSON value ({e.msg})") from e
    return steps

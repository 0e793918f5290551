"""Tool calling on ``/v1/chat/completions``: the tools a request declares, the constraint a
``tool_choice`` of ``required`` or a named function puts on the answer, and the parsers that
read tool calls out of a model's text (``--tool-call-parser``).

Parsers, one per way a model family writes its calls:

- ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``,
  any number, after optional content;
- ``llama3_json`` (Llama 3.1+): the whole answer is ``{"name": ..., "parameters": {...}}``
  (optionally after ``<|python_tag|>``), several joined by ``;``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` after optional content,
  or the newer ``[TOOL_CALLS]name[ARGS]{...}``.

Text that does not parse as the format's calls stays content, whole: a malformed call is never
half-returned. ``tool_choice`` ``required`` and a named function do not depend on the model's
habits: the answer is generated under a JSON schema built from the tools (an array of
``{"name", "parameters"}`` for ``required``, the function's own parameters for a named one), as
vLLM does, and read as such.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from arlm.sampling.structured import StructuredOutputs
from arlm.serve.errors import APIError

TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral")
DEFAULT_TOOL_CALL_PARSER = "hermes"  # Qwen's and Hermes' format, the most common template
MAX_TOOLS = 128  # OpenAI's limit
# Calls in one answer under tool_choice "required" with parallel calls: a bound, so that a weak
# model cannot go on adding calls until max_tokens cuts the array off unparsed
MAX_PARALLEL_TOOL_CALLS = 4
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@dataclass(frozen=True)
class ToolCall:
    """One call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = ""

    def as_openai(self, index: int | None = None) -> dict:
        out = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out = {"index": index, **out}
        return out


def new_call(name: str, arguments: object) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(name, text, f"call_{uuid.uuid4().hex[:24]}")


# -- the request's tools ----------------------------------------------------------------------


def check_tools(tools: list[dict]) -> dict[str, dict]:
    """``tools`` in OpenAI's shape, checked: name -> the function's parameters schema. A 400
    names the first tool that is wrong and what it must be."""
    if len(tools) > MAX_TOOLS:
        raise APIError.bad_request(f"tools has {len(tools)} tools; at most {MAX_TOOLS}", "tools")
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise APIError.bad_request(
                f'{where} must be {{"type": "function", "function": {{...}}}}', f"tools.{i}"
            )
        function = tool.get("function")
        if not isinstance(function, dict):
            raise APIError.bad_request(f"{where}.function must be an object", f"tools.{i}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise APIError.bad_request(
                f"{where}.function.name={json.dumps(name)[:80]} is not allowed; it must be 1 to "
                "64 letters, digits, '_', '.' or '-'",
                f"tools.{i}.function.name",
            )
        if name in out:
            raise APIError.bad_request(
                f"{where}.function.name={name!r} is given twice", f"tools.{i}.function.name"
            )
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
            raise APIError.bad_request(
                f"{where}.function.parameters must be a JSON schema of an object "
                '({"type": "object", ...})',
                f"tools.{i}.function.parameters",
            )
        out[name] = parameters
    return out


def choice_constraint(
    schemas: dict[str, dict], tool_choice: str | dict | None, parallel: bool
) -> tuple[str, StructuredOutputs | None]:
    """The tool mode (``none``, ``auto``, ``required`` or ``named``) and the constraint it puts
    on the answer (None for ``none`` and ``auto``)."""
    if tool_choice is None:
        return ("auto" if schemas else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError.bad_request(
                f"tool_choice={tool_choice!r} is not allowed; it must be none, auto, required "
                'or {"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        if tool_choice != "none" and not schemas:
            raise APIError.bad_request(f"tool_choice={tool_choice!r} needs tools", "tool_choice")
        if tool_choice != "required":
            return tool_choice, None
        calls = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "parameters": parameters},
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for name, parameters in schemas.items()
            ]
        }
        array = {
            "type": "array",
            "items": calls,
            "minItems": 1,
            "maxItems": MAX_PARALLEL_TOOL_CALLS if parallel else 1,
        }
        return "required", StructuredOutputs(json=array)
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise APIError.bad_request(
            'tool_choice must be none, auto, required or {"type": "function", "function": '
            '{"name": ...}}',
            "tool_choice",
        )
    if name not in schemas:
        raise APIError.bad_request(
            f"tool_choice names the function {name!r}, which is not among the tools "
            f"({', '.join(schemas) or 'none given'})",
            "tool_choice",
        )
    return "named", StructuredOutputs(json=schemas[name])


def parse_constrained(mode: str, text: str, tool_choice) -> list[ToolCall] | None:
    """The calls of an answer generated under ``choice_constraint``'s schema (None when it was
    cut off before it was whole)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if mode == "named":
        return [new_call(tool_choice["function"]["name"], value)]
    return [new_call(call["name"], call["parameters"]) for call in value]


# -- parsers ----------------------------------------------------------------------------------


class ToolParser:
    """Reads tool calls out of a model's text; ``marker`` is where calls begin (content before
    it can stream as it comes)."""

    marker = ""

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls): the text before the calls (None when empty) and the calls; the
        whole text as content and no calls when it holds none, or holds malformed ones."""
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        """How much of ``text`` (an answer so far) is surely content: up to a marker, or up to
        a tail that could be the start of one."""
        at = text.find(self.marker)
        if at >= 0:
            return at
        for k in range(min(len(self.marker) - 1, len(text)), 0, -1):
            if self.marker.startswith(text[-k:]):
                return len(text) - k
        return len(text)


def _call_object(value: object, arguments_key: str = "arguments") -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get("parameters", value.get("arguments", {})))
    if not isinstance(arguments, dict):
        return None
    return new_call(value["name"], arguments)


def _content(text: str) -> str | None:
    return text.strip() or None


class HermesParser(ToolParser):
    marker = "<tool_call>"
    _block = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text):
        at = text.find(self.marker)
        if at < 0:
            return _content(text), []
        calls = []
        for body in self._block.findall(text[at:]):
            try:
                call = _call_object(json.loads(body))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return _content(text), []
            calls.append(call)
        return _content(text[:at]), calls


class Llama3JsonParser(ToolParser):
    marker = "<|python_tag|>"

    def parse(self, text):
        body = text.strip()
        if body.startswith(self.marker):
            body = body[len(self.marker) :].strip()
        if not body.startswith("{"):
            return _content(text), []
        calls, decoder, at = [], json.JSONDecoder(), 0
        while at < len(body):
            try:
                value, end = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return _content(text), []
            call = _call_object(value, "parameters")
            if call is None:
                return _content(text), []
            calls.append(call)
            at = end
            while at < len(body) and body[at] in " \n\t;":
                at += 1
        return None, calls

    def content_end(self, text: str) -> int:
        # the whole answer is the call: content only once it plainly does not start like one
        body = text.lstrip()
        if not body or body.startswith("{") or self.marker.startswith(body[: len(self.marker)]):
            return 0
        return len(text)


class MistralParser(ToolParser):
    marker = "[TOOL_CALLS]"
    _args = re.compile(r"([A-Za-z0-9_.\-]+)\[ARGS\]")

    def parse(self, text):
        at = text.find(self.marker)
        if at < 0:
            return _content(text), []
        body = text[at + len(self.marker) :].strip()
        calls: list[ToolCall] = []
        try:
            if body.startswith("["):
                values = json.loads(body)
                calls = [_call_object(v) for v in values] if isinstance(values, list) else [None]
            else:  # name[ARGS]{...}, repeated
                decoder, pos = json.JSONDecoder(), 0
                while pos < len(body):
                    m = self._args.match(body, pos)
                    if m is None:
                        calls.append(None)
                        break
                    value, pos = decoder.raw_decode(body, m.end())
                    calls.append(new_call(m.group(1), value) if isinstance(value, dict) else None)
                    pos += len(body[pos:]) - len(body[pos:].lstrip(" \n"))
                    if body.startswith(self.marker, pos):
                        pos += len(self.marker)
        except json.JSONDecodeError:
            calls = [None]
        if not calls or any(c is None for c in calls):
            return _content(text), []
        return _content(text[:at]), calls


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}


def parser_for(name: str | None, chat_template: str | None) -> ToolParser:
    """The parser ``name``; None: the one the chat template plainly writes (its marker
    appears in it), else ``DEFAULT_TOOL_CALL_PARSER``."""
    if name is None:
        template = chat_template or ""
        found = [n for n, p in PARSERS.items() if p.marker in template]
        name = found[0] if len(found) == 1 else DEFAULT_TOOL_CALL_PARSER
    if name not in PARSERS:
        raise ValueError(
            f"tool_call_parser={name!r} is not allowed; it must be one of "
            f"{', '.join(TOOL_CALL_PARSERS)}"
        )
    return PARSERS[name]()


def argument_fragments(arguments: str, size: int = 16) -> list[str]:
    """``arguments`` cut into pieces for streamed deltas (they join back to it)."""
    return [arguments[i : i + size] for i in range(0, len(arguments), size)] or [""]


# -- answers as messages, whole or streamed ---------------------------------------------------


class ToolReader:
    """How one chat request's answers become assistant messages under its tool mode."""

    def __init__(self, mode: str, parser: ToolParser, tool_choice: str | dict | None) -> None:
        self.mode, self.parser, self.tool_choice = mode, parser, tool_choice

    def read(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a whole answer."""
        if self.mode in ("required", "named"):
            calls = parse_constrained(self.mode, text, self.tool_choice)
            return (None, calls) if calls else (text, [])
        return self.parser.parse(text)

    def message(self, text: str, finish_reason: str) -> tuple[dict, str]:
        """The assistant message of a whole answer and its finish reason (``tool_calls`` when
        it called tools)."""
        content, calls = self.read(text)
        if not calls:
            return {"role": "assistant", "content": text}, finish_reason
        message = {
            "role": "assistant",
            "content": content,
            "tool_calls": [c.as_openai() for c in calls],
        }
        return message, "tool_calls" if finish_reason == "stop" else finish_reason

    def stream(self) -> ToolStream:
        return ToolStream(self)


class ToolStream:
    """One streamed choice: content deltas as far as they surely are content, tool-call deltas
    as OpenAI sends them (per call, by ``index``: its id, type and name first, then its
    ``arguments`` in fragments). A named ``tool_choice`` streams the arguments as they are
    generated; ``required`` and ``auto`` send the calls when the answer is whole."""

    def __init__(self, reader: ToolReader) -> None:
        self.reader = reader
        self.text = ""
        self.sent = 0  # characters of text sent as content or arguments
        self.call_id: str | None = None  # a named call's, once its first delta is out

    def push(self, piece: str) -> list[dict]:
        self.text += piece
        mode = self.reader.mode
        if mode == "named":
            return self._named()
        if mode == "required":
            return []
        return self._content(self.reader.parser.content_end(self.text))

    def finish(self) -> tuple[list[dict], bool]:
        """The last deltas, and whether the answer called tools."""
        mode = self.reader.mode
        content, calls = self.reader.read(self.text)
        if mode == "named":
            return self._named(), bool(calls)
        if not calls:
            return self._content(len(self.text)), False
        deltas = (
            [] if mode == "required" else self._content(self.reader.parser.content_end(self.text))
        )
        for index, call in enumerate(calls):
            deltas.append(
                {
                    "tool_calls": [
                        {**call.as_openai(index), "function": {"name": call.name, "arguments": ""}}
                    ]
                }
            )
            deltas += [
                {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
                for fragment in argument_fragments(call.arguments)
            ]
        return deltas, True

    def _content(self, end: int) -> list[dict]:
        if end <= self.sent:
            return []
        piece, self.sent = self.text[self.sent : end], end
        return [{"content": piece}]

    def _named(self) -> list[dict]:
        deltas = []
        if self.call_id is None:
            call = new_call(self.reader.tool_choice["function"]["name"], "")
            self.call_id = call.id
            deltas.append({"tool_calls": [call.as_openai(0)]})
        if len(self.text) > self.sent:
            fragment, self.sent = self.text[self.sent :], len(self.text)
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]})
        return deltas

"""Tool calling (``arlm.serve.tools``): the parsers on golden texts of each format, and
``/v1/chat/completions`` with ``tools`` on a live server: the tools reach the chat template,
``tool_choice`` ``required`` and named give calls that validate against the tools' schemas even
from a random-weight model, streamed deltas join to the whole answer's calls, and bad tools,
tool choices and response formats are 400s that say what was wrong."""

from __future__ import annotations

import json

import httpx
import pytest

from arlm.api import LM
from arlm.engine import EngineConfig
from arlm.serve.errors import APIError
from arlm.serve.tools import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    check_tools,
    choice_constraint,
    parser_for,
)
from tests.conftest import make_model
from tests.serving import LiveServer
from tests.tool_template import HERMES_TEMPLATE, with_template

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def calls_of(parser, text):
    content, calls = parser.parse(text)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


ARGS = {"q": 'say "hi" \\ there', "city": "Zürich ☃", "n": 3}


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    [
        # hermes: single, parallel with content before, quotes and unicode, malformed
        (
            HermesParser(),
            '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',
            None,
            [("f", {"x": 1})],
        ),
        (
            HermesParser(),
            'Let me check.\n<tool_call>{"name": "f", "arguments": '
            + json.dumps(ARGS)
            + '}</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>',
            "Let me check.",
            [("f", ARGS), ("g", {})],
        ),
        (
            HermesParser(),
            'I think <tool_call>{"name": "f", "arguments": {"x": </tool_call>',
            'I think <tool_call>{"name": "f", "arguments": {"x": </tool_call>',
            [],
        ),
        (HermesParser(), "Just text, no calls.", "Just text, no calls.", []),
        # llama3_json: the whole answer, parameters, several joined by ;
        (
            Llama3JsonParser(),
            '{"name": "f", "parameters": ' + json.dumps(ARGS) + "}",
            None,
            [("f", ARGS)],
        ),
        (
            Llama3JsonParser(),
            '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}',
            None,
            [("f", {"x": 1}), ("g", {})],
        ),
        (
            Llama3JsonParser(),
            '{"name": "f", "parameters": {"x": 1',
            '{"name": "f", "parameters": {"x": 1',
            [],
        ),
        (Llama3JsonParser(), "The answer is {x}.", "The answer is {x}.", []),
        # mistral: the JSON list, the [ARGS] form, malformed
        (
            MistralParser(),
            'Sure.[TOOL_CALLS][{"name": "f", "arguments": '
            + json.dumps(ARGS)
            + '}, {"name": "g", "arguments": {}}]',
            "Sure.",
            [("f", ARGS), ("g", {})],
        ),
        (
            MistralParser(),
            '[TOOL_CALLS]f[ARGS]{"x": 1}[TOOL_CALLS]g[ARGS]{}',
            None,
            [("f", {"x": 1}), ("g", {})],
        ),
        (
            MistralParser(),
            '[TOOL_CALLS][{"name": "f", "arguments": {"x"}]',
            '[TOOL_CALLS][{"name": "f", "arguments": {"x"}]',
            [],
        ),
    ],
)
def test_parsers_golden(parser, text, content, calls):
    assert calls_of(parser, text) == (content, calls)


def test_parser_streaming_holds_back_a_possible_marker():
    p = HermesParser()
    assert p.content_end("Hello <tool") == len("Hello ")
    assert p.content_end("Hello <tool_call>{") == len("Hello ")
    assert p.content_end("Hello there") == len("Hello there")
    assert Llama3JsonParser().content_end('  {"na') == 0
    assert Llama3JsonParser().content_end("Hi") == 2


def test_parser_detection_from_the_template():
    assert isinstance(parser_for(None, HERMES_TEMPLATE), HermesParser)
    assert isinstance(parser_for(None, "{{ '[TOOL_CALLS]' }}"), MistralParser)
    assert isinstance(parser_for(None, None), HermesParser)  # the documented default
    assert isinstance(parser_for("llama3_json", HERMES_TEMPLATE), Llama3JsonParser)


def test_tool_choice_constraints():
    schemas = check_tools(TOOLS)
    assert choice_constraint(schemas, None, True) == ("auto", None)
    assert choice_constraint({}, None, True) == ("none", None)
    mode, spec = choice_constraint(schemas, "required", False)
    assert mode == "required" and spec.json["maxItems"] == 1
    mode, spec = choice_constraint(schemas, {"type": "function", "function": {"name": "add"}}, True)
    assert mode == "named" and spec.json == ADD["function"]["parameters"]
    with pytest.raises(APIError, match="'nope', which is not among the tools"):
        choice_constraint(schemas, {"type": "function", "function": {"name": "nope"}}, True)


@pytest.fixture(scope="module")
def live(tokenizer):
    engine = EngineConfig(kv_cache_memory_gib=0.25, max_num_seqs=8)
    # a context that holds the tools block the template writes
    lm = LM(make_model(block_size=1024), with_template(tokenizer), engine_config=engine)
    with LiveServer(lm) as s:
        yield s


def chat(live, **body):
    body.setdefault("messages", [{"role": "user", "content": "What is the weather in Paris?"}])
    return httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120)


def test_tools_and_tool_history_reach_the_template(live):
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Zürich", "unit": "c"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"},
    ]
    r = httpx.post(
        live.url + "/tokenize",
        json={"messages": messages, "tools": TOOLS, "return_token_strs": True},
        timeout=120,
    )
    text = "".join(r.json()["token_strs"])
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Z' in text
    assert "<tool_response>\nsunny, 21\n</tool_response>" in text


def test_required_calls_from_a_random_model_validate(live):
    for seed in range(12):
        r = chat(
            live, tools=TOOLS, tool_choice="required", max_tokens=250, seed=seed, temperature=1.0
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "tool_calls", choice
        calls = choice["message"]["tool_calls"]
        assert calls and all(c["id"].startswith("call_") for c in calls)
        for call in calls:
            arguments = json.loads(call["function"]["arguments"])
            jsonschema.validate(arguments, SCHEMAS[call["function"]["name"]])


def test_named_choice_and_no_parallel_calls(live):
    named = {"type": "function", "function": {"name": "add"}}
    r = chat(live, tools=TOOLS, tool_choice=named, max_tokens=60, seed=1)
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "add"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS["add"])
    for seed in range(4):
        r = chat(
            live,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=120,
            seed=seed,
        )
        assert len(r.json()["choices"][0]["message"]["tool_calls"]) == 1


def joined_stream(live, **body) -> tuple[str, list[dict], str]:
    """(content, calls, finish_reason) joined from a streamed answer's deltas by index."""
    content, calls, finish = "", {}, None
    with httpx.stream(
        "POST", live.url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120
    ) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            delta = choice["delta"]
            content += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:
                call = calls.setdefault(tc["index"], {"name": "", "arguments": ""})
                if "id" in tc:
                    assert call["name"] == "" and tc["function"]["name"]  # the name comes first
                    call["name"] = tc["function"]["name"]
                call["arguments"] += tc["function"].get("arguments", "")
            finish = choice["finish_reason"] or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_streamed_tool_call_deltas_join_to_the_whole_answer(live, tool_choice):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    body = dict(
        messages=messages,
        tools=TOOLS,
        tool_choice=tool_choice,
        max_tokens=250,
        seed=5,
        temperature=1.0,
    )
    whole = chat(live, **body).json()["choices"][0]
    content, calls, finish = joined_stream(live, **body)
    want = [
        {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
        for c in whole["message"]["tool_calls"]
    ]
    assert calls == want and finish == whole["finish_reason"] == "tool_calls"
    assert content == ""


def test_auto_with_text_only_is_content(live):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    body = dict(messages=messages, tools=TOOLS, max_tokens=16, seed=2)
    whole = chat(live, **body).json()["choices"][0]
    assert "tool_calls" not in whole["message"] and whole["finish_reason"] == "length"
    content, calls, finish = joined_stream(live, **body)
    assert calls == [] and content == whole["message"]["content"] and finish == "length"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}},
                        },
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
            "tools[0].function.name",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "not among the tools",
        ),
        ({"tool_choice": "required"}, "needs tools"),
        ({"response_format": {"type": "xml"}}, "response_format.type='xml' is not allowed"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nope"}},
                }
            },
            "response_format",
        ),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "both constrain",
        ),
    ],
)
def test_bad_tools_and_formats_are_400s(live, body, words):
    r = chat(live, max_tokens=4, **body)
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


def test_response_format_json_schema_and_structured_outputs(live):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}}
    for seed in range(4):
        r = chat(live, response_format=fmt, max_tokens=30, seed=seed)
        assert json.loads(r.json()["choices"][0]["message"]["content"]) in (
            {"ok": True},
            {"ok": False},
        )
    r = httpx.post(
        live.url + "/v1/completions",
        json={
            "prompt": "Pick:",
            "max_tokens": 10,
            "structured_outputs": {"choice": ["left", "right"]},
        },
    )
    assert r.json()["choices"][0]["text"] in ("left", "right")

"""The agent loop guard in the server (``arlm.serve.agent_guard``): a scripted agent over HTTP
that repeats a failing call is warned, then stopped, at its preset's thresholds; a healthy trace
as long is never touched; the server default and the per-request field; /metrics counts it."""

from __future__ import annotations

import json

import httpx
import pytest

from arlm.api import LM
from arlm.engine import EngineConfig
from arlm.serve.config import ServeConfig
from tests.conftest import make_model
from tests.serving import LiveServer
from tests.tool_template import with_template


def new_lm(tokenizer):
    engine = EngineConfig(kv_cache_memory_gib=0.25, max_num_seqs=4)
    return LM(make_model(block_size=1024), with_template(tokenizer), engine_config=engine)


@pytest.fixture(scope="module")
def live(tokenizer):
    with LiveServer(new_lm(tokenizer)) as s:
        yield s


def call(i: int, path: str) -> dict:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": "read_file", "arguments": json.dumps({"path": path})},
            }
        ],
    }


def result(i: int, text: str) -> dict:
    return {"role": "tool", "tool_call_id": f"call_{i}", "content": text}


def run_agent(live, rounds: int, failing: bool, guard: dict | None) -> list[dict]:
    """Each round the agent calls read_file and posts its whole history with the result; the
    server's answers, one per round, in order."""
    messages = [{"role": "user", "content": "Fix the bug."}]
    answers = []
    for i in range(rounds):
        path = "missing.py" if failing else f"file{i}.py"
        outcome = "Error: no such file" if failing else f"contents of file{i}.py"
        messages += [call(i, path), result(i, outcome)]
        body = {"messages": messages, "max_tokens": 3, "temperature": 0}
        if guard is not None:
            body["agent_loop_guard"] = guard
        r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        answers.append(r.json())
    return answers


def levels(answers: list[dict]) -> list[str | None]:
    return [(a.get("agent_loop_guard") or {}).get("level") for a in answers]


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        # strict: a call repeated 3 times (and its errors) warns, the 4th stops
        ("strict", [None, None, "warn", "stop"]),
        # OpenHands: the 3rd identical call followed by an error stops at once
        ("openhands", [None, None, "stop"]),
        # gemini-cli: a cycle of one call 5 times warns, the next stops
        ("gemini-cli", [None, None, None, None, "warn", "stop"]),
    ],
)
def test_a_repeated_failing_call_is_warned_then_stopped(live, preset, expected):
    answers = run_agent(live, len(expected), failing=True, guard={"preset": preset})
    assert levels(answers) == expected
    for answer, level in zip(answers, expected, strict=True):
        choice = answer["choices"][0]
        if level == "stop":
            assert choice["finish_reason"] == "loop" and answer["usage"]["completion_tokens"] == 0
            assert answer["agent_loop_guard"]["rule"] and answer["agent_loop_guard"]["message"]
        else:
            assert choice["finish_reason"] == "length"  # generated as usual


def test_a_healthy_trace_of_the_same_length_is_never_touched(live):
    for preset in ("strict", "openhands", "gemini-cli"):
        answers = run_agent(live, 6, failing=False, guard={"preset": preset})
        assert levels(answers) == [None] * 6


def test_a_warning_reaches_the_model_and_the_server_default(tokenizer):
    with LiveServer(new_lm(tokenizer), ServeConfig(agent_loop_guard="strict")) as live:
        warned = run_agent(live, 3, failing=True, guard=None)[-1]
        off = run_agent(live, 3, failing=True, guard={"preset": None})[-1]
        assert levels([warned, off]) == ["warn", None]
        # the warning was appended to the conversation the model read
        assert warned["usage"]["prompt_tokens"] > off["usage"]["prompt_tokens"]
        metrics = httpx.get(live.url + "/metrics").text
        assert 'arlm:agent_loop_guard_verdicts_total{level="warn"} 1.0' in metrics


def test_bad_guard_settings_are_400s(live):
    for guard, words in [
        ({"preset": "paranoid"}, "agent_loop_guard.preset='paranoid' is not allowed"),
        ({"preset": "strict", "repeated_actoin": 3}, "unknown fields ['repeated_actoin']"),
        ({"preset": "strict", "repeated_action": 1}, "repeated_action=1 is not allowed"),
    ]:
        body = {"messages": [{"role": "user", "content": "hi"}], "agent_loop_guard": guard}
        r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text

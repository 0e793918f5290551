"""The close_thinking loop policy (``arlm.loops.thinking``): a loop inside a ``<think>``
section is cut as "stop" cuts it, the section is closed with ``</think>`` and generation goes
on; a loop outside one stops as "stop" does."""

from __future__ import annotations

import pytest

from arlm.api import LM
from arlm.engine import EngineConfig
from arlm.loops.thinking import ThinkMarkers
from tests.conftest import make_model

# a random-weight model decoding greedily falls into a loop within a few dozen tokens
LOOP = {"temperature": 0, "repetition_detection": {"min_count": 3, "min_span": 6}}


@pytest.fixture(scope="module")
def lm(tokenizer):
    return LM(make_model(), tokenizer, engine_config=EngineConfig(kv_cache_memory_gib=0.25))


def test_markers_find_an_open_section(tokenizer):
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    markers = ThinkMarkers.of(encode)
    assert markers.inside(encode("Q: hi <think> let me see"))
    assert not markers.inside(encode("Q: hi <think> let me see </think> yes"))
    assert not markers.inside(encode("no section at all"))


def test_a_loop_inside_thinking_closes_the_section_and_the_answer_goes_on(lm):
    prompt = "Question: what is it?\n<think>"
    stopped = lm.generate(prompt, max_tokens=100, loop_policy="stop", **LOOP)
    assert stopped.finish_reason == "repetition"  # the premise: this prompt loops
    closed = lm.generate(prompt, max_tokens=100, loop_policy="close_thinking", **LOOP)
    # cut where "stop" cuts, then the closing marker, then more text
    assert closed.text.startswith(stopped.text + "</think>")
    assert len(closed.token_ids) > len(stopped.token_ids) + 1
    assert closed.loop_reports[0] == stopped.loop
    # streamed, the same text arrives
    assert "".join(lm.stream(prompt, max_tokens=100, loop_policy="close_thinking", **LOOP)) == (
        closed.text
    )


def test_a_loop_outside_thinking_stops_as_stop_does(lm):
    prompt = "Question: what is it?\n<think>done</think>"
    stopped = lm.generate(prompt, max_tokens=100, loop_policy="stop", **LOOP)
    closed = lm.generate(prompt, max_tokens=100, loop_policy="close_thinking", **LOOP)
    assert stopped.finish_reason == closed.finish_reason == "repetition"
    assert closed.text == stopped.text and closed.loop == stopped.loop


def test_close_thinking_with_logprobs_is_refused(lm):
    with pytest.raises(ValueError, match="close_thinking' with logprobs"):
        lm.generate("x", loop_policy="close_thinking", logprobs=1)

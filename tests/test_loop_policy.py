"""Loop policies in generation: stop, break and report, on a model built to loop under greedy
decoding, and on random models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from arlm.api import LM
from arlm.kv_cache import CacheConfig
from arlm.loops import LoopDetector, find_loops
from tests.conftest import make_model
from tests.numerics import assert_close

START = [40]  # the prompt
LEAD_IN = {40: 50, 50: 51, 51: 60}  # two tokens, then the cycle
CYCLE = {60: 61, 61: 62, 62: 60}
MIN_SPAN_0 = {"min_span": 0, "min_count": 3}


def table_model(
    tokenizer, first: dict[int, int], second: dict[int, int] | None = None, logit: float = 10.0
) -> LM:
    """A model whose next token depends only on the current one: ``first[t]`` scores ``logit``,
    ``second[t]`` half that, everything else 0 (so a token with no entry is followed by id 0,
    the end-of-text token). Every block is zeroed, so the residual stream is the embedding alone;
    a one-hot embedding through RMSNorm picks one column of the output matrix."""
    model = make_model("llama", vocab_size=tokenizer.vocab_size, tie_embeddings=False)
    d = model.config.n_embd
    with torch.no_grad():
        for p in model.h.parameters():
            p.zero_()
        model.ln_f.weight.fill_(1.0)
        model.wte.weight.zero_()
        model.lm_head.weight.zero_()
        for t in range(d):
            model.wte.weight[t, t] = 1.0  # ids 0..d-1 only: each its own direction
        scale = 1 / math.sqrt(d)  # RMSNorm turns the one-hot into sqrt(d) times it
        for table, value in ((first, logit), (second or {}, logit / 2)):
            for t, nxt in table.items():
                model.lm_head.weight[nxt, t] = value * scale
    return LM(model, tokenizer)


@pytest.fixture(scope="module")
def looper(tokenizer):
    return table_model(tokenizer, {**LEAD_IN, **CYCLE})


def test_the_table_model_loops_under_greedy(looper):
    out = looper.generate(START, max_tokens=20, temperature=0)
    assert out.token_ids == [50, 51] + [60, 61, 62] * 6
    assert out.loop is None and out.loop_reports == []


def test_stop_keeps_one_copy_of_the_block(looper):
    out = looper.generate(START, max_tokens=100, temperature=0, loop_policy="stop")
    assert out.finish_reason == "repetition"
    assert out.token_ids == [50, 51, 60, 61, 62]  # the lead-in and the first copy
    assert out.text == looper.tokenizer.decode(out.token_ids)
    # the default detector fires once the loop spans 32 tokens: at generated token 33
    assert (out.loop.start, out.loop.pattern_size, out.loop.position) == (2, 3, 33)
    assert out.loop.pattern == (60, 61, 62) and out.loop.count == 10
    assert out.loop_reports == [out.loop] and out.loops_broken == 0


def test_detection_settings_and_a_dict_both_work(looper):
    out = looper.generate(START, max_tokens=100, temperature=0, repetition_detection=MIN_SPAN_0)
    assert out.finish_reason == "repetition"  # detection settings alone mean "stop"
    assert out.loop.position == 2 + 3 * 3 - 1  # three copies
    assert out.token_ids == [50, 51, 60, 61, 62]


def test_stop_streams_only_what_it_keeps(looper):
    chunks = list(looper.stream(START, max_tokens=100, temperature=0, loop_policy="stop"))
    full = looper.generate(START, max_tokens=100, temperature=0, loop_policy="stop")
    assert "".join(chunks) == full.text
    assert [c.token_id for c in chunks if c.token_id is not None] == full.token_ids
    last = chunks[-1]
    assert last.finish_reason == "repetition" and last.loop == full.loop


def test_report_goes_on_and_attaches_the_reports(looper):
    chunks = list(looper.stream(START, max_tokens=60, temperature=0, loop_policy="report"))
    out = looper.generate(START, max_tokens=60, temperature=0, loop_policy="report")
    assert out.finish_reason == "length" and len(out.token_ids) == 60
    (report,) = out.loop_reports
    assert (report.start, report.pattern_size, report.position) == (2, 3, 59)
    assert report.count == (60 - 2) // 3
    flagged = [i for i, c in enumerate(chunks) if c.token_id is not None and c.loop is not None]
    assert flagged == [33]  # the chunk of the token where the loop was first reported
    assert out.loop is None


def test_break_rolls_back_bans_and_escapes(tokenizer):
    chain = {70 + i: 71 + i for i in range(9)}  # 70 -> ... -> 79 -> end of text
    lm = table_model(tokenizer, {**LEAD_IN, **CYCLE, **chain}, second={62: 70})
    out = lm.generate(START, max_tokens=100, temperature=0, loop_policy="break")
    # back to the end of the first copy; 60 is banned there, so 62's second choice, 70, follows
    assert out.token_ids == [50, 51, 60, 61, 62, *range(70, 80)]
    assert out.finish_reason == "stop" and out.loops_broken == 1
    assert out.loop is None and out.loop_reports[0].pattern == (60, 61, 62)
    assert find_loops(out.token_ids) == []
    chunks = list(lm.stream(START, max_tokens=100, temperature=0, loop_policy="break"))
    assert "".join(chunks) == out.text  # nothing streamed had to be taken back
    assert [c.token_id for c in chunks if c.token_id is not None] == out.token_ids


def test_break_stops_after_its_retries(tokenizer, looper):
    out = looper.generate(
        START, max_tokens=100, temperature=0, loop_policy="break", max_loop_breaks=0
    )
    assert out.finish_reason == "repetition" and out.loops_broken == 0
    assert out.token_ids == [50, 51, 60, 61, 62]
    # 62's second choice leads back into the cycle, and the logits are too far apart for the
    # escalated DRY to matter: without the held bans every break is followed by the same loop
    lm = table_model(tokenizer, {**LEAD_IN, **CYCLE, 63: 60}, second={62: 63}, logit=1000.0)
    kw = dict(max_tokens=100, temperature=0, repetition_detection=MIN_SPAN_0)
    out = lm.generate(START, loop_policy="break", max_loop_breaks=2, loop_break_hold=0, **kw)
    assert out.finish_reason == "repetition" and out.loops_broken == 2
    assert out.token_ids == [50, 51, 60, 61, 62] + [63, 60, 61, 62] * 2
    assert [r.start for r in out.loop_reports] == [2, 6, 10]
    assert find_loops(out.token_ids, **MIN_SPAN_0) == []
    # with them (the default), 60 61 62 is banned after the break: 61 is followed by its next
    # choice, the end-of-text id (every other logit is 0), and the cycle never comes back
    out = lm.generate(START, loop_policy="break", max_loop_breaks=2, **kw)
    assert out.loops_broken == 1 and out.finish_reason == "stop"
    assert out.token_ids == [50, 51, 60, 61, 62, 63, 60, 61]


def test_break_escalates_dry(tokenizer):
    """With ordinary logit gaps, DRY (0.8 after one break) steers away from the repeat."""
    lm = table_model(tokenizer, {**LEAD_IN, **CYCLE, 63: 60}, second={62: 63})
    out = lm.generate(START, max_tokens=100, temperature=0, loop_policy="break")
    assert out.loops_broken == 1 and out.finish_reason == "stop"
    plain = lm.generate(START, max_tokens=100, temperature=0)
    assert len(plain.token_ids) == 100 and len(out.token_ids) < 30


@pytest.mark.parametrize(
    "family, cache",
    [("gpt2", None), ("llama", None), ("llama", CacheConfig(window=96))],
)
def test_break_on_random_models_leaves_no_loop_and_a_consistent_cache(tokenizer, family, cache):
    for seed, prompt in ((0, "The"), (1, "if x"), (2, "class")):
        lm = LM(make_model(family, vocab_size=tokenizer.vocab_size, seed=seed), tokenizer, cache)
        out = lm.generate(
            prompt, max_tokens=90, temperature=0, ignore_eos=True, loop_policy="break", logprobs=0
        )
        assert out.loops_broken > 0  # random tiny models loop under greedy at once
        assert out.finish_reason == "repetition" or find_loops(out.token_ids) == []
        if out.finish_reason == "repetition":
            assert out.loops_broken == 3
        # after every rollback the model saw exactly the kept ids: each token's logprob equals
        # a full forward's
        ids = lm.tokenizer.encode(prompt)
        for i, lp in enumerate(out.logprobs):
            ref = F.log_softmax(lm.logits(ids + out.token_ids[:i])[-1], dim=-1)
            assert_close(lp.logprob, ref[out.token_ids[i]], scale=ref.abs().max().item())


@settings(max_examples=300, deadline=None)
@given(
    items=st.lists(st.integers(0, 2), max_size=80),
    min_count=st.integers(2, 3),
    min_span=st.integers(0, 8),
    max_pattern_size=st.integers(1, 6),
)
def test_settled_items_are_never_cut(items, min_count, min_span, max_pattern_size):
    """The first report's cut (start + pattern_size) is at or after every settled index."""
    detector = LoopDetector(
        max_pattern_size=max_pattern_size, min_count=min_count, min_span=min_span
    )
    settled = 0
    for item in items:
        report = detector.push(item)
        if report is not None:
            assert report.start + report.pattern_size >= settled
            return
        settled = max(settled, len(detector) - detector.unsettled)
        assert 0 <= settled <= len(detector)

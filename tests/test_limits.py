"""What one request may ask for, and what it cannot do to the others: every request is checked
against the model at admission, sizes are bounded, and whatever a sequence still raises inside
a step ends that sequence alone. The five requests that took ``arlm serve`` down in issue 26
are regression tests here."""

from __future__ import annotations

import asyncio
import copy
import math
import random

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from arlm.api import LM
from arlm.engine import AsyncEngine, Engine, EngineConfig, InvalidRequest
from arlm.engine.async_engine import QueueFull
from arlm.engine.text import TextState, stop_holdback
from arlm.kv_cache import CacheConfig
from arlm.loops.detector import LoopDetectorConfig
from arlm.loops.policy import LoopGuard
from arlm.sampling import SamplingParams, sample
from arlm.sampling.breakers import BreakerIndex
from arlm.sampling.dry import dry_penalties
from arlm.sampling.params import MAX_DRY_MULTIPLIER
from arlm.serve.config import ServeConfig
from arlm.serve.errors import APIError
from arlm.serve.protocol import ChatCompletionRequest, CompletionRequest, parse
from tests.conftest import make_model
from tests.numerics import assert_clear_choices, choice_logits
from tests.serving import LiveServer

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model("gpt2", vocab_size=tokenizer.vocab_size, seed=0)


@pytest.fixture(scope="module")
def lm(model, tokenizer):
    return LM(model, tokenizer, engine_config=EngineConfig(kv_cache_memory_gib=0.25))


# -- the five requests of the issue ---------------------------------------------------------


def test_stop_token_ids_outside_the_vocabulary_are_refused_at_admission(lm):
    with pytest.raises(InvalidRequest, match=r"stop_token_ids names token ids \[99999\]") as e:
        lm.engine.add_request(
            "hi", SamplingParams(max_tokens=4, stop_token_ids=[99999], min_tokens=1)
        )
    assert e.value.param == "stop_token_ids"
    with pytest.raises(InvalidRequest, match=r"logit_bias names token ids \[512\]") as e:
        lm.engine.add_request("hi", SamplingParams(logit_bias={512: 1.0}))
    assert e.value.param == "logit_bias"
    with pytest.raises(ValueError, match=r"prompt token ids \[True, False\]"):
        lm.engine.add_request([True, False])
    assert not lm.engine.has_unfinished()
    assert lm.generate("hi", max_tokens=4, **GREEDY).finish_reason == "length"


def test_dry_with_a_huge_base_is_refused_and_its_penalty_never_overflows():
    with pytest.raises(ValueError, match=r"dry_base=1e\+300"):
        SamplingParams(dry_multiplier=1, dry_base=1e300, dry_allowed_length=1)
    ids = [5, 6] * 8
    for base in (1e300, 1e40, MAX_DRY_MULTIPLIER, 1.75):
        for multiplier in (1e-3, 1.0, MAX_DRY_MULTIPLIER):
            got = dry_penalties(ids, multiplier, base, 1, {})
            assert got and all(math.isfinite(v) for v in got.values())
            # finite in float32 too: a penalty of inf would turn a logit into -inf or nan
            assert torch.isfinite(torch.tensor(list(got.values()), dtype=torch.float32)).all()


def test_a_huge_max_pattern_size_is_refused_before_anything_is_allocated(lm):
    with pytest.raises(ValueError, match=r"max_pattern_size=4611686018427387904 .* 65536\]"):
        SamplingParams(repetition_detection={"max_pattern_size": 4611686018427387904})
    with pytest.raises(ValueError, match=r"max_pattern_size"):
        LoopDetectorConfig(min_pattern_size=2**40, max_pattern_size=2**40)
    config = LoopDetectorConfig(max_pattern_size=65536)
    assert config.max_pattern_size == 65536


def test_the_break_policy_escalates_dry_only_up_to_its_limit(model, tokenizer):
    with pytest.raises(ValueError, match=r"dry_multiplier=1e\+308"):
        SamplingParams(loop_policy="break", dry_multiplier=1e308)
    guard = LoopGuard("break", LoopDetectorConfig(), max_breaks=64)
    guard.breaks = 64
    assert guard.dry_multiplier(MAX_DRY_MULTIPLIER, MAX_DRY_MULTIPLIER) == MAX_DRY_MULTIPLIER
    guard.breaks = 5000  # a guard made directly can break more often than a request may
    assert guard.dry_multiplier(1.0) == 2.0**1000  # not an OverflowError from 2 ** 5000
    assert guard.dry_multiplier(0.5, 3.0) == 3.0
    # in the engine: the strongest DRY a request may ask for, broken loops and all
    lm = LM(model, tokenizer, engine_config=EngineConfig(kv_cache_memory_gib=0.25))
    params = SamplingParams(
        max_tokens=40,
        loop_policy="break",
        max_loop_breaks=3,
        dry_multiplier=MAX_DRY_MULTIPLIER,
        dry_allowed_length=40,  # DRY lets the short loops form, so breaks happen
        repetition_detection={"min_count": 2, "min_span": 4},
        **GREEDY,
    )
    out = lm.generate("if x", params)
    assert out.finish_reason in ("length", "repetition") and out.loops_broken > 0


def test_model_end_ids_outside_the_vocabulary_end_nothing_and_break_nothing(model, tokenizer):
    bad = copy.copy(tokenizer)
    bad.eos_token_ids = [999999, *tokenizer.eos_token_ids]
    lm = LM(model, bad, engine_config=EngineConfig(kv_cache_memory_gib=0.25))
    out = lm.generate("hi", max_tokens=6, min_tokens=1, temperature=0)
    good = LM(model, tokenizer, engine_config=EngineConfig(kv_cache_memory_gib=0.25))
    assert out.token_ids == good.generate("hi", max_tokens=6, min_tokens=1, temperature=0).token_ids
    assert 999999 not in lm.engine.end_ids


# -- whatever a sequence raises in a step is its own -----------------------------------------


def test_any_exception_in_one_sequence_finishes_it_alone(lm):
    engine = lm.engine
    a = engine.add_request([5, 6, 7], SamplingParams(max_tokens=8, logit_bias={3: 0.5}, **GREEDY))
    b = engine.add_request([8, 9], SamplingParams(max_tokens=8, **GREEDY))
    c = engine.add_request([10, 11], SamplingParams(max_tokens=8, **GREEDY))
    # a row that breaks the batched draw: the rows are then drawn alone, and it fails alone
    d = engine.add_request([12, 13], SamplingParams(max_tokens=8, temperature=0.8, seed=1))
    engine.requests[d][0].generator = "not a generator"

    def process(row):
        raise IndexError("index 99999 is out of bounds")

    engine.requests[a][0].sampler.process = process
    seq_b, calls = engine.requests[b][0], []
    appended = seq_b.sampler.appended

    def appended_then_fail():  # fails on b's third token, after the id went in
        calls.append(1)
        if len(calls) == 3:
            raise KeyError("boom")
        appended()

    seq_b.sampler.appended = appended_then_fail
    done, texts = {}, {a: "", b: "", c: "", d: ""}
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.text
            if out.finished:
                done[out.request_id] = out
    assert done[a].completion.finish_reason == "error" and "IndexError" in done[a].completion.error
    assert done[a].completion.token_ids == []
    got_b = done[b].completion
    assert got_b.finish_reason == "error" and "KeyError" in got_b.error
    assert len(got_b.token_ids) == 2  # the id whose processing failed is not kept
    assert texts[b] == got_b.text
    assert done[d].completion.finish_reason == "error" and "TypeError" in done[d].completion.error
    want_c = lm.generate([10, 11], max_tokens=8, **GREEDY)
    # c ran batched with the others, want_c alone: no near-tie that the batch could flip
    assert_clear_choices(choice_logits(lm.model, [10, 11], want_c.token_ids))
    assert done[c].completion.token_ids == want_c.token_ids
    assert engine.scheduler.running == [] and not engine.has_unfinished()


def test_a_failing_forward_still_stops_the_engine(model, tokenizer):
    engine = Engine(model, tokenizer, config=EngineConfig(kv_cache_memory_gib=0.25))
    engine.add_request([5, 6], SamplingParams(max_tokens=4, **GREEDY))

    def run(batch, orders):
        raise RuntimeError("CUDA error: device lost")

    engine.runner.run = run
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()


def test_the_async_front_survives_a_request_that_fails_when_added(lm):
    front = AsyncEngine(lm.engine)

    def broken(*args, **kwargs):
        raise MemoryError("no room for the detector")

    async def main():
        original = lm.engine.add_request
        lm.engine.add_request = broken
        try:
            stream = front.add_request([5, 6], SamplingParams(max_tokens=3, **GREEDY), "bad")
            with pytest.raises(ValueError, match="MemoryError"):
                async for _ in stream:
                    pass
        finally:
            lm.engine.add_request = original
        outs = [
            o async for o in front.generate([5, 6], SamplingParams(max_tokens=3, **GREEDY), "ok")
        ]
        return outs[-1].completion

    try:
        completion = asyncio.run(main())
    finally:
        front.stop()
    assert front.error is None and completion.finish_reason == "length"


# -- small numbers ---------------------------------------------------------------------------


def test_a_temperature_below_float32s_range_is_greedy(lm):
    logits = torch.randn(4, 512, generator=torch.Generator().manual_seed(0)) * 8
    params = [SamplingParams(temperature=t) for t in (1e-40, 1e-30, 1e-6, 0.0)]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    assert sample(logits, params, gens).tolist() == logits.argmax(dim=-1).tolist()
    greedy = lm.generate("The", max_tokens=16, **GREEDY)
    tiny = lm.generate("The", max_tokens=16, temperature=1e-40, seed=3, ignore_eos=True)
    assert tiny.token_ids == greedy.token_ids


# -- sizes -----------------------------------------------------------------------------------


def test_the_windowed_cache_bounds_max_tokens(tokenizer):
    model = make_model("llama", vocab_size=tokenizer.vocab_size, seed=2)
    engine = Engine(model, tokenizer, CacheConfig(window=64), EngineConfig(max_model_len=1000))
    with pytest.raises(InvalidRequest, match=r"max_tokens=1000000000000000 .* 1000 positions") as e:
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=10**15))
    assert e.value.param == "max_tokens"
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=997))  # exactly the limit
    default = Engine(model, tokenizer, CacheConfig(window=64))
    assert default.window_max_len == 2**20


def test_a_request_that_can_never_fit_is_invalid_and_one_that_must_wait_is_queue_full(lm):
    front = AsyncEngine(lm.engine, max_queue=8)
    slots = lm.engine.scheduler.max_num_seqs

    async def main():
        with pytest.raises(InvalidRequest, match=rf"needs {slots + 9} sequences") as e:
            front.add_request([5], SamplingParams(n=slots + 9, max_tokens=2), "never")
        assert e.value.param == "n"
        busy = front.add_request([5], SamplingParams(n=slots, max_tokens=200, **GREEDY), "busy")
        with pytest.raises(QueueFull):
            front.add_request([6], SamplingParams(n=9, max_tokens=2), "wait")
        front.add_request([6], SamplingParams(n=8, max_tokens=2), "fits").close()
        busy.close()

    try:
        asyncio.run(main())
    finally:
        front.stop()


def test_requests_are_bounded_by_their_sequences_and_messages():
    body = b'{"prompt": [[1], [2], [3]], "n": 100}'
    with pytest.raises(APIError, match="3 prompts with n=100 make 300 sequences"):
        parse(CompletionRequest, body).sampling_params(4, None)
    assert parse(CompletionRequest, b'{"prompt": [[1], [2]], "n": 128}').sampling_params(4, None)
    messages = ",".join(['{"role": "user", "content": "x"}'] * 2049)
    with pytest.raises(APIError, match="messages") as e:
        parse(ChatCompletionRequest, f'{{"messages": [{messages}]}}'.encode())
    assert e.value.status == 400
    assert ServeConfig().max_queue == 256


# -- stop strings: checked in the tail a new token can complete ------------------------------


def _holdback_by_definition(text: str, stops: list[str]) -> int:
    return max(
        (n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])),
        default=0,
    )


@settings(max_examples=300, deadline=None)
@given(
    text=st.text("ab\n", max_size=30),
    stops=st.lists(st.text("ab\n", min_size=1, max_size=8), min_size=1, max_size=4),
)
def test_stop_holdback_equals_its_definition(text, stops):
    assert stop_holdback(text, stops) == _holdback_by_definition(text, stops)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), min_tokens=st.integers(0, 6))
def test_stop_strings_are_found_as_a_search_of_the_whole_text_finds_them(
    tokenizer, seed, min_tokens
):
    rng = random.Random(seed)
    ids = [rng.randrange(1, 300) for _ in range(40)]
    plain = TextState(tokenizer, [], 0)
    for token in ids:
        plain.push(token)
    whole = plain.text
    stops = []
    for _ in range(rng.randrange(1, 4)):
        at = rng.randrange(len(whole) - 1)
        stops.append(whole[at : at + rng.randrange(1, 12)])
    state = TextState(tokenizer, stops, min_tokens)
    expected = found = None
    for token in ids:
        state.push(token)
        if len(state.ends) >= min_tokens:  # what searching the whole text from the floor finds
            floor = state.ends[min_tokens - 2] if min_tokens >= 2 else 0
            hits = [i for s in stops if (i := state.text.find(s, floor)) >= 0]
            expected = state.text[: min(hits)] if hits else None
        if found := state.find_stop():
            break
    assert found == (expected is not None)
    if found:
        assert state.text == expected


# -- DRY's breaker table ---------------------------------------------------------------------


def _breakers_by_definition(texts, encode, breakers):
    """llama.cpp's loop, literally: every token against every breaker."""
    table: dict[int, set] = {}
    for breaker in breakers:
        breaker = breaker[:40]
        for token, text in enumerate(texts):
            if breaker in text:
                table.setdefault(token, set()).add(())
                continue
            for at in range(max(0, len(text) - len(breaker) + 1), len(text)):
                if breaker.startswith(text[at:]):
                    tail = tuple(encode(breaker[len(text) - at :])[:20])
                    table.setdefault(token, set()).add(tail)
    return {token: sorted(tails) for token, tails in table.items()}


def test_the_breaker_index_builds_llama_cpps_table(tokenizer):
    texts = tokenizer.token_texts
    encode = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    rng = random.Random(0)
    picked = [texts[rng.randrange(len(texts))] for _ in range(6)]
    cases = [
        ["\n", ":", '"', "*"],
        [" the", "ing ", "\n\n", "```"],
        [picked[0] + picked[1], picked[2][1:] + picked[3], "x" * 45],
        [picked[4] + picked[5] + "\x00z"],
    ]
    index = BreakerIndex(texts, encode)
    for breakers in cases:
        got = {token: sorted(tails) for token, tails in index.table(breakers).items()}
        assert got == _breakers_by_definition(texts, encode, breakers)
    # a separator the texts use is never picked: texts holding \x00 are searched all the same
    odd = ["a\x00b", "\x00", "b", "ab", "xa", ""]
    odd_encode = {"b": [2], "\x00b": [1, 2], "b\x00": [2, 1], "\x00": [1]}.__getitem__
    for breakers in (["a\x00b"], ["\x00b"], ["ab\x00"], ["b"]):
        got = BreakerIndex(odd, odd_encode).table(breakers)
        got = {token: sorted(tails) for token, tails in got.items()}
        assert got == _breakers_by_definition(odd, odd_encode, breakers)


def test_a_live_server_answers_after_each_request_that_used_to_kill_it(model, tokenizer):
    lm = LM(model, tokenizer, engine_config=EngineConfig(kv_cache_memory_gib=0.25))
    hostile = [
        {"prompt": "hi", "max_tokens": 4, "stop_token_ids": [99999], "min_tokens": 1},
        {
            "prompt": [5, 6] * 8,
            "max_tokens": 4,
            "dry_multiplier": 1,
            "dry_base": 1e300,
            "dry_allowed_length": 1,
        },
        {"prompt": "hi", "repetition_detection": {"max_pattern_size": 4611686018427387904}},
        {"prompt": [5, 6] * 8, "loop_policy": "break", "dry_multiplier": 1e308},
        {"prompt": "hi", "logit_bias": {"100000": 5}},
        {"prompt": "hi", "n": 100, "max_tokens": 2},  # never fits 64 sequences + a queue of 8
        {"prompt": "hi", "stop": ["x" * 1000] * 1000},
        {"prompt": [[1]] * 20, "n": 128},
    ]
    with LiveServer(lm, ServeConfig(max_queue=8)) as s, httpx.Client(timeout=10) as http:
        for body in hostile:
            r = http.post(s.url + "/v1/completions", json=body)
            assert r.status_code == 400, (body, r.text)
            ok = http.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert ok.status_code == 200, (body, ok.text)
        assert http.get(s.url + "/health").status_code == 200
        assert "logit_bias" in http.post(s.url + "/v1/completions", json=hostile[4]).text

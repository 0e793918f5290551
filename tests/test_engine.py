"""The engine: batch invariance, slots and the prefix cache, chunked prefill, per-sequence loop
policies and errors, abort, and the async front."""

from __future__ import annotations

import asyncio
import random

import pytest

from arlm.api import LM
from arlm.engine import AsyncEngine, Engine, EngineConfig
from arlm.engine.config import held_share
from arlm.engine.memory import GIB
from arlm.kv_cache import CacheConfig
from arlm.sampling import SamplingParams
from tests.conftest import make_model
from tests.numerics import assert_clear_choices, assert_close, choice_logits

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tokenizer):
    return make_model(request.param, vocab_size=tokenizer.vocab_size, seed=5)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 500) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


def _mixed_params(n: int) -> list[SamplingParams]:
    """Different lengths and settings, so rows join and finish at different steps."""
    out = []
    for i in range(n):
        kw = dict(max_tokens=4 + (i * 7) % 23, ignore_eos=True)
        if i % 3 == 0:
            kw.update(temperature=0)
        elif i % 3 == 1:
            kw.update(temperature=0.8, top_k=20, seed=100 + i)
        else:
            kw.update(temperature=1.1, top_p=0.9, repetition_penalty=1.3, seed=200 + i)
        out.append(SamplingParams(**kw))
    return out


def _alone(model, tokenizer, prompts, params) -> list[list[int]]:
    """Each request's tokens when it runs by itself. A batch rounds otherwise, so the greedy
    ones must hold no near-tie that could flip a token: asserted here. (A sampled token flips
    only if its uniform draw lands within rounding, ~1e-6, of a boundary of the cumulative
    probabilities: odds far below one in a thousand for all the draws of a test.)"""
    lm = LM(model, tokenizer, engine_config=EngineConfig(max_num_seqs=1))
    out = [lm.generate(p, sp).token_ids for p, sp in zip(prompts, params, strict=True)]
    for p, sp, tokens in zip(prompts, params, out, strict=True):
        if sp.temperature == 0:
            assert_clear_choices(choice_logits(model, p, tokens))
    return out


def test_sixteen_requests_give_the_same_tokens_alone_and_together(model, tokenizer):
    prompts, params = _prompts(16), _mixed_params(16)
    alone = _alone(model, tokenizer, prompts, params)
    engine = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=16))
    together = [c.token_ids for c in engine.generate(prompts, params, progress=False)]
    assert together == alone
    # and with rows joining while others decode: a few requests at a time, the rest later
    engine = Engine(
        model, tokenizer, config=EngineConfig(max_num_seqs=5, max_num_batched_tokens=40)
    )
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:6], params[:6], strict=True)]
    got, steps = {}, 0
    while engine.has_unfinished():
        if steps == 3:
            ids += [
                engine.add_request(p, sp) for p, sp in zip(prompts[6:], params[6:], strict=True)
            ]
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.completion.token_ids
        steps += 1
    assert [got[i] for i in ids] == alone


def test_the_engine_matches_a_full_forward_without_a_cache(model, tokenizer):
    prompts = _prompts(4, seed=3)
    lm = LM(model, tokenizer)
    outs = lm.generate(prompts, max_tokens=12, **GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        choices = choice_logits(model, prompt, out.token_ids)
        # the cached path rounds otherwise: these prompts hold no near-tie that could flip one
        assert_clear_choices(choices)
        assert choices.argmax(-1).tolist() == out.token_ids


def test_too_few_slots_make_requests_wait_and_each_still_matches_alone(model, tokenizer):
    prompts, params = _prompts(7, seed=1), _mixed_params(7)
    alone = _alone(model, tokenizer, prompts, params)
    engine = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=2))
    for p, sp in zip(prompts, params, strict=True):
        engine.add_request(p, sp)
    most_running, results = 0, {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.completion
        most_running = max(most_running, len(engine.scheduler.running))
    assert most_running == 2
    assert [results[i].token_ids for i in range(7)] == alone
    assert max(c.usage.queued_seconds for c in results.values()) > 0


def test_blocks_are_counted_by_reference_and_all_come_back(model, tokenizer):
    engine = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=6, kv_block_size=8))
    bm = engine.block_manager
    head = list(range(1, 30))  # shared by every prompt: its full blocks are shared
    for p, sp in zip(_prompts(12, seed=2), _mixed_params(12), strict=True):
        engine.add_request(head + p, sp)
    shared_seen = False
    while engine.has_unfinished():
        engine.step()
        running = engine.scheduler.running
        tables = [b for s in running for b in s.block_table]
        for b in set(tables):  # each block's count is the number of tables holding it
            assert bm.ref[b] == tables.count(b)
        shared_seen |= len(tables) > len(set(tables))
        for s in running:  # the block a sequence writes next, where it holds it, is its own
            nxt = s.block_table[s.num_cached // 8 :]
            assert not nxt or bm.ref[nxt[0]] == 1
            # it holds its positions' blocks and at most one more
            assert len(s.block_table) * 8 < len(s.token_ids) + 8
        assert engine.stats()["blocks_in_use"] == len(set(tables))
    assert shared_seen
    assert bm.num_free_blocks == bm.num_blocks and engine.stats()["blocks_in_use"] == 0


def test_abort_frees_the_blocks_at_the_next_step(model, tokenizer):
    engine = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=3))
    keep = engine.add_request([5, 6, 7], SamplingParams(max_tokens=30, **GREEDY))
    gone = engine.add_request([8, 9], SamplingParams(max_tokens=30, **GREEDY))
    waiting = engine.add_request([1, 2], SamplingParams(max_tokens=30, n=2, **GREEDY))
    engine.step()
    engine.step()
    bm = engine.block_manager
    assert len(engine.scheduler.running) == 3
    engine.abort(gone)
    engine.abort(waiting)
    outs = {o.request_id: o for o in engine.step()}
    assert outs[gone].finished and outs[gone].completion.finish_reason == "abort"
    assert outs[waiting].completion.finish_reason == "abort"
    (left,) = engine.scheduler.running
    assert bm.num_used_blocks == len(left.block_table)
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == keep
    assert bm.num_free_blocks == bm.num_blocks


def test_chunked_prefill_gives_the_same_logits_as_one_prefill(model, tokenizer):
    prompt = _prompts(1, seed=9)[0] + list(range(10, 70))  # 60+ tokens
    params = SamplingParams(max_tokens=6, logprobs=3, **GREEDY)
    whole = Engine(model, tokenizer, config=EngineConfig(max_num_batched_tokens=512))
    chunked = Engine(
        model, tokenizer, config=EngineConfig(max_num_seqs=2, max_num_batched_tokens=7)
    )
    a = whole.generate([prompt], params, progress=False)[0]
    b = chunked.generate([prompt], params, progress=False)[0]
    # chunks round otherwise than one prefill: no near-tie among the 3 top tokens compared
    assert_clear_choices(choice_logits(model, prompt, a.token_ids), ranks=3)
    assert a.token_ids == b.token_ids
    assert_close([y.logprob for y in b.logprobs], [x.logprob for x in a.logprobs])
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert chunked.steps > whole.steps


def test_prefix_cached_prompts_give_the_same_tokens_as_uncached(model, tokenizer):
    head = list(range(1, 50))
    prompts = [head + [100 + i, 7, 8 + i] for i in range(5)]
    params = SamplingParams(max_tokens=10, logprobs=0, **GREEDY)
    cold = Engine(model, tokenizer, config=EngineConfig(enable_prefix_caching=False))
    warm = Engine(model, tokenizer, config=EngineConfig(kv_block_size=16))
    plain = cold.generate(prompts, params, progress=False)
    cached = warm.generate(prompts, params, progress=False)
    for prompt, p in zip(prompts, plain, strict=True):  # no near-tie the cached path could flip
        assert_clear_choices(choice_logits(model, prompt, p.token_ids))
    assert [c.token_ids for c in cached] == [c.token_ids for c in plain]
    for c, p in zip(cached, plain, strict=True):
        assert_close([x.logprob for x in c.logprobs], [y.logprob for y in p.logprobs])
    # the first prompt computed the head's 3 full blocks, the other four reused them
    assert [c.usage.cached_prompt_tokens for c in cached] == [0, 48, 48, 48, 48]
    assert cold.block_manager.hit_tokens == 0
    # a later request finds the head's blocks, cached after their holders finished
    again = warm.generate([head + [1]], params, progress=False)[0]
    assert again.usage.cached_prompt_tokens == 48


def test_n_samples_share_the_prompt_and_differ(model, tokenizer):
    engine = Engine(model, tokenizer)
    prompt = list(range(1, 40))
    samples = engine.generate(
        [prompt], SamplingParams(n=3, max_tokens=15, temperature=1.0, seed=4), progress=False
    )[0]
    assert len(samples) == 3 and len({tuple(s.token_ids) for s in samples}) == 3
    assert [s.usage.cached_prompt_tokens for s in samples] == [0, 32, 32]
    # sample i is seeded with seed + i
    single = Engine(model, tokenizer).generate(
        [prompt], SamplingParams(max_tokens=15, temperature=1.0, seed=5), progress=False
    )[0]
    assert single.token_ids == samples[1].token_ids


def test_loop_policies_act_on_their_own_row_only(tokenizer):
    model = make_model("gpt2", vocab_size=tokenizer.vocab_size, seed=0)
    lm = LM(model, tokenizer)
    prompts = ["The", "if x", "class"]
    plain = lm.generate(prompts, max_tokens=60, **GREEDY)
    # alone and together round otherwise: no near-tie on the greedy paths (after a loop break
    # the path leaves these, and those choices go unchecked)
    for prompt, p in zip(prompts, plain, strict=True):
        assert_clear_choices(choice_logits(model, tokenizer.encode(prompt), p.token_ids))
    policies = [
        SamplingParams(max_tokens=60, loop_policy="stop", **GREEDY),
        SamplingParams(max_tokens=60, **GREEDY),
        SamplingParams(max_tokens=60, loop_policy="break", **GREEDY),
    ]
    alone = [lm.generate(p, sp) for p, sp in zip(prompts, policies, strict=True)]
    outs = lm.generate(prompts, policies)
    assert outs[0].finish_reason == "repetition" and len(outs[0].token_ids) < 60
    assert outs[1].token_ids == plain[1].token_ids and outs[1].finish_reason == "length"
    assert outs[2].loops_broken > 0
    for got, want in zip(outs, alone, strict=True):
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_request_that_fails_fails_alone(family, tokenizer):
    lm = LM(make_model(family, vocab_size=16), tokenizer)  # ids 0..15 of the tokenizer
    # with every id in its prompt, no_repeat_ngram_size=1 bans every token at the first step
    bad = SamplingParams(max_tokens=20, no_repeat_ngram_size=1, **GREEDY)
    good = SamplingParams(max_tokens=20, **GREEDY)
    outs = lm.generate([list(range(16)), [5, 6], list(range(16))], [bad, good, good])
    assert outs[0].finish_reason == "error" and "every token is banned" in outs[0].error
    assert outs[0].token_ids == []
    assert [o.finish_reason for o in outs[1:]] == ["length", "length"]
    assert [len(o.token_ids) for o in outs[1:]] == [20, 20]
    with pytest.raises(ValueError, match="every token is banned"):
        lm.generate(list(range(16)), bad)


def test_engine_limits_and_requests_are_checked(model, tokenizer):
    with pytest.raises(ValueError, match="max_num_batched_tokens=4 must be at least"):
        Engine(model, tokenizer, config=EngineConfig(max_num_seqs=8, max_num_batched_tokens=4))
    with pytest.raises(ValueError, match="longer than the model's context"):
        Engine(model, tokenizer, config=EngineConfig(max_model_len=4096))
    c = model.config
    block = 2 * c.n_layer * c.n_kv_head * c.head_dim * 4 * 16  # bytes of 16 positions, float32
    with pytest.raises(ValueError, match=r"first two KV blocks of 16 positions need 0\.\d+ MiB"):
        Engine(model, tokenizer, config=EngineConfig(kv_cache_memory_gib=1.5 * block / 2**30))
    small = 5.5 * block / 2**30  # five blocks: 80 of the context's 128 positions
    with pytest.raises(ValueError, match="max_model_len=128 needs 8 KV blocks .* than the 5"):
        Engine(model, tokenizer, config=EngineConfig(max_model_len=128, kv_cache_memory_gib=small))
    with pytest.raises(ValueError, match="max_num_seqs=6 needs at least one KV block each"):
        Engine(model, tokenizer, config=EngineConfig(max_num_seqs=6, kv_cache_memory_gib=small))
    capped = Engine(model, tokenizer, config=EngineConfig(kv_cache_memory_gib=small))
    assert capped.max_len == 80  # the default max_model_len is what the pool holds
    engine = Engine(model, tokenizer, config=EngineConfig(max_model_len=32))
    with pytest.raises(ValueError, match="max_model_len=32"):
        engine.add_request(list(range(1, 40)))
    with pytest.raises(ValueError, match="not in this vocabulary"):
        engine.add_request([1, 10**6])
    engine.add_request([1], request_id="a")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([2], request_id="a")
    # a sequence stops at max_model_len however many tokens it asked for
    out = engine.generate([[1, 2]], SamplingParams(max_tokens=100, **GREEDY), progress=False)
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 31


def test_a_full_pool_leaves_the_held_histories_their_share(tokenizer):
    """On a CPU an eighth of the budget is the held histories' (``held_share``): with every
    block given memory up front (``preallocate``, as ``arlm serve`` does) a lone row and rows
    beside one another still hold theirs, and the cache stays within the budget. An explicit
    max_model_len that needs the whole budget gets it; on a GPU nothing is set aside."""
    model = make_model("gpt2", vocab_size=tokenizer.vocab_size, seed=5)
    c = model.config
    block = 2 * c.n_layer * c.n_kv_head * c.head_dim * 4 * 16  # bytes of 16 positions, float32
    engine = Engine(model, tokenizer, config=EngineConfig(kv_cache_memory_gib=128 * block / GIB))
    cache = engine.runner.cache
    assert (cache.num_blocks, cache.held_blocks) == (112, 16)
    engine.preallocate()
    assert cache.allocated == cache.num_blocks
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=40, **GREEDY), progress=False)
    assert cache.lone_history.nbytes > 0
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    engine.generate(prompts, SamplingParams(max_tokens=40, **GREEDY), progress=False)
    assert cache.held_rows.nbytes > 0 and len(cache.held_rows.tables) == 3
    assert cache.nbytes <= 128 * block
    whole = EngineConfig(max_model_len=128, kv_cache_memory_gib=8.5 * block / GIB)
    assert Engine(model, tokenizer, config=whole).runner.cache.held_blocks == 0
    assert held_share(EngineConfig(), "cuda", 64, 16, block) == 0


def test_a_windowed_engine_runs_one_sequence_past_the_context(tokenizer):
    model = make_model("llama", vocab_size=tokenizer.vocab_size, seed=2)
    with pytest.raises(ValueError, match="one sequence at a time"):
        Engine(model, tokenizer, CacheConfig(window=64), EngineConfig(max_num_seqs=4))
    lm = LM(model, tokenizer, CacheConfig(window=64))
    outs = lm.generate(["The", "if"], max_tokens=200, **GREEDY)
    assert [len(o.token_ids) for o in outs] == [200, 200]  # past the context of 128


def test_interleaved_streams_each_get_their_own_text(model, tokenizer):
    lm = LM(model, tokenizer)
    a = lm.stream("The", max_tokens=12, temperature=0.9, seed=1)
    b = lm.stream("if x", max_tokens=8, **GREEDY)
    pieces_a, pieces_b = [next(a)], []
    for y in b:  # a step of b, then one of a, until b ends
        pieces_b.append(y)
        pieces_a.append(next(a))
    pieces_a += list(a)
    assert "".join(pieces_a) == lm.generate("The", max_tokens=12, temperature=0.9, seed=1).text
    alone = lm.generate("if x", max_tokens=8, **GREEDY)
    # b ran batched with a: no near-tie on its greedy path that the batch could flip
    assert_clear_choices(choice_logits(model, tokenizer.encode("if x"), alone.token_ids))
    assert "".join(pieces_b) == alone.text
    # a stream left early frees its sequence
    early = lm.stream("The", max_tokens=50, **GREEDY)
    next(early)
    early.close()
    lm.engine.step()
    assert not lm.engine.has_unfinished() and lm.engine.scheduler.running == []


def test_async_engine_streams_each_request_and_aborts_a_cancelled_one(model, tokenizer):
    engine = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=4))
    front = AsyncEngine(engine)
    expected = Engine(model, tokenizer).generate(
        [[1, 2, 3], [4, 5]], SamplingParams(max_tokens=10, **GREEDY), progress=False
    )
    for prompt, e in zip([[1, 2, 3], [4, 5]], expected, strict=True):  # batched otherwise below
        assert_clear_choices(choice_logits(model, prompt, e.token_ids))

    async def collect(prompt, request_id):
        text, tokens = "", []
        async for out in front.generate(
            prompt, SamplingParams(max_tokens=10, **GREEDY), request_id
        ):
            text += out.text
            if out.finished:
                tokens = out.completion.token_ids
        return text, tokens

    async def leave_early():
        stream = front.generate([7, 8], SamplingParams(max_tokens=500, **GREEDY), "gone")
        async for _ in stream:
            break
        await stream.aclose()

    async def main():
        return await asyncio.gather(collect([1, 2, 3], "a"), collect([4, 5], "b"), leave_early())

    try:
        (text_a, ids_a), (text_b, ids_b), _ = asyncio.run(main())
        assert (ids_a, ids_b) == (expected[0].token_ids, expected[1].token_ids)
        assert text_a == expected[0].text
        for _ in range(100):  # the abort lands at the loop's next step
            if engine.block_manager.num_used_blocks == 0:
                break
            asyncio.run(asyncio.sleep(0.02))
        assert engine.block_manager.num_used_blocks == 0
        with pytest.raises(ValueError, match="longer than"):
            asyncio.run(collect(list(range(1, 300)), "long"))
    finally:
        front.stop()

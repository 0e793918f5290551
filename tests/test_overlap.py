"""Overlap scheduling (``arlm.engine.overlap``): a step's successor is scheduled and its
forward launched, fed the ids still on the device, before the host has applied them; it is
sampled once they have landed.

On the CPU nothing runs behind the host, so nothing is faster here; what these tests check is
that the steps it launches, the ids it feeds from the device, the rows it leaves out, drops or
feeds again from the host, and the joins it schedules beside rows in flight change no row's
output. Two paths batch rows differently
(a row joins a step later with overlap), so greedy rows are checked for near-ties and
log-probabilities compared within float32's tolerance (tests/numerics.py)."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from arlm.engine import Engine, EngineConfig
from arlm.kv_cache import CacheConfig
from arlm.sampling import SamplingParams
from arlm.speculative.config import SpeculativeConfig
from tests.conftest import make_model
from tests.numerics import assert_clear_choices, assert_close, choice_logits
from tests.test_engine import _prompts


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tokenizer):
    return make_model(request.param, vocab_size=tokenizer.vocab_size, seed=5)


def _engine(model, tokenizer, overlap: bool, graphs: bool = False, **config) -> Engine:
    config.setdefault("kv_cache_memory_gib", 0.02)  # graphs give the whole pool its memory
    engine = Engine(model, tokenizer, config=EngineConfig(async_scheduling=overlap, **config))
    if graphs:
        engine.use_decode_graphs(capture=False)
    return engine


def _block_gib(model) -> float:
    """GiB of one KV block of 8 positions of ``model``, float32 (the pools here are sized in
    blocks)."""
    c = model.config
    return 2 * c.n_layer * c.n_kv_head * c.head_dim * 4 * 8 / 2**30


def _plain_params(n: int) -> list[SamplingParams]:
    """Rows that draw on the device alone (no processors, no loop guard): greedy, and seeded
    samples with log-probabilities, of different lengths so rows join and leave."""
    out = []
    for i in range(n):
        kw = dict(max_tokens=3 + (i * 7) % 19, ignore_eos=True)
        if i % 2 == 0:
            kw.update(temperature=0)
        else:
            kw.update(temperature=0.9, top_k=30, top_p=0.95, seed=300 + i, logprobs=2)
        out.append(SamplingParams(**kw))
    return out


def _generate(engine: Engine, prompts, params):
    results = engine.generate(prompts, params, progress=False)
    assert engine.stats()["blocks_in_use"] == 0  # every block came back, dropped rows' too
    return results


def _no_near_ties(model, prompts, params, results) -> None:
    for prompt, p, c in zip(prompts, params, results, strict=True):
        if p.temperature == 0:
            assert_clear_choices(choice_logits(model, prompt, c.token_ids))


def _assert_same(got, want) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.token_ids == b.token_ids
        assert a.finish_reason == b.finish_reason and a.text == b.text
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or [], b.logprobs or [], strict=True):
            assert x.token_id == y.token_id
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
            values = [x.logprob, *(v for _, v in x.top)]
            assert_close(values, [y.logprob, *(v for _, v in y.top)])


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "padded"])
def test_overlapped_steps_give_the_plain_steps_output_as_rows_join_and_leave(
    model, tokenizer, graphs
):
    prompts, params = _prompts(8, seed=3), _plain_params(8)
    config = dict(max_num_seqs=3, max_num_batched_tokens=40)
    plain = _generate(_engine(model, tokenizer, False, graphs, **config), prompts, params)
    _no_near_ties(model, prompts, params, plain)
    engine = _engine(model, tokenizer, True, graphs, **config)
    _assert_same(_generate(engine, prompts, params), plain)
    stats = engine.stats()
    # rows join in overlapped steps too: only the first, with nothing in flight, is plain
    assert stats["overlapped_steps"] == stats["steps"] - 1


def test_joins_in_overlapped_steps_share_prefix_blocks_and_chunk_long_prompts(model, tokenizer):
    """Sequences join beside rows in flight, their prompts chunked across several overlapped
    steps (a small token budget) and their shared head found in the prefix cache (a system
    prompt, and ``n`` samples of one prompt), registered by steps whose ids had not landed."""
    system = _prompts(1, seed=21)[0][:24] + [7] * 10
    prompts = [system + p[:20] for p in _prompts(6, seed=22)]
    params = [replace(p, n=2) if i % 3 == 0 else p for i, p in enumerate(_plain_params(6))]
    config = dict(max_num_seqs=4, max_num_batched_tokens=24, kv_block_size=8)
    plain_engine = _engine(model, tokenizer, False, **config)
    plain = [c for cs in _generate(plain_engine, prompts, params) for c in cs]  # n > 1: lists
    each = [(p, sp) for p, sp in zip(prompts, params, strict=True) for _ in range(sp.n)]
    _no_near_ties(model, [p for p, _ in each], [sp for _, sp in each], plain)
    engine = _engine(model, tokenizer, True, **config)
    _assert_same([c for cs in _generate(engine, prompts, params) for c in cs], plain)
    stats = engine.stats()
    assert stats["prefix_cache_hit_tokens"] == plain_engine.stats()["prefix_cache_hit_tokens"] > 0
    assert stats["overlapped_steps"] == stats["steps"] - 1


def test_a_request_for_prompt_logprobs_joins_through_a_plain_step(model, tokenizer):
    """Prompt log-probabilities are read on the host after their forward: the step that
    prefills such a prompt lands the one before it first, and the others overlap around it."""
    prompts, params = _prompts(6, seed=4), _plain_params(6)
    params[3] = replace(params[3], prompt_logprobs=1)
    config = dict(max_num_seqs=3)
    plain = _generate(_engine(model, tokenizer, False, **config), prompts, params)
    _no_near_ties(model, prompts, params, plain)
    engine = _engine(model, tokenizer, True, **config)
    got = _generate(engine, prompts, params)
    _assert_same(got, plain)
    scored = [[(t.token_id, t.logprob) for t in c.prompt_logprobs[1:]] for c in (got[3], plain[3])]
    assert [t for t, _ in scored[0]] == [t for t, _ in scored[1]]
    assert_close([v for _, v in scored[0]], [v for _, v in scored[1]])
    stats = engine.stats()
    assert 0 < stats["overlapped_steps"] < stats["steps"] - 1


def test_rows_ended_by_a_token_the_host_sees_a_step_late_end_where_they_would(model, tokenizer):
    """Stop ids and stop strings end rows whose next step was already launched: that step's
    result for them is dropped, and the output is the plain path's."""
    prompts = _prompts(6, seed=8)
    free = [SamplingParams(max_tokens=30, temperature=1.0, seed=40 + i) for i in range(6)]
    runs = _generate(_engine(model, tokenizer, False), prompts, free)
    params = []
    for i, (p, run) in enumerate(zip(free, runs, strict=True)):  # each ends at its own step
        at = 3 + 4 * i
        if i % 2 == 0:
            params.append(replace(p, stop_token_ids=[run.token_ids[at]]))
        else:
            params.append(replace(p, stop=[run.text[at : at + 3]]))
    plain = _generate(_engine(model, tokenizer, False), prompts, params)
    assert all(c.finish_reason == "stop" and len(c.token_ids) < 30 for c in plain)
    engine = _engine(model, tokenizer, True)
    _assert_same(_generate(engine, prompts, params), plain)
    assert engine.stats()["overlapped_steps"] > 0


def test_rows_with_penalties_bias_and_min_tokens_overlap_and_give_the_plain_steps_output(
    model, tokenizer
):
    """Their processors take each token on the host as it lands, before the next step is
    sampled (the penalties count it, a short ``penalty_last_n`` window letting older ones go;
    ``min_tokens`` counts it as generated): every step overlaps, and no row's output changes.
    A bias towards the end id would end the rows at once but for ``min_tokens``, so where its
    mask lifts decides where they end."""
    prompts = _prompts(8, seed=12)
    params = []
    for i, p in enumerate(_plain_params(8)):
        if i % 4 == 0:
            p = replace(p, repetition_penalty=1.5, penalty_last_n=3)
        elif i % 4 == 1:
            p = replace(p, presence_penalty=1.2, frequency_penalty=0.7, logit_bias={9: 4.0})
        elif i % 4 == 2:
            p = replace(p, frequency_penalty=1.5, penalty_last_n=4, logit_bias={11: -100.0})
        else:
            end = tokenizer.eos_token_ids[0]
            p = replace(p, ignore_eos=False, min_tokens=2 + i % 3, logit_bias={end: 30.0})
        params.append(p)
    config = dict(max_num_seqs=3, max_num_batched_tokens=40)
    plain = _generate(_engine(model, tokenizer, False, **config), prompts, params)
    _no_near_ties(model, prompts, params, plain)
    assert all(len(plain[i].token_ids) == params[i].min_tokens for i in (3, 7))
    engine = _engine(model, tokenizer, True, **config)
    _assert_same(_generate(engine, prompts, params), plain)
    stats = engine.stats()
    assert stats["overlapped_steps"] == stats["steps"] - 1


def test_rows_with_dry_ngram_bans_a_grammar_and_a_loop_break_overlap_too(model, tokenizer):
    """Their state follows each token on the host: the step after one in flight is launched
    first, and sampled once that token has landed. A loop break that rolls a row back while its
    next step was in flight drops that step's result for it, and the row is fed again from the
    host in the next overlapped step."""
    prompts = _prompts(10, seed=11)
    params = _plain_params(10)
    loop = dict(loop_policy="break", repetition_detection={"min_span": 0, "min_count": 3})
    params[4] = replace(params[4], dry_multiplier=0.8, max_tokens=12)
    params[5] = replace(params[5], no_repeat_ngram_size=2, max_tokens=12)
    params[6] = replace(params[6], logit_bias={60: 30.0}, max_tokens=16, **loop)
    params[7] = replace(params[7], structured_outputs={"json_object": True}, ignore_eos=False)
    config = dict(max_num_seqs=4)
    plain_engine = _engine(model, tokenizer, False, **config)
    plain = _generate(plain_engine, prompts, params)
    _no_near_ties(model, prompts, params, plain)
    assert plain_engine.stats()["loops_broken"] > 0
    engine = _engine(model, tokenizer, True, **config)
    _assert_same(_generate(engine, prompts, params), plain)
    stats = engine.stats()
    assert stats["loops_broken"] == plain_engine.stats()["loops_broken"]
    assert stats["overlapped_steps"] == stats["steps"] - 1


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_rows_and_waiting_ones_give_the_plain_steps_tokens(model, tokenizer, mode):
    """A pool a third of the peak: rows preempt each other through plain steps, and come
    back, like the waiting ones, in overlapped steps as blocks come back. Swapped-in rows
    feed their pending ids from the host beside the fed ones, through the padded decode
    path."""
    prompts = [p[:12] for p in _prompts(6, seed=7)]
    params = [replace(sp, max_tokens=24 + 4 * i) for i, sp in enumerate(_plain_params(6))]
    block = _block_gib(model)
    need = [-(-(len(p) + sp.max_tokens) // 8) for p, sp in zip(prompts, params, strict=True)]
    pool = max(sum(need) // 3, max(need) + 2)
    config = dict(
        kv_block_size=8,
        max_num_seqs=6,
        kv_cache_memory_gib=(pool + 0.5) * block,
        enable_prefix_caching=False,
        preemption_mode=mode,
    )
    if mode == "swap":
        config["kv_offload_gib"] = sum(need) * block
    graphs = mode == "swap"
    plain_engine = _engine(model, tokenizer, False, graphs, **config)
    plain = _generate(plain_engine, prompts, params)
    _no_near_ties(model, prompts, params, plain)
    assert plain_engine.stats()["preemptions"] > 0
    engine = _engine(model, tokenizer, True, graphs, **config)
    _assert_same(_generate(engine, prompts, params), plain)
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["overlapped_steps"] > 0
    assert stats["swapped"] == 0 and (mode == "recompute" or engine.scheduler.num_swaps > 0)


def test_a_request_aborted_while_its_next_step_is_in_flight_ends_and_frees_its_blocks(
    model, tokenizer
):
    greedy = dict(temperature=0, ignore_eos=True)
    engine = _engine(model, tokenizer, True, max_num_seqs=3)
    keep = engine.add_request([5, 6, 7], SamplingParams(max_tokens=20, **greedy))
    gone = engine.add_request([8, 9], SamplingParams(max_tokens=20, n=2, **greedy))
    for _ in range(4):
        engine.step()
    assert engine.overlap.in_flight is not None and engine.stats()["overlapped_steps"] > 0
    engine.abort(gone)
    outs = {o.request_id: o for o in engine.step()}
    assert outs[gone].finished and outs[gone].completion.finish_reason == "abort"
    assert keep not in outs or not outs[keep].finished
    tokens = None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == keep
            if out.finished:
                tokens = out.completion.token_ids
    alone = _engine(model, tokenizer, False).generate(
        [[5, 6, 7]], SamplingParams(max_tokens=20, **greedy), progress=False
    )[0]
    _no_near_ties(model, [[5, 6, 7]], [SamplingParams(**greedy)], [alone])
    assert tokens == alone.token_ids
    assert engine.block_manager.num_used_blocks == 0


def test_a_row_left_no_possible_token_fails_alone_when_its_step_lands(tokenizer):
    """``min_tokens`` holding off every id (all of them stop ids here) bans every token: the
    row's step was launched like the others', and it fails with the reason when it lands."""
    model = make_model("llama", vocab_size=16, seed=5)
    banned = SamplingParams(max_tokens=5, min_tokens=3, stop_token_ids=list(range(16)))
    fine = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts, params = [[1, 2, 3], [4, 5], [6, 7, 8]], [fine, banned, fine]
    plain = _generate(_engine(model, tokenizer, False), prompts, params)
    engine = _engine(model, tokenizer, True)
    got = _generate(engine, prompts, params)
    assert got[1].finish_reason == "error" and "every token is banned" in got[1].error
    assert got[1].token_ids == [] and engine.stats()["overlapped_steps"] > 0
    _assert_same(got[::2], plain[::2])


def _random_workload(seed: int, model):
    """Prompts (half sharing a head), a mix of rows (greedy, seeded samples, ``n`` of 2,
    penalties, bias with ``min_tokens``, DRY, a grammar, a loop break, and prompt
    log-probabilities, which the overlap steps plainly for), an engine config whose pool may
    run short (a host tier to swap to, or none), and whether decode steps take the padded
    path."""
    rng = random.Random(seed)
    head = [rng.randrange(1, 500) for _ in range(16)]
    prompts, params = [], []
    for i in range(8):
        tail = [rng.randrange(1, 500) for _ in range(rng.randrange(1, 30))]
        prompts.append(head + tail if rng.random() < 0.5 else tail)
        kw = dict(max_tokens=rng.randrange(2, 20), ignore_eos=True, temperature=0)
        kinds = ["greedy", "sampled", "n", "penalties", "bias", "dry", "json", "loop", "scored"]
        kind = rng.choice(kinds)
        if kind in ("sampled", "n"):
            kw.update(temperature=0.9, top_k=40, seed=seed * 100 + i, n=1 + (kind == "n"))
        elif kind == "penalties":
            kw.update(
                presence_penalty=0.6, frequency_penalty=0.4, penalty_last_n=rng.choice([0, 3])
            )
        elif kind == "bias":
            kw.update(ignore_eos=False, min_tokens=2, logit_bias={rng.randrange(500): 5.0})
        elif kind == "dry":
            kw.update(dry_multiplier=0.8)
        elif kind == "json":
            kw.update(structured_outputs={"json_object": True}, ignore_eos=False)
        elif kind == "loop":
            detection = {"min_span": 0, "min_count": 3}
            kw.update(loop_policy="break", repetition_detection=detection, logit_bias={60: 30.0})
        elif kind == "scored":
            kw.update(prompt_logprobs=1)
        params.append(SamplingParams(**kw))
    block = _block_gib(model)
    need = [-(-(len(p) + sp.max_tokens) // 8) * sp.n for p, sp in zip(prompts, params, strict=True)]
    pool = max(int(sum(need) * rng.choice([0.2, 0.5, 3.0])), max(need) + 2)
    config = dict(
        kv_block_size=8,
        max_num_seqs=rng.randrange(2, 6),
        max_num_batched_tokens=rng.choice([16, 24, 40]),
        kv_cache_memory_gib=(pool + 0.5) * block,
        kv_offload_gib=rng.choice([0, sum(need) * block]),  # preempted: swap, else recompute
    )
    return prompts, params, config, rng.random() < 0.5


@pytest.mark.parametrize("seed", [2, 7, 18])  # padded: a loop break; recomputed; swapped
def test_random_workloads_give_the_plain_steps_output(model, tokenizer, seed):
    prompts, params, config, graphs = _random_workload(seed, model)
    plain_engine = _engine(model, tokenizer, False, graphs, **config)
    plain = _generate(plain_engine, prompts, params)
    engine = _engine(model, tokenizer, True, graphs, **config)
    got = _generate(engine, prompts, params)
    for p, sp, a, b in zip(prompts, params, got, plain, strict=True):
        a, b = (a, b) if isinstance(a, list) else ([a], [b])  # lists where any n > 1
        processed = sp.presence_penalty or sp.logit_bias or sp.dry_multiplier
        if sp.temperature == 0 and not (processed or sp.structured_outputs):
            _no_near_ties(model, [p], [sp], b)
        _assert_same(a, b)
        if sp.prompt_logprobs is not None:
            want = [(t.token_id, t.logprob) for t in b[0].prompt_logprobs[1:]]
            have = [(t.token_id, t.logprob) for t in a[0].prompt_logprobs[1:]]
            assert [t for t, _ in have] == [t for t, _ in want]
            assert_close([v for _, v in have], [v for _, v in want])
    assert engine.stats()["overlapped_steps"] > 0


def test_overlap_is_on_by_default_on_cuda_only_and_refused_where_it_cannot_run(model, tokenizer):
    assert Engine(model, tokenizer).overlap is None  # a CPU runs the forward itself
    assert _engine(model, tokenizer, True).overlap is not None
    with pytest.raises(ValueError, match="async_scheduling does not run with speculative"):
        Engine(
            model,
            tokenizer,
            config=EngineConfig(async_scheduling=True),
            speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=2),
        )
    if model.config.family != "gpt2":  # the windowed cache needs rotary positions
        with pytest.raises(ValueError, match="async_scheduling does not run with the windowed"):
            Engine(model, tokenizer, CacheConfig(window=16), EngineConfig(async_scheduling=True))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_on_cuda_overlapped_graph_steps_give_the_plain_steps_tokens(tokenizer, family):
    """Over 100 engine steps with rows joining and leaving, some with penalties, float32: what
    the device runs behind the host, from ids it never sent back first, against steps that wait
    for them."""
    model = make_model(family, vocab_size=tokenizer.vocab_size, seed=5).cuda()
    prompts, params = _prompts(16, seed=3), _plain_params(16)
    for i in range(1, 16, 4):  # their penalties count the ids in flight on the device
        params[i] = replace(
            params[i], presence_penalty=0.5, frequency_penalty=0.5, penalty_last_n=5
        )
    config = dict(max_num_seqs=5, max_num_batched_tokens=40)
    plain = Engine(model, tokenizer, config=EngineConfig(async_scheduling=False, **config))
    overlapped = Engine(model, tokenizer, config=EngineConfig(**config))
    assert overlapped.overlap is not None and overlapped.eager_reason is None  # the defaults
    want = _generate(plain, prompts, params)
    _assert_same(_generate(overlapped, prompts, params), want)
    stats = overlapped.stats()
    assert stats["steps"] >= 100 and stats["overlapped_steps"] * 2 > stats["steps"]

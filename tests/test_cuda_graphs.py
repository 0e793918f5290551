"""Decode steps through static buffers padded to batch-size buckets (what CUDA graphs replay),
and the decode attention kernel that reads only the positions each row holds.

On the CPU the padded forward runs eagerly (``use_decode_graphs(capture=False)``): the same
code a graph captures, so what padding and bucketing do to each row is checked here; the
capture itself runs only on CUDA (tests/test_cuda.py)."""

from __future__ import annotations

import copy
import functools
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from arlm.engine import Engine, EngineConfig
from arlm.engine.cuda_graphs import DecodeGraphs, batch_buckets
from arlm.kv_cache import CacheConfig, make_codec
from arlm.kv_cache import decode_attention as decode_attention_module
from arlm.kv_cache.decode_attention import (
    decode_attention,
    decode_attention_reference,
    row_tiles,
    rows_per_tile,
    split_counters,
)
from arlm.kv_cache.paged import PagedRow
from arlm.sampling import SamplingParams
from arlm.speculative.config import SpeculativeConfig
from tests.conftest import make_model
from tests.numerics import assert_clear_choices, assert_close, choice_logits
from tests.test_engine import _mixed_params, _prompts
from tests.test_window_cache import windowed_model
from tests.triton_interpreter import run_interpreted

# a Llama layout with a mixture of 4 experts, 2 a token, in each MLP's place
MOE = dict(n_experts=4, n_experts_per_tok=2)


@pytest.fixture(scope="module", params=["gpt2", "llama", "moe"])
def model(request, tokenizer):
    if request.param == "moe":
        return make_model("llama", vocab_size=tokenizer.vocab_size, seed=5, **MOE)
    return make_model(request.param, vocab_size=tokenizer.vocab_size, seed=5)


def _engine(model, tokenizer, graphs: bool, **config) -> Engine:
    # graphs give every block of the pool its memory at once: a pool sized for these tests
    config.setdefault("kv_cache_memory_gib", 0.02)
    if graphs and model.config.n_experts is not None:
        # the padded steps stack the experts for their grouped products: a copy, so that the
        # plain path keeps its loop over experts
        model = copy.deepcopy(model)
    engine = Engine(model, tokenizer, config=EngineConfig(**config))
    if graphs:
        engine.use_decode_graphs(capture=False)
    return engine


def test_buckets_cover_every_batch_size_with_little_padding():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(300)[-6:] == [240, 248, 256, 272, 288, 300]
    for largest in (1, 3, 8, 9, 64, 100, 512):
        buckets = batch_buckets(largest)
        assert buckets[-1] == largest and buckets == sorted(set(buckets))
        for rows in range(1, largest + 1):
            padded = next(b for b in buckets if b >= rows)
            # at most double below 8, 7 past it, 15 past 256
            assert padded - rows <= (rows if rows <= 8 else 7 if rows <= 256 else 15)


def test_padded_decode_steps_give_the_plain_path_s_tokens_as_rows_join_and_leave(model, tokenizer):
    """Greedy and seeded rows of different lengths, five running at a time so rows join and
    leave between steps: every bucket size and padding count occurs. Inputs as
    tests/test_engine.py's batch-invariance test, whose margins hold across kernels."""
    prompts, params = _prompts(12, seed=3), _mixed_params(12)
    config = dict(max_num_seqs=5, max_num_batched_tokens=40)
    plain = _engine(model, tokenizer, False, **config).generate(prompts, params, progress=False)
    for prompt, p, c in zip(prompts, params, plain, strict=True):  # padding rounds otherwise
        if p.temperature == 0:
            assert_clear_choices(choice_logits(model, prompt, c.token_ids))
    padded_engine = _engine(model, tokenizer, True, **config)
    padded = padded_engine.generate(prompts, params, progress=False)
    assert [c.token_ids for c in padded] == [c.token_ids for c in plain]
    assert padded_engine.stats()["blocks_in_use"] == 0


def _assert_same_greedy_logprobs(model, prompts, want, got) -> None:
    """Greedy completions with 3 top log-probabilities each, from two paths that round
    otherwise: no near-tie among the 3 top tokens compared, the tokens equal, the
    log-probabilities within float32's tolerance."""
    for prompt, a, b in zip(prompts, want, got, strict=True):
        assert_clear_choices(choice_logits(model, prompt, a.token_ids), ranks=3)
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
            assert_close([y.logprob, *(v for _, v in y.top)], [x.logprob, *(v for _, v in x.top)])


def test_padded_decode_logprobs_match_the_plain_path(model, tokenizer):
    prompts = _prompts(6, seed=4)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=3)
    config = dict(max_num_seqs=4)
    plain = _engine(model, tokenizer, False, **config).generate(prompts, params, progress=False)
    padded = _engine(model, tokenizer, True, **config).generate(prompts, params, progress=False)
    _assert_same_greedy_logprobs(model, prompts, plain, padded)


@pytest.mark.parametrize("layers", ["all", "mixed"])
def test_padded_decode_steps_of_sliding_window_layers_give_the_plain_path_s_tokens(
    layers, tokenizer
):
    """Models whose every layer slides (Mistral) or every other one (Gemma 3), a window of 8
    over blocks of 4, rows decoding 40 positions past prompts of 3 to 30: a padded step reads
    each row's last 8 positions of a sliding layer (``decode_attention``'s window, as the
    captured step's kernel does), the plain path its held history masked to the window."""
    model = windowed_model(layers, tokenizer.vocab_size, seed=1)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(1, 500, (n,), generator=g).tolist() for n in (3, 17, 30, 9)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=3)
    config = dict(max_num_seqs=3, kv_block_size=4)
    plain = _engine(model, tokenizer, False, **config).generate(prompts, params, progress=False)
    padded_engine = _engine(model, tokenizer, True, **config)
    padded = padded_engine.generate(prompts, params, progress=False)
    _assert_same_greedy_logprobs(model, prompts, plain, padded)
    assert padded_engine.stats()["graph_steps"] > 40


def _joining_prompts(n: int, seed: int) -> list[list[int]]:
    """Prompts of 3 to 50 tokens, every other one starting with the same 20 (prefix-cache hits:
    its chunk then follows cached positions)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(1, 500, (20,), generator=g).tolist()
    prompts = []
    for i in range(n):
        tail = torch.randint(1, 500, (3 + (i * 13) % 31,), generator=g).tolist()
        prompts.append(head + tail if i % 2 else tail)
    return prompts


def test_steps_where_prompts_join_running_rows_replay_the_graphs_with_the_plain_path_s_outputs(
    model, tokenizer
):
    """Continuous batching's mixed steps (prompt chunks beside decode rows, a chunk after its
    prompt's cached head, a long prompt over several chunks) all run through the padded
    forward, one row per prompt token, and give every row the plain path's greedy tokens and
    log-probabilities."""
    prompts = _joining_prompts(9, seed=2)
    params = [
        SamplingParams(max_tokens=3 + (i * 5) % 11, temperature=0, ignore_eos=True, logprobs=3)
        for i in range(len(prompts))
    ]
    config = dict(max_num_seqs=3, max_num_batched_tokens=24)
    plain = _engine(model, tokenizer, False, **config).generate(prompts, params, progress=False)
    padded_engine = _engine(model, tokenizer, True, **config)
    assert padded_engine.runner.decode_graphs.max_rows == 24  # no step has more
    padded = padded_engine.generate(prompts, params, progress=False)
    _assert_same_greedy_logprobs(model, prompts, plain, padded)
    stats = padded_engine.stats()
    assert stats["graph_steps"] == padded_engine.steps  # prefill and mixed steps too
    assert stats["prefix_cache_hit_tokens"] > 0 and stats["blocks_in_use"] == 0


def test_steps_with_running_rows_take_prompt_tokens_only_as_far_as_the_largest_graph(
    model, tokenizer
):
    """With graphs, a prompt joining running rows goes in chunks that keep each step within
    the largest bucket, replayed, where it would have taken the token budget in one eager
    step; a step of prompts alone still takes the budget. The outputs are the plain path's."""
    prompts = _joining_prompts(6, seed=9)
    params = [
        SamplingParams(max_tokens=2 + (i * 5) % 9, temperature=0, ignore_eos=True)
        for i in range(len(prompts))
    ]
    config = dict(max_num_seqs=2, max_num_batched_tokens=48)
    plain = _engine(model, tokenizer, False, **config).generate(prompts, params, progress=False)
    graphed = _engine(model, tokenizer, True, max_cudagraph_capture_size=8, **config)
    steps = []  # (decode rows, positions) of each step
    schedule = graphed.scheduler.schedule

    def recorded(*args, **kwargs):
        batch = schedule(*args, **kwargs)
        steps.append((len(batch.decode), len(batch.decode) + sum(n for _, n in batch.prefill)))
        return batch

    graphed.scheduler.schedule = recorded
    got = graphed.generate(prompts, params, progress=False)
    assert [c.token_ids for c in got] == [c.token_ids for c in plain]
    assert any(decode and n > 1 + decode for decode, n in steps)  # prompts joined running rows
    assert all(n <= 8 for decode, n in steps if decode)
    assert any(n > 8 for decode, n in steps if not decode)
    assert graphed.stats()["graph_steps"] == sum(n <= 8 for _, n in steps)


def _graph_steps_through_the_kernel(family: str, **overrides) -> None:
    """The mixed steps above with every Triton kernel a GPU runs in the padded forward, where
    Triton interprets them: the decode kernel attending over the tiles ``DecodeGraphs.run``
    writes into its buffer (a prompt chunk's tokens together), the KV store, and the model's
    RMSNorm, rotary embedding and SwiGLU: the plain path's greedy tokens and
    log-probabilities. ``overrides``: of the model's config."""
    from arlm.kv_cache import paged
    from arlm.model import transformer
    from arlm.tokenizer import Tokenizer
    from arlm.train.corpus import builtin_documents

    tokenizer = Tokenizer.train(builtin_documents(), vocab_size=512)
    model = make_model(family, vocab_size=tokenizer.vocab_size, seed=5, n_layer=2, **overrides)
    prompts = _joining_prompts(5, seed=3)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=3)
    config = dict(max_num_seqs=3, max_num_batched_tokens=24)
    plain = _engine(model, tokenizer, False, **config).generate(prompts, params, progress=False)
    paged.decode_attention = functools.partial(decode_attention, use_triton=True)
    paged.fused_inference = transformer.fused_inference = lambda x: not torch.is_grad_enabled()
    padded_engine = _engine(model, tokenizer, True, **config)
    padded = padded_engine.generate(prompts, params, progress=False)
    _assert_same_greedy_logprobs(model, prompts, plain, padded)
    assert padded_engine.stats()["graph_steps"] == padded_engine.steps


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize("qk_norm", [False, True])
def test_graph_steps_give_the_plain_path_s_outputs_through_the_kernel_s_tiles(qk_norm):
    """What a GPU runs in a replayed step with prompt chunks, short of the capture: the
    decode kernel over the tiles of the step's buffer, 8 rows a tile with the Llama's two query
    heads per KV head, and the KV store's and the model's kernels (Triton's interpreter, a
    process of its own; tiles of other sizes: the kernel tests below); with Qwen3's query and
    key norms, which the rotary kernel applies too."""
    run_interpreted("from tests.test_cuda_graphs import _graph_steps_through_the_kernel as run; "
                 f"run('llama', qk_norm={qk_norm})")  # fmt: skip


def test_steps_past_the_capture_size_or_scoring_prompts_run_eagerly(model, tokenizer):
    """``max_cudagraph_capture_size`` bounds the steps the graphs take: larger ones run the
    plain forward, and so does a step that scores prompt positions (it needs logits at all of
    them); outputs are the same either way."""
    prompts = _joining_prompts(5, seed=7)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=2)
    config = dict(max_num_seqs=2, max_num_batched_tokens=32)
    plain = _engine(model, tokenizer, False, **config)
    bounded = _engine(model, tokenizer, True, max_cudagraph_capture_size=8, **config)
    assert bounded.runner.decode_graphs.buckets == [1, 2, 4, 8]
    want = plain.generate(prompts, params, progress=False)
    got = bounded.generate(prompts, params, progress=False)
    for a, b in zip(want, got, strict=True):
        assert b.token_ids == a.token_ids
        assert [x and x.token_id for x in b.prompt_logprobs] == [
            x and x.token_id for x in a.prompt_logprobs
        ]
        assert_close(
            [x.logprob for x in b.prompt_logprobs[1:]], [x.logprob for x in a.prompt_logprobs[1:]]
        )
    stats = bounded.stats()
    # every prefill step scored prompt positions, eagerly; the decode-only ones replayed
    assert 0 < stats["graph_steps"] < bounded.steps
    with pytest.raises(ValueError, match="max_cudagraph_capture_size=0 is not allowed"):
        EngineConfig(max_cudagraph_capture_size=0)


def test_a_compiled_padded_step_gives_the_uncompiled_tokens_and_logprobs(tokenizer):
    """``enable_torch_compile``'s forward (torch.compile over the padded decode step, the batch
    size symbolic), run eagerly on the CPU: six greedy rows four at a time, so buckets of 4 and
    2 run through the one compiled graph (a bucket of 1 would compile another: 30 s here).
    Fused kernels round otherwise."""
    model = make_model("llama", vocab_size=tokenizer.vocab_size, seed=5)
    prompts = _prompts(6, seed=4)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3)
    # steps of up to 4 positions: a prompt's larger steps would compile more graphs
    plain = _engine(model, tokenizer, True, max_num_seqs=4, max_cudagraph_capture_size=4)
    compiled = _engine(model, tokenizer, False, max_num_seqs=4, max_cudagraph_capture_size=4)
    compiled.use_decode_graphs(capture=False, compile=True)
    want = plain.generate(prompts, params, progress=False)
    got = compiled.generate(prompts, params, progress=False)
    _assert_same_greedy_logprobs(model, prompts, want, got)
    assert compiled.stats()["graph_steps"] > 10
    with pytest.raises(ValueError, match="enable_torch_compile .* none runs here: not a CUDA"):
        Engine(model, tokenizer, config=EngineConfig(enable_torch_compile=True))


def test_a_padding_row_changes_no_other_row(model, tokenizer):
    """The logits of 3 rows padded to a bucket of 4 equal each row's alone (bucket 1), and the
    padding writes only the spare block."""
    engine = _engine(model, tokenizer, True, max_num_seqs=8)
    runner = engine.runner
    prompts = _prompts(3, seed=9)
    for p in prompts:
        engine.add_request(p, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    engine.step()  # prefill all three: every row now decodes
    rows = list(engine.scheduler.running)
    graphs: DecodeGraphs = runner.decode_graphs
    assert graphs.bucket(3) == 4
    spare = runner.cache.spare
    before = [p[:spare].clone() for p in runner.cache.k[0]]
    tokens = [s.token_ids[s.num_cached] for s in rows]
    positions = [s.num_cached for s in rows]
    tables = [s.block_table for s in rows]
    spans = [PagedRow(s.block_table, s.num_cached, 1) for s in rows]
    together = graphs.run(spans, tokens, [0, 1, 2]).clone()
    after = [p[:spare] for p in runner.cache.k[0]]
    for i in range(3):
        alone = graphs.run(spans[i : i + 1], tokens[i : i + 1], [0])
        assert_close(together[i], alone[0])
    # the step wrote each row's own position and nothing else outside the spare block
    bs = engine.block_size
    written = {(t[p // bs], p % bs) for t, p in zip(tables, positions, strict=True)}
    for b, a in zip(before, after, strict=True):
        changed = (b != a).any(dim=-1).nonzero().tolist()  # (block, head, offset)
        assert {(blk, off) for blk, _, off in changed} == written


def test_the_windowed_cache_is_refused_with_the_reason(tokenizer):
    model = make_model("llama", vocab_size=tokenizer.vocab_size)
    engine = Engine(model, tokenizer, CacheConfig(window=16))
    with pytest.raises(ValueError, match="windowed KV cache"):
        engine.use_decode_graphs(capture=False)
    assert engine.eager_reason == "not a CUDA device"


@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_padded_decode_steps_over_quantized_blocks_give_the_plain_path_s_tokens(tokenizer, kv):
    """int8 and int4 blocks through the padded decode step (the kernel's reference decodes
    them here, the kernel as it reads them on CUDA): the plain path's greedy tokens and
    log-probabilities, which read the same stored codes."""
    model = make_model("llama", vocab_size=tokenizer.vocab_size, seed=5)
    prompts = _prompts(6, seed=4)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3)
    config = dict(max_num_seqs=4)
    cache = CacheConfig(dtype=kv)
    plain = Engine(model, tokenizer, cache, EngineConfig(kv_cache_memory_gib=0.02, **config))
    padded = Engine(model, tokenizer, cache, EngineConfig(kv_cache_memory_gib=0.02, **config))
    padded.use_decode_graphs(capture=False)
    want = plain.generate(prompts, params, progress=False)
    got = padded.generate(prompts, params, progress=False)
    for a, b in zip(want, got, strict=True):
        assert b.token_ids == a.token_ids
        assert_close([t.logprob for t in b.logprobs], [t.logprob for t in a.logprobs])
    assert padded.stats()["graph_steps"] > 10


def _rows(device: str, n_head: int, n_kv_head: int, head_dim: int, kv: str = "auto"):
    """Six rows' queries, their block tables over one pool of keys and values stored through
    the ``kv`` codec, and their lengths: (q, codec, k planes, v planes, tables, lengths)."""
    g = torch.Generator().manual_seed(0)
    rows, bs, width = 6, 16, 19  # up to 304 positions a row
    codec = make_codec(kv, torch.float32)
    shape = (rows * width, n_kv_head, bs, head_dim)
    k, v = ([p.to(device) for p in codec.encode(torch.randn(shape, generator=g))] for _ in "kv")
    lengths = torch.tensor([1, 63, 64, 65, 200, 300], device=device)
    # every row's blocks scattered over the pool; rows 1 and 2 share their first two
    tables = torch.randperm(rows * width, generator=g).view(rows, width)
    tables[2, :2] = tables[1, :2]
    tables = tables.to(device)
    q = torch.randn(rows, n_head, head_dim, generator=g).to(device)
    return q, codec, k, v, tables, lengths


# a step's rows as spans of one sequence each (a graph step's layout): a decode row, a prompt
# chunk of 21 positions after 50 cached ones (a tile across the splits' edge at 64, where its
# shorter rows see nothing), a verify row's pending token and two guesses, a decode row of 300
# positions, three padding rows on a block of their own; (rows, first length)
SPANS = [(1, 5), (21, 51), (3, 100), (1, 300), (3, 1)]


def _span_rows(device: str, n_head: int, n_kv_head: int, head_dim: int, kv: str = "auto"):
    """``_rows``' tuple for the rows of ``SPANS``, each span's rows on its sequence's table at
    consecutive lengths, and the kernel's tiles for them (padded with empty ones to a tile
    a row, as a graph's buffer is): (q, codec, k planes, v planes, tables, lengths, tiles)."""
    g = torch.Generator().manual_seed(1)
    bs, width = 16, 19
    codec = make_codec(kv, torch.float32)
    shape = (len(SPANS) * width, n_kv_head, bs, head_dim)
    k, v = ([p.to(device) for p in codec.encode(torch.randn(shape, generator=g))] for _ in "kv")
    span_tables = torch.randperm(len(SPANS) * width, generator=g).view(len(SPANS), width)
    counts = [n for n, _ in SPANS]
    tables = span_tables.repeat_interleave(torch.tensor(counts), dim=0).to(device)
    lengths = torch.tensor([first + i for n, first in SPANS for i in range(n)], device=device)
    rows = len(lengths)
    tiles = row_tiles(counts, rows_per_tile(n_head // n_kv_head))
    tiles = torch.tensor(tiles + [0] * (2 * rows - len(tiles)), device=device).view(rows, 2)
    q = torch.randn(rows, n_head, head_dim, generator=g).to(device)
    return q, codec, k, v, tables, lengths, tiles


def _kernel_against_reference(
    device: str,
    n_head: int,
    n_kv_head: int,
    head_dim: int,
    window: int | None = None,
    kv: str = "auto",
    splits: int | None = None,
    tiled: bool = False,
    softcap: float | None = None,
) -> None:
    """``splits``: the sequence split so many ways (None: as ``num_splits`` chooses);
    ``tiled``: the rows of ``SPANS`` in the kernel's tiles, else ``_rows``' one a program;
    ``softcap``: the scores' tanh cap."""
    if tiled:
        q, codec, k, v, tables, lengths, tiles = _span_rows(device, n_head, n_kv_head, head_dim, kv)
    else:
        q, codec, k, v, tables, lengths = _rows(device, n_head, n_kv_head, head_dim, kv)
        tiles = None
    scale = head_dim**-0.5
    args = (q, codec, k, v, tables, lengths, scale)
    chosen = decode_attention_module.num_splits
    if splits is not None:  # on CUDA this runs in the test process: put it back after
        decode_attention_module.num_splits = lambda *_: splits
    try:
        got = decode_attention(*args, window=window, tiles=tiles, softcap=softcap, use_triton=True)
    finally:
        decode_attention_module.num_splits = chosen
    want = decode_attention_reference(*args, window, softcap)
    # weighted means of values of size max|v|, summed in another order (the kernel's splits)
    assert_close(got, want, scale=codec.decode(v, torch.float32).abs().max().item())
    # the last split of each program put its counter back for the next launch
    assert not split_counters(q.device, 0).any()


def test_the_reference_with_a_window_attends_over_each_row_s_last_positions():
    """The reference the kernel is checked against, with a sliding window of 50: each row's
    query over its own last 50 positions (fewer where it has fewer), taken out by hand."""
    q, codec, (k,), (v,), tables, lengths = _rows("cpu", 8, 2, 24)
    got = decode_attention_reference(q, codec, [k], [v], tables, lengths, 24**-0.5, 50)
    for b, n in enumerate(lengths.tolist()):
        # the row's positions in order: block after block of its table
        keys, values = (x[tables[b]].transpose(0, 1).flatten(1, 2) for x in (k, v))
        seen = slice(max(0, n - 50), n)
        want = F.scaled_dot_product_attention(
            q[b][None, :, None],
            keys[None, :, seen],
            values[None, :, seen],
            scale=24**-0.5,
            enable_gqa=True,
        )
        assert_close(got[b], want[0, :, 0])


def test_the_reference_with_a_cap_bends_each_score_before_the_softmax():
    """The reference with Gemma 2's cap of 0.5 and a window of 50: each row's scores over its
    last 50 positions become 0.5 * tanh(score / 0.5), then the softmax, taken out by hand;
    and the cap changes the result (the scores reach past it)."""
    q, codec, (k,), (v,), tables, lengths = _rows("cpu", 8, 2, 24)
    scale = 24**-0.5
    got = decode_attention_reference(q, codec, [k], [v], tables, lengths, scale, 50, 0.5)
    uncapped = decode_attention_reference(q, codec, [k], [v], tables, lengths, scale, 50)
    for b, n in enumerate(lengths.tolist()):
        keys, values = (x[tables[b]].transpose(0, 1).flatten(1, 2) for x in (k, v))
        seen = slice(max(0, n - 50), n)
        keys, values = (x[:, seen].repeat_interleave(4, dim=0) for x in (keys, values))
        scores = 0.5 * torch.tanh(q[b][:, None] @ keys.transpose(1, 2) * scale / 0.5)
        want = (torch.softmax(scores, -1) @ values)[:, 0]
        assert_close(got[b], want)
        if n > 1:
            assert not torch.allclose(got[b], uncapped[b], atol=1e-3)


def test_tiles_take_up_to_their_size_of_one_span_s_rows():
    """A tile never holds two spans' rows (they read different tables) nor more than its
    size; every row is in exactly one tile, in order."""
    assert row_tiles([1, 21, 3, 1], 4) == [
        0, 1, 1, 4, 5, 4, 9, 4, 13, 4, 17, 4, 21, 1, 22, 3, 25, 1,
    ]  # fmt: skip
    assert row_tiles([2, 2], 1) == [0, 1, 1, 1, 2, 1, 3, 1]
    assert [rows_per_tile(g) for g in (1, 2, 3, 4, 8, 16, 32)] == [16, 8, 4, 4, 2, 1, 1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize(
    "n_head,n_kv_head,head_dim,window,kv,splits,tiled",
    [
        (4, 4, 16, None, "auto", None, False),
        (8, 2, 24, None, "auto", None, False),
        (6, 1, 64, None, "auto", None, False),
        (8, 2, 24, 50, "auto", None, False),
        (4, 4, 16, 64, "auto", None, False),
        (8, 2, 24, None, "int8", None, False),
        (8, 2, 24, 50, "int4", None, False),
        (4, 2, 128, 50, "int8", None, False),  # 32 positions a loop step (``tile``)
        (8, 2, 24, None, "auto", 1, False),  # one split: many rows on a GPU
        (8, 2, 24, None, "auto", 3, False),  # a split count that is not a power of two
        (4, 4, 16, None, "auto", None, True),  # tiles of 16 rows: one chunk's in two
        (8, 2, 24, None, "auto", 3, True),  # of 4 rows, over three splits
        (6, 1, 64, 30, "auto", None, True),  # of 2 rows (8 heads padded), a window of 30
        (8, 2, 24, 8, "int8", None, True),  # a window shorter than a tile's span
        (4, 4, 16, 50, "int4", 1, True),
    ],
)
def test_the_triton_kernel_equals_the_reference(
    n_head, n_kv_head, head_dim, window, kv, splits, tiled
):
    """The kernel, compiled on CUDA, else run by Triton's interpreter on the CPU: grouped
    heads, a head size that is not a power of two, lengths at and across its blocks of 64 and
    its splits, sliding windows that cut the longer rows (from inside a block of 64, and at
    one's edge), int8 and int4 blocks decoded as they are read, a head size of 128 (loop
    steps of 32 positions), the splits' results merged by the last split of each program (4
    splits, the shorter rows' later ones empty; one; three); and the tiles a graph step's
    kernel takes (``row_tiles``): a prompt chunk's and a verify row's positions sharing
    programs, each query over its own row's positions (a row of a tile may see none of a
    split, or, with a window, none of the tile's first positions). Interpreted in a process of
    its own (``run_interpreted``). That the kernel compiles for a GPU:
    tests/test_kernel_compile.py."""
    if torch.cuda.is_available():
        _kernel_against_reference("cuda", n_head, n_kv_head, head_dim, window, kv, splits, tiled)
        return
    run_interpreted(
        "from tests.test_cuda_graphs import _kernel_against_reference as check; "
        f"check('cpu', {n_head}, {n_kv_head}, {head_dim}, {window}, {kv!r}, {splits}, {tiled})"
    )


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
@pytest.mark.parametrize(
    "n_head,n_kv_head,head_dim,window,kv,splits,tiled",
    [
        (8, 2, 24, 50, "auto", None, False),  # lone rows, a window, four splits
        (8, 2, 24, None, "int8", 1, True),  # tiles, int8 blocks, one split
    ],
)
def test_the_triton_kernel_caps_scores_as_the_reference(
    n_head, n_kv_head, head_dim, window, kv, splits, tiled
):
    """Gemma 2's cap on the scores (0.5: most scores reach past it) in the kernel as in the
    reference, for lone rows and a graph step's tiles."""
    if torch.cuda.is_available():
        _kernel_against_reference(
            "cuda", n_head, n_kv_head, head_dim, window, kv, splits, tiled, 0.5
        )
        return
    run_interpreted(
        "from tests.test_cuda_graphs import _kernel_against_reference as check; "
        f"check('cpu', {n_head}, {n_kv_head}, {head_dim}, {window}, {kv!r}, {splits}, {tiled}, 0.5)"
    )


def _launches_in_turn(device: str) -> None:
    """Lone rows over three splits, a graph step's tiles over four (a window of 50), lone
    rows of other heads over int8 blocks and two splits, one launch after another."""
    _kernel_against_reference(device, 8, 2, 24, None, "auto", 3, False)
    _kernel_against_reference(device, 8, 2, 24, 50, "auto", 4, True)
    _kernel_against_reference(device, 4, 4, 16, None, "int8", 2, False)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_launches_one_after_another_each_merge_their_own_splits():
    """The splits' counters are one buffer for every launch: each launch of
    ``_launches_in_turn`` equals the reference and leaves them at 0 (a counter left short by
    one launch would keep the next from merging)."""
    if torch.cuda.is_available():
        _launches_in_turn("cuda")
        return
    run_interpreted(
        "from tests.test_cuda_graphs import _launches_in_turn; _launches_in_turn('cpu')"
    )


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _eager_and_graphed(model, tokenizer, prompts, params, cache=None, **config) -> Engine:
    """The same requests through an engine that launches every step and one that replays
    graphs, asserted to give the same tokens; the graphed engine, for its stats."""
    eager = Engine(model, tokenizer, cache, EngineConfig(enforce_eager=True, **config))
    graphed = Engine(model, tokenizer, cache, EngineConfig(**config))
    assert eager.eager_reason == "enforce_eager" and graphed.eager_reason is None
    want = eager.generate(prompts, params, progress=False)
    got = graphed.generate(prompts, params, progress=False)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    return graphed


def _cuda_llama(kind: str, tokenizer):
    """The Llama test model on CUDA, or ("moe") its mixture-of-experts layout in bfloat16 (the
    dtype grouped products take there)."""
    if kind == "moe":
        model = make_model("llama", vocab_size=tokenizer.vocab_size, seed=5, **MOE)
        return model.to("cuda", torch.bfloat16)
    return make_model("llama", vocab_size=tokenizer.vocab_size, seed=5).cuda()


@cuda
def test_a_mixture_of_experts_is_captured_and_gives_the_eager_tokens(tokenizer):
    """bfloat16 experts are stacked and run as grouped products through the graphs; the eager
    engine's steps on the same (stacked) model give the same tokens."""
    model = _cuda_llama("moe", tokenizer)
    prompts = _prompts(6, seed=1)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    graphed = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=8))
    assert graphed.eager_reason is None and model.h[0].mlp.stacked is not None
    got = graphed.generate(prompts, params, progress=False)
    eager = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=8, enforce_eager=True))
    want = eager.generate(prompts, params, progress=False)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert graphed.stats()["graph_steps"] > 30


@cuda
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cuda_graph_steps_give_the_eager_tokens(tokenizer, family):
    """Over 100 engine steps with rows joining and leaving: replayed graphs against plain
    launches, float32 (the inputs of the CPU batch-invariance test). No step has more than
    40 positions, so every one replays a graph, prompt chunks beside decode rows too."""
    model = make_model(family, vocab_size=tokenizer.vocab_size, seed=5).cuda()
    prompts, params = _prompts(16, seed=3), _mixed_params(16)
    config = dict(max_num_seqs=5, max_num_batched_tokens=40)
    graphed = _eager_and_graphed(model, tokenizer, prompts, params, **config)
    stats = graphed.stats()
    assert stats["steps"] >= 100 and stats["graph_steps"] == graphed.steps
    assert stats["graph_capture_seconds"] > 0 and stats["graph_capture_bytes"] >= 0


@cuda
@pytest.mark.parametrize("layers", ["all", "mixed"])
def test_sliding_window_layers_are_captured_and_give_the_eager_tokens(tokenizer, layers):
    """Windowed models (a window of 8) run their decode steps through the graphs, the kernel
    reading each row's window; the same greedy tokens as eager steps, 60 positions past it."""
    model = windowed_model(layers, tokenizer.vocab_size, seed=1).cuda()
    prompts = _prompts(6, seed=3)
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    graphed = _eager_and_graphed(model, tokenizer, prompts, params, max_num_seqs=4, kv_block_size=4)
    assert graphed.stats()["graph_steps"] > 60


@cuda
@pytest.mark.parametrize("kv", ["int8", "int4"])
def test_quantized_blocks_are_captured_and_give_the_eager_tokens(tokenizer, kv):
    """int8 and int4 KV caches run their decode steps through the graphs, the kernel decoding
    the blocks it reads; the same greedy tokens as eager steps (the same kernel)."""
    model = make_model("llama", vocab_size=tokenizer.vocab_size, seed=5).cuda()
    prompts = _prompts(6, seed=3)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    graphed = _eager_and_graphed(
        model, tokenizer, prompts, params, CacheConfig(dtype=kv), max_num_seqs=4
    )
    assert graphed.stats()["graph_steps"] > 30


@cuda
@pytest.mark.parametrize("kind", ["llama", "moe"])
def test_a_graph_decode_step_never_waits_for_the_device_but_for_its_sampled_ids(tokenizer, kind):
    """torch's sync debug mode raises on any implicit synchronisation (``.item()``, a pageable
    copy, ``.tolist()`` of a device tensor); the step's one wait is an event's, for the ids of
    the step before (overlap scheduling, on by default on CUDA). A mixture of experts too: its
    grouped products count each expert's tokens on the device."""
    model = _cuda_llama(kind, tokenizer)
    engine = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=8))
    for p in _prompts(6, seed=1):
        params = SamplingParams(max_tokens=40, temperature=0.7, seed=1, ignore_eos=True)
        engine.add_request(p, params)
    engine.step()  # the prefill
    before = engine.stats()["graph_steps"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert engine.stats()["graph_steps"] == before + 10
    assert engine.stats()["overlapped_steps"] >= 9  # each launched before the last landed


@cuda
def test_verify_steps_replay_captured_graphs_and_give_the_greedy_tokens(tokenizer):
    """Prompt lookup on CUDA, float32: verify rows (one graph row per position) replayed from
    the captured graphs give the tokens of decoding without speculation."""
    model = make_model("llama", vocab_size=tokenizer.vocab_size, seed=5).cuda()
    prompts = [p * 3 for p in _prompts(6, seed=2)]  # repeated: prompt lookup finds guesses
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    spec = SpeculativeConfig(method="ngram", num_speculative_tokens=3, adaptive=False)
    plain = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=4))
    speculating = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=4), speculative=spec)
    assert speculating.eager_reason is None
    want = plain.generate(prompts, params, progress=False)
    got = speculating.generate(prompts, params, progress=False)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    stats = speculating.stats()
    assert stats["spec_decode_num_draft_tokens"] > 0
    assert stats["graph_steps"] > stats["steps"] // 2  # verify steps replay graphs too


@cuda
def test_a_draft_model_s_steps_replay_graphs_of_their_own(tokenizer):
    """The target as its own greedy draft on CUDA, float32: the draft's one-token steps replay
    its captured graphs, its guesses are the target's own (all accepted but where the two
    paths' rounding splits a near-tie), and the tokens are those of decoding without
    speculation."""
    model = make_model("llama", vocab_size=tokenizer.vocab_size, seed=5).cuda()
    prompts = _prompts(6, seed=2)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    spec = SpeculativeConfig(
        method="draft", draft_model="(in memory)", num_speculative_tokens=3, adaptive=False
    )
    config = EngineConfig(max_num_seqs=4)
    plain = Engine(model, tokenizer, config=config)
    speculating = Engine(model, tokenizer, config=config, speculative=spec, draft=model)
    want = plain.generate(prompts, params, progress=False)
    got = speculating.generate(prompts, params, progress=False)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert speculating.speculator.proposer.runner.decode_graphs.steps > 0
    stats = speculating.stats()
    drafted = stats["spec_decode_num_draft_tokens"]
    assert drafted > 0 and stats["spec_decode_num_accepted_tokens"] >= 0.9 * drafted

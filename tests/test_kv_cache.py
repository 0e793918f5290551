"""KV cache kinds against the contiguous cache, the engine's paged cache, the window, and
accounting."""

import math

import pytest
import torch

from arlm.api import LM
from arlm.config import ModelConfig
from arlm.engine import EngineConfig
from arlm.kv_cache import (
    CacheConfig,
    KVCache,
    PagedKVCache,
    PagedRow,
    StepLayout,
    WindowedKVCache,
    make_codec,
)
from arlm.kv_cache.base import capped_attention, sdpa, storage_bytes
from arlm.kv_cache.codec import quantize_int4, quantize_int8
from tests.conftest import make_model
from tests.numerics import assert_clear_choices, assert_close

FAMILIES = ["gpt2", "llama"]


def run_chunks(model, cache, seq, chunks):
    """Logits (B, sum(chunks), V) of ``seq`` fed through ``cache`` in forwards of ``chunks``."""
    out, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(seq[:, pos : pos + n], kv_cache=cache, start_pos=pos)[0])
            pos += n
    return torch.cat(out, 1)


def prefill_then_decode(model, cache, seq, prompt=16):
    return run_chunks(model, cache, seq, [prompt] + [1] * (seq.size(1) - prompt))


def greedy(model, cache, prompt, steps):
    with torch.no_grad():
        logits, _ = model(prompt, kv_cache=cache, last_only=True)
        tokens = [logits[:, -1].argmax(-1)]
        for pos in range(prompt.size(1), prompt.size(1) + steps - 1):
            logits, _ = model(tokens[-1][:, None], kv_cache=cache, start_pos=pos)
            tokens.append(logits[:, -1].argmax(-1))
    return torch.stack(tokens, 1)


def random_tokens(shape, seed):
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


def codec(name):
    return make_codec(name, torch.float32)


# --- the paged cache, driven as the engine drives it ---


def interleaved_tables(n_seqs: int, blocks_each: int) -> dict[int, list[int]]:
    """Block tables whose blocks interleave in the pool, in reverse: nothing is contiguous."""
    return {s: [s + n_seqs * j for j in range(blocks_each)][::-1] for s in range(n_seqs)}


def step(model, cache, tables, seqs, decode=(), chunks=(), logits_at=None):
    """Logits (N or K, V) of one engine forward: ``decode`` rows (sequence, position) and then
    ``chunks`` (sequence, start, length), the tokens laid out flat, each at its own position.
    ``seqs[s]`` is the token ids (1, L) of sequence s, ``tables[s]`` its block table."""
    layout = StepLayout(
        [PagedRow(tables[s], p, 1) for s, p in decode],
        [PagedRow(tables[s], start, n) for s, start, n in chunks],
    )
    tokens = [int(seqs[s][0, p]) for s, p in decode]
    for s, start, n in chunks:
        tokens.extend(seqs[s][0, start : start + n].tolist())
    cache.reserve(1 + max(b for t in tables.values() for b in t))
    with torch.no_grad():
        logits, _ = model(
            torch.tensor([tokens]),
            kv_cache=cache.step(layout),
            positions=torch.tensor([layout.positions()]),
            logits_at=logits_at,
        )
    return logits[0]


def paged(config, n_seqs: int, length: int, kv_dtype: str = "float32", block_size: int = 8):
    blocks = -(-length // block_size)
    cache = PagedKVCache.for_model(config, n_seqs * blocks, block_size, codec=codec(kv_dtype))
    return cache, interleaved_tables(n_seqs, blocks)


def paged_prefill_then_decode(model, cache, tables, seq, prompt=16):
    """Logits (B, L, V) of the B rows of ``seq``: one forward prefilling every row (a chunk
    each), then one decode forward per position with every row in it."""
    B, L = seq.shape
    seqs = {b: seq[b : b + 1] for b in range(B)}
    out = [step(model, cache, tables, seqs, chunks=[(b, 0, prompt) for b in range(B)])]
    out[0] = out[0].view(B, prompt, -1)
    for pos in range(prompt, L):
        out.append(step(model, cache, tables, seqs, decode=[(b, pos) for b in range(B)])[:, None])
    return torch.cat(out, 1)


def paged_greedy(model, cache, tables, prompt, steps):
    """Greedy tokens (B, steps) of the B prompts decoded in one forward per step; the prefill
    projects only each chunk's last position (``logits_at``), as the engine does."""
    B, n = prompt.shape
    ids = prompt.clone()
    last = torch.arange(1, B + 1) * n - 1
    seqs = dict(enumerate(ids[:, None]))
    logits = step(model, cache, tables, seqs, chunks=[(b, 0, n) for b in range(B)], logits_at=last)
    for pos in range(n, n + steps):
        ids = torch.cat((ids, logits.argmax(-1)[:, None]), 1)
        if pos < n + steps - 1:
            seqs = dict(enumerate(ids[:, None]))
            logits = step(model, cache, tables, seqs, decode=[(b, pos) for b in range(B)])
    return ids[:, n:]


# --- every kind against the contiguous cache ---


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_cache_logits_equal_the_contiguous_cache(family):
    model = make_model(family)
    seq = random_tokens((2, 50), 1)
    contiguous = prefill_then_decode(model, KVCache.for_model(model.config, 2, 50), seq)
    cache, tables = paged(model.config, 2, 50)
    # the two caches hand attention keys laid out differently (the paged decode merges blocks
    # by their log-sum-exp): float32's rounding
    assert_close(paged_prefill_then_decode(model, cache, tables, seq), contiguous)


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_rows_at_their_own_lengths_in_one_forward_match_each_sequence_alone(family):
    model = make_model(family)
    # 0: a 37-token prompt; 1: a 20-token prompt prefilled in chunks of 12 and 8; 2: a 5-token
    # prompt. Every forward mixes rows at different lengths.
    seqs = {
        0: random_tokens((1, 41), 10),
        1: random_tokens((1, 23), 11),
        2: random_tokens((1, 9), 12),
    }
    schedule = [
        dict(chunks=[(0, 0, 37), (1, 0, 12), (2, 0, 5)]),
        dict(decode=[(0, 37), (2, 5)], chunks=[(1, 12, 8)]),
        dict(decode=[(0, 38), (1, 20), (2, 6)]),
        dict(decode=[(0, 39), (2, 7)]),  # 1 sits this one out
        dict(decode=[(1, 21)]),
        dict(decode=[(0, 40), (1, 22), (2, 8)]),
    ]
    cache, tables = paged(model.config, 3, 48)
    with torch.no_grad():
        alone = {s: model(seq)[0][0] for s, seq in seqs.items()}  # each sequence by itself
    checked = 0
    for rows in schedule:
        logits = step(model, cache, tables, seqs, **rows)
        fed = [*rows.get("decode", [])]
        fed += [(s, start + i) for s, start, n in rows.get("chunks", []) for i in range(n)]
        for row, (s, pos) in enumerate(fed):
            assert_close(logits[row], alone[s][pos])
            checked += 1
    assert checked == sum(s.size(1) for s in seqs.values())  # every position of every sequence


# measured on these random models: int8 differs by at most 0.005, int4 by 0.07 (logits ~2.5).
# Quantization's error is ~1e4 times float32's rounding; another CPU's kernels can at most move
# a code by one step where a value sits on a rounding boundary, which the 4x margin covers
INT8_ATOL = 0.02


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_dtype, atol", [("int8", INT8_ATOL), ("int4", 0.25)])
def test_quantized_cache_logits_are_within_a_measured_tolerance(family, kv_dtype, atol):
    model = make_model(family)
    seq = random_tokens((2, 50), 2)
    with torch.no_grad():
        full, _ = model(seq)
    contiguous = KVCache.for_model(model.config, 2, 50, codec=codec(kv_dtype))
    cached = prefill_then_decode(model, contiguous, seq)
    torch.testing.assert_close(cached, full, rtol=0, atol=atol)
    cache, tables = paged(model.config, 2, 50, kv_dtype)
    out = paged_prefill_then_decode(model, cache, tables, seq)
    torch.testing.assert_close(out, full, rtol=0, atol=atol)


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_and_int8_caches_give_the_same_greedy_tokens(family):
    model = make_model(family)
    prompt = random_tokens((2, 6), 3)
    reference = greedy(model, KVCache.for_model(model.config, 2, 46), prompt, 40)
    # the paths round otherwise, and int8 moves the logits by up to INT8_ATOL: this prompt has
    # no near-tie at that size in the reference's choices (the gpt2 margins reach down to 0.07)
    with torch.no_grad():
        choices = model(torch.cat((prompt, reference), 1))[0][:, prompt.size(1) - 1 : -1]
    assert_clear_choices(choices, INT8_ATOL)
    cache, tables = paged(model.config, 2, 46)
    assert torch.equal(paged_greedy(model, cache, tables, prompt, 40), reference)
    int8 = KVCache.for_model(model.config, 2, 46, codec=codec("int8"))
    assert torch.equal(greedy(model, int8, prompt, 40), reference)


# --- the paged cache's storage ---


def test_capped_attention_reads_every_mask_kind_as_sdpa_does():
    """Gemma 2's capped attention against the fused kernels it stands in for: a cap too high to
    bend any score gives ``sdpa``'s result for plain causal alignment (no mask, T == S), a
    lower-right causal bias (what CUDA steps pass), a boolean mask and an additive one, with
    grouped heads; a query that sees no key gets zeros and a log-sum-exp of -inf; and a low
    cap bends the result."""
    from torch.nn.attention.bias import causal_lower_right

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=g)
    k, v = (torch.randn(2, 2, 9, 16, generator=g) for _ in "kv")
    square = (k[:, :, :5], v[:, :, :5])
    visible = torch.rand(5, 9, generator=g) > 0.3
    visible[:, 0] = True
    additive = torch.zeros(5, 9).masked_fill(~visible, float("-inf"))
    cases = [
        (q, *square, None),
        (q, k, v, causal_lower_right(5, 9)),
        (q, k, v, visible),
        (q, k, v, additive),
    ]
    for q_, k_, v_, mask in cases:
        want = torch.nn.functional.scaled_dot_product_attention(
            q_, k_, v_, attn_mask=mask, is_causal=mask is None, enable_gqa=True
        )
        got, lse = capped_attention(q_, k_, v_, mask, None, softcap=1e6)
        assert_close(got, want)
        assert lse.shape == q_.shape[:3]
    blind = visible.clone()
    blind[2] = False
    got, lse = capped_attention(q, k, v, blind, 0.25, softcap=2.0)
    assert (got[:, :, 2] == 0).all() and (lse[:, :, 2] == float("-inf")).all()
    assert torch.isfinite(got).all()
    assert not torch.allclose(sdpa(q, k, v, visible, 1.0, softcap=0.5), sdpa(q, k, v, visible, 1.0))


def test_capped_attention_forms_long_chunks_scores_in_slices(monkeypatch):
    """Outside training a chunk whose scores pass ``CAPPED_SCORES`` goes in slices of its
    queries, each with its rows of the mask: the same results and log-sum-exps as whole."""
    from torch.nn.attention.bias import causal_lower_right

    import arlm.kv_cache.base as base

    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 13, 8, generator=g)
    k, v = (torch.randn(1, 2, 20, 8, generator=g) for _ in "kv")
    masks = [causal_lower_right(13, 20), torch.rand(13, 20, generator=g) > 0.5, None]
    with torch.no_grad():
        whole = [capped_attention(q, k, v, m, 0.3, 1.0) for m in masks]
        monkeypatch.setattr(base, "CAPPED_SCORES", 4 * 20 * 3)  # 3 queries a slice
        for m, (want, want_lse) in zip(masks, whole, strict=True):
            got, lse = capped_attention(q, k, v, m, 0.3, 1.0)
            assert_close(got, want)
            assert_close(lse.nan_to_num(neginf=0.0), want_lse.nan_to_num(neginf=0.0))


def test_growing_the_pool_keeps_what_the_existing_blocks_hold():
    model = make_model("llama")
    cache = PagedKVCache.for_model(model.config, num_blocks=10, block_size=8)
    assert cache.allocated == 0 and cache.nbytes == 0 == storage_bytes(cache)  # lazily
    seqs = {0: random_tokens((1, 26), 13), 1: random_tokens((1, 26), 14)}
    tables = {0: [1, 0, 2, 3], 1: [8, 6, 7, 9]}
    step(model, cache, {0: tables[0]}, seqs, chunks=[(0, 0, 20)])
    assert cache.allocated == 4
    # one chunk alone: its positions held, and stored in the pool only when written back
    # (arlm.kv_cache.held.LoneHistory)
    history = cache.lone_history.nbytes
    assert history and cache.nbytes == storage_bytes(cache) == 4 * cache.block_bytes + history
    assert not any(p[:4].any() for planes in (*cache.k, *cache.v) for p in planes)
    cache.write_back()  # the pool gets them once something reads it
    held = [p[:4].clone() for planes in (*cache.k, *cache.v) for p in planes]
    assert all(h.any() for h in held)
    step(model, cache, tables, seqs, decode=[(0, 20)], chunks=[(1, 0, 21)])  # the pool grows
    assert cache.allocated == 10
    # two rows: the held positions are given back
    assert cache.nbytes == storage_bytes(cache) == cache.allocated * cache.block_bytes
    grown = [p for planes in (*cache.k, *cache.v) for p in planes]
    for plane, before in zip(grown, held, strict=True):
        assert torch.equal(plane[:2], before[:2])  # block 2 took position 20 since
    # and sequence 0 goes on decoding as if nothing moved, beside sequence 1
    with torch.no_grad():
        alone = {s: model(seq)[0][0] for s, seq in seqs.items()}
    for pos in range(21, 26):
        logits = step(model, cache, tables, seqs, decode=[(0, pos), (1, pos)])
        assert_close(logits[0], alone[0][pos])
        assert_close(logits[1], alone[1][pos])
    cache.reserve(2)  # already there: nothing changes
    assert cache.allocated == 10
    with pytest.raises(ValueError, match="block 10 does not exist; the pool has 10"):
        cache.reserve(11)


def test_a_copied_block_decodes_as_the_one_it_copies():
    model = make_model("llama")
    cache = PagedKVCache.for_model(model.config, num_blocks=8, block_size=8)
    seq = random_tokens((1, 30), 15)
    seqs = {0: seq, 1: seq}
    step(model, cache, {0: [5, 1, 4]}, seqs, chunks=[(0, 0, 24)])
    cache.copy_blocks([(5, 2), (1, 0)])  # copy on write: sequence 1 gets its own copies
    planes = [p for layer in (*cache.k, *cache.v) for p in layer]
    assert len(planes) == 2 * model.config.n_layer  # float storage: one plane per k and v
    for p in planes:
        assert p[5].any() and torch.equal(p[2], p[5]) and torch.equal(p[0], p[1])
    # sequence 1 computes only from position 16 on, and gets what the whole sequence gets
    with torch.no_grad():
        alone = model(seq)[0][0]
    tables = {1: [2, 0, 3, 6]}
    logits = [step(model, cache, tables, seqs, chunks=[(1, 16, 8)])]
    for pos in range(24, 30):
        logits.append(step(model, cache, tables, seqs, decode=[(1, pos)]))
    assert_close(torch.cat(logits), alone[16:])


# --- the window with attention sinks ---


def test_window_larger_than_the_sequence_equals_the_contiguous_cache():
    model = make_model("llama")
    seq = random_tokens((2, 60), 4)
    with torch.no_grad():
        full, _ = model(seq)
    windowed = WindowedKVCache.for_model(model.config, 2, window=64, sink_tokens=4)
    assert_close(prefill_then_decode(model, windowed, seq), full)


def test_window_positions_keys_within_the_cache_as_streamingllm_does():
    # one layer: a key depends only on its token and rotary position, so the cached step must
    # equal a plain forward over the kept tokens (sinks, then the window) at positions 0..n-1
    model = make_model("llama", n_layer=1)
    seq = random_tokens((1, 90), 5)
    cache = WindowedKVCache.for_model(model.config, 1, window=16, sink_tokens=4)
    with torch.no_grad():
        for p in range(90):
            step = model(seq[:, p : p + 1], kv_cache=cache, start_pos=p)[0][0, -1]
            kept = [*range(min(p + 1, 4)), *range(max(4, p - 15), p + 1)]
            ref = model(seq[:, kept])[0][0, -1]
            assert_close(step, ref)


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("chunks", [[100], [7] * 14 + [2], [30, 1, 25, 44]])
def test_window_fed_in_chunks_equals_token_by_token(sinks, chunks):
    model = make_model("llama")
    seq = random_tokens((2, 100), 6)
    one = run_chunks(model, WindowedKVCache.for_model(model.config, 2, 16, sinks), seq, [1] * 100)
    chunked = run_chunks(model, WindowedKVCache.for_model(model.config, 2, 16, sinks), seq, chunks)
    assert_close(chunked, one)


def test_window_memory_stops_growing_once_full():
    model = make_model("llama")  # context 128; run 8x past the window of 32
    cache = WindowedKVCache.for_model(model.config, 1, window=32, sink_tokens=4)
    allocated = cache.nbytes
    used = []
    with torch.no_grad():
        for pos, token in enumerate(random_tokens((1, 288), 7)[0]):
            model(token.view(1, 1), kv_cache=cache, start_pos=pos)
            used.append(cache.used_bytes)
            assert cache.nbytes == allocated == storage_bytes(cache)
    assert used[35] == cache.nbytes  # full at 4 + 32 positions
    assert used[35:] == [used[35]] * (288 - 35)
    assert cache.tokens == 36


def test_windowed_generation_runs_past_the_context_of_a_rotary_model(tokenizer):
    model = make_model("llama")  # context 128
    lm = LM(model, tokenizer, CacheConfig(window=32))
    out = lm.generate("The", max_tokens=300, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 300 and out.finish_reason == "length"
    bounded = LM(model, tokenizer).generate("The", max_tokens=300, temperature=0, ignore_eos=True)
    assert len(bounded.token_ids) <= 128  # the contiguous cache stops at the context
    assert out.usage.kv_cache_bytes == out.usage.kv_cache_peak_bytes
    assert out.usage.kv_cache_bytes < bounded.usage.kv_cache_bytes


def test_window_refuses_learned_positions_and_says_why(tokenizer):
    with pytest.raises(ValueError, match="learned absolute position embeddings.*rotary|rotary"):
        LM(make_model("gpt2"), tokenizer, CacheConfig(window=32))


# --- accounting ---


@pytest.mark.parametrize("kv_dtype, per_vector", [("float32", 128), ("int8", 34), ("int4", 20)])
@pytest.mark.parametrize("kind", ["contiguous", "paged", "windowed"])
def test_reported_bytes_equal_the_allocated_tensors_and_the_formula(kind, kv_dtype, per_vector):
    config = ModelConfig.preset("llama-tiny")  # 4 layers, 2 kv heads, head_dim 32
    # per position: k and v, 4 layers, 2 kv heads, one vector of head_dim 32 each
    if kind == "paged":  # the engine's cache: 16 blocks of 8 positions
        cache = PagedKVCache.for_model(config, 16, 8, codec=codec(kv_dtype))
        cache.reserve(16)
        assert cache.bytes_per_token == 2 * 4 * 2 * per_vector
        assert cache.nbytes == storage_bytes(cache) == cache.block_bytes * 16
        assert cache.block_bytes == 8 * cache.bytes_per_token
        return
    settings = {"contiguous": {}, "windowed": {"window": 60}}[kind]
    cache = CacheConfig(dtype=kv_dtype, **settings).build(config, 2, 64)
    assert cache.bytes_per_token == 2 * 4 * 2 * per_vector
    assert cache.nbytes == storage_bytes(cache) == cache.bytes_per_token * cache.capacity
    assert cache.capacity == 2 * 64 and cache.tokens == 0 and cache.used_bytes == 0


def test_quantized_caches_meet_the_memory_targets_at_head_dim_64():
    config = ModelConfig.preset("small")  # head_dim 64
    float32 = KVCache.for_model(config, 1, 256).nbytes
    assert KVCache.for_model(config, 1, 256, codec=codec("int8")).nbytes <= 0.27 * float32
    assert KVCache.for_model(config, 1, 256, codec=codec("int4")).nbytes <= 0.15 * float32


@pytest.mark.parametrize("block_size, max_model_len", [(16, None), (8, 100)])
def test_usage_reports_the_whole_blocks_held_and_the_positions_in_them(
    tokenizer, block_size, max_model_len
):
    model = make_model("gpt2")  # context 128
    config = EngineConfig(kv_block_size=block_size, max_model_len=max_model_len)
    lm = LM(model, tokenizer, engine_config=config)
    out = lm.generate("The", max_tokens=40, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 40
    positions = out.usage.prompt_tokens + len(out.token_ids) - 1  # the last token is not fed
    per_token = 2 * 4 * 4 * 32 * 4  # k and v, 4 layers, 4 heads, head_dim 32, float32
    # held at most: the positions fed, rounded up to whole blocks; of those, the positions
    assert out.usage.kv_cache_bytes == math.ceil(positions / block_size) * block_size * per_token
    assert out.usage.kv_cache_peak_bytes == positions * per_token


# --- quantization primitives ---


def test_quantization_error_is_at_most_half_a_step():
    x = torch.randn(3, 2, 7, 64) * torch.rand(3, 2, 7, 1) * 5
    codes, scale = quantize_int8(x)
    assert codes.dtype == torch.int8 and scale.shape == (3, 2, 7, 1)
    err = (codec("int8").decode([codes, scale], torch.float32) - x).abs()
    assert (err <= scale.float() * 0.5 + 1e-6).all()
    packed, scale, zero = quantize_int4(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 2, 7, 32)  # two codes per byte
    err = (codec("int4").decode([packed, scale, zero], torch.float32) - x).abs()
    assert (err <= scale.float() * 0.5 + 1e-3 * x.abs().amax(-1, keepdim=True)).all()


# --- scoring through the cache ---


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_scoring_through_the_cache_equals_one_forward(family, tokenizer):
    lm = LM(make_model(family), tokenizer)
    ids = random_tokens((100,), 8).tolist()
    whole = lm.score(ids)
    for chunk_size in (1, 7, 64, 200):
        chunked = lm.score(ids, chunk_size=chunk_size)
        assert chunked.token_ids == whole.token_ids
        assert_close(chunked.token_logprobs, whole.token_logprobs)


def test_chunked_scoring_needs_the_text_to_fit_unless_the_cache_is_windowed(tokenizer):
    ids = random_tokens((300,), 9).tolist()
    with pytest.raises(ValueError, match="exceed the context of 128"):
        LM(make_model("llama"), tokenizer).score(ids, chunk_size=32)
    windowed = LM(make_model("llama"), tokenizer, CacheConfig(window=64)).score(ids, chunk_size=32)
    assert len(windowed.token_logprobs) == len(windowed.token_ids) >= 300


@pytest.mark.parametrize(
    "make, settings, message",
    [
        (CacheConfig, {"dtype": "int3"}, "kv_cache_dtype='int3'"),
        (CacheConfig, {"window": 0}, "kv_window=0"),
        (CacheConfig, {"sink_tokens": -1}, "kv_sink_tokens=-1"),
        (EngineConfig, {"kv_block_size": 0}, "kv_block_size=0"),  # blocks are the engine's
    ],
)
def test_cache_config_rejects_bad_settings(make, settings, message):
    with pytest.raises(ValueError, match=message):
        make(**settings)


# --- choosing the kind when loading ---


@pytest.fixture
def llama_dir(tmp_path, tokenizer):
    from arlm.formats.checkpoint import save_model

    save_model(tmp_path / "llama", make_model("llama"), tokenizer)
    return tmp_path / "llama"


def test_load_carries_the_cache_settings_to_generation(llama_dir):
    import arlm

    lm = arlm.load(llama_dir, kv_cache_dtype="int8", kv_window=32, kv_sink_tokens=2)
    assert lm.cache_config == CacheConfig(dtype="int8", window=32, sink_tokens=2)
    out = lm.generate("The", max_tokens=150, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 150  # past the context of 128
    # kv_block_size is the engine's: blocks of 8 in the usage of a full (unwindowed) cache
    lm = arlm.load(llama_dir, kv_block_size=8)
    assert lm.cache_config.kind == "full" and lm.engine_config.kv_block_size == 8
    out = lm.generate("The", max_tokens=20, temperature=0, ignore_eos=True)
    per_token = 2 * 4 * 2 * 32 * 4  # k and v, 4 layers, 2 kv heads, head_dim 32, float32
    positions = out.usage.prompt_tokens + 20 - 1
    assert out.usage.kv_cache_bytes == math.ceil(positions / 8) * 8 * per_token
    assert out.usage.kv_cache_peak_bytes == positions * per_token


def test_windowed_usage_reports_the_window_it_allocated(tokenizer):
    lm = LM(make_model("llama"), tokenizer, CacheConfig(dtype="int8", window=32, sink_tokens=2))
    out = lm.generate("The", max_tokens=60, temperature=0, ignore_eos=True)
    full = 2 * 4 * 2 * (32 + 2) * 34  # k and v, 4 layers, 2 kv heads, int8 vectors of 34 B
    assert out.usage.kv_cache_bytes == out.usage.kv_cache_peak_bytes == full


def test_cli_generate_stats_and_score_take_the_cache_flags(llama_dir, capsys, monkeypatch):
    import arlm
    from arlm.cli import main

    argv = ["generate", str(llama_dir), "The", "--max-tokens", "140", "--temperature", "0"]
    assert main([*argv, "--ignore-eos", "--kv-window", "32", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "140 generated" in err and "windowed" in err and "peak" in err
    loaded, load = [], arlm.load

    def spy(*args, **kwargs):
        loaded.append(load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(arlm, "load", spy)
    short = ["generate", str(llama_dir), "The", "--max-tokens", "5", "--temperature", "0"]
    paged = ["--kv-block-size", "8", "--kv-offload-gib", "0.01", "--preemption-mode", "recompute"]
    assert main([*short, *paged, "--stats"]) == 0
    err = capsys.readouterr().err
    assert "(full, auto)" in err and "blocks held now, peak 1 of" in err and "0 preemptions" in err
    config = loaded[-1].engine_config  # the flags set the engine's blocks and tiers
    assert config.kv_block_size == 8 and config.kv_offload_gib == 0.01
    assert config.preemption_mode == "recompute"
    text = llama_dir / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    assert (
        main(["score", str(llama_dir), str(text), "--chunk-size", "8", "--kv-cache-dtype", "int4"])
        == 0
    )
    assert "perplexity" in capsys.readouterr().out


def test_cli_explains_why_gpt2_has_no_window(tmp_path, tokenizer, capsys):
    from arlm.cli import main
    from arlm.formats.checkpoint import save_model

    save_model(tmp_path / "gpt2", make_model("gpt2"), tokenizer)
    assert main(["generate", str(tmp_path / "gpt2"), "The", "--kv-window", "32"]) == 1
    assert "learned absolute position embeddings" in capsys.readouterr().err

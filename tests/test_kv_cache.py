"""KV cache kinds against the contiguous cache, the block pool, the window, and accounting."""

import math
import random

import pytest
import torch

from arlm.api import LM
from arlm.config import ModelConfig
from arlm.kv_cache import (
    BlockPool,
    CacheConfig,
    KVCache,
    OutOfBlocksError,
    PagedKVCache,
    WindowedKVCache,
    make_codec,
)
from arlm.kv_cache.base import storage_bytes
from arlm.kv_cache.codec import quantize_int4, quantize_int8
from tests.conftest import make_model

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


# --- every kind against the contiguous cache ---


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_cache_logits_equal_the_contiguous_cache_exactly(family):
    model = make_model(family)
    seq = random_tokens((2, 50), 1)
    contiguous = prefill_then_decode(model, KVCache.for_model(model.config, 2, 50), seq)
    paged = PagedKVCache.for_model(model.config, 2, 50, block_size=16)
    assert torch.equal(prefill_then_decode(model, paged, seq), contiguous)


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_rows_at_their_own_lengths_match_each_sequence_alone(family):
    model = make_model(family)
    lengths = [37, 5, 20]
    seqs = [random_tokens((1, n + 6), i) for i, n in enumerate(lengths)]
    c = model.config
    cache = PagedKVCache(BlockPool(c.n_layer, c.n_kv_head, c.head_dim, num_blocks=20, block_size=8))
    ids = [cache.add_sequence() for _ in lengths]
    with torch.no_grad():
        for seq_id, seq, n in zip(ids, seqs, lengths, strict=True):  # prefill one by one
            cache.set_rows([seq_id])
            model(seq[:, :n], kv_cache=cache)
        cache.set_rows(ids)
        batched = []
        for step in range(6):  # then decode all three rows in one forward per step
            pos = torch.tensor(lengths) + step
            tokens = torch.stack([s[0, p] for s, p in zip(seqs, pos.tolist(), strict=True)])
            batched.append(model(tokens[:, None], kv_cache=cache, start_pos=pos)[0][:, 0])
    batched = torch.stack(batched, 1)
    for row, (seq, n) in enumerate(zip(seqs, lengths, strict=True)):
        alone = prefill_then_decode(model, KVCache.for_model(model.config, 1, n + 6), seq, n)
        torch.testing.assert_close(batched[row], alone[0, n:], rtol=0, atol=1e-5)


# measured on these random models: int8 differs by at most 0.005, int4 by 0.07 (logits ~2.5)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kv_dtype, atol", [("int8", 0.02), ("int4", 0.25)])
def test_quantized_cache_logits_are_within_a_measured_tolerance(family, kv_dtype, atol):
    model = make_model(family)
    seq = random_tokens((2, 50), 2)
    with torch.no_grad():
        full, _ = model(seq)
    for cache in (
        KVCache.for_model(model.config, 2, 50, codec=codec(kv_dtype)),
        PagedKVCache.for_model(model.config, 2, 50, codec=codec(kv_dtype)),
    ):
        torch.testing.assert_close(prefill_then_decode(model, cache, seq), full, rtol=0, atol=atol)


@pytest.mark.parametrize("family", FAMILIES)
def test_paged_and_int8_caches_give_the_same_greedy_tokens(family):
    model = make_model(family)
    prompt = random_tokens((2, 6), 3)
    reference = greedy(model, KVCache.for_model(model.config, 2, 46), prompt, 40)
    for cache in (
        PagedKVCache.for_model(model.config, 2, 46, block_size=4),
        KVCache.for_model(model.config, 2, 46, codec=codec("int8")),
    ):
        assert torch.equal(greedy(model, cache, prompt, 40), reference)


# --- the paged pool ---


def test_pool_allocates_and_frees_many_sequences_without_leaking_a_block():
    cache = PagedKVCache(BlockPool(1, 4, 32, num_blocks=64, block_size=16))
    rng = random.Random(0)
    live: dict[int, int] = {}
    for _ in range(300):
        if live and (rng.random() < 0.3 or cache.pool.num_free < 8):
            seq_id = rng.choice(sorted(live))
            cache.free_sequence(seq_id)
            del live[seq_id]
        elif rng.random() < 0.3 or not live:
            live[cache.add_sequence()] = 0
        else:  # grow a random subset of the live sequences by the same number of positions
            rows = rng.sample(sorted(live), rng.randint(1, len(live)))
            grow = rng.randint(1, 20)
            needed = sum(math.ceil((live[s] + grow) / 16) - math.ceil(live[s] / 16) for s in rows)
            if needed > cache.pool.num_free:
                continue
            cache.set_rows(rows)
            cache.prepare(torch.tensor([live[s] for s in rows]), grow)
            for s in rows:
                live[s] += grow
        in_use = sum(math.ceil(n / 16) for n in live.values())
        assert cache.pool.num_used == in_use
        assert cache.tokens == sum(live.values())
        # only each sequence's last block can be partly empty
        assert in_use * 16 - cache.tokens < max(len(live), 1) * 16
    for seq_id in list(live):
        cache.free_sequence(seq_id)
    assert cache.pool.num_free == cache.pool.num_blocks


def test_running_out_of_blocks_says_how_many_are_needed_and_free():
    cache = PagedKVCache(BlockPool(1, 2, 8, num_blocks=4, block_size=4))
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.set_rows([a])
    cache.prepare(0, 12)  # 3 blocks
    cache.set_rows([b])
    with pytest.raises(
        OutOfBlocksError, match="needs 2 more blocks of 4 positions but only 1 of 4"
    ):
        cache.prepare(0, 5)
    assert cache.pool.num_free == 1 and cache.lengths[b] == 0  # the failed step took nothing
    cache.free_sequence(a)
    cache.prepare(0, 5)
    assert cache.pool.num_used == 2


def test_a_block_cannot_be_freed_twice():
    pool = BlockPool(1, 2, 8, num_blocks=4)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(ValueError, match="freed only once"):
        pool.free(blocks[:1])


# --- the window with attention sinks ---


def test_window_larger_than_the_sequence_equals_the_contiguous_cache():
    model = make_model("llama")
    seq = random_tokens((2, 60), 4)
    with torch.no_grad():
        full, _ = model(seq)
    windowed = WindowedKVCache.for_model(model.config, 2, window=64, sink_tokens=4)
    torch.testing.assert_close(prefill_then_decode(model, windowed, seq), full, rtol=0, atol=1e-5)


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
            torch.testing.assert_close(step, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("chunks", [[100], [7] * 14 + [2], [30, 1, 25, 44]])
def test_window_fed_in_chunks_equals_token_by_token(sinks, chunks):
    model = make_model("llama")
    seq = random_tokens((2, 100), 6)
    one = run_chunks(model, WindowedKVCache.for_model(model.config, 2, 16, sinks), seq, [1] * 100)
    chunked = run_chunks(model, WindowedKVCache.for_model(model.config, 2, 16, sinks), seq, chunks)
    torch.testing.assert_close(chunked, one, rtol=0, atol=1e-5)


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
    settings = {"contiguous": {}, "paged": {"block_size": 16}, "windowed": {"window": 60}}[kind]
    cache = CacheConfig(dtype=kv_dtype, **settings).build(config, 2, 64)
    # per position: k and v, 4 layers, 2 kv heads, one vector of head_dim 32 each
    assert cache.bytes_per_token == 2 * 4 * 2 * per_vector
    assert cache.nbytes == storage_bytes(cache) == cache.bytes_per_token * cache.capacity
    assert cache.capacity == 2 * 64 and cache.tokens == 0


def test_quantized_caches_meet_the_memory_targets_at_head_dim_64():
    config = ModelConfig.preset("small")  # head_dim 64
    float32 = KVCache.for_model(config, 1, 256).nbytes
    assert KVCache.for_model(config, 1, 256, codec=codec("int8")).nbytes <= 0.27 * float32
    assert KVCache.for_model(config, 1, 256, codec=codec("int4")).nbytes <= 0.15 * float32


def test_paged_usage_counts_blocks_in_use(tokenizer):
    model = make_model("gpt2")
    lm = LM(model, tokenizer, CacheConfig(block_size=16))
    out = lm.generate("The", max_tokens=40, temperature=0, ignore_eos=True)
    positions = out.usage.prompt_tokens + len(out.token_ids) - 1
    per_token = 2 * 4 * 4 * 32 * 4
    assert out.usage.kv_cache_peak_bytes == math.ceil(positions / 16) * 16 * per_token
    assert out.usage.kv_cache_bytes >= out.usage.kv_cache_peak_bytes


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
        torch.testing.assert_close(
            torch.tensor(chunked.token_logprobs),
            torch.tensor(whole.token_logprobs),
            atol=1e-4,
            rtol=0,
        )


def test_chunked_scoring_needs_the_text_to_fit_unless_the_cache_is_windowed(tokenizer):
    ids = random_tokens((300,), 9).tolist()
    with pytest.raises(ValueError, match="exceed the context of 128"):
        LM(make_model("llama"), tokenizer).score(ids, chunk_size=32)
    windowed = LM(make_model("llama"), tokenizer, CacheConfig(window=64)).score(ids, chunk_size=32)
    assert len(windowed.token_logprobs) == len(windowed.token_ids) >= 300


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dtype": "int3"}, "kv_cache_dtype='int3'"),
        ({"block_size": 0}, "kv_block_size=0"),
        ({"window": 0}, "kv_window=0"),
        ({"sink_tokens": -1}, "kv_sink_tokens=-1"),
        ({"block_size": 16, "window": 64}, "choose one"),
    ],
)
def test_cache_config_rejects_bad_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        CacheConfig(**settings)


# --- choosing the kind when loading ---


@pytest.fixture
def llama_dir(tmp_path, tokenizer):
    from arlm.checkpoint import save_model

    save_model(tmp_path / "llama", make_model("llama"), tokenizer)
    return tmp_path / "llama"


def test_load_carries_the_cache_settings_to_generation(llama_dir):
    import arlm

    lm = arlm.load(llama_dir, kv_cache_dtype="int8", kv_window=32, kv_sink_tokens=2)
    assert lm.cache_config == CacheConfig(dtype="int8", window=32, sink_tokens=2)
    out = lm.generate("The", max_tokens=150, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 150  # past the context of 128
    assert out.usage.kv_cache_bytes == 2 * 4 * 2 * (32 + 2) * 34  # k and v, int8 vectors of 34 B


def test_cli_generate_stats_and_score_take_the_cache_flags(llama_dir, capsys):
    from arlm.cli import main

    argv = ["generate", str(llama_dir), "The", "--max-tokens", "140", "--temperature", "0"]
    assert main([*argv, "--ignore-eos", "--kv-window", "32", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "140 generated" in err and "windowed" in err and "peak" in err
    text = llama_dir / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 3)
    assert (
        main(["score", str(llama_dir), str(text), "--chunk-size", "8", "--kv-cache-dtype", "int4"])
        == 0
    )
    assert "perplexity" in capsys.readouterr().out


def test_cli_explains_why_gpt2_has_no_window(tmp_path, tokenizer, capsys):
    from arlm.checkpoint import save_model
    from arlm.cli import main

    save_model(tmp_path / "gpt2", make_model("gpt2"), tokenizer)
    assert main(["generate", str(tmp_path / "gpt2"), "The", "--kv-window", "32"]) == 1
    assert "learned absolute position embeddings" in capsys.readouterr().err

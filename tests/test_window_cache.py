"""Sliding-window layers: a ring of W positions per row in the contiguous cache, and every
position masked to the window in the engine's paged cache, float and quantized.

Each test runs far past the window (W = 8, 64+ positions) and checks that the logits are those
of the teacher-forced forward with the window's mask (the same model without its cache), and,
for the contiguous cache, that what a layer holds is bounded by W with no slack, asserted from
the cache's accounting and from its tensors. Models slide on every layer (Mistral) or on every
other one (Gemma 3, Qwen with layer_types), where the full-attention layers must still keep
every position.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import arlm
from arlm.api import LM
from arlm.engine import Engine, EngineConfig
from arlm.kv_cache import KVCache, PagedKVCache, PagedRow, StepLayout, make_codec
from arlm.kv_cache.base import storage_bytes
from arlm.model import Transformer
from arlm.sampling import SamplingParams
from tests.conftest import make_model
from tests.numerics import assert_clear_choices, assert_close

W = 8
LAYERS = {  # llama-tiny's 4 layers
    "all": None,
    "mixed": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
}
VECTOR_BYTES = {"auto": lambda d: 4 * d, "int8": lambda d: d + 2, "int4": lambda d: d // 2 + 4}
# quantized caches against the float teacher-forced logits (at most ~2.6 here), measured: int8
# 0.005, int4 0.066; dropping the window moves them by 0.46 to 0.77, far more. A float cache
# differs by float32's rounding alone (tests/numerics.py)
QUANT_ATOL = {"int8": 0.02, "int4": 0.2}
GREEDY = dict(temperature=0, ignore_eos=True)


def windowed_model(layers: str, vocab_size: int = 512, seed: int = 0):
    return make_model(
        "llama", vocab_size=vocab_size, seed=seed, sliding_window=W, layer_types=LAYERS[layers]
    )


def position_bytes(model, kv_dtype: str) -> int:
    """One position of one row in one layer, k and v, from the formula."""
    c = model.config
    return 2 * c.n_kv_head * VECTOR_BYTES[kv_dtype](c.head_dim)


def layer_bytes(cache, layer: int) -> int:
    """Bytes of one layer's tensors, measured."""
    return sum(t.numel() * t.element_size() for t in (*cache.k[layer], *cache.v[layer]))


def check_layers(model, cache, kv_dtype: str, held: list[int], rows: int, full_len: int) -> None:
    """Each layer holds what a window of W (or no window) leaves of sequences of ``held``
    positions, and its tensors are W (or ``full_len``) positions of ``rows`` rows, no more."""
    per_position = position_bytes(model, kv_dtype)
    used = 0
    for i, window in enumerate(model.config.layer_windows):
        span = W if window is not None else full_len
        assert cache.layer_tokens(i) == sum(min(n, span) for n in held)
        assert cache.layer_capacity(i) == rows * span
        assert layer_bytes(cache, i) == rows * span * per_position
        used += cache.layer_tokens(i) * per_position
    assert cache.used_bytes == used
    assert cache.nbytes == storage_bytes(cache)
    assert cache.tokens == max(cache.layer_tokens(i) for i in range(model.config.n_layer))


def teacher_forced(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0]


def assert_cache_close(cached: torch.Tensor, full: torch.Tensor, kv_dtype: str) -> float:
    """The cache's logits are the teacher-forced ones within its codec's error; returns that."""
    if kv_dtype == "auto":
        return assert_close(cached, full)
    torch.testing.assert_close(cached, full, rtol=0, atol=QUANT_ATOL[kv_dtype])
    return QUANT_ATOL[kv_dtype]


def assert_window_matters(model, ids: torch.Tensor, atol: float) -> None:
    """Without its window the model's logits move by far more than ``atol``."""
    plain = Transformer(replace(model.config, sliding_window=None, layer_types=None))
    plain.load_state_dict(model.state_dict())
    assert (teacher_forced(plain, ids) - teacher_forced(model, ids)).abs().max() > 2 * atol


# --- the contiguous cache ---------------------------------------------------------------------


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
@pytest.mark.parametrize("layers", ["all", "mixed"])
def test_contiguous_cache_keeps_the_window_and_matches_teacher_forcing(layers, kv_dtype):
    model = windowed_model(layers)
    seq = torch.randint(0, 512, (2, 90), generator=torch.Generator().manual_seed(3))
    cache = KVCache.for_model(model.config, 2, 100, codec=make_codec(kv_dtype, torch.float32))
    # a prefill longer than W, decodes, chunks longer and shorter than W that start mid-window
    chunks = [13, 1, 1, 20, 3, 1, 9] + [1] * 42
    out, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(seq[:, pos : pos + n], kv_cache=cache, start_pos=pos)[0])
            pos += n
            check_layers(model, cache, kv_dtype, [pos, pos], rows=2, full_len=100)
    assert pos == 90
    full = teacher_forced(model, seq)
    atol = assert_cache_close(torch.cat(out, 1), full, kv_dtype)
    assert_window_matters(model, seq, atol)


def test_contiguous_cache_refuses_to_go_back_once_a_ring_has_turned():
    model = windowed_model("mixed")
    seq = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(4))
    cache = KVCache.for_model(model.config, 1, 40)
    with torch.no_grad():
        model(seq[:, :6], kv_cache=cache)
        # within the window nothing is lost: going back to position 3 is fine
        again = model(seq[:, 3:20], kv_cache=cache, start_pos=3)[0]
        assert_close(again, teacher_forced(model, seq[:, :20])[:, 3:])
        with pytest.raises(ValueError, match="can go on from position 20, not 15"):
            model(seq[:, 15:16], kv_cache=cache, start_pos=15)
        cache.reset()
        model(seq[:, :4], kv_cache=cache)  # reset starts over


# --- the paged cache, driven as the engine drives it -------------------------------------------


def run_paged(model, cache, seqs, chunks, starts=None):
    """Logits {s: (L, V)} of each sequence ``seqs[s]`` (1, L), block table ``[s, s + n, ...]``
    (n sequences: interleaved blocks): s joins at step ``starts[s]`` (default 0), prefills in
    ``chunks[s]`` (one chunk per step, beside the others' decodes), then decodes a position per
    step; a step is one forward over every sequence with work."""
    starts = starts or dict.fromkeys(seqs, 0)
    n, bs = len(seqs), cache.block_size
    tables = {s: [s + n * j for j in range(-(-seqs[s].size(1) // bs))] for s in seqs}
    cache.reserve(1 + max(b for t in tables.values() for b in t))
    pos, pending = dict.fromkeys(seqs, 0), {s: list(chunks.get(s, [])) for s in seqs}
    out = {s: [] for s in seqs}
    step = 0
    while any(pos[s] < seqs[s].size(1) for s in seqs):
        live = [s for s in sorted(seqs) if step >= starts[s] and pos[s] < seqs[s].size(1)]
        decode = [s for s in live if not pending[s]]
        prefill = [(s, pending[s].pop(0)) for s in live if pending[s]]
        layout = StepLayout(
            [PagedRow(tables[s], pos[s], 1) for s in decode],
            [PagedRow(tables[s], pos[s], k) for s, k in prefill],
        )
        tokens = [int(seqs[s][0, pos[s]]) for s in decode]
        for s, k in prefill:
            tokens += seqs[s][0, pos[s] : pos[s] + k].tolist()
        if tokens:
            with torch.no_grad():
                logits = model(
                    torch.tensor([tokens]),
                    kv_cache=cache.step(layout),
                    positions=torch.tensor([layout.positions()]),
                )[0][0]
            rows = [(s, 1) for s in decode] + prefill
            for (s, k), part in zip(rows, logits.split([k for _, k in rows]), strict=True):
                out[s].append(part)
                pos[s] += k
        step += 1
    return {s: torch.cat(o) for s, o in out.items()}


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
@pytest.mark.parametrize("layers", ["all", "mixed"])
def test_paged_cache_masks_each_row_to_its_window_and_matches_teacher_forcing(layers, kv_dtype):
    model = windowed_model(layers)
    g = torch.Generator().manual_seed(5)
    seqs = {s: torch.randint(0, 512, (1, n), generator=g) for s, n in ((0, 80), (1, 64), (2, 76))}
    codec = make_codec(kv_dtype, torch.float32)
    cache = PagedKVCache.for_model(model.config, 3 * 20, 4, codec=codec)
    # 0 and 2 start together (2 prefills a chunk of 25 past its first 5 while 0 decodes); 1
    # joins at step 30 with chunks of 19 and 1
    starts, chunks = {0: 0, 1: 30, 2: 0}, {0: [11], 1: [19, 1], 2: [5, 25]}
    out = run_paged(model, cache, seqs, chunks, starts)
    for s, ids in seqs.items():
        assert_cache_close(out[s], teacher_forced(model, ids)[0], kv_dtype)


# --- the engine -------------------------------------------------------------------------------


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens, each from a teacher-forced forward over everything before it. The
    engine's cached forwards round otherwise, so the prompt must leave no near-tie among these
    choices that their difference could flip: asserted here."""
    ids, choices = list(prompt), []
    for _ in range(n):
        choices.append(teacher_forced(model, torch.tensor([ids]))[0, -1])
        ids.append(int(choices[-1].argmax()))
    choices = torch.stack(choices)
    assert_clear_choices(choices)
    return ids[len(prompt) :]


@pytest.mark.parametrize("layers", ["all", "mixed"])
def test_engine_batches_sequences_far_past_the_window(layers, tokenizer):
    model = windowed_model(layers, tokenizer.vocab_size, seed=1)
    # three rows at once, prompts in chunks of at most 12 positions beside the decoding rows
    config = EngineConfig(max_num_seqs=3, max_num_batched_tokens=12, kv_block_size=4)
    lm = LM(model, tokenizer, engine_config=config)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(1, 500, (n,), generator=g).tolist() for n in (3, 17, 30)]
    outs = lm.generate(prompts, max_tokens=70, **GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == greedy_reference(model, prompt, 70)
        # every layer keeps every position, in whole blocks (the paged cache masks windows)
        fed = len(prompt) + 70 - 1
        per_position = position_bytes(model, "auto") * model.config.n_layer
        assert out.usage.kv_cache_bytes == math.ceil(fed / 4) * 4 * per_position


@pytest.mark.parametrize("layers", ["all", "mixed"])
def test_prefix_cache_hits_with_windowed_layers_stay_exact(layers, tokenizer):
    model = windowed_model(layers, tokenizer.vocab_size, seed=2)
    engine = Engine(model, tokenizer, config=EngineConfig(kv_block_size=4))
    params = SamplingParams(max_tokens=64, **GREEDY)
    short = [[5, 6, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 40, 41, 42, 43]]
    head = list(range(60, 76))
    long = [head + [1, 2, 3, 4], head + [9, 8, 7, 6]]
    out = engine.generate(short, params, progress=False)
    out += engine.generate(long, params, progress=False)
    # blocks hold every position, so a hit is good however far the window has moved
    assert [o.usage.cached_prompt_tokens for o in out] == [0, 4, 0, 16]
    for prompt, o in zip(short + long, out, strict=True):
        assert o.token_ids == greedy_reference(model, prompt, 64)


def test_a_loop_break_past_the_window_stays_exact(tokenizer):
    model = windowed_model("mixed", tokenizer.vocab_size)
    engine = Engine(model, tokenizer, config=EngineConfig(kv_block_size=4))
    params = SamplingParams(max_tokens=80, loop_policy="break", logprobs=0, **GREEDY)
    prompts = [tokenizer.encode(p) for p in ("The", "if x", "class")]
    outs = engine.generate(prompts, params, progress=False)
    assert all(o.loops_broken > 0 for o in outs)
    # every kept token's logprob is the teacher-forced one, before and after each break
    for prompt, o in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt + o.token_ids])
        logprobs = F.log_softmax(teacher_forced(model, ids)[0, len(prompt) - 1 : -1], -1)
        want = logprobs.gather(-1, torch.tensor(o.token_ids)[:, None])[:, 0]
        got = torch.tensor([lp.logprob for lp in o.logprobs])
        assert_close(got, want)


# --- against transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["mistral", "qwen2-mixed"])
def test_engine_matches_transformers_far_past_the_window(family, tmp_path, tokenizer):
    transformers = pytest.importorskip("transformers")
    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        sliding_window=W,
        bos_token_id=0,
        eos_token_id=0,
    )
    if family == "mistral":
        config = transformers.MistralConfig(**common)
    else:
        types = ["sliding_attention", "full_attention"]
        config = transformers.Qwen2Config(**common, use_sliding_window=True, layer_types=types)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # weights large enough for wide next-token margins
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.15 * noise)
    hf.save_pretrained(tmp_path)
    tokenizer.save(tmp_path / "tokenizer.json")
    lm = arlm.load(tmp_path, max_num_seqs=3, max_num_batched_tokens=10)
    assert lm.config.layer_windows == [
        W if t == "sliding_attention" else None
        for t in (getattr(config, "layer_types", None) or ["sliding_attention"] * 2)
    ]
    prompts = [torch.randint(1, 500, (n,), generator=g) for n in (4, 13, 21)]
    outs = lm.generate([p.tolist() for p in prompts], max_tokens=64, **GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        want = hf.eval().generate(
            prompt[None],
            do_sample=False,
            max_new_tokens=64,
            eos_token_id=None,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        # arlm and transformers round differently: no choice here is a near-tie
        choices = torch.cat(want.logits)
        assert_clear_choices(choices)
        assert out.token_ids == want.sequences[0, len(prompt) :].tolist()

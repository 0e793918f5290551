"""The rotary families against transformers: explicit head_dim, Qwen3's q/k norms, sliding-window
attention (Mistral, Qwen2, Qwen3, Phi-3), Phi-3's partial rotary and LongRoPE, Gemma 3 (its
norms, GeGLU, scaled embeddings, attention scale, local and global rope, logit cap) and Gemma 2
(the same without q/k norms, and with capped attention scores), through every path a model runs
on.

Random-weight models are built locally with odd sizes (head_dim != hidden / heads, grouped-query
attention, tied and untied heads) and windows shorter than the test sequences, so the window
really cuts: every sequence here is longer than every window.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import gguf
import pytest
import torch
import torch.nn.functional as F

import arlm
from arlm.config import ModelConfig
from arlm.formats.checkpoint import load_model, save_model
from arlm.formats.gguf import export_gguf
from arlm.formats.hf import config_from_hf, export_hf, load_hf
from arlm.kv_cache import KVCache, PagedKVCache, PagedRow, StepLayout, make_codec
from arlm.model import Transformer
from arlm.model.packing import _REDUCE_RANGE, PackedInt4Linear, PackedInt8Linear, PackedLinear
from arlm.model.quantize import quantize
from arlm.model.tensor_parallel import head_split
from tests.numerics import (
    assert_clear_choices,
    assert_close,
    assert_decode_matches,
    choice_logits,
    hf_greedy,
)

transformers = pytest.importorskip("transformers")

VOCAB = 512  # the conftest tokenizer's
# bf16 against transformers loaded in bf16 (logits up to ~5): teacher forcing measured
# bit-identical (0.0) on every case here, under ATEN_CPU_CAPABILITY=default and avx2 alike, as
# both do the same arithmetic in the same order (the same ops on the same shapes get the same
# kernels, whichever the CPU); the bound leaves room for a kernel picked by shape
BF16_ATOL = 0.02
# bf16 log-probabilities through the KV cache, in chunks, against transformers' through its own:
# 0.0 on every case (gemma3-window included, whose query_pre_attn_scalar of 20 is not its
# head_dim of 24: the caches' attention takes the scale as the kernel's, as transformers does)
BF16_CACHED_ATOL = 0.02
# bf16 greedy decode through the engine against transformers': the engine's paged decode attends
# each block in float32 and merges the blocks by their log-sum-exp, transformers attends in
# bfloat16, so an attention output can differ in its last bit; a unit of bfloat16 at the
# logits' size (4) is 0.031 (measured up to 0.031): two units
BF16_DECODE_ATOL = 2 * 4 * torch.finfo(torch.bfloat16).eps
SEQ = 40  # longer than every window below
# every linear layer's input a multiple of 32, for int4's groups
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=128, intermediate_size=96)
CASES = {
    # head_dim 24 where hidden / heads is 16; grouped-query; untied; no window
    "qwen3": (
        "Qwen3Config",
        dict(
            COMMON,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            tie_word_embeddings=False,
        ),
    ),
    # a window of 7 on layers 1 and 2 (max_window_layers=1), layer 0 full; MQA; tied
    "qwen3-window": (
        "Qwen3Config",
        dict(
            COMMON,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=48,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=7,
            max_window_layers=1,
        ),
    ),
    # every layer slides, window 6; head_dim 8 where hidden / heads is 16
    "mistral-window": (
        "MistralConfig",
        dict(
            COMMON,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=6,
        ),
    ),
    # q/k/v biases; windows on the layers layer_types names (0 and 2), window 5; tied
    "qwen2-window": (
        "Qwen2Config",
        dict(
            COMMON,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        ),
    ),
    # Gemma 3: windows of 6 on layers 0 and 2 (sliding_window_pattern 2), local rope theta 100
    # there, global theta 1000 stretched 4x (linear) on layer 1; query_pre_attn_scalar 20 where
    # head_dim is 24; logits capped at 3 (they reach ~5 uncapped); tied
    "gemma3-window": (
        "Gemma3TextConfig",
        dict(
            COMMON,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            query_pre_attn_scalar=20,
            sliding_window=6,
            sliding_window_pattern=2,
            rope_theta=1000.0,
            rope_local_base_freq=100.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
            final_logit_softcapping=3.0,
        ),
    ),
    # Gemma 3 untied, MQA, head_dim 48 where hidden / heads is 16, layer_types given per layer
    # (full first), window 5, no cap, transformers 5's per-layer-type rope_parameters
    "gemma3-untied-window": (
        "Gemma3TextConfig",
        dict(
            COMMON,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=48,
            query_pre_attn_scalar=48,
            sliding_window=5,
            layer_types=["full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            },
            tie_word_embeddings=False,
        ),
    ),
    # Gemma 2: no q/k norms, one rope theta (500) for every layer; windows of 6 on layers 0
    # and 2 (its default pattern), layer 1 full; attention scores capped at 1.5 (they reach ~5:
    # greedy tokens differ from the uncapped model's from the second on) and logits at 30;
    # query_pre_attn_scalar its head_dim (24: llama.cpp runs it; gemma3-window has a scale of
    # its own); tied
    "gemma2-window": (
        "Gemma2Config",
        dict(
            COMMON,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            query_pre_attn_scalar=24,
            sliding_window=6,
            rope_theta=500.0,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=30.0,
        ),
    ),
    # Phi-3: fused qkv and gate_up, half of each head rotating (head_dim 24 where hidden / heads
    # is 16), a window of 6 on every layer, untied
    "phi3-window": (
        "Phi3Config",
        dict(
            COMMON,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            partial_rotary_factor=0.5,
            sliding_window=6,
            pad_token_id=0,
        ),
    ),
    # Phi-3 with LongRoPE: the original context (16) is shorter than the test sequences, so the
    # long factors and the attention factor both act; 3/4 of each head rotates; MQA, tied
    "phi3-longrope": (
        "Phi3Config",
        dict(
            COMMON,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            partial_rotary_factor=0.75,
            original_max_position_embeddings=16,
            rope_scaling={
                "type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(12)],
                "long_factor": [1.0 + 2.5 * i for i in range(12)],
            },
            tie_word_embeddings=True,
            pad_token_id=0,
        ),
    ),
    # Mixtral: 4 experts a layer, 2 a token (renormalized), head_dim 24 where hidden / heads is
    # 16, untied
    "mixtral": (
        "MixtralConfig",
        dict(
            COMMON,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    # Qwen3-MoE: q/k norms, 6 experts of 64 hidden units (not intermediate_size's 96) a layer, 3
    # a token, renormalized (as the released models are); tied
    "qwen3-moe": (
        "Qwen3MoeConfig",
        dict(
            COMMON,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=64,
            norm_topk_prob=True,
            tie_word_embeddings=True,
        ),
    ),
    # Qwen3-MoE sliding on every layer (window 6), its expert weights not renormalized
    # (norm_topk_prob false), 5 experts, 2 a token; untied
    "qwen3-moe-window": (
        "Qwen3MoeConfig",
        dict(
            COMMON,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            num_experts=5,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=False,
            use_sliding_window=True,
            sliding_window=6,
            tie_word_embeddings=False,
        ),
    ),
    # Qwen2-MoE: q/k/v biases, 4 experts of 32 hidden units a layer, 2 a token, not
    # renormalized, and a shared expert of 64 behind its sigmoid gate; untied
    "qwen2-moe": (
        "Qwen2MoeConfig",
        dict(
            COMMON,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            norm_topk_prob=False,
            tie_word_embeddings=False,
        ),
    ),
    # plain Llama with head_dim 24 where hidden / heads is 16
    "llama-head-dim": (
        "LlamaConfig",
        dict(
            COMMON,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
        ),
    ),
}
WINDOWED = [name for name in CASES if "window" in name]
# mixtures of experts: a token's experts change where its router's scores cross, so no bound on
# the weights' or the cache's rounding bounds their logits' error (one changed expert moves them
# by the difference of two MLPs); their rounded forms are checked against the same rounding
MOE = [name for name, (config, _) in CASES.items() if "Moe" in config or "Mixtral" in config]
UNWINDOWED = [name for name in CASES if name not in WINDOWED]
LONGROPE = [name for name in CASES if "longrope" in name]


def cases(names: list[str]):
    """Run a test on these of the ``case`` fixture's families only."""
    return pytest.mark.parametrize("case", names, indirect=True)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # weights large enough that next-token margins are wide, non-trivial norm gains (about 1:
    # Gemma's norms multiply by 1 + weight) and biases
    g = torch.Generator().manual_seed(seed)
    gain = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(gain + 0.1 * noise if "norm" in name else 0.15 * noise)
            if model.config.model_type == "gemma2" and "embed_tokens" in name:
                # Gemma scales its embeddings by sqrt(hidden): at the others' size the input
                # token outweighs what the layers add, and the tied head only repeats it (32
                # greedy tokens the same, capped scores or not)
                p.mul_(0.1)


def _prompt(name: str) -> torch.Tensor:
    """8 tokens, so that 32 more run far past every window; 20 for LongRoPE, past its original
    context already (see test_longrope_switches_factors_per_forward)."""
    return _ids(20 if "longrope" in name else 8, seed=1)


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # Qwen2 has none


def _ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits[0].float()


def _hf_chunked_logits(hf, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """transformers' logits for ``ids`` fed ``chunk`` tokens per forward through its own KV
    cache: the reference for arlm's chunked scoring (the same as one forward over them all,
    except that LongRoPE picks its factors per forward)."""
    cache, out = transformers.DynamicCache(config=hf.config), []
    with torch.no_grad():
        for start in range(0, ids.size(1), chunk):
            out.append(hf(ids[:, start : start + chunk], past_key_values=cache).logits[0].float())
    return torch.cat(out)


def _greedy(lm, ids: torch.Tensor, n: int = 32) -> list[int]:
    return lm.generate(ids[0].tolist(), max_tokens=n, temperature=0, ignore_eos=True).token_ids


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, tokenizer):
    """(name, folder, transformers model in float32) for one family."""
    name = request.param
    config_name, kwargs = CASES[name]
    folder = tmp_path_factory.mktemp(name)
    hf = transformers.AutoModelForCausalLM.from_config(
        getattr(transformers, config_name)(**kwargs, bos_token_id=0, eos_token_id=0)
    )
    _randomize(hf, seed=len(name))
    hf.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return name, folder, hf.eval()


# ---------------------------------------------------------------------------------------------
# parity


def test_config_is_read_as_transformers_reads_it(case):
    _, folder, hf = case
    config, c = load_hf(folder)[0].config, hf.config
    assert config.head_dim == _head_dim(c)
    assert config.qk_norm == (c.model_type in ("qwen3", "qwen3_moe", "gemma3_text"))
    assert config.tie_embeddings == c.tie_word_embeddings
    # Mistral and Phi-3 slide on every layer, Qwen and Gemma on those layer_types names, Llama
    # on none
    types = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    if c.model_type in ("mistral", "phi3", "mixtral", "qwen3_moe"):
        types = ["sliding_attention"] * c.num_hidden_layers
    windows = [c.sliding_window if t == "sliding_attention" else None for t in types]
    assert config.layer_windows == windows
    partial = c.rope_parameters.get("partial_rotary_factor", 1.0)
    assert config.rotary_dim == int(_head_dim(c) * partial)
    if c.model_type in ("mixtral", "qwen3_moe", "qwen2_moe"):
        assert config.n_experts == getattr(c, "num_local_experts", getattr(c, "num_experts", 0))
        assert config.n_experts_per_tok == c.num_experts_per_tok
        assert config.norm_topk_prob == getattr(c, "norm_topk_prob", True)
        assert config.intermediate_size == getattr(c, "moe_intermediate_size", c.intermediate_size)
        shared = getattr(c, "shared_expert_intermediate_size", None)
        assert config.shared_expert_size == shared
    if c.model_type == "gemma2":
        assert config.attn_scale == c.query_pre_attn_scalar**-0.5
        assert config.attn_softcap == c.attn_logit_softcapping
        assert config.logit_softcap == c.final_logit_softcapping
        assert config.rope_theta == c.rope_parameters["rope_theta"]
        assert config.rope_local_theta is None
    if c.model_type == "gemma3_text":
        assert config.attn_scale == c.query_pre_attn_scalar**-0.5
        assert config.logit_softcap == c.final_logit_softcapping
        assert config.rope_local_theta == c.rope_parameters["sliding_attention"]["rope_theta"]
        assert config.rope_theta == c.rope_parameters["full_attention"]["rope_theta"]


def test_fp32_logits_and_greedy_through_the_engine(case):
    name, folder, hf = case
    lm = arlm.load(folder)
    ids = _ids(SEQ)
    reference = _hf_logits(hf, ids)
    assert_close(lm.logits(ids[0].tolist()), reference)
    # scoring through the contiguous KV cache, in chunks that start inside earlier windows (the
    # text starts with the start token, id 0, so score adds none)
    ids[0, 0] = 0
    score = lm.score(ids[0].tolist(), chunk_size=6)
    reference = _hf_chunked_logits(hf, ids, 6)
    logprobs = F.log_softmax(reference[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    assert_close(score.token_logprobs, logprobs)
    prompt = _prompt(name)
    assert _greedy(lm, prompt) == hf_greedy(hf, prompt)


@cases(WINDOWED)  # the window's masks are what this exercises
def test_batched_and_chunked_engine_rows_match_transformers(case):
    name, folder, hf = case
    # three rows at their own positions in one decode forward; prompts prefill in chunks that
    # share forwards with the decoding rows
    lm = arlm.load(folder, max_num_seqs=3, max_num_batched_tokens=6)
    # seeds whose greedy paths hold no near-tie on any case (seed=n had one on phi3-window)
    prompts = [_ids(n, seed=100 + n) for n in (3, 11, 17)]
    out = lm.generate(
        [p[0].tolist() for p in prompts], max_tokens=20, temperature=0, ignore_eos=True
    )
    for prompt, completion in zip(prompts, out, strict=True):
        assert completion.token_ids == hf_greedy(hf, prompt, 20)


def test_bf16_logits_and_greedy(case):
    name, folder, _ = case
    lm = arlm.load(folder, dtype="bfloat16")
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = _ids(SEQ)
    diff = (lm.logits(ids[0].tolist()) - _hf_logits(hf16, ids)).abs().max().item()
    assert diff < BF16_ATOL, diff
    ids[0, 0] = 0  # the start token: score adds none
    score = torch.tensor(lm.score(ids[0].tolist(), chunk_size=6).token_logprobs)
    reference = F.log_softmax(_hf_chunked_logits(hf16, ids, 6)[:-1], -1)
    diff = (score - reference.gather(-1, ids[0, 1:, None])[:, 0]).abs().max().item()
    assert diff < BF16_CACHED_ATOL, diff
    assert_decode_matches(lm, hf16, _prompt(name), BF16_DECODE_ATOL)


@cases(LONGROPE)
def test_longrope_rows_batched_decode_as_alone(case):
    """Each row of an engine batch picks LongRoPE's factors by its own length: a short row
    batched with one past the original context (16) keeps its short factors."""
    _, folder, _ = case
    lm = arlm.load(folder, max_num_seqs=2)
    prompts = [_ids(20, seed=3)[0].tolist(), _ids(3, seed=4)[0].tolist()]  # 3 + 8 stays short
    alone = [lm.generate(p, max_tokens=8, temperature=0).token_ids for p in prompts]
    # a batched forward rounds otherwise than one alone: these prompts have no near-tie (each
    # sequence stays on one side of the original context, so one forward over it has its factors)
    for p, tokens in zip(prompts, alone, strict=True):
        assert_clear_choices(choice_logits(lm.model, p, tokens))
    together = [c.token_ids for c in lm.generate(prompts, max_tokens=8, temperature=0)]
    assert together == alone
    # and the rows really were in one forward with different factors: the short row's logits
    # differ when its factors are the long ones
    model = lm.model
    short = torch.tensor([prompts[1]])
    positions = torch.arange(3)[None]
    as_short, _ = model(short, positions=positions, seq_ends=torch.full((1, 3), 3))
    as_long, _ = model(short, positions=positions, seq_ends=torch.full((1, 3), 17))
    assert not torch.allclose(as_short, as_long)


@cases(LONGROPE)
def test_longrope_decode_steps_run_padded_as_a_cuda_graph_runs_them(case):
    """The padded decode forward a CUDA graph captures (run eagerly here) picks LongRoPE's
    factors row by row from each row's reach in the static buffers, never reading them: rows
    past the original context (16), short of it, and one crossing it as it decodes give the
    plain path's tokens and log-probabilities."""
    _, folder, _ = case
    plain, padded = (arlm.load(folder, max_num_seqs=3, kv_cache_memory_gib=0.02) for _ in "ab")
    padded.engine.use_decode_graphs(capture=False)
    prompts = [_ids(n, seed=n)[0].tolist() for n in (20, 3, 8)]  # 3 + 12 stays short
    params = dict(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    want, got = plain.generate(prompts, **params), padded.generate(prompts, **params)
    for a, b in zip(want, got, strict=True):
        assert b.token_ids == a.token_ids
        assert_close([t.logprob for t in b.logprobs], [t.logprob for t in a.logprobs])
    assert padded.engine.stats()["graph_steps"] >= 10


@cases(["gemma2-window"])
def test_capped_scores_on_every_decode_path(case):
    """Gemma 2's cap on the attention scores on the paths a decode row can take beside the
    held histories the engine tests above cover: rows reading their blocks in place, several
    sharing one fused call per range of the pool and merged by their log-sum-exps (no held
    room: every block has its memory), and the padded forward a CUDA graph captures (run
    eagerly here), each against the teacher-forced logits or transformers' greedy tokens."""
    name, folder, hf = case
    model, _ = load_hf(folder)
    bs, n = 4, 3
    seqs = [_ids(SEQ, seed=10 + i) for i in range(n)]
    # the rows' blocks interleaved over the pool: row i's j-th block is j * n + i
    tables = [[j * n + i for j in range(SEQ // bs)] for i in range(n)]
    cache = PagedKVCache.for_model(model.config, n * SEQ // bs, bs)
    cache.reserve(cache.num_blocks)
    assert cache.lone_history_room() == 0
    got = []
    with torch.no_grad():
        for p in range(SEQ):
            layout = StepLayout([PagedRow(t, p, 1) for t in tables], [])
            tokens = torch.cat([s[:, p] for s in seqs])[None]
            got.append(
                model(tokens, kv_cache=cache.step(layout), positions=torch.full((1, n), p))[0]
            )
        got = torch.cat(got)  # (SEQ, rows, vocab)
        for i, seq in enumerate(seqs):
            assert_close(got[:, i], model(seq)[0][0])
    padded = arlm.load(folder, max_num_seqs=3, kv_cache_memory_gib=0.02)
    padded.engine.use_decode_graphs(capture=False)
    prompts = [_ids(k, seed=k) for k in (8, 3, 12)]
    out = padded.generate(
        [p[0].tolist() for p in prompts], max_tokens=24, temperature=0, ignore_eos=True
    )
    assert [c.token_ids for c in out] == [hf_greedy(hf, p, 24) for p in prompts]
    assert padded.engine.stats()["graph_steps"] >= 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@cases(["gemma2-window"])
def test_capped_scores_replay_cuda_graphs_with_transformers_tokens(case):
    """On a GPU the decode kernel caps the scores itself: graph steps (and eager ones) give
    transformers' greedy tokens, rows past the window included."""
    _, folder, hf = case
    kw = dict(device="cuda", max_num_seqs=3)
    eager, graphed = arlm.load(folder, enforce_eager=True, **kw), arlm.load(folder, **kw)
    assert graphed.engine.eager_reason is None
    prompts = [_ids(k, seed=k) for k in (8, 3, 12)]
    params = dict(max_tokens=24, temperature=0, ignore_eos=True)
    want = [hf_greedy(hf, p, 24) for p in prompts]
    for lm in (eager, graphed):
        out = lm.generate([p[0].tolist() for p in prompts], **params)
        assert [c.token_ids for c in out] == want
    assert graphed.engine.stats()["graph_steps"] >= 20


@cases(["gemma2-window"])
def test_training_through_capped_scores_matches_transformers(case):
    """Teacher forcing's loss and gradients through Gemma 2's capped scores and logits equal
    transformers' (its eager attention, in float32): the embedding's and the first layer's
    query projection's."""
    _, folder, hf = case
    model, _ = load_hf(folder)
    ids = _ids(SEQ + 1, seed=3)
    x, y = ids[:, :-1], ids[:, 1:]
    _, loss = model.train()(x, y)
    loss.backward()
    try:
        logits = hf(x).logits[0]
        hf_loss = F.cross_entropy(logits, y[0])
        hf_loss.backward()
        assert_close(loss, hf_loss)
        embed = hf.model.embed_tokens.weight.grad
        assert_close(model.wte.weight.grad, embed, scale=embed.abs().max().item())
        rows = model.config.n_head * model.config.head_dim
        q_proj = hf.model.layers[0].self_attn.q_proj.weight.grad
        got = model.h[0].attn.c_attn.weight.grad[:rows]
        assert_close(got, q_proj, scale=q_proj.abs().max().item())
    finally:
        hf.zero_grad(set_to_none=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@cases(LONGROPE)
def test_longrope_decode_steps_replay_cuda_graphs_with_the_eager_tokens(case):
    _, folder, _ = case
    kw = dict(device="cuda", max_num_seqs=3)
    eager, graphed = arlm.load(folder, enforce_eager=True, **kw), arlm.load(folder, **kw)
    assert graphed.engine.eager_reason is None
    prompts = [_ids(n, seed=n)[0].tolist() for n in (20, 3, 8)]
    params = dict(max_tokens=12, temperature=0, ignore_eos=True)
    want, got = eager.generate(prompts, **params), graphed.generate(prompts, **params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert graphed.engine.stats()["graph_steps"] >= 10


@cases(LONGROPE)
def test_longrope_switches_factors_per_forward(case):
    """LongRoPE picks its factors per forward, as transformers' model does: a forward that reaches
    past the original context turns all its positions by the long factors. transformers' generate
    also recomputes the whole cache once, when a sequence first grows past that context; arlm's
    engine does not, so from a prompt shorter than it arlm decodes as transformers' model fed one
    token per forward through its own cache, and as transformers' generate only up to there."""
    name, folder, hf = case
    lm = arlm.load(folder)
    prompt = _ids(8, seed=1)  # 8 + 32 positions cross the original context of 16
    ours = _greedy(lm, prompt)
    cache, theirs, choices = transformers.DynamicCache(config=hf.config), [], []
    with torch.no_grad():
        logits = hf(prompt, past_key_values=cache).logits[0, -1]
        for _ in range(len(ours)):
            choices.append(logits)
            theirs.append(int(logits.argmax()))
            logits = hf(torch.tensor([theirs[-1:]]), past_key_values=cache).logits[0, -1]
    choices = torch.stack(choices)  # no near-tie that arlm's rounding could flip
    assert_clear_choices(choices)
    assert ours == theirs
    assert ours[:8] == hf_greedy(hf, prompt, 8)  # tokens 0-7 come from positions 7-15


def _gemma3_folder(path: Path, tokenizer) -> transformers.PreTrainedModel:
    """A gemma3 folder (text model, vision tower, projector) with random weights, as
    save_pretrained writes it; the transformers model in float32."""
    text = dict(CASES["gemma3-window"][1], num_hidden_layers=2, final_logit_softcapping=None)
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, bos_token_id=0
    )
    hf = transformers.Gemma3ForConditionalGeneration(config)
    _randomize(hf.model.language_model, seed=3)
    hf.save_pretrained(path)
    tokenizer.save(path / "tokenizer.json")
    return hf.eval()


@cases(MOE)
def test_training_a_mixture_of_experts_matches_transformers(case):
    """Teacher forcing with the load-balancing loss: transformers adds it where the config asks
    for the router's logits; the loss and every gradient equal transformers' (float32)."""
    _, folder, hf = case
    config = json.loads((folder / "config.json").read_text())
    config.update(output_router_logits=True, router_aux_loss_coef=0.3)
    reference = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**config)
    )
    reference.load_state_dict(hf.state_dict())
    reference.train()
    model, _ = load_hf(folder)
    model.config.router_aux_loss_coef = 0.3
    model.train()
    ids = _ids(SEQ, seed=3)
    out = reference(ids[:, :-1])  # routes the same tokens as arlm's teacher forcing
    expected = F.cross_entropy(out.logits[0], ids[0, 1:]) + 0.3 * out.aux_loss
    expected.backward()
    loss = model(ids[:, :-1], ids[:, 1:])[1]
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    moe = model.h[1].mlp
    names = (
        ("model.layers.1.mlp.gate.weight", "model.layers.1.block_sparse_moe.gate.weight"),
        (
            "model.layers.1.mlp.experts.down_proj",
            "model.layers.1.block_sparse_moe.experts.down_proj",
        ),
    )
    grads = {n: p.grad for n, p in reference.named_parameters()}
    router = next(grads[n] for n in names[0] if n in grads)
    torch.testing.assert_close(moe.router.weight.grad, router, rtol=1e-4, atol=1e-6)
    down = next(grads[n] for n in names[1] if n in grads)
    for e, expert in enumerate(moe.experts):
        torch.testing.assert_close(expert.c_proj.weight.grad, down[e], rtol=1e-4, atol=1e-6)
    # without the term the loss is the cross-entropy alone
    model.config.router_aux_loss_coef = 0.0
    with torch.no_grad():
        plain = model(ids[:, :-1], ids[:, 1:])[1]
    torch.testing.assert_close(loss - plain, 0.3 * out.aux_loss, rtol=1e-4, atol=0)


@cases(["mixtral"])
def test_a_mixture_of_experts_refuses_tensor_parallelism_and_decode_graphs(case):
    """Its experts are not split over ranks, and packed experts (a CPU's) cannot run as grouped
    products, whose counts stay on the device as a captured step needs: both say so."""
    _, folder, _ = case
    lm = arlm.load(folder)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 with a mixture of 4 experts"):
        head_split(lm.config, 2)
    with pytest.raises(ValueError, match="decode graphs do not support a mixture of experts"):
        lm.engine.use_decode_graphs(capture=False)  # its experts packed for the CPU


def test_gemma3_folder_loads_its_text_model(tmp_path, tokenizer):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "gemma3"
    hf = _gemma3_folder(folder, tokenizer)
    ids = _ids(SEQ)
    reference = _hf_logits(hf, ids)
    lm = arlm.load(folder)
    assert lm.config.extra == {"hf_model_type": "gemma3"} and lm.config.tie_embeddings
    assert_close(lm.logits(ids[0].tolist()), reference)
    assert _greedy(lm, _ids(8, seed=1), 8) == hf_greedy(hf, _ids(8, seed=1), 8)
    # save_pretrained writes the Hub's names (language_model.model.*); the names transformers 5
    # holds in memory (model.language_model.*) load the same
    state = load_file(folder / "model.safetensors")
    assert any(k.startswith("language_model.model.") for k in state)
    renamed = {
        ("model." + k).replace("model.language_model.model.", "model.language_model."): v
        for k, v in state.items()
    }
    save_file(renamed, folder / "model.safetensors", {"format": "pt"})
    assert_close(arlm.load(folder).logits(ids[0].tolist()), reference)


def test_gemma3_defaults_are_transformers_defaults():
    # a gemma3 folder's text_config on the Hub gives few keys; transformers fills the rest
    text = dict(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=34,
        rope_scaling={"factor": 8.0, "rope_type": "linear"},
        sliding_window=1024,
    )
    config = config_from_hf({"model_type": "gemma3", "text_config": text})
    c = transformers.Gemma3Config(text_config=text).text_config
    assert (config.n_head, config.n_kv_head, config.head_dim) == (
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
    )
    assert (config.vocab_size, config.block_size, config.norm_eps) == (
        c.vocab_size,
        c.max_position_embeddings,
        c.rms_norm_eps,
    )
    assert config.attn_scale == c.query_pre_attn_scalar**-0.5
    assert config.layer_windows == [
        c.sliding_window if t == "sliding_attention" else None for t in c.layer_types
    ]
    full, local = c.rope_parameters["full_attention"], c.rope_parameters["sliding_attention"]
    assert (
        config.rope_theta == full["rope_theta"] and config.rope_local_theta == local["rope_theta"]
    )
    assert (
        config.rope_scaling
        == {"rope_type": "linear", "factor": 8.0}
        == {k: v for k, v in full.items() if k != "rope_theta"}
    )


# ---------------------------------------------------------------------------------------------
# the window in every cache kind, quantized too


def _contiguous(model, seq, codec):
    cache = KVCache.for_model(model.config, 1, seq.size(1), codec=codec)
    with torch.no_grad():
        out = [model(seq[:, :9], kv_cache=cache)[0]]
        out += [model(seq[:, p : p + 1], kv_cache=cache, start_pos=p)[0] for p in range(9, SEQ)]
    return torch.cat(out, dim=1)[0]


def _paged(model, seq, codec):
    bs = 8
    blocks = list(range(-(-seq.size(1) // bs)))[::-1]  # in reverse: not contiguous
    cache = PagedKVCache.for_model(model.config, len(blocks), bs, codec=codec)
    cache.reserve(len(blocks))
    out = []
    with torch.no_grad():
        for p in range(SEQ):
            layout = StepLayout([PagedRow(blocks, p, 1)], [])
            step = cache.step(layout)
            out.append(model(seq[:, p : p + 1], kv_cache=step, positions=torch.tensor([[p]]))[0])
    return torch.cat(out, dim=1)[0]


# quantized caches against the float teacher-forced logits (up to ~5; 0.52 for gemma2, whose
# tied embeddings are a tenth the size), measured on these models: float at most 1e-5 (Phi-3),
# int8 at most 0.11, int4 at most 1.2; dropping the window moves the logits by 2.4 to 6.6 (0.66 for
# gemma2), at least twice each model's int4 error and a fifth of the largest logit
@pytest.mark.parametrize("kv_dtype, atol", [("auto", 1e-5), ("int8", 0.15), ("int4", 1.5)])
@cases(WINDOWED)
def test_window_in_the_contiguous_and_paged_caches(case, kv_dtype, atol):
    name, folder, _ = case
    if name in MOE and kv_dtype != "auto":
        pytest.skip("a mixture of experts has no error bound under a rounded cache (see MOE)")
    model, _ = load_hf(folder)
    seq = _ids(SEQ, seed=2)
    with torch.no_grad():
        full = model(seq)[0][0]  # teacher forcing with the window's mask (checked against HF)
    codec = make_codec(kv_dtype, torch.float32)
    contiguous, paged = _contiguous(model, seq, codec), _paged(model, seq, codec)
    torch.testing.assert_close(contiguous, full, rtol=0, atol=atol)
    # the two kinds store the same codes and see the same windows (their kernels sum in another
    # order, which can move a quantized code by one step: measured 4e-4 once, on gemma3 int8)
    torch.testing.assert_close(paged, contiguous, rtol=0, atol=1e-4 if kv_dtype == "auto" else 1e-3)
    # and the window matters: without it the logits move by more than twice the cache's error (a
    # window as long as the sequence cuts nothing; Gemma's local layers keep their own rope)
    plain = replace(model.config, sliding_window=SEQ)
    unwindowed = Transformer(plain)
    unwindowed.load_state_dict(model.state_dict())
    with torch.no_grad():
        moved = (unwindowed(seq)[0][0] - full).abs().max()
    assert moved > max(0.2 * full.abs().max(), 2 * (contiguous - full).abs().max())


@cases(UNWINDOWED)  # a sliding-window model refuses it (below)
def test_streaming_window_cache(case):
    """The StreamingLLM cache (kv_window) turns its sink keys further as the window moves: turning
    by a, then by b, must equal turning by a + b, with part of each head rotating and LongRoPE's
    attention factor applied once; before anything is evicted it decodes as transformers does."""
    name, folder, hf = case
    lm = arlm.load(folder, kv_window=64)
    model, config = lm.model, lm.config
    k = torch.randn(
        1, config.n_kv_head, 3, config.head_dim, generator=torch.Generator().manual_seed(0)
    )
    a, b = torch.tensor([1, 5, 9]), torch.tensor([4, 4, 30])
    for kind in ("full", "long") if "long" in model.inv_freq else ("full",):
        turned = model._rotate(model._rotate(k, a, kind), b, kind)
        torch.testing.assert_close(turned, model._rotate(k, a + b, kind))
        assert torch.equal(turned[..., config.rotary_dim :], k[..., config.rotary_dim :])
    prompt = _prompt(name)  # 8 or 20 + 32 positions: within the 4 sinks and 64 window slots
    assert _greedy(lm, prompt) == hf_greedy(hf, prompt)


@cases(WINDOWED)
def test_streaming_window_is_refused_on_a_sliding_window_model(case):
    name, folder, _ = case
    with pytest.raises(ValueError, match="kv_window=16 with a model whose layers have a sliding"):
        arlm.load(folder, kv_window=16)


# ---------------------------------------------------------------------------------------------
# weights quantized, packed kernels, export


# relative error of the logits (norm of the difference over the norm), measured on these models:
# int8 weights 0.016-0.035 from transformers' float logits, int4 (groups of 32) 0.24-0.43; the
# packed kernels against the same quantized weights on the dequantizing path, int8 0.033-0.055
# (fbgemm rounds the activations to 7 bits on a CPU without VNNI), int4 0.007-0.013
QUANT_TOLERANCES = {"int8": (0.04, 0.08), "int4": (0.45, 0.02)}
# int8's packed error is the activations' rounding, so it doubles where fbgemm gets 7 bits of
# them rather than 8 (a CPU without VNNI: measured 0.106 on an AVX2 EPYC, against 0.033-0.055)
INT8_ACTIVATION_STEPS = 2 if _REDUCE_RANGE else 1


@pytest.mark.parametrize("method", list(QUANT_TOLERANCES))
@cases([name for name in CASES if name not in MOE])
def test_quantized_weights_on_the_packed_kernels(case, method):
    _, folder, hf = case
    tolerance, packed_tolerance = QUANT_TOLERANCES[method]
    if method == "int8":
        packed_tolerance *= INT8_ACTIVATION_STEPS
    lm = arlm.load(folder, quantize=method)  # quantized, then packed for this CPU
    kernel = PackedInt8Linear if method == "int8" else PackedInt4Linear
    assert isinstance(lm.model.h[0].attn.c_attn, kernel)
    unpacked = quantize(load_hf(folder)[0], method)  # the dequantizing forward
    ids = _ids(SEQ)
    reference = _hf_logits(hf, ids)
    with torch.no_grad():
        quantized = unpacked(ids)[0][0]
    packed = lm.logits(ids[0].tolist())
    assert (quantized - reference).norm() / reference.norm() < tolerance
    assert (packed - quantized).norm() / quantized.norm() < packed_tolerance
    assert len(_greedy(lm, _ids(8, seed=1), 8)) == 8  # and the engine runs it


@pytest.mark.parametrize("method", list(QUANT_TOLERANCES))
@cases(MOE)
def test_quantized_experts(case, method):
    """Every expert's linear layers are quantized and packed, the router is not; the quantized
    model computes exactly what a float model holding the dequantized weights computes."""
    _, folder, _ = case
    lm = arlm.load(folder, quantize=method)
    kernel = PackedInt8Linear if method == "int8" else PackedInt4Linear
    for block in lm.model.h:
        assert all(
            isinstance(e.c_fc, kernel) and isinstance(e.c_proj, kernel) for e in block.mlp.experts
        )
        assert isinstance(block.mlp.router, PackedLinear)  # float, on oneDNN
        if block.mlp.shared_expert is not None:  # quantized, and its gate float
            assert isinstance(block.mlp.shared_expert.c_fc, kernel)
            assert isinstance(block.mlp.shared_gate, PackedLinear)
    quantized, dequantized = quantize(load_hf(folder)[0], method), load_hf(folder)[0]
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if hasattr(module, "dequantize"):  # a tied head gets its own matrix, as quantized
                weight = torch.nn.Parameter(module.dequantize(torch.float32))
                dequantized.get_submodule(name).weight = weight
        ids = _ids(SEQ)
        assert torch.equal(quantized(ids)[0], dequantized(ids)[0])
    assert len(_greedy(lm, _ids(8, seed=1), 8)) == 8  # and the engine runs the packed kernels


def test_arlm_checkpoint_round_trip(case, tmp_path, tokenizer):
    # the resolved config (rotary_dim, local rope theta, LongRoPE's attention factor, ...) is
    # all an arlm checkpoint needs, float or quantized
    _, folder, _ = case
    model, _ = load_hf(folder)
    ids = _ids(SEQ)
    for method in (None, "int8"):
        if method is not None:
            model = quantize(model, method)
        save_model(tmp_path / str(method), model, tokenizer)
        again, _ = load_model(tmp_path / str(method))
        assert again.config == model.config
        with torch.no_grad():
            assert torch.equal(again(ids)[0], model(ids)[0])


def test_hf_export_round_trip(case, tmp_path, tokenizer):
    name, folder, hf = case
    model, _ = load_hf(folder)
    export_hf(model, tokenizer, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == hf.config.model_type
    assert written["head_dim"] == _head_dim(hf.config)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids(SEQ)
    assert_close(_hf_logits(again, ids), _hf_logits(hf, ids))
    assert load_hf(tmp_path / "out")[0].config.layer_windows == model.config.layer_windows


# the rest: llama
GGUF_ARCH = {
    "qwen3": "qwen3",
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
}
# what llama.cpp cannot run as these models compute, refused rather than written wrong
GGUF_REFUSED = {
    "gemma3-window": "attn_scale=0.223607: llama.cpp's gemma3 does not read",
    "phi3-window": r"phi3 architecture has no biases and n_head \* head_dim == n_embd",
    "qwen3-window": "sliding_window=7",
    "mistral-window": "sliding_window=6",
    "qwen2-window": "sliding_window=5",
    "qwen3-moe-window": "norm_topk_prob=False: llama.cpp rescales",
}


def _gguf_names(arch: str, n_layer: int) -> set[str]:
    """Every tensor name llama.cpp's ``arch`` can read, from gguf-py's table of them."""
    kinds = gguf.MODEL_TENSORS[next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)]
    names = {gguf.TENSOR_NAMES[k] for k in kinds}
    return {
        n.format(bid=i) + suffix
        for n in names
        for i in range(n_layer)
        for suffix in (".weight", ".bias")
    }


def test_gguf_export(case, tmp_path, tokenizer):
    name, folder, hf = case
    model, _ = load_hf(folder)
    config, state = model.config, model.state_dict()
    path = tmp_path / "m.gguf"
    if name in GGUF_REFUSED:
        with pytest.raises(ValueError, match=GGUF_REFUSED[name]):
            export_gguf(model, tokenizer, path)
        assert not path.exists()
        return
    export_gguf(model, tokenizer, path)
    reader = gguf.GGUFReader(path)
    fields = {n: f.contents() for n, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}

    def data(name: str) -> torch.Tensor:
        return torch.from_numpy(tensors[name].data.copy())

    arch = GGUF_ARCH.get(hf.config.model_type, "llama")
    assert fields["general.architecture"] == arch
    assert set(tensors) <= _gguf_names(arch, config.n_layer)
    assert (
        "output.weight" in tensors
    ) != config.tie_embeddings  # tied: llama.cpp reuses token_embd
    assert fields[f"{arch}.attention.key_length"] == config.head_dim
    assert fields[f"{arch}.attention.value_length"] == config.head_dim
    assert fields[f"{arch}.rope.dimension_count"] == config.rotary_dim
    q_rows = config.n_head * config.head_dim
    qkv_rows = (config.n_head + 2 * config.n_kv_head) * config.head_dim
    assert tuple(tensors["blk.0.attn_output.weight"].shape) == (q_rows, config.n_embd)
    if arch == "phi3":  # q, k, v and gate, up stay fused, in arlm's row order
        assert torch.equal(data("blk.0.attn_qkv.weight"), state["h.0.attn.c_attn.weight"])
        assert torch.equal(data("blk.1.ffn_up.weight"), state["h.1.mlp.c_fc.weight"])
        assert tuple(tensors["blk.0.attn_qkv.weight"].shape) == (config.n_embd, qkv_rows)
        scaling = config.rope_scaling
        assert data("rope_factors_long.weight").tolist() == pytest.approx(scaling["long_factor"])
        assert data("rope_factors_short.weight").tolist() == pytest.approx(scaling["short_factor"])
        assert fields["phi3.rope.scaling.original_context_length"] == 16
        assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(scaling["attention_factor"])
        return
    assert tuple(tensors["blk.0.attn_q.weight"].shape) == (config.n_embd, q_rows)
    if arch in ("gemma2", "gemma3"):
        # llama.cpp's RMSNorm multiplies by its weight, Gemma's by 1 + weight
        for gguf_name, arlm_name in [
            ("blk.1.attn_norm", "h.1.ln_1"),
            ("blk.1.post_attention_norm", "h.1.post_attn_norm"),
            ("blk.1.ffn_norm", "h.1.ln_2"),
            ("blk.1.post_ffw_norm", "h.1.post_mlp_norm"),
            *([("blk.1.attn_q_norm", "h.1.attn.q_norm")] if config.qk_norm else []),
            ("output_norm", "ln_f"),
        ]:
            assert torch.equal(data(gguf_name + ".weight"), state[arlm_name + ".weight"] + 1)
        windows = config.layer_windows
        assert fields[f"{arch}.attention.sliding_window"] == config.sliding_window
        assert fields[f"{arch}.attention.sliding_window_pattern"] == [
            w is not None for w in windows
        ]
        assert fields[f"{arch}.rope.freq_base"] == config.rope_theta
        local_theta = config.rope_local_theta or config.rope_theta
        assert fields[f"{arch}.rope.freq_base_swa"] == local_theta
        if arch == "gemma2":  # both caps
            assert fields["gemma2.attn_logit_softcapping"] == config.attn_softcap
            assert fields["gemma2.final_logit_softcapping"] == config.logit_softcap
        else:
            assert "gemma3.final_logit_softcapping" not in fields  # this one has no cap
    if config.qk_norm:
        t = tensors["blk.1.attn_k_norm.weight"]
        assert t.data.shape == (config.head_dim,)
        # qwen3 and gemma3 rotate halves, as arlm does: q rows are written as they are
        assert torch.equal(data("blk.0.attn_q.weight"), state["h.0.attn.c_attn.weight"][:q_rows])
    if config.n_experts is not None:  # each projection of a layer's experts in one tensor
        assert fields[f"{arch}.expert_count"] == config.n_experts
        assert fields[f"{arch}.expert_used_count"] == config.n_experts_per_tok
        assert fields[f"{arch}.expert_feed_forward_length"] == config.intermediate_size
        hidden = config.intermediate_size
        gate_up = torch.stack(
            [state[f"h.1.mlp.experts.{e}.c_fc.weight"] for e in range(config.n_experts)]
        )
        assert torch.equal(data("blk.1.ffn_gate_exps.weight"), gate_up[:, :hidden])
        assert torch.equal(data("blk.1.ffn_up_exps.weight"), gate_up[:, hidden:])
        down = data("blk.1.ffn_down_exps.weight")
        assert torch.equal(down[2], state["h.1.mlp.experts.2.c_proj.weight"])
        assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        assert torch.equal(data("blk.1.ffn_gate_inp.weight"), state["h.1.mlp.router.weight"])
    if arch in ("qwen3", "qwen3moe"):
        for kind in ("q", "k"):
            t = data(f"blk.1.attn_{kind}_norm.weight")
            assert torch.equal(t, state[f"h.1.attn.{kind}_norm.weight"])


# llama.cpp's server, where this machine has one (benchmarks/serve.py uses the same build)
LLAMA_SERVER = Path(
    os.environ.get("ARLM_LLAMA_SERVER", "/work/peers/llama.cpp-build/bin/llama-server")
)
LLAMA_CPP_CASES = (
    "qwen3",
    "gemma2-window",
    "gemma3-untied-window",
    "phi3-longrope",
    "mixtral",
    "qwen3-moe",
    "qwen2-moe",
)
NEAR_TIE = 0.01  # a logit gap within which two runtimes' float32 arithmetic may pick either


def _llama_cpp_greedy(path: Path, prompt: list[int], n: int, log: Path) -> list[int]:
    """``n`` greedy tokens after ``prompt`` from llama-server running the GGUF at ``path`` (float32
    KV cache, a context longer than LongRoPE's original one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(LLAMA_SERVER), "-m", str(path), "--port", str(port), "-c", "128", "-np", "1"]
    argv += ["-t", "1", "--no-warmup", "-ctk", "f32", "-ctv", "f32"]
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as err:
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError as e:
                if server.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text()[-2000:]
                    raise AssertionError(f"llama-server did not start:\n{tail}") from e
                time.sleep(0.1)
        body = dict(prompt=prompt, n_predict=n, temperature=0, top_k=1, ignore_eos=True)
        body.update(cache_prompt=False, return_tokens=True)
        request = urllib.request.Request(
            url + "/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["tokens"]
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.skipif(not LLAMA_SERVER.is_file(), reason=f"no llama.cpp server at {LLAMA_SERVER}")
@cases(LLAMA_CPP_CASES)  # one case per llama.cpp architecture
def test_llama_cpp_runs_the_gguf_greedy(case, tmp_path, tokenizer):
    """llama.cpp runs the exported file as arlm runs the model: 32 greedy tokens equal, except
    that from a near-tie on (a gap under NEAR_TIE in arlm's logits, or in a router's scores of
    the last expert it picks and the first it leaves) either pick is right."""
    name, folder, _ = case
    lm = arlm.load(folder)
    prompt = _prompt(name)[0].tolist()
    ours = _greedy(lm, _prompt(name))
    export_gguf(lm.model, tokenizer, tmp_path / "m.gguf")
    theirs = _llama_cpp_greedy(tmp_path / "m.gguf", prompt, len(ours), tmp_path / "server.log")
    if theirs != ours:
        i = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
        logits = lm.logits(prompt + ours[:i])[-1]
        gap = min((logits[ours[i]] - logits[theirs[i]]).item(), _routing_gap(lm, prompt + ours[:i]))
        assert gap < NEAR_TIE, f"token {i}: arlm {ours[i]}, llama.cpp {theirs[i]}, gap {gap}"


def _routing_gap(lm, ids: list[int]) -> float:
    """The smallest gap, over a mixture of experts' layers, between the router's score of the
    last expert the last token runs through and of the first it does not (inf for a dense model)."""
    gaps = [float("inf")]

    def record(moe, inputs, _):
        scores = moe.router(inputs[0][0, -1]).topk(moe.top_k + 1).values
        gaps.append((scores[-2] - scores[-1]).item())

    hooks = [b.mlp.register_forward_hook(record) for b in lm.model.h if hasattr(b.mlp, "router")]
    with torch.no_grad():
        lm.model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return min(gaps)


# ---------------------------------------------------------------------------------------------
# refusals


BASE = dict(
    model_type="llama",
    vocab_size=100,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=4096,
)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "gemma"}, r"model_type='gemma' is not supported"),
        (
            {"attn_logit_softcapping": 50.0},
            "attn_logit_softcapping=50.0 is not supported for llama",
        ),
        (
            {
                "model_type": "gemma2",
                "rope_parameters": {"rope_theta": 10.0, "rope_type": "dynamic"},
            },
            "rope_scaling type 'dynamic' is not supported",
        ),
        (
            {"model_type": "gemma3_text", "attn_logit_softcapping": 50.0},
            "attn_logit_softcapping=50.0 is not supported for gemma3_text",
        ),
        (
            {"model_type": "gemma3", "text_config": {"attn_logit_softcapping": 50.0}},
            "attn_logit_softcapping=50.0 is not supported for gemma3_text",
        ),
        (
            {"model_type": "gemma3_text", "use_bidirectional_attention": True},
            "use_bidirectional_attention=True is not supported",
        ),
        ({"model_type": "gemma3_text", "hidden_activation": "gelu"}, "hidden_activation='gelu'"),
        ({"model_type": "gemma3_text", "attention_bias": True}, "attention_bias=true"),
        (
            {
                "model_type": "gemma3_text",
                "rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0}},
            },
            "sliding_attention rope_type 'linear' is not supported",
        ),
        (
            {"model_type": "gemma3_text", "rope_parameters": {"rope_theta": 10.0}},
            r"rope_parameters with keys \['rope_theta'\] is not supported for gemma3",
        ),
        (
            {"model_type": "gemma3_text", "sliding_window": None},
            "sliding_attention layers but sets sliding_window: null",
        ),
        (
            {"model_type": "phi3", "rope_scaling": {"type": "dynamic", "factor": 2.0}},
            "rope_scaling type 'dynamic' is not supported",
        ),
        (
            {
                "model_type": "phi3",
                "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
            },
            "short_factor has 1 entries; it needs one per rotated pair, rotary_dim / 2 = 8",
        ),
        ({"model_type": "phi3", "partial_rotary_factor": 0.2}, "rotary_dim=3 must be an even"),
        ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
        ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping=50.0 is not supported"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
        (
            {"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
            "partial_rotary_factor is not supported",
        ),
        (
            {"rope_scaling": {"rope_type": "longrope"}},
            r"rope_scaling type 'longrope' needs \['short_factor', 'long_factor'\]",
        ),
        (
            {"rope_parameters": {"full_attention": {}, "sliding_attention": {}}},
            "rope_parameters per layer type",
        ),
        ({"model_type": "qwen3", "attention_bias": True}, "attention_bias=true"),
        (
            {
                "model_type": "qwen2",
                "use_sliding_window": True,
                "sliding_window": 8,
                "layer_types": ["chunked_attention"] * 2,
            },
            r"layer_types \['chunked_attention'\] are not supported",
        ),
        ({"head_dim": 31}, "head_dim=31 must be even"),
        ({"model_type": "mixtral", "router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
        (
            {"model_type": "qwen3_moe", "moe_intermediate_size": 32, "mlp_only_layers": [1]},
            r"decoder_sparse_step=1 with mlp_only_layers=\[1\] is not supported",
        ),
        (
            {"model_type": "qwen3_moe", "moe_intermediate_size": 32, "decoder_sparse_step": 2},
            "decoder_sparse_step=2 with mlp_only_layers=None is not supported",
        ),
        ({"model_type": "qwen3_moe"}, "the config has no 'moe_intermediate_size'"),
        (
            {"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 3},
            "n_experts_per_tok=3 is not allowed; it must be an integer from 1 to n_experts=2",
        ),
    ],
)
def test_unimplemented_settings_are_refused_by_name(change, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf({**BASE, **change})


def test_windows_as_long_as_the_context_cut_nothing_and_are_dropped():
    mistral = config_from_hf({**BASE, "model_type": "mistral", "sliding_window": 4096})
    assert mistral.sliding_window is None
    off = config_from_hf({**BASE, "model_type": "qwen3", "sliding_window": 8})
    assert off.sliding_window is None  # use_sliding_window defaults to false
    llama = config_from_hf({**BASE, "sliding_window": 8})  # Llama has no window
    assert llama.sliding_window is None


def test_config_validates_the_new_fields():
    with pytest.raises(ValueError, match="head_dim=24 with n_head=4 must give n_embd=128"):
        ModelConfig.preset("tiny", head_dim=24)
    with pytest.raises(ValueError, match="layer_types has 1 entries"):
        ModelConfig.preset("llama-tiny", sliding_window=8, layer_types=["full_attention"])
    with pytest.raises(ValueError, match="sliding_window is None"):
        ModelConfig.preset("llama-tiny", layer_types=["sliding_attention"] * 4)
    with pytest.raises(ValueError, match="sliding_window=0"):
        ModelConfig.preset("llama-tiny", sliding_window=0)
    with pytest.raises(ValueError, match="for the rotary families"):
        ModelConfig.preset("tiny", qk_norm=True)
    with pytest.raises(ValueError, match="rotary_dim=6 must be an even number from 2 to head_dim"):
        ModelConfig.preset("llama-tiny", head_dim=4, rotary_dim=6)
    with pytest.raises(ValueError, match="rope_local_theta=10.0 is the sliding-window layers'"):
        ModelConfig.preset("llama-tiny", rope_local_theta=10.0)
    with pytest.raises(ValueError, match="logit_softcap=-1 must be a positive number"):
        ModelConfig.preset("llama-tiny", family="gemma", logit_softcap=-1)
    with pytest.raises(ValueError, match="n_experts=0 is not allowed"):
        ModelConfig.preset("llama-tiny", n_experts=0)
    with pytest.raises(ValueError, match="shared_expert_size=64 is an expert beside"):
        ModelConfig.preset("llama-tiny", shared_expert_size=64)
    with pytest.raises(ValueError, match="router_aux_loss_coef=-1 is not allowed"):
        ModelConfig.preset("llama-tiny", n_experts=4, router_aux_loss_coef=-1)
    config = ModelConfig.preset("llama-tiny", head_dim=48, sliding_window=8)
    assert config.layer_windows == [8] * 4
    assert ModelConfig.from_dict(config.to_dict()) == config

"""arlm on one GPU beside its peers, in one run: decode against the memory-bandwidth limit,
offline batches, streaming latency under load, and training MFU, printed as one table of ratios.

Model: random weights in Llama-3.2-1B's shape (16 layers, 2048 wide, 32 heads, 8 KV heads,
8192 MLP, 32,000-token untied vocabulary: 1.10B parameters), bfloat16, built with transformers'
``LlamaConfig`` and saved with ``save_pretrained``; arlm loads that folder with ``arlm.load``.
Prompts are random token ids; every request ignores end-of-text, so each makes all its tokens.

Sections (each guarded: a failure prints an error line and the others go on):
- bandwidth: a large device-to-device copy (bytes read + written per second), and the decode
  limit it implies: that rate over the bytes of weights a decode step reads (the linear
  layers', output head included: ``arlm.model.packing.weight_bytes``; of the input embedding a
  step reads one row);
- decode: batch-1 greedy decode of 256 tokens after a 64-token prompt: ``lm.generate``, and
  (on CUDA) the same with ``enable_torch_compile`` (its start-up time too) and with the
  PyTorch ops in place of arlm's Triton kernels for the norms, rotary embedding, SwiGLU and
  KV store (``arlm.model.kernels``), transformers' ``generate`` (eager), and ``generate``
  with a static cache and ``torch.compile`` (``cache_implementation="static"``), after a
  warm-up run each;
- variants: batch-1 greedy decode as above after a prompt longer than a window, through the
  KV caches and layers the decode graphs also take: the float cache, int8 and int4 blocks,
  and the same weights with a sliding window on every layer (Mistral's layout), each with how
  its steps ran (replayed graphs or eager);
- steps: 64 sequences decoding, 20 steady ``Engine.step`` calls under ``torch.profiler``: wall
  time per step against the device's busy time (the sum of its kernels' and copies' times)
  and how many kernels and copies a step runs, with overlap scheduling (``async_scheduling``,
  the default on CUDA) and without;
- offline: 256 requests, prompts of 64 to 512 tokens, 128 new tokens each, greedy, through
  ``lm.generate`` of the whole list at max_num_seqs 64 and 256, and transformers' continuous
  batching at the same caps (``benchmarks/peers/transformers_cb.py``); at the first cap also
  with graphs for decode-only steps alone (``max_cudagraph_capture_size`` = the cap: steps
  where prompts join running rows run eagerly), against the default (such steps replay
  graphs up to 512 positions);
- tpot: time per output token (after the first) of 128-token streams through the engine's
  ``AsyncEngine``, 1 stream alone against 64 at once; then, where fastapi and uvicorn are
  installed, ``arlm serve`` under ``arlm bench serve``'s client at 1, 16 and 64 streams;
- train: GPT-2 124M's shape (12 x 768, 50,257 ids, block 1024), batch 16, ``--bf16
  --compile``, 30 timed steps of arlm's ``Trainer`` after the compiling ones: tokens/s and MFU
  against the same run's measured bfloat16 matmul peak (``arlm.train.flops``);
- speculative: batch-1 greedy decode of 256 tokens after an input-grounded prompt (a passage
  of the built-in corpus, a blank line and its first line again: ``benchmarks/speculative.py``'s
  prompts, runners and timing, decode tok/s with the prefill's time taken out, median of 3
  rounds): arlm plain, with prompt lookup (``{"method": "ngram"}``, k=4) and with a draft
  model, beside transformers' plain ``generate``, ``prompt_lookup_num_tokens=4`` and
  ``assistant_model``; the acceptance of each arlm proposer, and how many greedy tokens each
  speculative run shares with its plain one (a verify row computes its logits in another
  kernel shape, so in bfloat16 a near-tie may fall the other way). The weights are random, so
  the passage means nothing to the model: prompt lookup is accepted where the greedy output
  repeats the prompt or itself, as random models' outputs soon do, and its gain is read
  against the acceptance printed beside it. The draft is a random Llama of the same shape and
  vocabulary with 2 layers (an eighth of the target's): two unrelated random models agree by
  chance only, so the draft rows are a cost-only measurement (what proposing and verifying
  cost at almost no acceptance: the floor of draft decoding), not a speed-up. An int4
  self-draft is not measured here: its acceptance on random weights, whose logits lie close
  together, says little about a trained model's, and its forward is no cheaper than the
  target's (arlm's int4 linear dequantizes its whole weight at every call,
  ``arlm.model.quantize``, so on a GPU it moves more bytes than the bfloat16 layer).

- moe: a Mixtral layout with the Llama's attention and as many MLP weights read per token (8
  experts of half its MLP's width, 2 a token: 3.2B parameters, the same 1.1B read per token),
  batch-1 greedy decode as in decode: eager steps first (a loop over experts that reads the
  device's token counts once a layer), then the decode graphs (the experts stacked and run as
  grouped products, whose counts stay on the device; eager steps of that engine too), against
  the bandwidth limit of the weights a token reads and transformers' ``generate`` (eager).

Run: ``python benchmarks/gpu.py`` (under 6 minutes on one H200); ``--quick`` for a smoke run
(fewer tokens, requests and steps); ``--device cpu --quick`` runs every section with tiny
shapes on a CPU (to test this script without a GPU); ``--sections decode train`` for some.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

import arlm
import arlm.devices
from arlm.engine import AsyncEngine, Engine, EngineConfig
from arlm.kv_cache import CacheConfig
from arlm.model.packing import weight_bytes
from arlm.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).parent / "peers"))  # the peers are scripts, not a package
import transformers_cb  # noqa: E402

SECTIONS = (
    "bandwidth",
    "decode",
    "variants",
    "steps",
    "offline",
    "tpot",
    "train",
    "speculative",
    "moe",
)


@dataclass(frozen=True)
class Sizes:
    """The model and workload of one run."""

    llama: dict  # LlamaConfig keywords
    dtype: torch.dtype
    prompt: int = 64  # batch-1 decode
    new: int = 256
    variant_prompt: int = 768  # variants: a prompt past the window
    window: int = 256
    requests: int = 256  # offline
    prompt_range: tuple[int, int] = (64, 512)
    offline_new: int = 128
    seq_caps: tuple[int, ...] = (64, 256)
    streams: tuple[int, int] = (1, 64)  # tpot: alone, under load
    serve_streams: tuple[int, ...] = (1, 16, 64)
    stream_new: int = 128
    step_seqs: int = 64  # steps: the decode steps profiled
    step_count: int = 20
    max_model_len: int = 1024
    train: dict | None = None  # TrainConfig shape keywords
    train_batch: int = 16
    train_steps: int = 30
    copy_bytes: int = 2**31
    spec_new: int = 256  # speculative: new tokens after the grounded prompt
    spec_rounds: int = 3  # and timed rounds (median)


LLAMA_1B = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
GPT2_124M = dict(preset="gpt2")
FULL = Sizes(llama=LLAMA_1B, dtype=torch.bfloat16, train=GPT2_124M)
QUICK_GPU = Sizes(
    llama=LLAMA_1B,
    dtype=torch.bfloat16,
    new=32,
    requests=32,
    offline_new=16,
    seq_caps=(8, 32),
    streams=(1, 8),
    serve_streams=(1, 8),
    stream_new=16,
    train=GPT2_124M,
    train_steps=5,
    spec_new=64,
    spec_rounds=1,
)
TINY = Sizes(
    llama=dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
    dtype=torch.float32,
    prompt=16,
    new=8,
    requests=8,
    prompt_range=(8, 32),
    offline_new=8,
    seq_caps=(4, 8),
    streams=(1, 4),
    serve_streams=(1, 4),
    stream_new=8,
    step_seqs=4,
    step_count=3,
    max_model_len=64,
    variant_prompt=40,
    window=16,
    train=dict(preset="tiny", n_layer=2, n_embd=64, n_head=4, block_size=64, vocab_size=512),
    train_batch=2,
    train_steps=3,
    copy_bytes=2**24,
    spec_new=32,
    spec_rounds=1,
)


class Skip(Exception):
    """A section (or part) that cannot run here, with the reason."""


# -- timing -----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn) -> tuple[float, object]:
    """(seconds, result) of ``fn()``, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- models -----------------------------------------------------------------------------------


def build_llama(
    sizes: Sizes,
    root: Path,
    device: torch.device,
    name: str = "llama",
    seed: int = 0,
    tokenizer: Path | None = None,
    **overrides,
):
    """The random Llama (``sizes.llama`` with ``overrides``) as a Hugging Face folder
    ``root / name`` with a tokenizer (prompts are ids, it only has to exist; ``tokenizer``: a
    ``tokenizer.json`` to copy rather than train one), and transformers' model of it on
    ``device`` for the peers."""
    import transformers

    from arlm.tokenizer import Tokenizer
    from arlm.train.corpus import builtin_documents

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        **{**sizes.llama, **overrides}, bos_token_id=0, eos_token_id=1
    )
    with torch.device(device):  # initialised where it runs: seconds, not minutes, for 1.1B
        hf = transformers.LlamaForCausalLM(config).to(sizes.dtype).eval()
    folder = root / name
    hf.save_pretrained(folder)
    if tokenizer is None:
        Tokenizer.train(builtin_documents(), 300).save(folder / "tokenizer.json")
    else:
        (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    return folder, hf


def random_ids(rng: random.Random, vocab: int, n: int) -> list[int]:
    return [rng.randrange(2, vocab) for _ in range(n)]


# -- sections ---------------------------------------------------------------------------------


def bandwidth(ctx: dict) -> dict:
    device, sizes = ctx["device"], ctx["sizes"]
    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = min(timed(device, lambda: dst.copy_(src))[0] for _ in range(5))
    rate = 2 * sizes.copy_bytes / best  # read + write
    per_step = weight_bytes(ctx["lm"].model)  # the linear layers' (embedding: one row a step)
    return {"copy_bytes_per_s": rate, "weight_bytes": per_step, "limit_tok_s": rate / per_step}


def _agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def decode(ctx: dict) -> dict:
    device, sizes, hf = ctx["device"], ctx["sizes"], ctx["hf"]
    prompt = random_ids(random.Random(1), sizes.llama["vocab_size"], sizes.prompt)
    params = SamplingParams(max_tokens=sizes.new, temperature=0.0, ignore_eos=True)
    lm = engine_lm(ctx, 1)
    lm.generate(prompt, params)  # warm-up: kernels, allocator, the engine itself
    seconds, completion = timed(device, lambda lm=lm: lm.generate(prompt, params))
    out = {"arlm_tok_s": sizes.new / seconds}
    del lm  # its KV pool and graphs, before transformers' caches
    free_memory(device)
    if device.type == "cuda":  # the same with the decode step compiled before its capture
        start = time.perf_counter()
        lm = engine_lm(ctx, 1, enable_torch_compile=True)
        lm.generate(prompt, params)  # compiling, capturing, warming up
        out["arlm_compile_s"] = time.perf_counter() - start
        seconds, fused = timed(device, lambda lm=lm: lm.generate(prompt, params))
        out["arlm_compiled_tok_s"] = sizes.new / seconds
        out["compiled_agree"] = _agree(fused.token_ids, completion.token_ids)
        del lm
        free_memory(device)
        # the same without arlm's Triton kernels for the norms, rotary, SwiGLU and KV store:
        # the PyTorch ops they stand in for, captured as they were before stop 45
        arlm.devices._HAS_TRITON = False
        try:
            lm = engine_lm(ctx, 1)
            lm.generate(prompt, params)
            seconds, ops = timed(device, lambda lm=lm: lm.generate(prompt, params))
        finally:
            arlm.devices._HAS_TRITON = True
        out["arlm_ops_tok_s"] = sizes.new / seconds
        out["ops_agree"] = _agree(ops.token_ids, completion.token_ids)
        del lm
        free_memory(device)
    ids = torch.tensor([prompt], device=device)
    greedy = dict(max_new_tokens=sizes.new, min_new_tokens=sizes.new, do_sample=False)

    def hf_generate(**kw):
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), **greedy, **kw)

    hf_generate()
    seconds, tokens = timed(device, hf_generate)
    out["hf_eager_tok_s"] = sizes.new / seconds
    out["greedy_agree"] = _agree(completion.token_ids, tokens[0, sizes.prompt :].tolist())
    try:
        static = dict(cache_implementation="static")
        try:
            from transformers import CompileConfig

            static["compile_config"] = CompileConfig(fullgraph=True, mode="reduce-overhead")
        except ImportError:
            pass  # older transformers compile a static-cache decode on their own
        for _ in range(2):  # compiling, then capturing the graphs
            hf_generate(**static)
        seconds, _ = timed(device, lambda: hf_generate(**static))
        out["hf_static_compile_tok_s"] = sizes.new / seconds
    except Exception as e:  # noqa: BLE001 (the peer's failure is reported, not fatal)
        out["hf_static_compile_error"] = f"{type(e).__name__}: {e}"[:300]
    return out


def variants(ctx: dict) -> dict:
    device, sizes, lm = ctx["device"], ctx["sizes"], ctx["lm"]
    prompt = random_ids(random.Random(2), sizes.llama["vocab_size"], sizes.variant_prompt)
    params = SamplingParams(max_tokens=sizes.new, temperature=0.0, ignore_eos=True)
    out = {}
    for name, model, cache in (
        ("float", lm.model, lm.cache_config),
        ("int8", lm.model, CacheConfig(dtype="int8")),
        ("int4", lm.model, CacheConfig(dtype="int4")),
        ("window", windowed_copy(ctx).model, lm.cache_config),
    ):
        variant = arlm.LM(model, lm.tokenizer, cache, engine_config(ctx, 1))
        variant.generate(prompt, params)  # warm-up
        before = variant.engine.stats()
        seconds, _ = timed(device, lambda v=variant: v.generate(prompt, params))
        out[f"{name}_tok_s"] = sizes.new / seconds
        out[f"{name}_steps"] = steps_summary(before, variant.engine.stats())
        del variant
        free_memory(device)
    return out


def mixture(ctx: dict) -> dict:
    import transformers

    device, sizes = ctx["device"], ctx["sizes"]
    shape = dict(sizes.llama, intermediate_size=sizes.llama["intermediate_size"] // 2)
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        **shape, num_local_experts=8, num_experts_per_tok=2, bos_token_id=0, eos_token_id=1
    )
    with torch.device(device):
        hf = transformers.MixtralForCausalLM(config).to(sizes.dtype).eval()
    folder = ctx["root"] / "mixtral"
    hf.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((ctx["folder"] / name).read_bytes())
    loaded = arlm.load(folder, device=device, dtype=sizes.dtype)
    prompt = random_ids(random.Random(1), sizes.llama["vocab_size"], sizes.prompt)
    params = SamplingParams(max_tokens=sizes.new, temperature=0.0, ignore_eos=True)
    out = {"weight_bytes": weight_bytes(loaded.model), "new_tokens": sizes.new}
    tokens = {}
    # eager first: the graphs' engine stacks the experts, and every step runs them grouped then
    for name, kw in (("eager", {"enforce_eager": True}), ("graphs", {})):
        config = engine_config(ctx, 1, **kw)
        lm = arlm.LM(loaded.model, loaded.tokenizer, loaded.cache_config, config)
        lm.generate(prompt, params)  # warm-up (and the capture)
        seconds, completion = timed(device, lambda lm=lm: lm.generate(prompt, params))
        out[f"arlm_{name}_tok_s"] = sizes.new / seconds
        out[f"{name}_why_eager"] = lm.engine.eager_reason
        tokens[name] = completion.token_ids
        del lm
        free_memory(device)
    out["eager_agree"] = _agree(tokens["graphs"], tokens["eager"])
    ids = torch.tensor([prompt], device=device)
    greedy = dict(max_new_tokens=sizes.new, min_new_tokens=sizes.new, do_sample=False)

    def hf_generate():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), **greedy)

    hf_generate()
    seconds, theirs = timed(device, hf_generate)
    out["hf_eager_tok_s"] = sizes.new / seconds
    out["hf_agree"] = _agree(tokens["graphs"], theirs[0, sizes.prompt :].tolist())
    return out


def windowed_copy(ctx: dict) -> arlm.LM:
    """The model's folder as a Mistral folder (the same weights, linked) whose every layer
    slides over ``sizes.window`` positions, loaded."""
    folder, sizes = ctx["folder"], ctx["sizes"]
    copy = ctx["root"] / "mistral"
    copy.mkdir(exist_ok=True)
    for f in folder.iterdir():
        if f.name != "config.json" and not (copy / f.name).exists():
            (copy / f.name).symlink_to(f)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    config["sliding_window"] = sizes.window
    (copy / "config.json").write_text(json.dumps(config))
    return arlm.load(copy, device=ctx["device"], dtype=sizes.dtype)


def steps_summary(before: dict, after: dict) -> str:
    """How the steps between two ``Engine.stats()`` ran."""
    n = {k: after[k] - before[k] for k in ("steps", "graph_steps", "overlapped_steps")}
    summary = (
        f"{n['steps']} steps: {n['graph_steps']} graphs, {n['steps'] - n['graph_steps']} "
        f"eager, {n['overlapped_steps']} overlapped"
    )
    if after["graph_capture_seconds"]:  # what capturing them took at start-up
        mib = after["graph_capture_bytes"] / 2**20
        summary += f" (captured in {after['graph_capture_seconds']:.1f} s, {mib:.0f} MiB)"
    return summary


def _profiled_steps(ctx: dict, seqs: int, overlap: bool) -> dict:
    """``step_count`` steady decode steps of ``seqs`` sequences through ``Engine.step`` under
    ``torch.profiler``: wall ms a step and, on CUDA, the device's busy ms a step (its kernels'
    and copies' durations), its kernels and copies a step, and the kernels that took most of
    its time (name, microseconds a step)."""
    device, sizes, lm = ctx["device"], ctx["sizes"], ctx["lm"]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    config = engine_config(ctx, seqs, async_scheduling=overlap)
    engine = Engine(lm.model, lm.tokenizer, lm.cache_config, config)
    rng = random.Random(3)
    params = SamplingParams(max_tokens=sizes.step_count + 16, temperature=0.0, ignore_eos=True)
    for _ in range(seqs):
        engine.add_request(random_ids(rng, lm.model.config.vocab_size, sizes.prompt), params)
    running = engine.scheduler.running
    while engine.scheduler.waiting or any(s.num_cached < s.prompt_len for s in running):
        engine.step()  # the prefill
    for _ in range(4):  # the first decode steps: graphs' first replays, the overlap's start
        engine.step()
    sync(device)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(sizes.step_count):
            engine.step()
        sync(device)
        wall = (time.perf_counter() - start) / sizes.step_count
    out = {"step_ms": wall * 1e3, "overlapped_steps": engine.stats()["overlapped_steps"]}
    if device.type == "cuda":
        # the device's kernels and copies: what its launches cost beside its bytes
        events = prof.key_averages()
        on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy = sum(e.self_device_time_total for e in events) / 1e3 / sizes.step_count
        out.update(busy_ms=busy, busy_share=busy / out["step_ms"])
        out["device_ops"] = sum(e.count for e in on_device) / sizes.step_count
        top = sorted(on_device, key=lambda e: e.self_device_time_total, reverse=True)[:5]
        out["top_kernels"] = [
            (e.key[:70], e.self_device_time_total / sizes.step_count, e.count / sizes.step_count)
            for e in top
        ]
    del engine
    free_memory(device)
    return out


def steps(ctx: dict) -> dict:
    """Steady decode steps (``_profiled_steps``) of ``step_seqs`` sequences with overlap
    scheduling (the default on CUDA) and without, and of one sequence with it: where the
    batch-1 step's time goes."""
    out = {}
    for key, seqs, overlap in (
        ("overlap", ctx["sizes"].step_seqs, True),
        ("plain", ctx["sizes"].step_seqs, False),
        ("single", 1, True),
    ):
        out.update({f"{key}_{k}": v for k, v in _profiled_steps(ctx, seqs, overlap).items()})
    return out


def offline_requests(sizes: Sizes) -> list[dict]:
    rng = random.Random(2)
    low, high = sizes.prompt_range
    vocab = sizes.llama["vocab_size"]
    return [
        {
            "prompt_token_ids": random_ids(rng, vocab, rng.randint(low, high)),
            "max_tokens": sizes.offline_new,
            "temperature": 0.0,
        }
        for _ in range(sizes.requests)
    ]


def engine_config(
    ctx: dict, max_num_seqs: int, max_model_len: int | None = None, **kw
) -> EngineConfig:
    """An engine for ``max_num_seqs`` sequences of ``max_model_len`` positions (None: the
    sizes') with a KV budget of what they hold at most: by default an engine takes 0.9 of the
    GPU less what is in use, so a second engine beside a first (speculative builds three side
    by side) would find no room."""
    c, sizes = ctx["lm"].model.config, ctx["sizes"]
    max_model_len = max_model_len or sizes.max_model_len
    per_position = 2 * c.n_layer * c.n_kv_head * c.head_dim * sizes.dtype.itemsize
    gib = max_num_seqs * (max_model_len + 16) * per_position / 2**30
    return EngineConfig(
        max_num_seqs=max_num_seqs, max_model_len=max_model_len, kv_cache_memory_gib=gib, **kw
    )


def engine_lm(ctx: dict, max_num_seqs: int, **kw) -> arlm.LM:
    lm = ctx["lm"]
    return arlm.LM(lm.model, lm.tokenizer, lm.cache_config, engine_config(ctx, max_num_seqs, **kw))


def offline(ctx: dict) -> dict:
    device, sizes = ctx["device"], ctx["sizes"]
    requests = offline_requests(sizes)
    prompts = [r["prompt_token_ids"] for r in requests]
    params = SamplingParams(max_tokens=sizes.offline_new, temperature=0.0, ignore_eos=True)
    out = {}
    # the first cap again with graphs for decode-only steps alone: what replaying the steps
    # where prompts join running rows gives
    arms = [(f"arlm_{cap}", cap, {}) for cap in sizes.seq_caps]
    first = sizes.seq_caps[0]
    arms.append((f"arlm_{first}_decode_graphs", first, {"max_cudagraph_capture_size": first}))
    for key, cap, kw in arms:
        lm = engine_lm(ctx, cap, **kw)
        warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        lm.generate([p[:64] for p in prompts[:cap]], warm, progress=False)
        before = lm.engine.stats()
        seconds, _ = timed(device, lambda lm=lm: lm.generate(prompts, params, progress=False))
        out[f"{key}_tok_s"] = sizes.requests * sizes.offline_new / seconds
        # how its steps ran: replayed graphs, overlapped
        out[f"{key}_steps"] = steps_summary(before, lm.engine.stats())
        del lm
        free_memory(device)
    reason = transformers_cb.available()
    if reason is not None and not hasattr(ctx["hf"], "generate_batch"):
        out["hf_cb_skip"] = reason + "; and no generate_batch"
        return out
    for cap in sizes.seq_caps:
        try:
            if reason is None:
                result = transformers_cb.run_transformers_cb(ctx["hf"], requests, cap)
                out[f"hf_cb_{cap}_tok_s"] = result["output_tokens_per_s"]
            else:
                out[f"hf_cb_{cap}_tok_s"] = plain_generate_batch(ctx, requests)
                out["hf_cb_note"] = f"{reason}: plain generate_batch, no cap on sequences"
        except Exception as e:  # noqa: BLE001
            out[f"hf_cb_{cap}_error"] = f"{type(e).__name__}: {e}"[:300]
        free_memory(device)
    return out


def plain_generate_batch(ctx: dict, requests: list[dict]) -> float:
    """Output tokens/s of ``generate_batch`` with its defaults, for a transformers without the
    continuous-batching config the peer script uses (its scheduler sets its own batch)."""
    from transformers import GenerationConfig

    hf, device = ctx["hf"], ctx["device"]
    new = requests[0]["max_tokens"]
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1)
    inputs = [r["prompt_token_ids"] for r in requests]
    with torch.inference_mode():
        hf.generate_batch([p[:64] for p in inputs[:8]], generation_config=config)  # warm-up
        seconds, done = timed(device, lambda: hf.generate_batch(inputs, generation_config=config))
    return sum(len(o.generated_tokens) for o in done.values()) / seconds


async def _streams(front: AsyncEngine, prompts: list[list[int]], params: SamplingParams) -> None:
    async def one(i: int, prompt: list[int]) -> None:
        async for _ in front.generate(prompt, params, f"s{i}"):
            pass

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def _tpots(stamps: dict[str, list[float]]) -> list[float]:
    """Per stream, the seconds from its first output to its last over the outputs after the
    first: each step gives each running stream one output of one token (end-of-text ignored)."""
    return [(t[-1] - t[0]) / (len(t) - 1) for t in stamps.values() if len(t) > 1]


def tpot(ctx: dict) -> dict:
    device, sizes = ctx["device"], ctx["sizes"]
    alone, loaded = sizes.streams
    lm = engine_lm(ctx, loaded)
    rng = random.Random(3)
    params = SamplingParams(max_tokens=sizes.stream_new, temperature=0.0, ignore_eos=True)
    # stamped in the engine's thread as each step hands its outputs over, not when the event
    # loop gets round to reading them
    stamps: dict[str, list[float]] = {}
    front = AsyncEngine(
        lm.engine,
        on_output=lambda o: stamps.setdefault(o.request_id, []).append(time.perf_counter()),
    )
    out = {}
    try:
        prompts = [random_ids(rng, sizes.llama["vocab_size"], sizes.prompt) for _ in range(loaded)]
        asyncio.run(_streams(front, prompts[:alone], params))  # warm-up
        for n in (alone, loaded):
            stamps.clear()
            asyncio.run(_streams(front, prompts[:n], params))
            out[f"engine_tpot_ms_{n}"] = 1e3 * statistics.median(_tpots(stamps))
    finally:
        front.stop()
        del lm, front
        free_memory(device)
    try:
        out.update(serve_tpot(ctx))
    except Skip as e:
        out["serve_skip"] = str(e)
    except Exception as e:  # noqa: BLE001 (the engine's numbers above still count)
        out["serve_skip"] = f"error: {type(e).__name__}: {e}"[:300]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_tpot(ctx: dict) -> dict:
    """``arlm serve`` in a process of its own, measured by ``arlm bench serve``'s client."""
    missing = [m for m in ("fastapi", "uvicorn", "httpx") if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"arlm serve needs {', '.join(missing)}, not installed here")
    import httpx

    from arlm.measure.serve_bench import ServeBenchConfig, run

    sizes, device = ctx["sizes"], ctx["device"]
    port = _free_port()
    cmd = [sys.executable, "-m", "arlm", "serve", str(ctx["folder"]), "--port", str(port)]
    cmd += ["--device", str(device), "--max-num-seqs", str(max(sizes.serve_streams))]
    cmd += ["--max-model-len", str(sizes.max_model_len)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    out = {}
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"arlm serve exited: {server.stderr.read().decode()[-500:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:  # 503 while loading
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("arlm serve did not answer within 300 s")
            time.sleep(1)
        for n in (1, *sizes.serve_streams):  # the first run of 1 warms the server up
            config = ServeBenchConfig(
                num_prompts=n,
                max_concurrency=n,
                input_len=sizes.prompt,
                output_len=sizes.stream_new,
                token_range=f"2:{sizes.llama['vocab_size']}",
            )
            summary = asyncio.run(run(url, config))
            if summary["failed"]:
                raise RuntimeError(f"{summary['failed']} requests failed: {summary['errors']}")
            out[f"serve_tpot_ms_{n}"] = summary["median_tpot_ms"]
    finally:
        server.terminate()
        server.wait(timeout=60)
    return out


def char_tokenizer(vocab_size: int, folder: Path) -> tuple[Path, Path]:
    """A text (Python's topic docs) and a tokenizer of ``vocab_size`` ids: one per character of
    the text, padded with unused ids to the size whose output layer is measured."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models

    from arlm.tokenizer import EOT

    text = "\n".join(topics[name] for name in sorted(topics))
    chars = sorted(set(text))[: vocab_size - 1]
    text = "".join(ch for ch in text if ch in set(chars))
    vocab = {ch: i for i, ch in enumerate(chars)}
    vocab |= {f"<unused{i}>": i for i in range(len(chars), vocab_size - 1)}
    vocab[EOT] = vocab_size - 1
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.add_special_tokens([EOT])
    corpus, path = folder / "text.txt", folder / "tokenizer.json"
    corpus.write_text(text)
    tk.save(str(path))
    return corpus, path


def train(ctx: dict) -> dict:
    from arlm.config import PRESETS
    from arlm.tokenizer import Tokenizer
    from arlm.train import TrainConfig, Trainer
    from arlm.train.flops import peak_flops
    from arlm.train.prepare import prepare

    device, sizes, root = ctx["device"], ctx["sizes"], ctx["root"]
    shape = dict(sizes.train)
    vocab = shape.pop("vocab_size", None) or PRESETS[shape["preset"]]["vocab_size"]
    corpus, tokenizer = char_tokenizer(vocab, root)
    shards = root / "shards"
    prepare(str(corpus), shards, tokenizer=Tokenizer.from_file(tokenizer), progress=False)
    cfg = TrainConfig(
        corpus=str(shards),
        **shape,
        vocab_size=vocab,
        batch_size=sizes.train_batch,
        bf16=True,
        compile=True,
        steps=10**9,
        warmup_steps=0,
        out=str(root / "run"),
        device=str(device),
        cache_dir=str(root / "cache"),
    )
    trainer = Trainer(cfg, progress=False)
    trainer.model.train()
    for _ in range(3):  # torch.compile's graphs, forward and backward
        trainer.train_step()
    seconds, losses = timed(
        device, lambda: [trainer.train_step() for _ in range(sizes.train_steps)]
    )
    tokens = sizes.train_steps * sizes.train_batch * trainer.model.config.block_size
    rate = tokens / seconds
    peak = peak_flops(device, torch.bfloat16)
    flops = rate * trainer.flops_per_token
    return {
        "tok_s": rate,
        "tflops": flops / 1e12,
        "mfu": flops / peak,
        "peak_tflops": peak / 1e12,
        "last_loss": float(losses[-1]),
    }


def speculation(ctx: dict) -> dict:
    # benchmarks/speculative.py, beside this script: its prompts, runners and timing
    from speculative import K, arlm_runner, counters, grounded_prompts, hf_runner, measure

    from arlm.engine.speculation import summary
    from arlm.speculative import SpeculativeConfig

    device, sizes, lm, hf, root = ctx["device"], ctx["sizes"], ctx["lm"], ctx["hf"], ctx["root"]
    new = sizes.spec_new
    prompts = grounded_prompts(lm.tokenizer, n=1, passage_tokens=2 * sizes.prompt)
    layers = max(1, sizes.llama["num_hidden_layers"] // 8)
    draft_folder, draft_hf = build_llama(
        sizes, root, device, "draft", seed=1, tokenizer=ctx["folder"] / "tokenizer.json",
        num_hidden_layers=layers,
    )  # fmt: skip
    draft = arlm.load(draft_folder, device=device, dtype=sizes.dtype).model
    for m in (hf, draft_hf):
        m.generation_config.pad_token_id = 0  # batch 1: never used, but generate asks for one
    draft_hf.generation_config.num_assistant_tokens = K
    draft_hf.generation_config.num_assistant_tokens_schedule = "constant"

    def lm_with(spec: dict | None = None, draft_model=None) -> arlm.LM:
        config = SpeculativeConfig(num_speculative_tokens=K, **spec) if spec else None
        # batch 1: no more graphs, rows or memory than the prompt and its new tokens need
        engine = engine_config(ctx, 1, len(prompts[0]) + new)
        return arlm.LM(
            lm.model, lm.tokenizer, lm.cache_config, engine, speculative=config, draft=draft_model
        )

    plain = lm_with()
    ngram = lm_with({"method": "ngram", "prompt_lookup_max": 4})
    drafted = lm_with({"method": "draft", "draft_model": str(draft_folder)}, draft)
    greedy = dict(temperature=0)
    settings = {
        "arlm": lambda p: arlm_runner(plain, p, new, **greedy),
        "arlm ngram": lambda p: arlm_runner(ngram, p, new, **greedy),
        "arlm draft": lambda p: arlm_runner(drafted, p, new, **greedy),
    }
    peers = {
        "hf": {},
        "hf prompt_lookup": {"prompt_lookup_num_tokens": K},
        "hf assistant": {"assistant_model": draft_hf},
    }
    out = {"prompt_tokens": len(prompts[0]), "new_tokens": new, "k": K, "draft_layers": layers}
    for name, kw in peers.items():
        try:  # a peer's failure is reported, and the others are measured
            hf_runner(hf, prompts[0], 2, **kw)[0]()
            settings[name] = lambda p, kw=kw: hf_runner(hf, p, new, **kw)
        except Exception as e:  # noqa: BLE001
            out[f"{name.replace(' ', '_')}_error"] = f"{type(e).__name__}: {e}"[:300]
    before = {name: counters(x) for name, x in (("ngram", ngram), ("draft", drafted))}
    results = measure(settings, prompts, sizes.spec_rounds, new)
    for name, (rate, _) in results.items():
        out[f"{name.replace(' ', '_')}_tok_s"] = rate
    for name, x in (("ngram", ngram), ("draft", drafted)):
        stats = {k: v - before[name][k] for k, v in counters(x).items()}
        guessed = stats["spec_decode_num_draft_tokens"]
        accepted = stats["spec_decode_num_accepted_tokens"]
        out[f"{name}_acceptance"] = accepted / guessed if guessed else None
        out[f"{name}_summary"] = summary(stats).removeprefix("speculation: ")
        out[f"{name}_agree"] = _agree(results[f"arlm {name}"][1][0], results["arlm"][1][0])
    for name in ("hf prompt_lookup", "hf assistant"):
        if name in results:
            key = name.replace(" ", "_")
            out[f"{key}_agree"] = _agree(results[name][1][0], results["hf"][1][0])
    return out


RUNNERS = {
    "bandwidth": bandwidth,
    "decode": decode,
    "variants": variants,
    "steps": steps,
    "offline": offline,
    "tpot": tpot,
    "train": train,
    "speculative": speculation,
    "moe": mixture,
}


# -- the table --------------------------------------------------------------------------------


def _fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:,.1f}{unit}" if value < 100 else f"{value:,.0f}{unit}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"


def table(results: dict, sizes: Sizes) -> str:
    rows = [("measurement", "arlm", "peer", "arlm/peer", "target")]

    def row(name: str, ours, peer=None, target: str = "", ratio: str | None = None) -> None:
        rows.append((name, _fmt(ours), _fmt(peer), ratio or _ratio(ours, peer), target))

    bw, dec = results.get("bandwidth", {}), results.get("decode", {})
    off, tp, tr = results.get("offline", {}), results.get("tpot", {}), results.get("train", {})
    if bw:
        row("device copy, GB/s (read + write)", bw["copy_bytes_per_s"] / 1e9)
        row("weights read per decode step, GB", f"{bw['weight_bytes'] / 1e9:.4g}")
    limit = bw.get("limit_tok_s")
    if "arlm_tok_s" in dec:
        a = dec["arlm_tok_s"]
        row("batch-1 decode tok/s vs bandwidth limit", a, limit, ">= 0.60x")
        row("batch-1 decode tok/s vs transformers eager", a, dec.get("hf_eager_tok_s"), ">= 8x")
        peer = dec.get("hf_static_compile_tok_s", dec.get("hf_static_compile_error"))
        row("batch-1 decode tok/s vs static cache + compile", a, peer)
        row("greedy tokens equal to transformers eager", f"{dec['greedy_agree']}/{sizes.new}")
    if "arlm_compiled_tok_s" in dec:
        a = dec["arlm_compiled_tok_s"]
        row("batch-1 decode tok/s, --enable-torch-compile vs not", a, dec["arlm_tok_s"])
        row("  compiled: vs bandwidth limit", a, limit, ">= 0.60x")
        seconds, agree = dec["arlm_compile_s"], dec["compiled_agree"]
        row("  compiled: start-up s, greedy tokens equal", f"{seconds:.0f} s, {agree}/{sizes.new}")
    if "arlm_ops_tok_s" in dec:
        a, agree = dec["arlm_ops_tok_s"], dec["ops_agree"]
        row("batch-1 decode tok/s, Triton norms/rotary/SwiGLU/store vs ops", dec["arlm_tok_s"], a)
        row("  ops: greedy tokens equal", f"{agree}/{sizes.new}")
    va = results.get("variants", {})
    if "float_tok_s" in va:
        what = f"after {sizes.variant_prompt} positions"
        for name, label in (
            ("int8", "int8 KV"),
            ("int4", "int4 KV"),
            ("window", f"window {sizes.window}"),
        ):
            if f"{name}_tok_s" in va:
                row(f"batch-1 decode tok/s {what}, {label} vs float KV", va[f"{name}_tok_s"],
                    va["float_tok_s"])  # fmt: skip
                row(f"  {label}: how its steps ran", va[f"{name}_steps"])
    st, n = results.get("steps", {}), sizes.step_seqs
    if "overlap_step_ms" in st:
        row(f"decode step ms, {n} seqs, overlap vs not", st["overlap_step_ms"], st["plain_step_ms"])
    if "single_step_ms" in st:
        row("decode step ms, 1 seq (overlap)", st["single_step_ms"])
    for key, what in (("overlap", f"{n}-seq step (overlap)"), ("plain", f"{n}-seq step (plain)"),
                      ("single", "1-seq step (overlap)")):  # fmt: skip
        if f"{key}_busy_share" not in st:
            continue
        busy, share = st[f"{key}_busy_ms"], st[f"{key}_busy_share"]
        row(f"GPU busy ms of a {what}", busy, None, "", f"{share:.0%} busy")
        row(f"  kernels and copies a step ({key})", st[f"{key}_device_ops"])
        for name, us, count in st[f"{key}_top_kernels"]:
            row(f"    {name}", f"{us:.0f} us, {count:g} a step")
    for cap in sizes.seq_caps:
        if f"arlm_{cap}_tok_s" in off:
            peer = off.get(f"hf_cb_{cap}_tok_s")
            peer = peer if peer is not None else off.get(f"hf_cb_{cap}_error")
            peer = peer if peer is not None else off.get("hf_cb_skip")
            target = ">= 15,000 tok/s and 5x" if cap == 256 else ""
            row(
                f"offline tok/s, max_num_seqs {cap}, vs transformers CB",
                off[f"arlm_{cap}_tok_s"],
                peer,
                target,
            )
            row(f"offline steps, max_num_seqs {cap}", off[f"arlm_{cap}_steps"])
        if f"arlm_{cap}_decode_graphs_tok_s" in off:
            row(
                f"offline tok/s, max_num_seqs {cap}, vs graphs for decode-only steps",
                off[f"arlm_{cap}_tok_s"],
                off[f"arlm_{cap}_decode_graphs_tok_s"],
            )
            row("  decode-only graphs' steps", off[f"arlm_{cap}_decode_graphs_steps"])
    alone, loaded = sizes.streams
    if f"engine_tpot_ms_{loaded}" in tp:
        a, b = tp[f"engine_tpot_ms_{loaded}"], tp[f"engine_tpot_ms_{alone}"]
        row(f"AsyncEngine TPOT ms, {loaded} streams vs {alone}", a, b, "<= 2x")
    if "serve_skip" in tp:
        row("arlm serve TPOT", "not run: " + tp["serve_skip"])
    for n in sizes.serve_streams:
        if f"serve_tpot_ms_{n}" in tp:
            row(
                f"arlm serve TPOT ms, {n} streams vs 1",
                tp[f"serve_tpot_ms_{n}"],
                tp.get("serve_tpot_ms_1"),
            )
    if tr:
        row("training tok/s (bf16 + compile)", tr["tok_s"])
        mfu = f"MFU {tr['mfu']:.1%}"
        row(
            "training TFLOP/s vs measured bf16 matmul peak",
            tr["tflops"],
            tr["peak_tflops"],
            "MFU >= 45%",
            mfu,
        )
    sp = results.get("speculative", {})
    if "arlm_tok_s" in sp:
        new = sp["new_tokens"]
        for name, what in (("ngram", "prompt lookup"), ("draft", "draft model (cost only)")):
            rate = sp[f"arlm_{name}_tok_s"]
            row(f"batch-1 {what} tok/s vs arlm plain", rate, sp["arlm_tok_s"])
            acceptance = sp[f"{name}_acceptance"]
            accepted = "-" if acceptance is None else f"{acceptance:.1%}"
            agree = f"{sp[f'{name}_agree']}/{new}"
            row(f"  {what}: acceptance, greedy tokens equal to plain", f"{accepted}, {agree}")
        for ours, peer, what in (
            ("arlm_ngram_tok_s", "hf_prompt_lookup", "prompt lookup tok/s vs transformers'"),
            ("arlm_draft_tok_s", "hf_assistant", "draft tok/s vs transformers assistant_model"),
        ):
            theirs = sp.get(f"{peer}_tok_s", sp.get(f"{peer}_error"))
            row(f"batch-1 {what}", sp[ours], theirs)
        if "hf_tok_s" in sp:
            for peer, what in (("hf_prompt_lookup", "prompt lookup"), ("hf_assistant", "draft")):
                if f"{peer}_tok_s" in sp:
                    agree = f"{sp[f'{peer}_agree']}/{new} tokens equal"
                    what = f"  transformers {what} vs its plain generate ({agree})"
                    row(what, sp[f"{peer}_tok_s"], sp["hf_tok_s"])
    mo = results.get("moe", {})
    if "arlm_graphs_tok_s" in mo:
        a, new = mo["arlm_graphs_tok_s"], mo["new_tokens"]
        moe_limit = bw["copy_bytes_per_s"] / mo["weight_bytes"] if bw else None
        row("MoE batch-1 decode tok/s vs bandwidth limit (read per token)", a, moe_limit)
        row("MoE batch-1 decode tok/s, graphs vs eager steps", a, mo["arlm_eager_tok_s"])
        row("MoE batch-1 decode tok/s vs transformers eager", a, mo["hf_eager_tok_s"])
        agree = f"{mo['eager_agree']}/{new}, {mo['hf_agree']}/{new}"
        row("  MoE greedy tokens equal to eager steps, to transformers", agree)
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke run"
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer tokens and steps")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--json", help="also write the measurements as JSON here")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py measures arlm on a GPU, and this machine has none "
            "(torch.cuda.is_available() is False); `--device cpu --quick` runs it as a smoke test"
        )
    if device.type == "cpu" and not args.quick:
        sys.exit("on a CPU only the smoke run makes sense: add --quick (tiny shapes)")
    sizes = TINY if device.type == "cpu" else QUICK_GPU if args.quick else FULL
    started = time.perf_counter()
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{what}; torch {torch.__version__}", end="")
    import transformers

    print(f", transformers {transformers.__version__}; {'quick' if args.quick else 'full'} run")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t, (folder, hf) = timed(device, lambda: build_llama(sizes, root, device))
        lm = arlm.load(folder, device=device, dtype=sizes.dtype)
        n = lm.model.num_params()
        print(f"model: random Llama, {n / 1e9:.2f}B parameters, {sizes.dtype}; built in {t:.0f} s")
        ctx = dict(device=device, sizes=sizes, root=root, folder=folder, lm=lm, hf=hf)
        for name in args.sections:
            t0 = time.perf_counter()
            try:
                results[name] = RUNNERS[name](ctx)
                print(f"{name}: {json.dumps(results[name])} ({time.perf_counter() - t0:.0f} s)")
            except Exception as e:  # noqa: BLE001 (one section's failure leaves the rest)
                print(f"{name}: error: {type(e).__name__}: {e}")
                traceback.print_exc(limit=3)
            free_memory(device)
            if args.json:  # after every section: a run cut off by a time limit keeps its figures
                Path(args.json).write_text(json.dumps(results, indent=2))
    print()
    print(table(results, sizes))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

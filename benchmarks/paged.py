"""Paged KV memory against the slot design it replaced, side by side in one run.

The slot design (arlm up to commit e7ab6fd) gave every running sequence a slot of
``max_model_len`` positions. Its decode speed is measured by running that commit's own code (a
``git archive`` of it, in a subprocess) on the same model and requests as the current code;
its concurrency at a budget is its own formula, ``budget // (max_model_len x bytes per
position)``, which is how it sized itself.

1. Decode speed at 16 sequences (GPT-2 124M's layers, a 512-token vocabulary, random weights,
   float32; 16 prompts of 64
   to 320 tokens, 64 new tokens each, greedy): output tok/s, current / slot design
   (``--baseline COMMIT``: against that commit instead, a before/after check of any change).
2. Concurrency at one budget: a Llama-shaped model with a 4,096-token context, 256 requests of
   about 600 tokens (500 prompt + 100 new), a 256 MiB KV budget: the most sequences running at
   once, paged against the slot design's count; the blocks in use checked at every step against
   what the sequences hold plus one block each.
3. Preemption: the same requests with a pool that holds a third of their peak, by recompute
   and by swap, against a pool that holds them all (max_model_len 1,024): identical tokens,
   preemptions, wall time.
4. Offload: a 2,000-token shared prefix evicted by other traffic, brought back from the host
   tier, against recomputing it (the prefill of the same prompt with prefix caching off).
5. A long-context model with defaults: a random-weight folder with Qwen3-0.6B's shape (28
   layers, 8 KV heads of 128, a 40,960-token context, bfloat16 weights), loaded with
   ``arlm.load(folder)`` and nothing else, runs 32 requests of 1,000 prompt + 200 new tokens
   (greedy): what the defaults chose, the most running at once, preemptions, time. About ten
   minutes on 2 cores (its own run: ``--parts 5``).

Run: ``python benchmarks/paged.py`` (minutes on 2 cores); ``--skip-baseline`` without the slot
design's run.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from baseline import ROOT, checkout, env

BASELINE = "e7ab6fd"

# the decode workload, run by both designs: the script is the same code for each
DECODE = r"""
import json, random, sys, time, torch
from arlm.api import LM
from arlm.config import ModelConfig
from arlm.engine import EngineConfig
from arlm.model import Transformer
from arlm.sampling import SamplingParams
from arlm.tokenizer import Tokenizer
from arlm.train.corpus import builtin_documents
torch.manual_seed(0)
tok = Tokenizer.train(builtin_documents(), vocab_size=512)
model = Transformer(ModelConfig.preset("gpt2", vocab_size=512)).eval()
lm = LM(model, tok, engine_config=EngineConfig(max_num_seqs=16, max_model_len=1024))
rng = random.Random(0)
prompts = [[rng.randrange(1, 500) for _ in range(rng.randrange(64, 320))] for _ in range(16)]
params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
lm.engine.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                   progress=False)
best = None
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    outs = lm.engine.generate(prompts, params, progress=False)
    secs = time.perf_counter() - start
    best = secs if best is None else min(best, secs)
print(json.dumps({"tok_s": 16 * 64 / best, "tokens": [o.token_ids for o in outs]}))
"""


def run_decode(path: Path, rounds: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", DECODE, str(rounds)], env=env(path), capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def decode_speed(skip_baseline: bool, rounds: int, baseline: str = BASELINE) -> None:
    print("1. decode, 16 sequences, GPT-2 124M shape, float32 (best of", rounds, "runs)")
    now = run_decode(ROOT, rounds)
    print(f"   paged (this code)        {now['tok_s']:8.1f} tok/s")
    if skip_baseline:
        return
    with checkout(baseline) as folder:
        before = run_decode(folder, rounds)
    name = "slots" if baseline == BASELINE else "before"
    print(f"   {name} ({baseline})         {before['tok_s']:8.1f} tok/s")
    same = now["tokens"] == before["tokens"]
    print(
        f"   paged / {name:5}            {now['tok_s'] / before['tok_s']:8.3f}x  "
        f"same tokens: {same}"
    )


def _llama_4k():
    import torch

    from arlm.config import ModelConfig
    from arlm.model import Transformer

    torch.manual_seed(0)
    config = ModelConfig.preset("llama-tiny", vocab_size=512, block_size=4096)
    return Transformer(config).eval()


def _requests(n: int, seed: int = 0) -> tuple[list[list[int]], list]:
    from arlm.sampling import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 500) for _ in range(rng.randrange(450, 550))] for _ in range(n)]
    params = [
        SamplingParams(max_tokens=100, temperature=0.8, seed=i, ignore_eos=True) for i in range(n)
    ]
    return prompts, params


def _tokenizer():
    from arlm.tokenizer import Tokenizer
    from arlm.train.corpus import builtin_documents

    return Tokenizer.train(builtin_documents(), vocab_size=512)


def _engine(model, gib: float, max_model_len: int = 4096, **kw):
    from arlm.engine import Engine, EngineConfig

    config = EngineConfig(kv_cache_memory_gib=gib, max_model_len=max_model_len, **kw)
    return Engine(model, _tokenizer(), config=config)


def _drive(engine, prompts, params) -> tuple[list[list[int]], int, float]:
    """Run to completion; (tokens per request, most running at once, seconds), checking the
    blocks in use at every step against what the sequences hold plus one block each."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done, most, bs = {}, 0, engine.block_size
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.completion.token_ids
        running = engine.scheduler.running
        most = max(most, len(running))
        held = {b for s in running for b in s.block_table}
        bound = sum(len(s.token_ids) // bs + 1 for s in running)
        assert len(held) <= bound, (len(held), bound)
    return [done[i] for i in ids], most, time.perf_counter() - start


def concurrency() -> None:
    model = _llama_4k()
    prompts, params = _requests(256)
    gib = 0.25
    engine = _engine(model, gib, max_num_seqs=256, max_num_batched_tokens=8192)
    tokens, most, secs = _drive(engine, prompts, params)
    per_position = engine.runner.cache.bytes_per_token
    slots = int(gib * 2**30 // (4096 * per_position))
    print("\n2. concurrency at a 256 MiB KV budget, max_model_len 4096, requests of ~600 tokens")
    print(f"   slot design: {slots} sequences at once (budget // (4096 x {per_position} B))")
    print(
        f"   paged:       {most} sequences at once, peak {engine.block_manager.peak_in_use} "
        f"blocks of {engine.block_manager.num_blocks}; blocks in use <= held + 1 each: ok"
    )
    print(f"   paged / slots: {most / slots:.1f}x   ({secs:.1f} s for {len(prompts)} requests)")


def preemption() -> None:
    model = _llama_4k()
    prompts, params = _requests(16, seed=1)
    engine = _engine(model, 1.0, max_model_len=1024, max_num_seqs=16)
    peak_blocks = sum(-(-(len(p) + 100) // engine.block_size) for p in prompts)
    per_block = engine.runner.cache.block_bytes
    big_tokens, _, big_secs = _drive(engine, prompts, params)
    print("\n3. preemption: 16 requests of ~600 tokens, pool of a third of their peak")
    print(f"   large pool:  {big_secs:6.2f} s, 0 preemptions")
    for mode in ("recompute", "swap"):
        small = (peak_blocks // 3 + 0.5) * per_block / 2**30
        offload = peak_blocks * per_block / 2**30 if mode == "swap" else 0.0
        engine = _engine(
            model,
            small,
            max_model_len=1024,
            max_num_seqs=16,
            preemption_mode=mode,
            kv_offload_gib=offload,
        )
        tokens, _, secs = _drive(engine, prompts, params)
        stats = engine.stats()
        print(
            f"   {mode:10s}  {secs:6.2f} s, {stats['preemptions']} preemptions, "
            f"same tokens: {tokens == big_tokens}, wall time {secs / big_secs:.2f}x"
        )


def offload() -> None:
    import torch

    from arlm.config import ModelConfig
    from arlm.engine import Engine, EngineConfig
    from arlm.model import Transformer
    from arlm.sampling import SamplingParams

    torch.manual_seed(0)
    shape = dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, block_size=4096)
    model = Transformer(ModelConfig.preset("llama-small", vocab_size=512, **shape)).eval()
    tok = _tokenizer()
    rng = random.Random(2)
    head = [rng.randrange(1, 500) for _ in range(2000)]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    per_block = 2 * model.config.n_layer * model.config.n_kv_head * model.config.head_dim * 4 * 16
    pool = (2000 // 16 + 16) * per_block / 2**30  # the head, and a little: other traffic evicts it
    config = EngineConfig(kv_cache_memory_gib=pool, kv_offload_gib=4 * pool, max_model_len=2064)
    engine = Engine(model, tok, config=config)
    engine.generate([head + [1]], params, progress=False)
    other = [[rng.randrange(1, 500) for _ in range(2000)]]
    engine.generate(other, params, progress=False)  # evicts the head's blocks to the host
    start = time.perf_counter()
    warm = engine.generate([head + [2]], params, progress=False)[0]
    host = time.perf_counter() - start
    cold = Engine(model, tok, config=EngineConfig(enable_prefix_caching=False, max_model_len=2064))
    start = time.perf_counter()
    cold.generate([head + [2]], params, progress=False)
    recompute = time.perf_counter() - start
    print("\n4. offload: a 2,000-token shared prefix evicted by other traffic (12 x 768 Llama)")
    print(
        f"   from the host tier: {host:6.3f} s ({warm.usage.cached_prompt_tokens} tokens "
        f"reused, {engine.block_manager.host.hits} blocks from the host)"
    )
    print(f"   recomputed:         {recompute:6.3f} s")
    print(f"   recompute / host:   {recompute / host:6.1f}x")


def qwen3_folder(root: Path) -> Path:
    """A random-weight Hugging Face folder with Qwen3-0.6B's shape, bfloat16 on disk."""
    import torch
    import transformers

    from arlm.tokenizer import Tokenizer
    from arlm.train.corpus import builtin_documents

    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    )
    hf = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16)
    folder = root / "qwen3-0.6b-shape"
    hf.save_pretrained(folder)
    Tokenizer.train(builtin_documents(), 1000).save(folder / "tokenizer.json")
    return folder


def long_context_defaults() -> None:
    import resource

    import arlm
    from arlm.sampling import SamplingParams

    print("\n5. a Qwen3-0.6B-shaped folder (40,960-token context, bfloat16) with arlm's defaults")
    with tempfile.TemporaryDirectory() as tmp:
        lm = arlm.load(qwen3_folder(Path(tmp)))
    engine = lm.engine
    per_token = engine.runner.cache.bytes_per_token
    bm = engine.block_manager
    print(
        f"   loaded: weights {lm.model.wte.weight.dtype}, max_model_len {engine.max_len}, "
        f"max_num_seqs {engine.scheduler.max_num_seqs}, KV pool {bm.num_blocks} blocks of "
        f"{engine.block_size} ({bm.num_blocks * engine.runner.cache.block_bytes / 2**30:.2f} GiB, "
        f"{per_token / 1024:.0f} KiB a position)"
    )
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 1000) for _ in range(1000)] for _ in range(32)]
    params = [SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)] * 32
    tokens, most, secs = _drive(engine, prompts, params)
    stats = engine.stats()
    complete = sum(len(t) == 200 for t in tokens)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"   32 requests of 1,000 + 200 tokens: {complete}/32 complete, {most} running at once, "
        f"{stats['preemptions']} preemptions, peak {stats['blocks_peak']} blocks; blocks in use "
        f"<= held + 1 each: ok"
    )
    print(
        f"   {secs:.0f} s, {32 * 200 / secs:.1f} output tok/s; the process's peak memory "
        f"{rss:.1f} GiB"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument(
        "--baseline",
        default=BASELINE,
        help=f"the commit part 1 compares with (default: {BASELINE}, the slot design)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", default="1234", help="which of the parts 1-5 to run")
    args = p.parse_args()
    if "1" in args.parts:
        decode_speed(args.skip_baseline, args.rounds, args.baseline)
    if "2" in args.parts:
        concurrency()
    if "3" in args.parts:
        preemption()
    if "4" in args.parts:
        offload()
    if "5" in args.parts:
        long_context_defaults()


if __name__ == "__main__":
    main()

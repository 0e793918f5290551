"""Continuous batching: arlm's engine beside one request at a time, vLLM's CPU build and
transformers' continuous batching, on the same random-weight models and requests.

Models (random weights, float32): GPT-2 124M, and the Llama-GQA model of ``decode.py`` (12 x 768,
4 KV heads, untied 32k vocabulary). Requests: 64 prompts of 32 to 512 random token ids, 128 new
tokens each (end-of-text ignored), half greedy and half at temperature 0.8 with a seed each.

Columns, each over the same requests:
- arlm, one request at a time (``lm.generate`` per prompt; on the first 16 requests, enough for
  a rate);
- arlm's engine, 16 sequences at once (``lm.generate`` of the whole list);
- transformers' continuous batching (``benchmarks/peers/transformers_cb.py``);
- vLLM's CPU build, offline ``LLM.generate`` in its own virtual environment (a subprocess:
  ``benchmarks/peers/vllm_offline.py``; how to install it is in that file's docstring). The
  column is skipped, saying so, when that environment is missing. Its sampled requests run
  without their seeds (vLLM's CPU build fails on seeded requests whose prefill is chunked).

Then: batch-1 decode through ``lm.generate`` against a bare loop of the model over a contiguous
KV cache (what arlm's batch-1 loop was before the engine); prefix caching (16 requests sharing a
400-token head, prefill with and without it); and the peak of the KV blocks in use against what
the sequences hold.

``--attention`` measures one decode step's attention at 16 and at 4 sequences x 250/500/1000
positions: slot views (the design before paged memory), the paged cache reading blocks in place
(what the engine does), and gathering each row's blocks into a dense tensor. ``--profile``
prints where one 16-sequence decode step's time goes.

``--baseline COMMIT`` is a before/after check of a change: only arlm's own columns (one at a
time, the engine at 16 and at 4, batch-1 decode, and batch-1 decode after prompts of 1,536 and
6,144 tokens on a copy of the model taking 8,192 positions; then 4 at once and one at a time
"as served": the default ``max_num_seqs``, the pool preallocated as ``arlm serve`` does, in a
4 GiB budget), for this checkout and for COMMIT's code
(its ``arlm`` package from ``git archive``), each run in a process of its own, in the order
this, COMMIT, COMMIT, this, ... (``--rounds`` each); the means, their ratios, and how many
greedy requests gave the same tokens.

Run: ``python benchmarks/engine.py`` (about 20 minutes on 2 cores with vLLM installed);
``--models gpt2`` for one model, ``--vllm-python PATH`` for another vLLM environment.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import arlm
from arlm.kv_cache import KVCache
from arlm.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).parent / "peers"))  # the peers are scripts, not a package
from baseline import ROOT, checkout, env  # noqa: E402
from decode import build_hf as build  # noqa: E402  (the same models as decode.py)

N_REQUESTS, CONCURRENCY, NEW = 64, 16, 128
# --baseline's long rows: prompt lengths past the 1,024 positions of the other columns, decoded
# at batch 1 by a copy of the model that takes LONG_MODEL positions
LONG, LONG_MODEL = (1536, 6144), 8192
SINGLE = 16  # requests timed one at a time
FEW = 4  # --baseline: requests in each wave of a few at once (``arlm_waves``)
# --baseline, "as served": the engine as ``arlm serve`` makes it (the default max_num_seqs, its
# pool given memory up front) within a quarter of a 16 GiB machine, which 64 of GPT-2's
# sequences of 1,024 positions (4.5 GiB of keys and values) would more than fill
SERVED_GIB = 4.0
DEFAULT_VLLM = "/work/peers/vllm-venv/bin/python"


def make_requests(vocab: int, n: int = N_REQUESTS, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    requests = []
    for i in range(n):
        length = rng.randint(32, 512)
        requests.append(
            {
                "prompt_token_ids": [rng.randrange(vocab) for _ in range(length)],
                "max_tokens": NEW,
                "temperature": 0.0 if i % 2 == 0 else 0.8,
                "seed": None if i % 2 == 0 else 1000 + i,
            }
        )
    return requests


def params_of(r: dict) -> SamplingParams:
    return SamplingParams(
        max_tokens=r["max_tokens"], temperature=r["temperature"], seed=r["seed"], ignore_eos=True
    )


def arlm_single(lm, requests: list[dict]) -> dict:
    start = time.perf_counter()
    outs = [lm.generate(r["prompt_token_ids"], params_of(r)) for r in requests]
    seconds = time.perf_counter() - start
    return summarize(outs, seconds)


def arlm_engine(lm, requests: list[dict], blocks: bool = True) -> dict:
    """The requests through the engine's steps; with ``blocks``, the KV blocks in use are
    counted at every step (against what the sequences hold)."""
    engine = lm.engine
    ids = [engine.add_request(r["prompt_token_ids"], params_of(r)) for r in requests]
    done, peak_blocks, over = {}, 0, 0
    start = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.completion
        if not blocks:
            continue
        running = engine.scheduler.running
        in_use = len({b for s in running for b in s.block_table})
        # what the sequences hold, in whole blocks, plus one block each
        bound = sum(len(s.token_ids) // engine.block_manager.block_size + 1 for s in running)
        peak_blocks = max(peak_blocks, in_use)
        over += in_use > bound
    seconds = time.perf_counter() - start
    result = summarize([done[i] for i in ids], seconds)
    if not blocks:
        return result
    bytes_per_block = engine.runner.kv_bytes_per_token * engine.block_manager.block_size
    result.update(
        peak_blocks=peak_blocks,
        steps_over_bound=over,
        peak_kv_mib=peak_blocks * bytes_per_block / 2**20,
        allocated_kv_mib=engine.runner.cache.nbytes / 2**20,
    )
    return result


def arlm_waves(lm, requests: list[dict], width: int) -> dict:
    """The requests through the engine ``width`` at a time, each wave finished before the next
    starts: steps of a few rows, as a server with that many clients runs."""
    completions, seconds = [], 0.0
    for i in range(0, len(requests), width):
        wave = requests[i : i + width]
        prompts, params = [r["prompt_token_ids"] for r in wave], [params_of(r) for r in wave]
        start = time.perf_counter()
        completions += lm.engine.generate(prompts, params, progress=False)
        seconds += time.perf_counter() - start
    return summarize(completions, seconds)


def summarize(completions, seconds: float) -> dict:
    tokens = sum(len(c.token_ids) for c in completions)
    tpot = [
        c.usage.decode_seconds / (len(c.token_ids) - 1) for c in completions if len(c.token_ids) > 1
    ]
    return {
        "seconds": seconds,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / seconds,
        "tpot_ms": statistics.median(tpot) * 1e3,
        "ttft_ms": statistics.median(c.usage.prefill_seconds for c in completions) * 1e3,
        "outputs": [c.token_ids for c in completions],
    }


def vllm(python: str, folder: Path, requests: list[dict], root: Path) -> dict | str:
    if not Path(python).exists():
        return (
            f"vLLM column skipped: no {python}; install it as benchmarks/peers/vllm_offline.py "
            "says, or pass --vllm-python"
        )
    path = root / "requests.json"
    # vLLM 0.32's CPU build dies ("CPU Generator does not use offset") when a request with
    # its own seed has its prefill split into chunks, so its sampled requests go unseeded
    path.write_text(json.dumps([dict(r, seed=None) for r in requests]))
    script = Path(__file__).parent / "peers" / "vllm_offline.py"
    cmd = [python, str(script), "--model", str(folder), "--requests", str(path)]
    cmd += ["--max-num-seqs", str(CONCURRENCY), "--dtype", "float32"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        errors = [line for line in run.stderr.splitlines() if "Error" in line] or [run.stderr]
        return f"vLLM failed (exit {run.returncode}): {errors[-1].strip()[-300:]}"
    result = json.loads(run.stdout.strip().splitlines()[-1])
    result["tpot_ms"] = result["ttft_ms"] = float("nan")
    return result


def transformers_cb(folder: Path, requests: list[dict]) -> dict | str:
    import transformers_cb as peer

    reason = peer.available()
    if reason is not None:
        return f"transformers column skipped: {reason}"
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    result = peer.run_transformers_cb(model.eval(), requests, CONCURRENCY)
    result["tpot_ms"] = result["ttft_ms"] = float("nan")
    return result


@torch.inference_mode()
def bare_decode(model, prompt: list[int], new: int) -> float:
    """Decode tokens/s of a bare greedy loop: the model over a contiguous KV cache."""
    cache = KVCache.for_model(model.config, 1, len(prompt) + new, dtype=model.wte.weight.dtype)
    logits, _ = model(torch.tensor([prompt]), kv_cache=cache, last_only=True)
    token = logits[:, -1].argmax(-1)
    start = time.perf_counter()
    for pos in range(len(prompt), len(prompt) + new - 1):
        logits, _ = model(token[:, None], kv_cache=cache, start_pos=pos)
        token = logits[:, -1].argmax(-1)
    return (new - 1) / (time.perf_counter() - start)


def batch1(lm, rounds: int = 5, bare: bool = True) -> tuple[float, float]:
    """Median decode tokens/s at batch 1: (lm.generate, bare loop), alternating rounds; NaN for
    the bare loop without ``bare``."""
    prompt = list(range(1, 65))
    engine_rates, bare_rates = [], []
    lm.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True)  # warm-up
    for _ in range(rounds):
        c = lm.generate(prompt, max_tokens=NEW, temperature=0, ignore_eos=True)
        engine_rates.append(c.usage.decode_tokens_per_second)
        if bare:
            bare_rates.append(bare_decode(lm.model, prompt, NEW))
    bare_rate = statistics.median(bare_rates) if bare_rates else float("nan")
    return statistics.median(engine_rates), bare_rate


def long_decode(lm, new: int = 64, rounds: int = 3) -> dict[str, float]:
    """Median batch-1 decode tokens/s after a prompt of each of the ``LONG`` lengths."""
    rates = {}
    for n in LONG:
        prompt = [i % 30000 + 1 for i in range(n)]
        runs = [
            lm.generate(prompt, max_tokens=new, temperature=0, ignore_eos=True)
            for _ in range(rounds)
        ]
        rates[str(n)] = statistics.median(c.usage.decode_tokens_per_second for c in runs)
    return rates


def prefix_caching(folder: Path) -> tuple[float, float]:
    """Seconds to prefill 16 requests sharing a 400-token head: (without, with) the cache."""
    rng = random.Random(1)
    head = [rng.randrange(1000) for _ in range(400)]
    prompts = [head + [rng.randrange(1000) for _ in range(16)] for _ in range(16)]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times = []
    for enabled in (False, True):
        lm = arlm.load(folder, max_num_seqs=16, enable_prefix_caching=enabled)
        lm.generate(prompts[0][:64], params)  # warm-up, on another head
        start = time.perf_counter()
        lm.generate(prompts, params)
        times.append(time.perf_counter() - start)
    return times[0], times[1]


def _median_ms(fn, n: int = 7) -> float:
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def attention_at(
    S: int, heads: int, head_dim: int, n_layer: int, B: int = 16
) -> tuple[float, float, float]:
    """ms of one layer's decode attention for B rows of about S positions (the best of rounds
    that run the three in turn, so a busy machine slows each alike): (slot views, the design
    before paging; this code's paged cache, blocks read in place; each row's blocks gathered
    into a dense tensor). The paged cache's per-step setup (which rows read which blocks) is
    made once per step and shared by its ``n_layer`` layers, as in the engine: it is timed over
    a whole step and divided by ``n_layer``."""
    from arlm.kv_cache import PagedKVCache, PagedRow, StepLayout

    block = 16
    lengths = [S - 7 * i for i in range(B)]  # rows at their own lengths
    q = torch.randn(1, heads, B, head_dim)
    kv = torch.randn(1, heads, B, head_dim)

    planes_k = torch.randn(B, heads, 1024, head_dim)
    planes_v = torch.randn_like(planes_k)
    slot_mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None])[:, None, None]
    qb = q[0].transpose(0, 1)[:, :, None]

    def slots():  # one call over the rows' slots, as the slot design read them
        F.scaled_dot_product_attention(
            qb, planes_k[:, :, :S], planes_v[:, :, :S], attn_mask=slot_mask
        )

    num_blocks = B * (S // block + 1)
    cache = PagedKVCache(1, heads, head_dim, num_blocks, block)
    cache.reserve(num_blocks)
    for plane in (*cache.k[0], *cache.v[0]):
        plane.normal_()
    tables = torch.randperm(num_blocks).view(B, -1).tolist()  # scattered over the pool
    layout = StepLayout([PagedRow(t, n - 1, 1) for t, n in zip(tables, lengths, strict=True)], [])

    def paged():  # a new step each time: its per-step setup counts, shared by the layers
        step = cache.step(layout)
        for _ in range(n_layer):
            step.attend(0, q, kv, kv)

    (pool_k,), (pool_v,) = cache.k[0], cache.v[0]
    index = torch.tensor(tables)
    width = index.size(1) * block
    gather_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None])[:, None, None]

    def gather():
        k = pool_k[index].transpose(1, 2).reshape(B, heads, width, head_dim)
        v = pool_v[index].transpose(1, 2).reshape(B, heads, width, head_dim)
        F.scaled_dot_product_attention(qb, k, v, attn_mask=gather_mask)

    best = [float("inf")] * 3
    for _ in range(15):
        for i, (fn, layers) in enumerate(((slots, 1), (paged, n_layer), (gather, 1))):
            t = time.perf_counter()
            fn()
            best[i] = min(best[i], (time.perf_counter() - t) / layers)
    return tuple(b * 1e3 for b in best)


def attention(n_layer: int = 12, heads: int = 12, head_dim: int = 64) -> None:
    """One decode step's attention for 16 rows and for 4, per layer."""
    for B in (16, FEW):
        shape = f"{B} sequences, {heads} heads of {head_dim}, float32, one layer (ms)"
        print(f"\ndecode attention, {shape}")
        columns = ("slot views", 10), ("paged", 8), ("gather", 8), ("paged/slot", 10)
        print(f"  {'positions':>9}" + "".join(f"  {name:>{w}}" for name, w in columns))
        for S in (250, 500, 1000):
            a, b, c = attention_at(S, heads, head_dim, n_layer, B)
            print(f"  {S:9d}  {a:10.2f}  {b:8.2f}  {c:8.2f}  {b / a:10.2f}")


def profile_step(folder: Path) -> None:
    """Where one decode step of 16 sequences of about 300 positions spends its time."""
    from torch.profiler import ProfilerActivity, profile

    lm = arlm.load(folder, max_num_seqs=16)
    engine = lm.engine
    for r in make_requests(lm.config.vocab_size, 16, seed=3):
        engine.add_request(r["prompt_token_ids"][:300], params_of(r))
    while any(s.num_pending > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        engine.step()
        step_ms = (time.perf_counter() - start) * 1e3
    print(f"\none decode step of 16 sequences (~300 positions each): {step_ms:.1f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def agreement(a: list[list[int]], b: list[list[int]], requests: list[dict]) -> str:
    greedy = [i for i, r in enumerate(requests) if r["temperature"] == 0 and i < len(b)]
    same = sum(a[i] == b[i] for i in greedy)
    return f"{same}/{len(greedy)} greedy requests identical"


def run_model(kind: str, root: Path, vllm_python: str) -> None:
    folder = build(kind, root)
    lm = arlm.load(folder, max_num_seqs=CONCURRENCY)
    requests = make_requests(lm.config.vocab_size)
    n_params = lm.model.num_params()
    print(f"\n== {kind}: {n_params / 1e6:.0f}M parameters, random weights, float32 ==")
    prompt_tokens = sum(len(r["prompt_token_ids"]) for r in requests)
    print(f"{len(requests)} requests, {prompt_tokens} prompt tokens, {NEW} new tokens each")

    results: dict[str, dict | str] = {}
    results["arlm, one at a time"] = arlm_single(lm, requests[:SINGLE])
    results[f"arlm engine, {CONCURRENCY} at once"] = arlm_engine(lm, requests)
    results["transformers CB"] = transformers_cb(folder, requests)
    results["vLLM (CPU)"] = vllm(vllm_python, folder, requests, root)

    rows = []
    for name, r in results.items():
        if isinstance(r, str):
            print(r)
            continue
        rows.append(
            f"  {name:<26}{r['output_tokens_per_s']:10.1f}{r['tpot_ms']:10.1f}"
            f"{r['ttft_ms']:10.0f}{r['seconds']:10.1f}"
        )
    print(f"  {'':<26}{'out tok/s':>10}{'TPOT ms':>10}{'TTFT ms':>10}{'wall s':>10}")
    print("\n".join(rows))
    single = results["arlm, one at a time"]
    eng = results[f"arlm engine, {CONCURRENCY} at once"]
    print("ratios:")
    print(
        f"  engine / one at a time, output tok/s: "
        f"{eng['output_tokens_per_s'] / single['output_tokens_per_s']:.2f}x  (target >= 5)"
    )
    print(
        f"  TPOT at {CONCURRENCY} concurrent / single stream: "
        f"{eng['tpot_ms'] / single['tpot_ms']:.2f}x  (target <= 3)"
    )
    for peer in ("vLLM (CPU)", "transformers CB"):
        r = results[peer]
        if not isinstance(r, str):
            target = "  (target >= 1.0)" if peer.startswith("vLLM") else ""
            print(
                f"  engine / {peer}, output tok/s: "
                f"{eng['output_tokens_per_s'] / r['output_tokens_per_s']:.2f}x{target}; "
                f"{agreement(eng['outputs'], r['outputs'], requests)}"
            )
    print(f"  engine vs one at a time: {agreement(eng['outputs'], single['outputs'], requests)}")
    print(
        f"KV blocks: peak {eng['peak_blocks']} in use ({eng['peak_kv_mib']:.0f} MiB of "
        f"{eng['allocated_kv_mib']:.0f} MiB allocated); steps where blocks in use exceeded what "
        f"the sequences hold plus one block each: {eng['steps_over_bound']}"
    )

    rate_engine, rate_bare = batch1(lm)
    print(
        f"batch-1 decode: lm.generate {rate_engine:.1f} tok/s, bare model + KV cache loop "
        f"{rate_bare:.1f} tok/s: {rate_engine / rate_bare:.2f}x  (target >= 0.95)"
    )
    without, with_cache = prefix_caching(folder)
    print(
        f"prefix caching, 16 requests sharing a 400-token head: prefill {without:.2f} s without, "
        f"{with_cache:.2f} s with: {without / with_cache:.1f}x  (target >= 4)"
    )


def arms(folder: Path, long_folder: Path) -> dict:
    """arlm's own columns on the model in ``folder`` (one request at a time, the engine at 16 and
    at ``FEW``, batch-1 decode), and batch-1 decode of long prompts on its copy in
    ``long_folder``, as ``--baseline`` measures each commit's code: in a process of its own."""
    lm = arlm.load(folder, max_num_seqs=CONCURRENCY)
    requests = make_requests(lm.config.vocab_size)
    single = arlm_single(lm, requests[:SINGLE])
    engine = arlm_engine(lm, requests, blocks=False)
    few = arlm_waves(lm, requests[:SINGLE], FEW)
    rate, _ = batch1(lm, bare=False)
    del lm
    served = arlm.load(folder, kv_cache_memory_gib=SERVED_GIB)
    served.engine.preallocate()
    arlm_waves(served, requests[:FEW], FEW)  # warm-up: a new model's first steps run slower
    served_few = arlm_waves(served, requests[:SINGLE], FEW)
    served_single = arlm_single(served, requests[:SINGLE])
    del served
    # one sequence: the slot design reserves max_model_len positions for each of max_num_seqs
    long = long_decode(arlm.load(long_folder, max_num_seqs=1))
    return {
        "single": single,
        "engine": engine,
        "few": few,
        "batch1": rate,
        "long": long,
        "served_few": served_few,
        "served_single": served_single,
    }


def before_after(kind: str, root: Path, commit: str, rounds: int) -> None:
    """arlm's columns for this checkout and for ``commit`` on the same model, each run in a
    process of its own, in the order this, commit, commit, this, ... (``rounds`` each), so
    drift in the machine's speed falls on both alike; the means of each side's rounds."""
    folder, long_folder = build(kind, root), build(kind, root, LONG_MODEL)
    sides: dict[str, list[dict]] = {"this": [], commit: []}
    order = (["this", commit, commit, "this"] * rounds)[: 2 * rounds]
    with checkout(commit) as old:
        for side in order:
            code = ROOT if side == "this" else old
            cmd = [sys.executable, __file__, "--arms", str(folder), str(long_folder)]
            run = subprocess.run(cmd, env=env(code), capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"{side}'s run failed:\n{run.stderr[-3000:]}")
            sides[side].append(json.loads(run.stdout.strip().splitlines()[-1]))
    print(f"\n== {kind}: this checkout against {commit}, {rounds} round(s) each ==")
    rows = (
        ("engine, 16 at once, output tok/s", lambda r: r["engine"]["output_tokens_per_s"]),
        ("engine, 16 at once, TPOT ms", lambda r: r["engine"]["tpot_ms"]),
        (f"engine, {FEW} at once, output tok/s", lambda r: r["few"]["output_tokens_per_s"]),
        ("one at a time, output tok/s", lambda r: r["single"]["output_tokens_per_s"]),
        (
            f"as served, {FEW} at once, output tok/s",
            lambda r: r["served_few"]["output_tokens_per_s"],
        ),
        (
            "as served, one at a time, output tok/s",
            lambda r: r["served_single"]["output_tokens_per_s"],
        ),
        ("batch-1 decode tok/s", lambda r: r["batch1"]),
        *(
            (f"batch-1 decode tok/s at {n:,} positions", lambda r, n=n: r["long"][str(n)])
            for n in LONG
        ),
    )
    print(f"  {'':<42}{'this':>10}{commit:>10}{'this/before':>13}")
    for name, get in rows:
        now, then = (statistics.mean(get(r) for r in sides[s]) for s in ("this", commit))
        print(f"  {name:<42}{now:10.1f}{then:10.1f}{now / then:12.3f}x")
    requests = make_requests(json.loads((folder / "config.json").read_text())["vocab_size"])
    a, b = sides["this"][0]["engine"]["outputs"], sides[commit][0]["engine"]["outputs"]
    print(f"  tokens, engine: {agreement(a, b, requests)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="gpt2,llama", help="comma-separated: gpt2, llama")
    p.add_argument("--vllm-python", default=os.environ.get("ARLM_VLLM_PYTHON", DEFAULT_VLLM))
    p.add_argument("--attention", action="store_true", help="only the attention measurement")
    p.add_argument("--profile", action="store_true", help="only the 16-sequence step profile")
    p.add_argument(
        "--baseline",
        metavar="COMMIT",
        help="only arlm's own columns, this checkout against COMMIT's code (a before/after)",
    )
    p.add_argument("--rounds", type=int, default=1, help="with --baseline: runs of each side")
    p.add_argument("--arms", nargs=2, help=argparse.SUPPRESS)  # one side's process
    args = p.parse_args()
    if args.arms:
        print(json.dumps(arms(*map(Path, args.arms))))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.attention:
        attention()
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            profile_step(build("gpt2", Path(tmp)))
            return
        if args.baseline:
            for kind in args.models.split(","):
                before_after(kind, Path(tmp), args.baseline, args.rounds)
            return
        for kind in args.models.split(","):
            run_model(kind, Path(tmp), args.vllm_python)


if __name__ == "__main__":
    main()

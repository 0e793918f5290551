"""Training throughput: arlm's trainer beside transformers' GPT-2 with a plain AdamW loop, and
data-parallel scaling from one process to two.

Configurations (dropout 0, character-level vocabulary of 65, as nanoGPT's Shakespeare):
- ``nanogpt-cpu``: nanoGPT's CPU settings, 4 layers x 4 heads x 128 wide, block 64, batch 12;
- ``6x384``: 6 layers x 6 heads x 384 wide, block 256, batch 12.

Sides, each in its own worker process (so each one's peak memory is its own), all run in turns,
``--steps`` steps per turn for ``--rounds`` rounds, one side at a time on every core:
- arlm: ``Trainer.train_step`` (batches from the prepared shards, fused AdamW, the chunked loss),
  as ``arlm train`` runs it, float32; then with ``--bf16``, ``--compile``, and both;
- transformers: ``GPT2LMHeadModel`` (SDPA attention), ``torch.optim.AdamW`` with its defaults,
  ``model(input_ids=x, labels=x)``, backward, step: the loop its documentation shows.

Per side: median ms/step, tokens/s, model FLOPs utilisation against the same run's matmul
ceiling in the side's dtype (``arlm.train.flops``), and the worker's peak RSS above what it held
before building the model. Ratios are transformers' median step time over arlm's.

DDP: ``arlm train`` on the nanogpt-cpu configuration with 1 process (2 threads) and under
``torchrun`` with 2 processes (1 thread each) at the same per-process batch. On 2 cores this
measures the all-reduce's cost, not a speed-up: both runs share the same two cores.

Sharding memory: the 6x384 configuration under ``torchrun`` with 2 processes, ``--sharding ddp``
then ``fsdp``. Each rank counts the bytes it holds of the parameters, their gradients and the
AdamW moments (``arlm.train.sharding.local_bytes``, a DTensor by its local shard) just before
every optimizer step, when all three are alive, and reports its peak; the ratio is FSDP's
largest rank over DDP's. DDP's own gradient buckets (a second copy of the gradients) are not
counted, which flatters DDP.

Run: ``python benchmarks/train.py`` (about 10 minutes on 2 cores); ``--configs nanogpt-cpu``
for one configuration, ``--no-ddp`` to skip scaling, ``--only-memory`` for the sharding memory
alone (a minute).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OUT = Path(__file__).parent / "out"
CONFIGS = {
    "nanogpt-cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "6x384": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=12),
}
ARLM_SIDES = {  # side name -> TrainConfig options
    "arlm f32": {},
    "arlm bf16": {"bf16": True},
    "arlm compile": {"compile": True},
    "arlm compile+bf16": {"compile": True, "bf16": True},
}
HF = "transformers f32"
LR = 6e-4


def char_corpus(folder: Path) -> tuple[Path, Path]:
    """A text of 64 distinct characters (the built-in corpus, other characters dropped) and a
    character-level tokenizer for it: 64 characters and end-of-text, 65 ids."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, models

    from arlm.tokenizer import EOT

    text = "\n".join(topics[name] for name in sorted(topics))
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    chars = sorted(sorted(counts, key=counts.get, reverse=True)[:64])
    keep = set(chars)
    corpus = folder / "chars.txt"
    corpus.write_text("".join(ch for ch in text if ch in keep))
    vocab = {ch: i for i, ch in enumerate(chars)} | {EOT: 64}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one id per character
    tk.add_special_tokens([EOT])
    path = folder / "chars-tokenizer.json"
    tk.save(str(path))
    return corpus, path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def serve_steps(step, conn) -> None:
    """A worker's loop: run ``n`` steps whenever the parent sends ``n``, sending their times
    back; return when it sends None."""
    while (n := conn.recv()) is not None:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        conn.send(times)


def take_turns(worker, jobs: dict, args) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """One spawned ``worker(job, conn)`` process per side of ``jobs``, each running its steps
    in turn on every core: ``args.warmup`` steps each, then ``args.rounds`` rounds of
    ``args.steps``. Returns each side's step times and what its worker sent once built and
    once done (merged)."""
    ctx = mp.get_context("spawn")
    pipes, procs, info = {}, {}, {}
    for side, job in jobs.items():
        parent, child = ctx.Pipe()
        procs[side] = ctx.Process(target=worker, args=(job, child), daemon=True)
        procs[side].start()
        pipes[side] = parent
        info[side] = parent.recv()  # built: its model exists (and its ceiling is measured)
    times: dict[str, list[float]] = {side: [] for side in jobs}
    for side in jobs:  # warm-up: allocator, kernels, and torch.compile's first graphs
        pipes[side].send(args.warmup)
        pipes[side].recv()
    for _ in range(args.rounds):
        for side in jobs:
            pipes[side].send(args.steps)
            times[side] += pipes[side].recv()
    for side in jobs:
        pipes[side].send(None)
        info[side].update(pipes[side].recv())
        procs[side].join()
    return times, info


@dataclass
class Job:
    side: str
    config: dict
    shards: str
    workdir: str
    threads: int


def _arlm_stepper(job: Job):
    from arlm.train import TrainConfig, Trainer

    cfg = TrainConfig(
        corpus=job.shards,
        out=str(Path(job.workdir) / job.side.replace(" ", "-")),
        steps=10**9,  # never reached: the parent decides how many steps run
        lr=LR,
        warmup_steps=0,
        **job.config,
        **ARLM_SIDES[job.side],
    )
    trainer = Trainer(cfg, progress=False)
    trainer.model.train()
    return trainer.train_step, trainer.flops_per_token, cfg.bf16


def _hf_stepper(job: Job):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from arlm.config import ModelConfig
    from arlm.train.data import get_batch, open_shards
    from arlm.train.flops import model_flops_per_token

    c = job.config
    shards = open_shards(Path(job.shards))
    vocab = shards.tokenizer.vocab_size
    config = GPT2Config(
        vocab_size=vocab, n_positions=c["block_size"], n_embd=c["n_embd"], n_layer=c["n_layer"],
        n_head=c["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=vocab - 1, eos_token_id=vocab - 1,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        x, _ = get_batch(shards.train, c["batch_size"], c["block_size"], generator)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    flops = model_flops_per_token(
        ModelConfig(vocab_size=vocab, n_layer=c["n_layer"], n_head=c["n_head"],
                    n_embd=c["n_embd"], block_size=c["block_size"])
    )  # fmt: skip
    return step, flops, False


def worker(job: Job, conn) -> None:
    """Builds one side, then runs ``n`` steps whenever the parent asks, returning their times."""
    import torch

    torch.set_num_threads(job.threads)
    baseline = current_rss_mb()
    step, flops_per_token, bf16 = (_hf_stepper if job.side == HF else _arlm_stepper)(job)
    conn.send({"flops_per_token": flops_per_token, "dtype": "bf16" if bf16 else "f32"})
    serve_steps(step, conn)
    conn.send({"peak_rss_mb": peak_rss_mb() - baseline})


def compare(name: str, config: dict, shards: Path, workdir: Path, peaks: dict, args) -> dict:
    sides = [HF, *ARLM_SIDES]
    jobs = {side: Job(side, config, str(shards), str(workdir), args.threads) for side in sides}
    times, info = take_turns(worker, jobs, args)
    tokens = config["batch_size"] * config["block_size"]
    rows = {}
    for side in sides:
        median = statistics.median(times[side])
        rate = tokens / median
        rows[side] = {
            "ms_per_step": median * 1e3,
            "tokens_per_s": rate,
            "mfu": rate * info[side]["flops_per_token"] / peaks[info[side]["dtype"]],
            "peak_rss_mb": info[side]["peak_rss_mb"],
        }
    hf = rows[HF]["ms_per_step"]
    for side in ARLM_SIDES:
        rows[side]["vs_transformers"] = hf / rows[side]["ms_per_step"]
    print(f"\n{name}: {config}")
    print(f"{'side':<20} {'ms/step':>9} {'tokens/s':>10} {'MFU':>7} {'peak MB':>8} {'ratio':>7}")
    for side, r in rows.items():
        ratio = f"{r['vs_transformers']:.2f}x" if "vs_transformers" in r else ""
        print(
            f"{side:<20} {r['ms_per_step']:>9.1f} {r['tokens_per_s']:>10,.0f} {r['mfu']:>7.1%} "
            f"{r['peak_rss_mb']:>8.0f} {ratio:>7}"
        )
    best = max(ARLM_SIDES, key=lambda s: rows[s]["vs_transformers"])
    print(f"best arlm ({best}) vs transformers: {rows[best]['vs_transformers']:.2f}x")
    return rows


def ddp_scaling(shards: Path, workdir: Path, steps: int) -> dict:
    """``arlm train`` at 1 and 2 processes: tokens/s per process and in total."""
    shape = CONFIGS["nanogpt-cpu"]
    results = {}
    for nproc in (1, 2):
        out = workdir / f"ddp-{nproc}"
        launcher = [sys.executable, "-m", "arlm"]
        if nproc > 1:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", str(nproc), "-m", "arlm"]  # fmt: skip
        command = [*launcher, "train", "--corpus", str(shards), "--out", str(out)]
        command += ["--steps", str(steps), "--log-interval", "10", "--eval-interval", "100000"]
        command += ["--sample", "", "--lr", str(LR)]
        for key, value in shape.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        env = {**os.environ, "OMP_NUM_THREADS": str(2 // nproc)}
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r][1:]  # warm
        total = statistics.median(rates)
        results[nproc] = {"total_tokens_per_s": total, "per_process_tokens_per_s": total / nproc}
    print("\nDDP, nanogpt-cpu, per-process batch 12 (2 processes share the same 2 cores):")
    for nproc, r in results.items():
        print(
            f"  {nproc} process(es): {r['total_tokens_per_s']:>8,.0f} tokens/s in total, "
            f"{r['per_process_tokens_per_s']:>8,.0f} per process"
        )
    scale = results[2]["total_tokens_per_s"] / results[1]["total_tokens_per_s"]
    print(f"  2 vs 1 in total: {scale:.2f}x")
    return results


def memory_rank(sharding: str, shards: str, workdir: str) -> None:
    """One rank of the sharding memory measurement (under torchrun): a few steps, the peak of
    the bytes held before each optimizer step; rank 0 prints every rank's as one JSON line."""
    import torch.distributed as dist

    from arlm.train import TrainConfig, Trainer
    from arlm.train.distributed import close_world
    from arlm.train.sharding import local_bytes

    shape = {**CONFIGS["6x384"], "batch_size": 1}  # the batch sets activations, not these
    cfg = TrainConfig(
        corpus=shards, out=str(Path(workdir) / f"memory-{sharding}"), steps=10**9, lr=LR,
        warmup_steps=0, sharding=sharding, **shape,
    )  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    peak = {"params": 0, "grads": 0, "optimizer": 0}

    def measure(optimizer, args, kwargs) -> None:
        counted = local_bytes(trainer.model, optimizer)
        if sum(counted.values()) > sum(peak.values()):
            peak.update(counted)

    trainer.optimizer.register_step_pre_hook(measure)
    for _ in range(3):  # AdamW makes its moments at the first step: the second sees all three
        trainer.train_step()
    ranks = [None] * trainer.world.size
    dist.all_gather_object(ranks, peak)
    if trainer.world.is_main:
        print("MEMORY " + json.dumps(ranks))
    close_world(trainer.world)


def sharding_memory(shards: Path, workdir: Path) -> dict:
    """Per-rank bytes of parameters + gradients + optimizer state, DDP beside FSDP, 2 ranks."""
    results = {}
    for sharding in ("ddp", "fsdp"):
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc-per-node", "2", __file__, "--memory-rank", sharding,
                   "--shards", str(shards), "--workdir", str(workdir)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        (line,) = [ln for ln in run.stdout.splitlines() if ln.startswith("MEMORY ")]
        results[sharding] = json.loads(line.removeprefix("MEMORY "))
    mib = 2**20
    print("\nsharding memory, 6x384, 2 processes: per rank, MiB held before an optimizer step")
    print(f"{'sharding':<9} {'rank':>4} {'params':>8} {'grads':>8} {'AdamW':>8} {'total':>8}")
    for sharding, ranks in results.items():
        for rank, r in enumerate(ranks):
            total = sum(r.values())
            print(
                f"{sharding:<9} {rank:>4} {r['params'] / mib:>8.2f} {r['grads'] / mib:>8.2f} "
                f"{r['optimizer'] / mib:>8.2f} {total / mib:>8.2f}"
            )
    ratio = max(sum(r.values()) for r in results["fsdp"]) / max(
        sum(r.values()) for r in results["ddp"]
    )
    print(f"  FSDP / DDP, largest rank: {ratio:.3f}x (target <= 0.55x)")
    return {**results, "fsdp_over_ddp": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no-ddp", action="store_true")
    parser.add_argument("--ddp-steps", type=int, default=60)
    parser.add_argument("--only-memory", action="store_true", help="sharding memory alone")
    # a rank of the sharding memory measurement (the benchmark launches these itself)
    parser.add_argument("--memory-rank", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_rank:
        memory_rank(args.memory_rank, args.shards, args.workdir)
        return

    import torch

    from arlm.tokenizer import Tokenizer
    from arlm.train.flops import peak_flops
    from arlm.train.prepare import prepare

    results = {}
    with tempfile.TemporaryDirectory(prefix="arlm-train-bench-") as tmp:
        workdir = Path(tmp)
        corpus, tokenizer_path = char_corpus(workdir)
        shards = workdir / "shards"
        prepare(str(corpus), shards, tokenizer=Tokenizer.from_file(tokenizer_path), progress=False)
        results["sharding_memory"] = sharding_memory(shards, workdir)
        if args.only_memory:
            OUT.mkdir(exist_ok=True)
            (OUT / "train-memory.json").write_text(json.dumps(results, indent=2))
            return
        # one ceiling per dtype for every side, measured here with the workers' threads
        torch.set_num_threads(args.threads)
        cpu = torch.device("cpu")
        peaks = {"f32": peak_flops(cpu, torch.float32), "bf16": peak_flops(cpu, torch.bfloat16)}
        print(
            f"matmul ceiling (MFU's denominator): float32 {peaks['f32'] / 1e9:,.0f} GFLOP/s, "
            f"bfloat16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s on {args.threads} threads"
        )
        results["matmul_gflops"] = {k: v / 1e9 for k, v in peaks.items()}
        for name in args.configs.split(","):
            results[name] = compare(name, CONFIGS[name], shards, workdir, peaks, args)
        if not args.no_ddp:
            results["ddp"] = ddp_scaling(shards, workdir, args.ddp_steps)
    OUT.mkdir(exist_ok=True)
    (OUT / "train.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Serving: ``arlm serve`` beside vLLM's CPU OpenAI server and llama.cpp's ``llama-server``, on
the same random-weight GPT-2 124M, each measured in turn with ``arlm bench serve``.

Servers (each its own process, started here and stopped after its runs):
- arlm, float32, and arlm with int8 weights (``--quantize int8``), 16 sequences, ``--max-queue
  32``;
- vLLM's CPU build (``python -m vllm.entrypoints.openai.api_server``) from its own virtual
  environment, float32 (install: ``benchmarks/peers/install_vllm.sh``);
- llama.cpp's ``llama-server`` on arlm's own GGUF exports, f32 and q8_0, ``--parallel 16``
  (install: ``benchmarks/peers/install_llama_cpp.sh``).
A missing peer is skipped, saying how to install it.

Load: random 64-token prompts (token ids, so every server sees exactly 64), 128 output tokens
with ``ignore_eos``, greedy, at 1, 4 and 16 concurrent streams (8, 16 and 64 requests). Then
overload, for arlm: Poisson arrivals at 4x the request rate it sustained at 16 streams, with
``--max-queue 32``: how fast the excess is refused (429), the TPOT of the accepted requests,
and the server's memory (RSS) over the run.

Agents and evaluators, for arlm (issue 25), in the same run:
- constrained decoding's cost: 32 requests at 16 streams, each under a JSON schema (an array
  of at least 200 objects, which no answer completes within max_tokens, so every answer runs
  to max_tokens as the free ones do: answers that ended early would change the batch and the
  share of prefill in each token's time), against the same requests free (``ignore_eos`` off
  in both), after a warm-up, each arm run twice in the order free, constrained, constrained,
  free: output tok/s and TPOT (the means of an arm's two runs), target <= 10% slower;
- prompt log-probability scoring in lm-evaluation-harness's request shape (a token-id prompt of
  a 64-token context and a 4-token continuation, ``echo``, ``logprobs=1``, ``max_tokens=1``,
  not streamed), 16 in flight: prompt tokens scored per second. vLLM's CPU server is the peer
  when installed (the same requests); without it, arlm's figure stands alone.

``--baseline COMMIT`` (a before/after check of a change) also serves COMMIT's arlm (its
``arlm`` package from ``git archive``, first on the server's import path), the same command,
right after this checkout's: the two servers' concurrency sweeps and their ratios (no agents,
evaluators or overload runs). With ``--rounds N`` each side is served N times, in the order
this, COMMIT, COMMIT, this, ..., so that drift in the machine's speed falls on both alike, and
the means of each side's sweeps are compared.

Run: ``python benchmarks/serve.py`` (about 10 minutes on 2 cores with both peers);
``--servers arlm,vllm`` for some, ``--vllm-python`` / ``--llama-server`` for other installs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from arlm.measure.serve_bench import ServeBenchConfig, run

sys.path.insert(0, str(Path(__file__).parent))
from baseline import checkout, env  # noqa: E402
from decode import build  # noqa: E402  (the same GPT-2 folder and GGUF files as decode.py)

CONCURRENCY = {1: 8, 4: 16, 16: 64}  # streams -> requests sent
INPUT_LEN, OUTPUT_LEN = 64, 128
DEFAULT_VLLM = "/work/peers/vllm-venv/bin/python"
DEFAULT_LLAMA = "/work/peers/llama.cpp-build/bin/llama-server"


@dataclass
class Peer:
    name: str
    command: list[str]
    env: dict = field(default_factory=dict)
    missing: str | None = None  # why it cannot run, with the command that installs it


def peers(
    root: Path, folder: Path, args: argparse.Namespace, port: int, old: Path | None = None
) -> list[Peer]:
    """The servers, in the order they run; ``old`` holds ``--baseline``'s commit's code."""
    arlm = [sys.executable, "-m", "arlm", "serve", str(folder), "--port", str(port)]
    arlm += ["--max-num-seqs", "16", "--max-queue", "32", "--log-level", "warning"]
    arlm += ["--served-model-name", "gpt2"]
    vllm = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder)]
    vllm += ["--port", str(port), "--dtype", "float32", "--max-num-seqs", "16"]
    vllm += ["--served-model-name", "gpt2", "--disable-uvicorn-access-log"]
    llama = [args.llama_server, "--port", str(port), "--parallel", "16"]
    llama += ["-t", str(args.llama_threads), "-c", str(16 * 1024), "--alias", "gpt2"]
    no_vllm = (
        None
        if Path(args.vllm_python).exists()
        else (f"{args.vllm_python} not found; install: benchmarks/peers/install_vllm.sh")
    )
    no_llama = (
        None
        if Path(args.llama_server).exists()
        else (f"{args.llama_server} not found; install: benchmarks/peers/install_llama_cpp.sh")
    )
    vllm_env = {
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    before = []
    if old is not None:  # the same command; the commit's arlm first on the import path
        before = [Peer(f"arlm@{args.baseline}", arlm, env(old))]
    return [
        Peer("arlm", arlm),
        *before,
        Peer("arlm int8", arlm + ["--quantize", "int8"]),
        Peer("vLLM", vllm, vllm_env, no_vllm),
        Peer("llama f32", llama + ["-m", str(root / "gpt2-f32.gguf")], missing=no_llama),
        Peer("llama q8_0", llama + ["-m", str(root / "gpt2-q8_0.gguf")], missing=no_llama),
    ]


def process_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (vLLM runs its engine in a child)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class Running:
    """A peer's server process, up until ``stop``; ``rss`` samples its memory every 0.2 s."""

    def __init__(self, peer: Peer, port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log.open("w")
        self.process = subprocess.Popen(
            peer.command,
            env={**os.environ, **peer.env},
            stdout=self.log,
            stderr=self.log,
            cwd=log.parent,  # not the checkout: nothing there may shadow a peer's imports
        )
        self.rss: list[tuple[float, int]] = []
        self._sampling = True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while self._sampling and self.process.poll() is None:
            self.rss.append((time.monotonic(), process_rss(self.process.pid)))
            time.sleep(0.2)

    def wait_ready(self, timeout: float = 600) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"exited with {self.process.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"not ready after {timeout} s; see {self.log.name}")

    def stop(self) -> None:
        self._sampling = False
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def bench(url: str, concurrency: int | None, num_prompts: int, rate: float = float("inf")):
    config = ServeBenchConfig(
        num_prompts=num_prompts,
        max_concurrency=concurrency,
        request_rate=rate,
        input_len=INPUT_LEN,
        output_len=OUTPUT_LEN,
        model="gpt2",
        seed=concurrency or 0,
    )
    return asyncio.run(run(url, config))


def overload(server: Running, sustained: float) -> dict:
    """Poisson arrivals at 4x ``sustained`` requests/s for 30 s worth of requests."""
    rate = 4 * sustained
    before = len(server.rss)
    summary = bench(server.url, None, max(int(rate * 30), 64), rate)
    during = [b for _, b in server.rss[before:]] or [process_rss(server.process.pid)]
    summary["rss_start"], summary["rss_max"] = during[0], max(during)
    summary["rss_end"] = during[-1]
    summary["rate"] = rate
    return summary


# a schema whose answers never complete within OUTPUT_LEN: every request decodes all its tokens
CONSTRAINT = {
    "structured_outputs": {
        "json": {
            "type": "array",
            "minItems": 200,
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
                "required": ["name", "n"],
            },
        }
    }
}
SCORING_CONTEXT, SCORING_CONTINUATION, SCORING_REQUESTS = 64, 4, 128


def bench_free_and_constrained(url: str) -> dict:
    """32 requests at 16 streams, free and under ``CONSTRAINT``, the same prompts, no
    ignore_eos: after a warm-up, each arm twice in the order free, constrained, constrained,
    free (drift in the machine's speed falls on both alike); each arm's throughput and TPOT
    are the means of its two runs."""

    def config(extra: str | None, num_prompts: int = 32) -> ServeBenchConfig:
        return ServeBenchConfig(
            num_prompts=num_prompts,
            max_concurrency=16,
            input_len=INPUT_LEN,
            output_len=OUTPUT_LEN,
            ignore_eos=False,
            model="gpt2",
            seed=16,
            extra_body=extra,
        )

    arms = {"free": None, "constrained": json.dumps(CONSTRAINT)}
    asyncio.run(run(url, config(None, num_prompts=16)))  # warm-up (the schema stays uncompiled)
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for name in ("free", "constrained", "constrained", "free"):
        runs[name].append(asyncio.run(run(url, config(arms[name]))))
    return {
        name: {
            **means(results),
            "total_output_tokens": sum(r["total_output_tokens"] for r in results),
        }
        for name, results in runs.items()
    }


async def _score_all(url: str, prompts: list[list[int]], concurrency: int) -> float:
    """Seconds to send ``prompts`` in lm-eval's loglikelihood shape, ``concurrency`` at once."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(prompt):
            async with limit:
                body = {"model": "gpt2", "prompt": prompt, "echo": True, "logprobs": 1}
                body |= {"max_tokens": 1, "temperature": 0, "seed": 1234}
                r = await client.post("/v1/completions", json=body)
                r.raise_for_status()
                scored = r.json()["choices"][0]["logprobs"]["token_logprobs"]
                assert len(scored) == len(prompt) + 1 and scored[0] is None

        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - started


def bench_scoring(url: str) -> dict:
    import random

    rng = random.Random(25)
    n = SCORING_CONTEXT + SCORING_CONTINUATION
    prompts = [[rng.randrange(100, 1000) for _ in range(n)] for _ in range(SCORING_REQUESTS)]
    asyncio.run(_score_all(url, prompts[:8], 16))  # warm-up
    seconds = asyncio.run(_score_all(url, prompts, 16))
    return {
        "requests": len(prompts),
        "seconds": seconds,
        "requests_per_second": len(prompts) / seconds,
        "prompt_tokens_per_second": len(prompts) * n / seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--servers", default="arlm,arlm int8,vLLM,llama f32,llama q8_0")
    p.add_argument("--vllm-python", default=DEFAULT_VLLM)
    p.add_argument("--llama-server", default=DEFAULT_LLAMA)
    p.add_argument(
        "--llama-threads",
        type=int,
        default=2,
        help="llama-server's threads (1 does better than 2 when the machine is busy)",
    )
    p.add_argument(
        "--agents-only",
        action="store_true",
        help="only the agents and evaluators measurements (constrained decoding, prompt "
        "scoring), not the concurrency sweep and the overload",
    )
    p.add_argument(
        "--baseline",
        metavar="COMMIT",
        help="also serve COMMIT's arlm, the same way, right after this checkout's (a "
        "before/after: the concurrency sweeps only)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --baseline: sweeps of each side, alternating (this, COMMIT, COMMIT, this, ...)",
    )
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--out", default="benchmarks/out/serve.json", help="the results as JSON")
    args = p.parse_args()
    wanted = [s.strip() for s in args.servers.split(",")]
    if args.rounds < 1 or (args.rounds > 1 and not (args.baseline and "arlm" in wanted)):
        p.error("--rounds N (N >= 1) alternates arlm with --baseline's: give both")
    if args.baseline:
        wanted.append(f"arlm@{args.baseline}")
    root = Path(tempfile.mkdtemp(prefix="arlm-serve-bench-"))
    folder = build("gpt2", root)
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} cores; GPT-2 124M, random weights")
    print(f"{INPUT_LEN}-token prompts, {OUTPUT_LEN} output tokens (ignore_eos), greedy\n")
    overloaded = None
    agents: dict[str, dict] = {}  # issue 25's measurements, per server
    sweeps: dict[str, list[dict[int, dict]]] = {}  # per server, one per time it was served
    stack = contextlib.ExitStack()
    old = stack.enter_context(checkout(args.baseline)) if args.baseline else None
    order = [p for p in peers(root, folder, args, args.port, old) if p.name in wanted]
    if args.baseline and args.rounds > 1:  # this, COMMIT, COMMIT, this, ...
        mine, theirs = (p for p in order if p.name in ("arlm", f"arlm@{args.baseline}"))
        order = ([mine, theirs, theirs, mine] * args.rounds)[: 2 * args.rounds]
    for peer in order:
        if peer.missing:
            print(f"{peer.name}: skipped ({peer.missing})")
            continue
        server = Running(peer, args.port, root / f"{peer.name.replace(' ', '-')}.log")
        try:
            ready = server.wait_ready()
            bench(server.url, 4, 8)  # warm-up: first-call allocations and compilation
            sweep: dict[int, dict] = {}
            sweeps.setdefault(peer.name, []).append(sweep)
            for c, n in ({} if args.agents_only else CONCURRENCY).items():
                r = sweep[c] = bench(server.url, c, n)
                print(
                    f"{peer.name:11} c={c:<3} {r['output_throughput']:7.1f} tok/s  TTFT p50 "
                    f"{r.get('median_ttft_ms', float('nan')):7.0f} ms  TPOT p50 "
                    f"{r.get('median_tpot_ms', float('nan')):6.1f} ms  ({r['failed']} failed; "
                    f"ready in {ready:.0f} s)",
                    flush=True,
                )
            if args.baseline:  # a before/after: the two servers' sweeps alone
                continue
            if peer.name == "arlm":
                agents["arlm"] = bench_free_and_constrained(server.url)
            if peer.name in ("arlm", "vLLM"):
                agents.setdefault(peer.name, {})["scoring"] = bench_scoring(server.url)
            report_agents({peer.name: agents[peer.name]} if peer.name in agents else {})
            if peer.name == "arlm" and not args.agents_only:
                overloaded = overload(server, sweep[16]["request_throughput"])
        finally:
            server.stop()
    stack.close()
    results = {name: mean_sweep(runs) for name, runs in sweeps.items()}
    if not args.agents_only:
        report(results, overloaded)
    if "vLLM" in agents:
        report_agents(agents)  # the ratio, once both have run
    elif "arlm" in agents:
        print("vLLM is not installed here: no peer figure (benchmarks/peers/install_vllm.sh)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    record = {"runs": results, "overload": overloaded, "agents": agents}
    Path(args.out).write_text(json.dumps(record, indent=1))


def means(results: list[dict]) -> dict:
    """Each number in ``results`` (benchmark results with the same keys), averaged."""
    return {
        key: statistics.mean(r[key] for r in results)
        for key, value in results[0].items()
        if isinstance(value, (int, float))
    }


def mean_sweep(runs: list[dict[int, dict]]) -> dict[int, dict]:
    """One server's sweep: the one run as it is, or each concurrency's ``means`` over ``runs``."""
    if len(runs) == 1:
        return runs[0]
    return {c: means([run[c] for run in runs]) for c in runs[0]}


def report(results: dict, overloaded: dict | None) -> None:
    print("\n                 output tok/s            TTFT p50 ms             TPOT p50 ms")
    print("server         " + "  ".join(f"{'c=' + str(c):>6}" for c in CONCURRENCY) * 3)
    for name, runs in results.items():
        row = [runs[c]["output_throughput"] for c in CONCURRENCY]
        row += [runs[c].get("median_ttft_ms", float("nan")) for c in CONCURRENCY]
        row += [runs[c].get("median_tpot_ms", float("nan")) for c in CONCURRENCY]
        print(f"{name:14} " + "  ".join(f"{v:6.0f}" if v >= 10 else f"{v:6.1f}" for v in row))
    if "arlm" not in results:
        return
    a = results["arlm"]

    def tput(name, c):
        return results[name][c]["output_throughput"]

    print("\nratios:")
    print(
        f"  arlm 16 streams / 1 stream, output tok/s: {tput('arlm', 16) / tput('arlm', 1):.2f}x"
        "  (target >= 5)"
    )
    print(
        f"  arlm TPOT p50 at 16 / at 1: "
        f"{a[16]['median_tpot_ms'] / a[1]['median_tpot_ms']:.2f}x  (target <= 3)"
    )
    before = [("arlm", name) for name in results if name.startswith("arlm@")]
    for mine, theirs in (
        *before,
        ("arlm", "vLLM"),
        ("arlm", "llama f32"),
        ("arlm int8", "llama q8_0"),
        ("arlm int8", "vLLM"),
    ):
        if mine not in results or theirs not in results:
            continue
        ratios = "  ".join(f"c={c}: {tput(mine, c) / tput(theirs, c):.2f}x" for c in CONCURRENCY)
        ttft = results[mine][16]["median_ttft_ms"] / results[theirs][16]["median_ttft_ms"]
        tpot = results[mine][16]["median_tpot_ms"] / results[theirs][16]["median_tpot_ms"]
        print(
            f"  {mine} / {theirs}, output tok/s: {ratios};  TTFT p50 at 16: {ttft:.2f}x;  "
            f"TPOT p50 at 16: {tpot:.2f}x"
        )
    if overloaded is not None:
        o = overloaded
        refused = o["status_counts"].get("429", 0)
        print(
            f"\noverload (arlm, --max-queue 32): {o['num_prompts']} requests at "
            f"{o['rate']:.1f}/s (4x the {o['rate'] / 4:.2f}/s sustained at 16 streams)\n"
            f"  accepted {o['completed']}, refused with 429: {refused}; 429 latency p50 "
            f"{o.get('median_rejected_ms', float('nan')):.1f} ms, p99 "
            f"{o.get('p99_rejected_ms', float('nan')):.1f} ms  (target <= 50)\n"
            f"  accepted TPOT p50 {o.get('median_tpot_ms', float('nan')):.1f} ms against "
            f"{a[16]['median_tpot_ms']:.1f} ms at 16 streams; TTFT p50 "
            f"{o.get('median_ttft_ms', float('nan')):.0f} ms (queueing)\n"
            f"  server RSS: {o['rss_start'] / 2**20:.0f} MiB at the start, "
            f"{o['rss_max'] / 2**20:.0f} MiB at most, {o['rss_end'] / 2**20:.0f} MiB at the end"
        )


def report_agents(agents: dict) -> None:
    """The agents and evaluators figures of the servers in ``agents`` measured so far."""
    mine = agents.get("arlm", {})
    if "free" in mine:
        free, constrained = mine["free"], mine["constrained"]
        tput = constrained["output_throughput"] / free["output_throughput"]
        tpot = constrained["median_tpot_ms"] / free["median_tpot_ms"]
        print(
            f"\nconstrained decoding (arlm, 16 streams, a JSON schema per request): "
            f"{constrained['output_throughput']:.1f} tok/s against "
            f"{free['output_throughput']:.1f} free ({constrained['total_output_tokens']} and "
            f"{free['total_output_tokens']} tokens): {tput:.3f}x;  TPOT p50 "
            f"{constrained['median_tpot_ms']:.1f} ms against {free['median_tpot_ms']:.1f} ms: "
            f"{tpot:.3f}x  (target: cost <= 10%)",
            flush=True,
        )
    for name, result in agents.items():
        s = result["scoring"]
        print(
            f"prompt scoring ({name}, lm-eval's loglikelihood requests, {SCORING_CONTEXT}+"
            f"{SCORING_CONTINUATION} tokens, 16 in flight): {s['requests_per_second']:.1f} "
            f"requests/s, {s['prompt_tokens_per_second']:.0f} prompt tokens/s",
            flush=True,
        )
    if "arlm" in agents and "vLLM" in agents:
        ratio = agents["arlm"]["scoring"]["prompt_tokens_per_second"]
        ratio /= agents["vLLM"]["scoring"]["prompt_tokens_per_second"]
        print(f"  arlm / vLLM prompt scoring: {ratio:.2f}x  (target >= 1)")


if __name__ == "__main__":
    main()

"""``arlm bench``: one model's prefill and decode speed through the engine (``bench decode
MODEL``, or just ``bench MODEL``), or an OpenAI-compatible server under load (``bench serve
URL``)."""

from __future__ import annotations

import argparse
import asyncio
import json

from arlm.atomic import write_atomic
from arlm.cli.common import add_cache_options, add_model_options, load_kwargs
from arlm.cli.options import add_options, given

KINDS = ("decode", "serve")


def add_parser(sub) -> None:
    from arlm.measure.serve_bench import ServeBenchConfig

    p = sub.add_parser(
        "bench",
        help="speed of a model (bench MODEL) or of a server under load (bench serve URL)",
        description="bench decode MODEL (or bench MODEL): prefill and decode speed of one "
        "request. bench serve URL: load an OpenAI-compatible server with many streams.",
    )
    kinds = p.add_subparsers(dest="bench_command", required=True, metavar="KIND")
    d = kinds.add_parser(
        "decode",
        help="prefill and decode speed, time to first token, peak memory",
        description="Greedy generation after a random prompt, through the same decode loop as "
        "generate; one warm-up run, then the median of the timed runs.",
    )
    add_model_options(d)
    add_cache_options(d)
    d.add_argument("--prompt-tokens", type=int, help="prompt length (default: 64)")
    d.add_argument("--new-tokens", type=int, help="tokens generated per run (default: 128)")
    d.add_argument("--runs", type=int, help="timed runs (default: 3)")
    d.set_defaults(run=run_decode)

    s = kinds.add_parser(
        "serve",
        help="throughput and latency of an OpenAI-compatible server under load",
        description="Stream NUM_PROMPTS requests to URL (arlm serve, vLLM, llama-server, ...), "
        "all at once or at a Poisson request rate, and report output tokens/s, requests/s "
        "and TTFT / TPOT / ITL / end-to-end percentiles, as vllm bench serve does.",
    )
    s.add_argument("url", help="the server's base URL, e.g. http://127.0.0.1:8000")
    add_options(s, ServeBenchConfig)
    s.add_argument("--result-file", help="also write the summary as JSON here")
    s.set_defaults(run=run_serve)


def expand(argv: list[str]) -> list[str]:
    """``arlm bench MODEL ...`` is short for ``arlm bench decode MODEL ...``."""
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] not in (*KINDS, "-h", "--help"):
        return ["bench", "decode", *argv[1:]]
    return argv


def run_decode(args: argparse.Namespace) -> None:
    import arlm
    from arlm.measure.speed import bench

    lm = arlm.load(args.model, **load_kwargs(args))
    given_runs = {k: getattr(args, k) for k in ("prompt_tokens", "new_tokens", "runs")}
    r = bench(lm, **{k: v for k, v in given_runs.items() if v is not None})
    n_params = lm.model.num_params()
    dtype = lm.config.quantization or str(lm.model.wte.weight.dtype).removeprefix("torch.")
    print(
        f"model: {args.model} ({n_params / 1e6:.1f}M parameters, {dtype}, {lm.device}); "
        f"{r.prompt_tokens} prompt + {r.new_tokens} new tokens, median of {r.runs} runs"
    )
    print(f"prefill      {r.prefill_tokens_per_second:10.1f} tokens/s")
    print(f"decode       {r.decode_tokens_per_second:10.1f} tokens/s")
    print(f"first token  {r.time_to_first_token_ms:10.1f} ms")
    print(
        f"KV cache     {r.kv_cache_peak_bytes / 2**20:10.2f} MiB of positions "
        f"({r.kv_cache_bytes / 2**20:.2f} MiB in whole blocks)"
    )
    print(f"peak memory  {r.peak_memory_bytes / 2**20:10.1f} MiB")
    print(
        f"weights      {r.weight_bytes / 2**20:10.1f} MiB read per decode step "
        f"({r.weight_bytes * r.decode_tokens_per_second / 1e9:.1f} GB/s at that speed)"
    )


def run_serve(args: argparse.Namespace) -> None:
    from arlm.measure.serve_bench import ServeBenchConfig, report, run

    config = ServeBenchConfig(**given(args, ServeBenchConfig))
    summary = asyncio.run(run(args.url, config))
    print(report(summary))
    if args.result_file:
        write_atomic(args.result_file, json.dumps(summary, indent=2).encode())
    if not summary["completed"]:
        raise ValueError(f"no request succeeded; the first error: {summary['errors'][0]}")

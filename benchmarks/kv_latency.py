"""Decode latency against position: with each KV cache kind, and with no cache at all.

Without a cache every new token re-runs the whole context, so a token at position p costs O(p)
(and the attention in it O(p^2)) and generating n tokens costs O(n^2); with a cache a token costs
one token's work plus attention over p cached keys, and n tokens cost about O(n). The kinds: the
contiguous cache (float32, int8, int4), and the engine's paged cache (``PagedKVCache``: the
sequence's own blocks, fed as the engine feeds it, prefill chunks and then one decode row per
step, its blocks read in place). The windowed cache holds a fixed number of positions, so
past its window a token costs the same at any position. Random weights: latency does not depend
on what a model learned.

Run: ``python benchmarks/kv_latency.py`` (about two minutes on two CPU cores). Prints the tables
and writes ``benchmarks/out/kv_latency.png``.
"""

from __future__ import annotations

import argparse
import time

import torch
from report import print_table, save_figure  # benchmarks/report.py, beside this script

from arlm.config import ModelConfig
from arlm.kv_cache import CacheConfig, PagedKVCache, PagedRow, StepLayout
from arlm.model import Transformer

POSITIONS = (64, 128, 256, 512, 1024, 2048)
FILL_CHUNK = 256  # the context is filled in chunks, as chunked prefill would
KINDS = {  # label -> settings; all in float32 unless quantized
    "contiguous": CacheConfig(),
    "int8": CacheConfig(dtype="int8"),
    "int4": CacheConfig(dtype="int4"),
    "paged": None,  # the engine's PagedKVCache, one sequence in it
}


class OneSequence:
    """One sequence in the engine's ``PagedKVCache``, its blocks in order, driven with
    ``start_pos`` as the contiguous cache is: each forward becomes the step layout the engine's
    runner would build for it, a prefill chunk for several tokens, a decode row for one."""

    def __init__(self, config: ModelConfig, max_len: int, block_size: int = 16) -> None:
        blocks = -(-max_len // block_size)
        self.paged = PagedKVCache.for_model(config, blocks, block_size)
        self.paged.reserve(blocks)
        self.table = list(range(blocks))
        self._step = None

    def prepare(self, start_pos: int, T: int, rotate=None) -> None:
        row = PagedRow(self.table, start_pos, T)
        layout = StepLayout([row], []) if T == 1 else StepLayout([], [row])
        self._step = self.paged.step(layout)
        self._step.prepare(start_pos, T, rotate)

    def attend(self, layer: int, q, k, v, scale=None):
        return self._step.attend(layer, q, k, v, scale)


def build(kind: CacheConfig | None, config: ModelConfig, max_len: int):
    return OneSequence(config, max_len) if kind is None else kind.build(config, 1, max_len)


def make_model(preset: str, block_size: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.preset(preset, block_size=block_size)).eval()


def best_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


@torch.inference_mode()
def cached_ms(model: Transformer, cache, tokens: torch.Tensor, p: int, steps: int) -> float:
    """Best ms of the decode steps at positions p-1 .. p+steps-2 (the p-th token onwards).

    The best, not the median: on a shared machine it is the time least disturbed by other load.
    """
    for s in range(0, p - 1, FILL_CHUNK):
        model(tokens[:, s : min(s + FILL_CHUNK, p - 1)], kv_cache=cache, start_pos=s)
    times = []
    for pos in range(p - 1, p - 1 + steps):
        t0 = time.perf_counter()
        model(tokens[:, pos : pos + 1], kv_cache=cache, start_pos=pos)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


@torch.inference_mode()
def uncached_ms(model: Transformer, tokens: torch.Tensor, p: int, reps: int) -> float:
    """Best ms of one forward over p tokens: the p-th token's cost without a cache."""
    return best_ms(lambda: model(tokens[:, :p], last_only=True), reps)


def total_seconds(per_token_ms: list[float], positions: tuple[int, ...], n: int) -> float:
    """Seconds to generate tokens 1..n, integrating the per-token curve (linear in between)."""
    xs, ys = [1, *positions], [per_token_ms[0], *per_token_ms]
    total = 0.0
    for p in range(1, n + 1):
        i = next(i for i in range(1, len(xs)) if p <= xs[i])
        w = (p - xs[i - 1]) / (xs[i] - xs[i - 1])
        total += (1 - w) * ys[i - 1] + w * ys[i]
    return total / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="decode steps timed per position")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    max_pos = POSITIONS[-1]
    tokens = torch.randint(0, 4096, (1, max_pos + args.steps), generator=torch.Generator())

    # --- GPT-2 layout (the "small" preset's sizes) with a 2048-position context ----------------
    gpt2 = make_model("small", max_pos + args.steps)  # the timed steps go a little past 2048
    cfg = gpt2.config
    curves: dict[str, list[float]] = {"no cache": []}
    for p in POSITIONS:
        curves["no cache"].append(uncached_ms(gpt2, tokens, p, reps=5))
    for label, kind in KINDS.items():
        curves[label] = [
            cached_ms(gpt2, build(kind, cfg, p + args.steps), tokens, p, args.steps)
            for p in POSITIONS
        ]
    rows = [
        [
            str(p),
            *(f"{curves[k][i]:.2f}" for k in curves),
            f"{curves['no cache'][i] / curves['contiguous'][i]:.1f}x",
        ]
        for i, p in enumerate(POSITIONS)
    ]
    print_table(
        f"ms per generated token at position p (gpt2 layout, {cfg.n_layer} layers, "
        f"d={cfg.n_embd}, float32, random weights)",
        ["position", *(f"{k} ms" for k in curves), "no cache / cache"],
        rows,
    )
    totals = {k: [total_seconds(v, POSITIONS, p) for p in POSITIONS] for k, v in curves.items()}
    rows = [
        [
            str(p),
            f"{totals['no cache'][i]:.2f}",
            f"{totals['contiguous'][i]:.2f}",
            "" if i == 0 else f"{totals['no cache'][i] / totals['no cache'][i - 1]:.2f}x",
            "" if i == 0 else f"{totals['contiguous'][i] / totals['contiguous'][i - 1]:.2f}x",
        ]
        for i, p in enumerate(POSITIONS)
    ]
    print_table(
        "total seconds to generate n tokens (the per-token curve integrated); when n doubles, "
        "linear cost doubles and quadratic cost quadruples",
        ["n", "no cache s", "cache s", "no cache growth", "cache growth"],
        rows,
    )

    # --- the window: a Llama-layout model run 8x past a 256-position window ------------------
    llama = make_model("llama-small", max_pos + args.steps)  # the contiguous cache follows too
    window = CacheConfig(window=max_pos // 8 - 4, sink_tokens=4)  # 256 slots in all
    win_ms, win_bytes, full_ms, full_bytes = [], [], [], []
    for p in POSITIONS:
        cache = window.build(llama.config, 1, p + args.steps)
        win_ms.append(cached_ms(llama, cache, tokens, p, args.steps))
        win_bytes.append(cache.nbytes)
        cache = CacheConfig().build(llama.config, 1, p + args.steps)
        full_ms.append(cached_ms(llama, cache, tokens, p, args.steps))
        full_bytes.append(cache.nbytes)
    rows = [
        [
            str(p),
            f"{win_ms[i]:.2f}",
            f"{win_bytes[i] / 2**10:.0f}",
            f"{full_ms[i]:.2f}",
            f"{full_bytes[i] / 2**10:.0f}",
        ]
        for i, p in enumerate(POSITIONS)
    ]
    print_table(
        f"windowed cache (4 sinks + {window.window} recent = 256 positions) vs contiguous, "
        "llama layout: ms per token and KV KiB at position p",
        ["position", "windowed ms", "windowed KiB", "contiguous ms", "contiguous KiB"],
        rows,
    )
    plot(curves, totals, win_ms, full_ms)


def plot(curves, totals, win_ms, full_ms) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for label, ys in curves.items():
        axes[0].plot(POSITIONS, ys, marker="o", label=label)
    axes[0].set(
        xscale="log",
        yscale="log",
        xlabel="position",
        ylabel="ms per token",
        title="per-token latency (gpt2 layout)",
    )
    for label in ("no cache", "contiguous"):
        axes[1].plot(POSITIONS, totals[label], marker="o", label=label)
    axes[1].set(xlabel="tokens generated", ylabel="seconds", title="total latency")
    axes[2].plot(POSITIONS, win_ms, marker="o", label="windowed (256 slots)")
    axes[2].plot(POSITIONS, full_ms, marker="o", label="contiguous")
    axes[2].axvline(256, color="grey", ls=":")
    axes[2].set(
        xscale="log",
        xlabel="position",
        ylabel="ms per token",
        title="window: flat past 256 (llama layout)",
    )
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    save_figure(fig, "kv_latency.png")


if __name__ == "__main__":
    main()

"""Cost of LoopDetector.push per item, on streams shaped like generated token ids.

Compares the shipped detector with the plain scheme that keeps one run counter per period and
updates all of them on every push (O(max_pattern_size) per item). Run:
``python benchmarks/loop_detector.py``.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from arlm.loops import LoopDetector

VOCAB = 50257  # GPT-2's vocabulary size
N_ITEMS = 20_000
N_ITEMS_PLAIN = 2_000  # the baseline is slow; fewer items give the same per-item cost
SIZES = (64, 256, 1024)


class PerPeriodRuns:
    """Baseline: the run of every period updated on every push."""

    def __init__(self, max_pattern_size: int, min_count: int, min_span: int) -> None:
        self.max_pattern_size, self.min_count, self.min_span = max_pattern_size, min_count, min_span
        self.items: list[int] = []
        self.runs = [0] * (max_pattern_size + 1)

    def push(self, x: int) -> int:
        items, runs, n = self.items, self.runs, len(self.items)
        found = 0
        for p in range(1, min(self.max_pattern_size, n) + 1):
            if items[n - p] == x:
                r = runs[p] = runs[p] + 1
                if not found and p + r >= max(self.min_count * p, self.min_span):
                    found = p
            else:
                runs[p] = 0
        items.append(x)
        return found


def streams(rng: random.Random) -> dict[str, list[int]]:
    """Token streams: no loop, text-like frequencies, an exact loop, a near loop."""
    zipf = rng.choices(range(VOCAB), weights=[1 / (r + 1) for r in range(VOCAB)], k=N_ITEMS)
    sentence = rng.choices(range(VOCAB), k=50)
    near = []
    while len(near) < N_ITEMS:  # each copy of the sentence has one token changed
        copy = list(sentence)
        copy[rng.randrange(len(copy))] = rng.randrange(VOCAB)
        near += copy
    prefix = zipf[:200]
    return {
        "uniform random": rng.choices(range(VOCAB), k=N_ITEMS),
        "zipf (text-like)": zipf,
        "50-token loop": (prefix + sentence * N_ITEMS)[:N_ITEMS],
        "1-token loop": (prefix + [13] * N_ITEMS)[:N_ITEMS],
        "near loop (no fire)": near[:N_ITEMS],
        "2-symbol random": rng.choices(range(2), k=N_ITEMS),
    }


def us_per_push(push: Callable[[int], object], items: list[int], warmup: int, n: int) -> float:
    """Mean cost of ``n`` pushes, timed once the window is full (after ``warmup`` items)."""
    for x in items[:warmup]:
        push(x)
    timed = items[warmup : warmup + n]
    start = time.perf_counter()
    for x in timed:
        push(x)
    return (time.perf_counter() - start) / len(timed) * 1e6


def main() -> None:
    rng = random.Random(0)
    columns = ("max_pattern_size", "detector us/push", "per-period us/push")
    header = f"{'stream':<22}" + "".join(f"{c:>20}" for c in columns)
    print(header)
    print("-" * len(header))
    for name, items in streams(rng).items():
        for size in SIZES:
            fast = us_per_push(LoopDetector(max_pattern_size=size).push, items, size, N_ITEMS)
            plain = us_per_push(PerPeriodRuns(size, 3, 32).push, items, size, N_ITEMS_PLAIN)
            print(f"{name:<22}{size:>20}{fast:>20.2f}{plain:>20.1f}")


if __name__ == "__main__":
    main()

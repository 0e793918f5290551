"""KV cache memory against context length, for each cache kind: measured, and the formula.

Measured: the bytes of every tensor storage the cache object holds (walked from its attributes,
so nothing is taken from the cache's own accounting). Formula: 2 (k and v) x layers x kv heads
x bytes per stored head vector x positions, where a head vector costs head_dim x 4 bytes in
float32, head_dim x 2 in bfloat16, head_dim + 2 in int8 (a float16 scale) and head_dim / 2 + 4
in int4 (codes packed two per byte, a float16 scale and zero point).

Then many sequences at once: a batch of sequences of random lengths in one contiguous buffer
(every row padded to the longest) against the paged pool (blocks as each sequence needs them).

Run: ``python benchmarks/kv_memory.py`` (seconds). Prints the tables and writes
``benchmarks/out/kv_memory.png``.
"""

from __future__ import annotations

import math
import random

from report import print_table, save_figure  # benchmarks/report.py, beside this script

from arlm.config import ModelConfig
from arlm.kv_cache import CacheConfig, PagedKVCache
from arlm.kv_cache.base import storage_bytes

LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
CONFIG = ModelConfig.preset("llama-small")  # 4 layers, 2 kv heads of 64: rotary, so all kinds
VECTOR_BYTES = {  # stored bytes of one head vector of head_dim d
    "float32": lambda d: 4 * d,
    "bfloat16": lambda d: 2 * d,
    "int8": lambda d: d + 2,
    "int4": lambda d: d // 2 + 4,
}
WINDOW = CacheConfig(window=1020, sink_tokens=4)  # 1024 slots
KINDS = {
    "float32": CacheConfig(dtype="float32"),
    "bfloat16": CacheConfig(dtype="bfloat16"),
    "int8": CacheConfig(dtype="int8"),
    "int4": CacheConfig(dtype="int4"),
    "paged f32": CacheConfig(dtype="float32", block_size=16),
    "window f32": WINDOW,
    "window int8": CacheConfig(dtype="int8", window=1020, sink_tokens=4),
}


def formula(kv_dtype: str, positions: int) -> int:
    c = CONFIG
    return 2 * c.n_layer * c.n_kv_head * VECTOR_BYTES[kv_dtype](c.head_dim) * positions


def measure(label: str, kind: CacheConfig, n: int) -> tuple[int, int]:
    """(measured bytes, formula bytes) of a cache holding ``n`` positions of one sequence."""
    dtype = "float32" if kind.dtype == "auto" else kind.dtype
    if kind.block_size is not None:
        # a pool with room to spare: what the sequence holds is its blocks in use
        cache = kind.build(CONFIG, 1, 2 * n)
        cache.prepare(0, n)
        per_block = storage_bytes(cache) // cache.pool.num_blocks
        return cache.pool.num_used * per_block, formula(dtype, math.ceil(n / 16) * 16)
    cache = kind.build(CONFIG, 1, n)
    held = n if kind.window is None else kind.sink_tokens + kind.window
    return storage_bytes(cache), formula(dtype, held)


def many_sequences(n_seqs: int, max_len: int, seed: int = 0) -> list[list[str]]:
    rng = random.Random(seed)
    lengths = [rng.randint(1, max_len) for _ in range(n_seqs)]
    per_token = formula("float32", 1)
    padded = KINDS["float32"].build(CONFIG, n_seqs, max(lengths))
    cache = PagedKVCache.for_model(
        CONFIG, 0, max_len, block_size=16, num_blocks=sum(math.ceil(n / 16) for n in lengths)
    )
    for n in lengths:  # each sequence grows to its own length, in one pool
        cache.set_rows([cache.add_sequence()])
        cache.prepare(0, n)
    used = cache.pool.num_used * (storage_bytes(cache.pool) // cache.pool.num_blocks)
    needed = sum(lengths) * per_token
    return [
        ["exact need", f"{needed / 2**20:.1f}", "", "1.00x"],
        [
            "contiguous batch (padded to longest)",
            f"{storage_bytes(padded) / 2**20:.1f}",
            f"{(storage_bytes(padded) - needed) / per_token / n_seqs:.0f}",
            f"{storage_bytes(padded) / needed:.2f}x",
        ],
        [
            "paged pool, blocks of 16",
            f"{used / 2**20:.1f}",
            f"{(used - needed) / per_token / n_seqs:.1f}",
            f"{used / needed:.2f}x",
        ],
    ]


def main() -> None:
    measured = {label: [] for label in KINDS}
    rows, mismatches = [], 0
    for n in LENGTHS:
        row = [str(n)]
        for label, kind in KINDS.items():
            got, expected = measure(label, kind, n)
            measured[label].append(got)
            mismatches += got != expected
            row.append(f"{got / 2**20:.3f}" + ("" if got == expected else f" (formula {expected})"))
        rows.append(row)
    print_table(
        f"KV cache MiB for one sequence of n positions ({CONFIG.n_layer} layers, "
        f"{CONFIG.n_kv_head} kv heads, head_dim {CONFIG.head_dim}), measured from the "
        "allocated tensors",
        ["n", *KINDS],
        rows,
    )
    print(
        f"measured == formula in {len(rows) * len(KINDS) - mismatches} of "
        f"{len(rows) * len(KINDS)} cells"
    )
    base = measured["float32"]
    rows = [[label, f"{measured[label][-1] / base[-1]:.3f}"] for label in KINDS]
    print_table(f"bytes relative to float32 at n = {LENGTHS[-1]}", ["kind", "ratio"], rows)
    print_table(
        "64 sequences of random lengths 1..2048 at once, float32",
        ["layout", "MiB", "wasted positions per sequence", "of the exact need"],
        many_sequences(64, 2048),
    )
    plot(measured)


def plot(measured: dict[str, list[int]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ys in measured.items():
        ax.plot(LENGTHS, [y / 2**20 for y in ys], marker="o", label=label)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="positions held (one sequence)",
        ylabel="MiB",
        title="KV cache memory (llama-small sizes)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, "kv_memory.png")


if __name__ == "__main__":
    main()

"""KV cache memory against context length, for each cache kind: measured, and the formula.

Measured: the bytes of every tensor storage the cache object holds (walked from its attributes,
so nothing is taken from the cache's own accounting). Formula: 2 (k and v) x layers x kv heads
x bytes per stored head vector x positions, where a head vector costs head_dim x 4 bytes in
float32, head_dim x 2 in bfloat16, head_dim + 2 in int8 (a float16 scale) and head_dim / 2 + 4
in int4 (codes packed two per byte, a float16 scale and zero point).

The engine's paged cache (``PagedKVCache``) is shown the way the engine accounts for it: a
sequence holds the blocks of 16 positions its length fills (``Usage.kv_cache_bytes``; the
positions in them, ``Usage.kv_cache_peak_bytes``). The blocks come from the engine's own block
manager; their bytes are measured from the pool's tensors, and checked against what the engine
reports in each sequence's ``Usage``.

Then many sequences at once: a batch of sequences of random lengths in one contiguous buffer
(every row padded to the longest), the slot design arlm had before paging (every sequence in a
slot of the longest allowed length, by its formula), and the paged pool (measured).

Then sliding-window models, whose windowed layers store only their window W (a ring): a
Mistral-style model (every layer slides) and a Gemma-3-style one (5 sliding layers to 1 full),
at W = 1,024 with llama-small's layer sizes, against the same model with every layer keeping
every position (what the cache stored before the window bounded it). Measured from the tensors of
the contiguous cache, checked against the formula: per layer, min(n, W) positions where the
layer slides, n where it does not; and what the engine's paged cache (which keeps every position
and masks the window) holds for one sequence of the longest length, and how many fit in 1 GiB.

Run: ``python benchmarks/kv_memory.py`` (seconds). Prints the tables and writes
``benchmarks/out/kv_memory.png``.
"""

from __future__ import annotations

import math
import random

from report import print_table, save_figure  # benchmarks/report.py, beside this script

from arlm.config import ModelConfig
from arlm.engine.block_manager import BlockManager
from arlm.engine.runner import ModelRunner
from arlm.engine.sequence import Sequence
from arlm.kv_cache import CacheConfig, KVCache
from arlm.kv_cache.base import storage_bytes
from arlm.model import Transformer

LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
CONFIG = ModelConfig.preset("llama-small")  # 4 layers, 2 kv heads of 64: rotary, so all kinds
MODEL = Transformer(CONFIG)  # random weights: only the engine's runner needs a model, none runs
VECTOR_BYTES = {  # stored bytes of one head vector of head_dim d
    "float32": lambda d: 4 * d,
    "bfloat16": lambda d: 2 * d,
    "int8": lambda d: d + 2,
    "int4": lambda d: d // 2 + 4,
}
WINDOW = CacheConfig(window=1020, sink_tokens=4)  # 1024 slots
BLOCK = 16  # the engine's kv_block_size
PAGED = "paged f32 blocks"
KINDS = {  # label -> settings; None: the engine's paged cache
    "float32": CacheConfig(dtype="float32"),
    "bfloat16": CacheConfig(dtype="bfloat16"),
    "int8": CacheConfig(dtype="int8"),
    "int4": CacheConfig(dtype="int4"),
    PAGED: None,
    "window f32": WINDOW,
    "window int8": CacheConfig(dtype="int8", window=1020, sink_tokens=4),
}


def formula(kv_dtype: str, positions: int) -> int:
    c = CONFIG
    return 2 * c.n_layer * c.n_kv_head * VECTOR_BYTES[kv_dtype](c.head_dim) * positions


class PagedAccounting:
    """Sequences of given lengths placed by the engine's ``BlockManager`` in the float32
    ``PagedKVCache`` of its ``ModelRunner``: the blocks each holds (allocated as the block
    manager hands them out), the bytes measured from the cache's tensors, and what the engine
    reports in each sequence's ``Usage`` (``ModelRunner.kv_bytes``: its blocks, and the
    positions in them)."""

    def __init__(self, lengths: list[int]) -> None:
        num_blocks = sum(math.ceil(n / BLOCK) for n in lengths)
        runner = ModelRunner(MODEL, CacheConfig(dtype="float32"), num_blocks, BLOCK)
        self.cache = runner.cache
        manager = BlockManager(num_blocks, BLOCK, prefix_caching=False)
        self.blocks: list[int] = []  # blocks each sequence holds
        self.usages: list[tuple[int, int]] = []  # (kv_cache_bytes, kv_cache_peak_bytes)
        for i, n in enumerate(lengths):
            # only the fields the block manager reads: no forward runs here
            seq = Sequence(
                request_id=str(i),
                index=0,
                token_ids=list(range(n)),
                prompt_len=n,
                params=None,
                generator=None,
                sampler=None,
                text=None,
                end_ids=frozenset(),
            )
            manager.allocate(seq)
            manager.ensure(seq, n)  # its n positions' blocks
            seq.num_cached = n  # its n positions computed
            self.blocks.append(len(seq.block_table))
            self.usages.append(runner.kv_bytes(seq))
        self.cache.reserve(manager.num_used_blocks)
        self.allocated = storage_bytes(self.cache)  # measured
        self.in_use = self.allocated  # the pool holds exactly the blocks handed out
        self.positions = sum(lengths) * self.cache.bytes_per_token

    def usage_agrees(self) -> bool:
        """Whether the engine's ``Usage`` (summed over sequences) says what was measured."""
        return (
            sum(blocks for blocks, _ in self.usages) == self.allocated
            and sum(positions for _, positions in self.usages) == self.positions
        )


def measure(label: str, kind: CacheConfig | None, n: int) -> tuple[int, int]:
    """(measured bytes, formula bytes) of a cache holding ``n`` positions of one sequence."""
    if kind is None:  # the paged cache: the blocks n positions fill
        paged = PagedAccounting([n])
        return paged.allocated, formula("float32", math.ceil(n / BLOCK) * BLOCK)
    dtype = "float32" if kind.dtype == "auto" else kind.dtype
    cache = kind.build(CONFIG, 1, n)
    held = n if kind.window is None else kind.sink_tokens + kind.window
    return storage_bytes(cache), formula(dtype, held)


def many_sequences(n_seqs: int, max_len: int, seed: int = 0) -> tuple[list[list[str]], bool]:
    """The table's rows, and whether the engine's ``Usage`` agrees with what was measured."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, max_len) for _ in range(n_seqs)]
    per_token = formula("float32", 1)
    padded = storage_bytes(KINDS["float32"].build(CONFIG, n_seqs, max(lengths)))
    paged = PagedAccounting(lengths)  # every sequence's blocks, in one pool
    needed = sum(lengths) * per_token
    slots = n_seqs * max_len * per_token  # the slot design: a slot of max_len each

    def row(label: str, nbytes: int, digits: int) -> list[str]:
        wasted = (nbytes - needed) / per_token / n_seqs
        return [label, f"{nbytes / 2**20:.1f}", f"{wasted:.{digits}f}", f"{nbytes / needed:.2f}x"]

    rows = [
        ["exact need", f"{needed / 2**20:.1f}", "", "1.00x"],
        row("contiguous batch (padded to longest)", padded, 0),
        row(f"slot design ({n_seqs} slots of {max_len}), by its formula", slots, 0),
        row(f"paged cache, blocks of {BLOCK} (measured)", paged.allocated, 1),
    ]
    return rows, paged.usage_agrees()


SLIDING_WINDOW = 1024
SLIDING = {  # label -> a model whose sliding layers keep SLIDING_WINDOW positions
    "mistral-style (4 of 4 slide)": ModelConfig.preset(
        "llama-small", sliding_window=SLIDING_WINDOW
    ),
    "gemma3-style (5 of 6 slide)": ModelConfig.preset(
        "llama-small",
        n_layer=6,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
    ),
}


def window_formula(config: ModelConfig, positions: int) -> int:
    """float32 bytes of one sequence of ``positions``: each layer holds min(n, W) or n."""
    per_position = 2 * config.n_kv_head * VECTOR_BYTES["float32"](config.head_dim)
    return sum(min(positions, w or positions) for w in config.layer_windows) * per_position


def sliding_models() -> tuple[list[list[str]], list[list[str]], bool]:
    """(rows against n, rows for the engine's 1 GiB, whether measured == formula everywhere)."""
    rows, engine_rows, agree = [], [], True
    budget = 2**30
    for label, config in SLIDING.items():
        # the same layers, none sliding
        unbounded = ModelConfig.preset("llama-small", n_layer=config.n_layer)
        for n in LENGTHS:
            bounded = storage_bytes(KVCache.for_model(config, 1, n))
            full = storage_bytes(KVCache.for_model(unbounded, 1, n))
            agree &= bounded == window_formula(config, n) and full == window_formula(unbounded, n)
            saving = f"{full / bounded:.2f}x"
            rows.append([label, str(n), f"{full / 2**20:.2f}", f"{bounded / 2**20:.2f}", saving])
        # the engine's paged cache keeps every position of every layer (and masks windows)
        per_block = window_formula(unbounded, BLOCK)
        cache = ModelRunner(
            Transformer(config), CacheConfig(dtype="float32"), LENGTHS[-1] // BLOCK, BLOCK
        ).cache
        cache.reserve(LENGTHS[-1] // BLOCK)
        agree &= storage_bytes(cache) == per_block * LENGTHS[-1] // BLOCK
        engine_rows.append(
            [label, f"{storage_bytes(cache) / 2**20:.1f}", str(budget // storage_bytes(cache))]
        )
    return rows, engine_rows, agree


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
    agree = sum(
        PagedAccounting([n]).usage_agrees() for n in LENGTHS
    )  # the engine's own accounting of the one-sequence paged column
    print(
        f"engine Usage (kv_cache_bytes, kv_cache_peak_bytes) == measured at {agree} of "
        f"{len(LENGTHS)} lengths"
    )
    base = measured["float32"]
    rows = [[label, f"{measured[label][-1] / base[-1]:.3f}"] for label in KINDS]
    print_table(f"bytes relative to float32 at n = {LENGTHS[-1]}", ["kind", "ratio"], rows)
    rows, agrees = many_sequences(64, 2048)
    print_table(
        "64 sequences of random lengths 1..2048 at once, float32",
        ["layout", "MiB", "wasted positions per sequence", "of the exact need"],
        rows,
    )
    print(f"engine Usage summed over the 64 == measured: {'yes' if agrees else 'NO'}")
    rows, engine_rows, agree = sliding_models()
    print_table(
        f"sliding-window models, W = {SLIDING_WINDOW}: KV MiB for one sequence of n positions, "
        "float32, every position kept vs sliding layers keeping W (measured)",
        ["model", "n", "all positions", "window-bounded", "saving"],
        rows,
    )
    print_table(
        f"the engine's paged cache: MiB of one sequence of {LENGTHS[-1]} positions (every "
        "position of every layer), and sequences of that length in 1 GiB",
        ["model", "MiB", "fit"],
        engine_rows,
    )
    print(f"measured == formula (per layer min(n, W) or n): {'yes' if agree else 'NO'}")
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

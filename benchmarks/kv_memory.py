"""KV cache memory against context length, for each cache kind: measured, and the formula.

Measured: the bytes of every tensor storage the cache object holds (walked from its attributes,
so nothing is taken from the cache's own accounting). Formula: 2 (k and v) x layers x kv heads
x bytes per stored head vector x positions, where a head vector costs head_dim x 4 bytes in
float32, head_dim x 2 in bfloat16, head_dim + 2 in int8 (a float16 scale) and head_dim / 2 + 4
in int4 (codes packed two per byte, a float16 scale and zero point).

The engine's slot cache (``SlotKVCache``) is shown the way the engine accounts for it: a
sequence owns a slot sized for the longest sequence the engine accepts (``max_model_len``, here
the longest length in the table: what is allocated, ``Usage.kv_cache_bytes``), and of it holds
the blocks of 16 positions its length fills (what is in use, ``Usage.kv_cache_peak_bytes``). The
blocks come from the engine's own block manager; their bytes are measured from the slot's
tensors, and checked against what the engine reports in each sequence's ``Usage``.

Then many sequences at once: a batch of sequences of random lengths in one contiguous buffer
(every row padded to the longest) against the slot cache (every sequence in a slot of the
longest allowed length; in use, the blocks each sequence fills).

Then sliding-window models, whose windowed layers store only their window W (a ring): a
Mistral-style model (every layer slides) and a Gemma-3-style one (5 sliding layers to 1 full),
at W = 1,024 with llama-small's layer sizes, against the same model with every layer keeping
every position (what the cache stored before the window bounded it). Measured from the tensors of
the contiguous cache and of one engine slot, checked against the formula: per layer, min(n, W)
positions where the layer slides, n where it does not; and how many sequences of the longest
length the engine fits in 1 GiB.

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
from arlm.kv_cache import CacheConfig, KVCache, SlotKVCache
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
SLOT_ALLOCATED, SLOT_IN_USE = "slot f32 allocated", "slot f32 in use"
KINDS = {  # label -> settings; None: the engine's slot cache, as allocated or as in use
    "float32": CacheConfig(dtype="float32"),
    "bfloat16": CacheConfig(dtype="bfloat16"),
    "int8": CacheConfig(dtype="int8"),
    "int4": CacheConfig(dtype="int4"),
    SLOT_ALLOCATED: None,
    SLOT_IN_USE: None,
    "window f32": WINDOW,
    "window int8": CacheConfig(dtype="int8", window=1020, sink_tokens=4),
}


def formula(kv_dtype: str, positions: int) -> int:
    c = CONFIG
    return 2 * c.n_layer * c.n_kv_head * VECTOR_BYTES[kv_dtype](c.head_dim) * positions


class SlotAccounting:
    """Sequences of given lengths placed by the engine's ``BlockManager`` in the float32
    ``SlotKVCache`` of its ``ModelRunner``, slots of ``max_len`` positions: the bytes measured
    from the cache's tensors, and what the engine reports in each sequence's ``Usage``
    (``ModelRunner.kv_bytes``: allocated, and at most in use)."""

    def __init__(self, lengths: list[int], max_len: int) -> None:
        runner = ModelRunner(MODEL, CacheConfig(dtype="float32"), len(lengths), max_len)
        self.cache = runner.cache
        manager = BlockManager(self.cache, BLOCK, prefix_caching=False)
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
            manager.allocate(seq)  # gives it a slot (the cache allocates slots as needed)
            seq.num_cached = n  # its n positions computed
            manager.computed(seq)
            self.blocks.append(len(seq.block_table))
            self.usages.append(runner.kv_bytes(seq, BLOCK))
        self.allocated = storage_bytes(self.cache)  # measured
        self.block_bytes = self.allocated // (self.cache.allocated * manager.blocks_per_slot)
        self.in_use = sum(self.blocks) * self.block_bytes

    def usage_agrees(self) -> bool:
        """Whether the engine's ``Usage`` (summed over sequences) says what was measured."""
        return (
            sum(allocated for allocated, _ in self.usages) == self.allocated
            and sum(peak for _, peak in self.usages) == self.in_use
        )


def measure(label: str, kind: CacheConfig | None, n: int) -> tuple[int, int]:
    """(measured bytes, formula bytes) of a cache holding ``n`` positions of one sequence."""
    if kind is None:  # the slot cache: a slot of the longest length, n positions in it
        slots = SlotAccounting([n], LENGTHS[-1])
        if label == SLOT_ALLOCATED:
            return slots.allocated, formula("float32", LENGTHS[-1])
        return slots.in_use, formula("float32", math.ceil(n / BLOCK) * BLOCK)
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
    slots = SlotAccounting(lengths, max_len)  # each sequence in its slot, in one cache
    needed = sum(lengths) * per_token

    def row(label: str, nbytes: int, digits: int) -> list[str]:
        wasted = (nbytes - needed) / per_token / n_seqs
        return [label, f"{nbytes / 2**20:.1f}", f"{wasted:.{digits}f}", f"{nbytes / needed:.2f}x"]

    rows = [
        ["exact need", f"{needed / 2**20:.1f}", "", "1.00x"],
        row("contiguous batch (padded to longest)", padded, 0),
        row(f"slot cache, allocated ({n_seqs} slots of {max_len})", slots.allocated, 0),
        row(f"slot cache, blocks of {BLOCK} in use", slots.in_use, 1),
    ]
    return rows, slots.usage_agrees()


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
        slots = []
        for cfg in (unbounded, config):
            cache = SlotKVCache.for_model(cfg, 1, LENGTHS[-1])
            cache.reserve(1)
            slot = storage_bytes(cache)
            agree &= slot == cache.slot_bytes(LENGTHS[-1]) == window_formula(cfg, LENGTHS[-1])
            slots.append(slot)
        full_slot, slot = slots
        mib = [f"{full_slot / 2**20:.1f}", f"{slot / 2**20:.1f}"]
        engine_rows.append([label, *mib, str(budget // full_slot), str(budget // slot)])
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
        SlotAccounting([n], LENGTHS[-1]).usage_agrees() for n in LENGTHS
    )  # the engine's own accounting of the one-sequence slot columns
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
        f"the engine: MiB per slot of {LENGTHS[-1]} positions, and sequences of that length in "
        "1 GiB of KV cache",
        ["model", "slot, all positions", "slot, bounded", "fit, all", "fit, bounded"],
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

"""``EngineConfig``, the engine's limits, and ``plan``: the sizes they come to for one model.

The KV cache is a pool of blocks sized from a memory budget (``arlm.engine.memory``), not from
``max_num_seqs`` x ``max_model_len``: sequences take blocks as they grow, so how many run at
once depends on what they hold. ``max_model_len`` defaults to the model's context, or to what
the whole pool holds where that is less (a long-context model on a small budget still loads;
one sequence can never outgrow the pool).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from arlm.config import option
from arlm.engine.memory import GIB, WidestStep, fit_blocks
from arlm.engine.scheduler import PREEMPTION_MODES
from arlm.kv_cache.codec import make_codec
from arlm.kv_cache.config import CacheConfig
from arlm.kv_cache.held import LONE_HISTORY_BYTES
from arlm.model.transformer import Transformer
from arlm.validate import check_float, check_int

DEFAULT_MAX_NUM_SEQS = {"cuda": 256, "cpu": 64}
# A GPU computes a chunk of thousands of positions in about the time it takes to launch one
# step's kernels, so it prefills in few large chunks (vLLM's server default on large GPUs); a
# CPU's step time grows with every position, so its chunks stay short for the running rows.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 8192, "cpu": 512}
# The most positions a step may have to replay a CUDA graph (vLLM's default capture size): the
# running rows and a new prompt's chunk of a few hundred tokens, the step continuous batching
# runs whenever a request arrives; more than max_num_seqs where that is more.
DEFAULT_CUDAGRAPH_CAPTURE_SIZE = 512
# The windowed cache has no pool to bound a sequence; without this one request could hold the
# engine for ever (max_tokens 10**15).
DEFAULT_WINDOW_MAX_MODEL_LEN = 2**20

log = logging.getLogger("arlm.engine")


@dataclass(frozen=True)
class EngineConfig:
    """The engine's limits. None picks a default sized from the model and the machine.

    max_num_seqs: sequences running at once (default 256 on a GPU, 64 elsewhere, at most one per
    KV block). max_num_batched_tokens: positions per forward (default 8,192 on a GPU, 512
    elsewhere, at least max_num_seqs): larger prefill chunks finish prompts sooner and delay
    the running sequences' next token longer. max_model_len: the longest prompt + generation
    of a sequence (default: the model's context, or what the KV pool holds where that is less;
    with the windowed cache, which runs past the context, ``DEFAULT_WINDOW_MAX_MODEL_LEN``,
    1,048,576).
    kv_cache_memory_gib: the KV pool's budget (default: on a CPU a quarter of the machine's
    memory; on a GPU what gpu_memory_utilization leaves, see ``arlm.engine.memory``).
    gpu_memory_utilization: the share of the GPU's memory the engine may fill with weights,
    activations and KV cache (default 0.9). kv_block_size: positions per block (default 16).
    enable_prefix_caching: share computed prompt blocks (default on). kv_offload_gib: host
    memory for KV blocks the pool evicts or swaps out (default 0: none). preemption_mode: how a
    sequence gives up its blocks when the pool runs out ("auto": swap to the host tier where it
    has room, else recompute). enforce_eager: no CUDA graphs (default off: on CUDA, steps
    replay graphs captured at start-up for token-count buckets where the model and cache allow
    it; see ``arlm.engine.cuda_graphs``). max_cudagraph_capture_size: the most positions a step
    may have to replay one, decode rows and prompt chunks together (default 512, or the
    decode rows of max_num_seqs where that is more; at most max_num_batched_tokens); with
    graphs, a step with running rows takes prompt tokens only up to it (a joining prompt's
    rest goes in later chunks), a step of prompts alone up to max_num_batched_tokens.
    enable_torch_compile: compile that step with ``torch.compile`` before capturing it
    (default off; needs the graphs).
    async_scheduling: overlap each step's scheduling and host work with the device's run of
    the step before (None: on CUDA wherever it can; True where it cannot is refused; see
    ``arlm.engine.overlap``).
    """

    max_num_seqs: int | None = option(
        None, help="sequences running at once (default: 256 on a GPU, 64 on a CPU)"
    )
    max_num_batched_tokens: int | None = option(
        None,
        help="positions per forward; longer prompts prefill in chunks (default: 8192 on a GPU, "
        "512 on a CPU)",
    )
    max_model_len: int | None = option(
        None, help="longest prompt + generation of a sequence (default: the context)"
    )
    kv_cache_memory_gib: float | None = option(
        None,
        help="the KV cache's memory budget (default: on CPU a quarter of the machine's memory; "
        "on a GPU what --gpu-memory-utilization leaves after the weights and activations)",
    )
    gpu_memory_utilization: float = option(
        0.9, help="share of the GPU's memory for weights, activations and KV cache"
    )
    kv_block_size: int = option(16, help="positions per KV block, the unit of KV memory")
    enable_prefix_caching: bool = option(
        True, help="share computed prompt blocks", flag="--prefix-caching"
    )
    kv_offload_gib: float = option(
        0.0, help="host memory for KV blocks evicted or swapped out of the pool (default: none)"
    )
    preemption_mode: str = option(
        "auto",
        help="when the KV pool runs out: swap a sequence's blocks to the host tier, or "
        "recompute them later (auto: swap where the host tier has room)",
        choices=PREEMPTION_MODES,
    )
    enforce_eager: bool = option(
        False,
        help="on CUDA, launch every step's kernels from Python instead of replaying steps "
        "from CUDA graphs",
    )
    max_cudagraph_capture_size: int | None = option(
        None,
        help="on CUDA, the most positions (decode rows and prompt tokens) a step may have to "
        "replay a CUDA graph, and so the most a step with running rows takes; steps of "
        "prompts alone may be larger and run eagerly (default: 512, or max_num_seqs where "
        "that is more)",
    )
    enable_torch_compile: bool = option(
        False,
        help="on CUDA, compile the graphed step with torch.compile (fused kernels) before its "
        "graphs are captured: slower start-up",
    )
    async_scheduling: bool | None = option(
        None,
        help="schedule and launch each decode step while the device still runs the one "
        "before (default: on CUDA, where the model and settings allow it)",
    )

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "max_cudagraph_capture_size",
        ):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.kv_cache_memory_gib is not None:
            check_float("kv_cache_memory_gib", self.kv_cache_memory_gib, lambda v: v > 0, "> 0")
        check_float("kv_offload_gib", self.kv_offload_gib, lambda v: v >= 0, ">= 0")
        check_float(
            "gpu_memory_utilization", self.gpu_memory_utilization, lambda v: 0 < v <= 1, "in (0, 1]"
        )
        check_int("kv_block_size", self.kv_block_size, 1)
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode={self.preemption_mode!r} is not one of "
                f"{', '.join(PREEMPTION_MODES)}"
            )


@dataclass(frozen=True)
class Plan:
    """The sizes ``EngineConfig`` comes to for one model on one device."""

    max_len: int | None  # None: the windowed cache, which runs past the context
    num_blocks: int
    host_blocks: int
    held_blocks: int  # the budget's share for held histories, in blocks (``held_share``)
    max_num_seqs: int
    max_num_batched_tokens: int


def plan(config: EngineConfig, model: Transformer, cache_config: CacheConfig) -> Plan:
    """Size the engine for ``model``: a ValueError naming the numbers where it cannot fit."""
    context, bs = model.config.block_size, config.kv_block_size
    device = model.wte.weight.device.type
    seqs = config.max_num_seqs or DEFAULT_MAX_NUM_SEQS.get(device, DEFAULT_MAX_NUM_SEQS["cpu"])
    chunk = DEFAULT_MAX_NUM_BATCHED_TOKENS.get(device, DEFAULT_MAX_NUM_BATCHED_TOKENS["cpu"])
    if cache_config.window is not None:
        if config.max_num_seqs not in (None, 1):
            raise ValueError(
                f"max_num_seqs={config.max_num_seqs}: the windowed KV cache (kv_window) runs "
                "one sequence at a time; use max_num_seqs=1, or a cache without a window"
            )
        tokens = config.max_num_batched_tokens or chunk
        return Plan(None, 0, 0, 0, 1, tokens)
    max_len = config.max_model_len or context
    if max_len > context:
        raise ValueError(
            f"max_model_len={max_len} is longer than the model's context of {context} tokens"
        )
    codec = make_codec(cache_config.dtype, model.wte.weight.dtype)
    per_position = model.config.n_layer * 2 * model.config.n_kv_head
    block_bytes = bs * per_position * codec.bytes_per_vector(model.config.head_dim)
    tokens = config.max_num_batched_tokens or max(chunk, seqs)
    budget = fit_blocks(config, model, bs, block_bytes, WidestStep(tokens, min(seqs, tokens)))
    held_blocks = held_share(config, device, budget, bs, block_bytes)
    num_blocks = budget - held_blocks
    if num_blocks * bs < max_len:
        if config.max_model_len is not None:
            raise ValueError(
                f"max_model_len={max_len} needs {math.ceil(max_len / bs)} KV blocks of {bs} "
                f"positions, more than the {num_blocks} the budget holds; lower max_model_len, "
                "raise kv_cache_memory_gib, or quantize the cache (kv_cache_dtype)"
            )
        log.info(
            "max_model_len %d (the KV pool's %d blocks of %d), less than the context of %d",
            num_blocks * bs,
            num_blocks,
            bs,
            context,
        )
        max_len = num_blocks * bs
    if config.max_num_seqs is not None and config.max_num_seqs > num_blocks:
        raise ValueError(
            f"max_num_seqs={config.max_num_seqs} needs at least one KV block each, more than "
            f"the {num_blocks} the budget holds; lower max_num_seqs or raise kv_cache_memory_gib"
        )
    host_blocks = int(config.kv_offload_gib * GIB // block_bytes)
    if config.kv_offload_gib > 0 and host_blocks < 1:
        raise ValueError(
            f"kv_offload_gib={config.kv_offload_gib} holds no KV block of "
            f"{block_bytes / 2**20:.2f} MiB; raise it or use 0 for no host tier"
        )
    return Plan(max_len, num_blocks, host_blocks, held_blocks, min(seqs, num_blocks), tokens)


# The share of a CPU's KV budget set aside for held histories (``LoneHistory``, ``HeldRows``):
# with none, a pool whose blocks all have memory (``preallocate``, which ``arlm serve`` runs, or
# any traffic that once filled it) leaves them no room, and every decode step reads its blocks in
# place: GPT-2 so, preallocated in 4 GiB, decoded 13% slower alone after a 1,000-token prompt and
# 8-19% slower 4 at once than with the share (docs/inference.md).
HELD_SHARE = 8  # one eighth


def held_share(
    config: EngineConfig, device: str, budget: int, block_size: int, block_bytes: int
) -> int:
    """How many of the ``budget`` blocks' worth of memory go to held histories rather than to
    the pool: on a CPU, an eighth, at most what they may hold (``LONE_HISTORY_BYTES``), and never
    the blocks an explicit ``max_model_len`` or ``max_num_seqs`` needs; none elsewhere (the held
    histories are a CPU path)."""
    if device != "cpu":
        return 0
    needed = max(2, config.max_num_seqs or 0, -(-(config.max_model_len or 0) // block_size))
    return max(0, min(budget // HELD_SHARE, LONE_HISTORY_BYTES // block_bytes, budget - needed))

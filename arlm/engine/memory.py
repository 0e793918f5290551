"""How much memory the engine's KV cache may take, and so how many sequences run at once.

On a CPU the budget is ``kv_cache_memory_gib``, or a quarter of the machine's memory: the
weights, the activations and everything else on the machine share the rest. An eighth of it
goes to the held histories of a few decoding rows rather than to the pool's blocks
(``arlm.engine.config.held_share``).

On a GPU the engine owns the device, as vLLM does: the budget is ``gpu_memory_utilization`` of
the device's memory, less what is in use once the weights are loaded (the weights, the CUDA
context, other processes) and less the activation peak of the widest step, measured by running
one (``max_num_batched_tokens`` positions, all their logits). ``kv_cache_memory_gib`` sets the
budget instead, and must fit what is free after the activations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from arlm.model.transformer import Transformer

DEFAULT_KV_MEMORY_FRACTION = 0.25  # of the machine's memory on a CPU, when no budget is given
GIB = 2**30


class MemoryLimits(Protocol):
    """The fields of ``EngineConfig`` that size the KV cache."""

    max_num_seqs: int | None
    kv_cache_memory_gib: float | None
    gpu_memory_utilization: float


def machine_memory() -> int:
    """The host's physical memory in bytes (8 GiB where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * GIB


@dataclass(frozen=True)
class Budget:
    """The KV cache's budget in bytes and where it came from (for error messages)."""

    nbytes: float
    source: str


@torch.inference_mode()
def activation_peak(model: Transformer, tokens: int, sampled: int) -> int:
    """Bytes a forward over ``tokens`` positions allocates on its CUDA device above the memory
    in use before it, measured by running it: one sequence, with logits at ``sampled`` of its
    positions, as the engine's widest step computes them at its rows that sample only (the
    logits of every position of a long chunk would be gigabytes the engine never holds)."""
    device = model.wte.weight.device
    tokens = min(tokens, model.config.block_size)
    idx = torch.zeros((1, tokens), dtype=torch.long, device=device)
    at = torch.arange(max(tokens - sampled, 0), tokens, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    model(idx, logits_at=at)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()  # give the activations' blocks back for the cache to take
    return peak


@dataclass(frozen=True)
class WidestStep:
    """The largest forward the engine will run: ``tokens`` positions
    (``max_num_batched_tokens``), logits at ``rows`` of them (``max_num_seqs``)."""

    tokens: int
    rows: int


def gpu_budget(
    model: Transformer, utilization: float, explicit_gib: float | None, widest: WidestStep
) -> Budget:
    """The KV budget on the model's CUDA device, after the activations of the ``widest`` step;
    a ValueError naming the numbers when the weights and activations leave no room."""
    device = model.wte.weight.device
    peak = activation_peak(model, widest.tokens, widest.rows)
    free, total = torch.cuda.mem_get_info(device)
    used = total - free  # the weights, the CUDA context, other processes
    if explicit_gib is not None:
        room = free - peak
        if explicit_gib * GIB > room:
            raise ValueError(
                f"kv_cache_memory_gib={explicit_gib} is more than {device} has free: "
                f"{free / GIB:.2f} GiB free after the weights, less an activation peak of "
                f"{peak / GIB:.2f} GiB, leaves {room / GIB:.2f} GiB; lower kv_cache_memory_gib"
            )
        return Budget(explicit_gib * GIB, f"kv_cache_memory_gib={explicit_gib}")
    allowed = utilization * total
    budget = allowed - used - peak
    source = (
        f"gpu_memory_utilization={utilization} of {device}'s {total / GIB:.2f} GiB "
        f"({allowed / GIB:.2f} GiB), less {used / GIB:.2f} GiB in use after loading the "
        f"weights and an activation peak of {peak / GIB:.2f} GiB"
    )
    if budget <= 0:
        raise ValueError(
            f"the model does not fit: {source} leaves no KV cache memory "
            f"({budget / GIB:.2f} GiB); raise gpu_memory_utilization, lower "
            "max_num_batched_tokens, quantize the weights (quantize=int8/int4) or use a larger GPU"
        )
    return Budget(budget, source)


def kv_budget(config: MemoryLimits, model: Transformer, widest: WidestStep) -> Budget:
    """The KV cache's budget for ``model`` on its device under ``config``."""
    if model.wte.weight.device.type == "cuda":
        return gpu_budget(model, config.gpu_memory_utilization, config.kv_cache_memory_gib, widest)
    if config.kv_cache_memory_gib is not None:
        return Budget(config.kv_cache_memory_gib * GIB, "kv_cache_memory_gib")
    return Budget(
        DEFAULT_KV_MEMORY_FRACTION * machine_memory(), "a quarter of the machine's memory"
    )


def fit_blocks(
    config: MemoryLimits, model: Transformer, block_size: int, block_bytes: int, widest: WidestStep
) -> int:
    """How many KV blocks of ``block_bytes`` each the budget holds; a ValueError naming both
    numbers when it holds fewer than two (a sequence's first block and the next one)."""
    budget = kv_budget(config, model, widest)
    fit = int(budget.nbytes // block_bytes)
    if fit < 2:
        raise ValueError(
            f"a sequence's first two KV blocks of {block_size} positions need "
            f"{2 * block_bytes / 2**20:.2f} MiB, more than the budget of "
            f"{budget.nbytes / 2**20:.2f} MiB ({budget.source}); raise kv_cache_memory_gib, "
            "lower kv_block_size, or quantize the cache (kv_cache_dtype)"
        )
    return fit


def check_weights_fit(
    nbytes: int, device: torch.device, dtype: torch.dtype, ranks: int = 1
) -> None:
    """A ValueError naming both numbers when weights of ``nbytes``, split over ``ranks`` GPUs
    (tensor parallelism), cannot fit the free memory of the CUDA ``device``, before any of them
    is loaded (nothing to check on a CPU, which pages)."""
    if device.type != "cuda":
        return
    free, total = torch.cuda.mem_get_info(device)
    share = nbytes // ranks
    if share > free:
        name = str(dtype).removeprefix("torch.")
        what, more = "the model's weights need", "a larger GPU"
        if ranks > 1:
            what = f"a 1/{ranks} share of the weights needs"
            more += " or more of them (tensor_parallel_size)"
        raise ValueError(
            f"{what} {share / GIB:.2f} GiB in {name}, more than the {free / GIB:.2f} GiB free "
            f"on {device} (of {total / GIB:.2f} GiB); load with quantize=int8/int4 or "
            f"dtype=bfloat16, or use {more}"
        )

"""Tensor parallelism: one model's layers split across N ranks, on DTensor
(``torch.distributed.tensor.parallel``), as Megatron-LM lays them out.

Each block's attention splits by heads: the fused q/k/v projection is column-parallel (rank r
computes its n_head/N query heads and their key/value heads), the output projection
row-parallel (each rank multiplies its heads' columns; one all-reduce sums them). The MLP splits
the same way: gate/up column-parallel, down row-parallel, one all-reduce. The vocabulary is
split too: the embedding by rows (an all-reduce of the looked-up vectors), the head by its
output rows (an all-gather of the logits, so every rank ends with them whole). Norms are small
and stay whole on every rank. Each rank's KV cache then holds its own heads only.

The fused matrices are stored [q heads; k heads; v heads] and [gate; up]; ``ColwiseParallel``
cuts rows into N contiguous chunks, so the rows are first reordered into per-rank groups
([q_r; k_r; v_r] for r = 0..N-1, [gate_r; up_r]). With fewer key/value heads than ranks
(grouped-query attention), each rank's group carries a copy of the one KV head its query heads
read (the KV heads replicated N / n_kv_head times).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from arlm.config import ModelConfig
from arlm.model.transformer import Transformer


@dataclass(frozen=True)
class HeadSplit:
    """How ``size`` ranks share a model's heads."""

    size: int
    q_heads: int  # query heads per rank
    kv_heads: int  # key/value heads per rank (1 when they are replicated)
    replicas: int  # ranks that hold a copy of each key/value head (1: split, not replicated)

    def kv_head(self, rank: int, j: int) -> int:
        """The model's index of rank ``rank``'s ``j``-th key/value head."""
        return rank // self.replicas if self.replicas > 1 else rank * self.kv_heads + j


def head_split(config: ModelConfig, size: int) -> HeadSplit:
    """How ``size`` ranks split ``config``'s heads, or a ValueError naming both numbers."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size={size} must be a positive integer")
    if config.quantization is not None:
        raise ValueError(
            f"tensor parallelism splits float weights; this model's are quantized "
            f"({config.quantization}): load it without quantization"
        )
    if config.n_experts is not None and size > 1:
        raise ValueError(
            f"tensor_parallel_size={size} with a mixture of {config.n_experts} experts: tensor "
            "parallelism splits dense MLPs only (expert parallelism is not built); use 1"
        )
    if config.n_head % size:
        raise ValueError(
            f"tensor_parallel_size={size} does not divide the model's {config.n_head} attention "
            f"heads (n_head={config.n_head}); use a divisor of {config.n_head}"
        )
    n_kv = config.n_kv_head
    if n_kv % size and size % n_kv:
        raise ValueError(
            f"tensor_parallel_size={size} and the model's {n_kv} key/value heads "
            f"(n_kv_head={n_kv}): one must divide the other, to split the key/value heads over "
            f"the ranks or replicate each over {size} / {n_kv} of them"
        )
    if config.intermediate_size % size:
        raise ValueError(
            f"tensor_parallel_size={size} does not divide the MLP's {config.intermediate_size} "
            f"hidden units (intermediate_size={config.intermediate_size})"
        )
    if n_kv >= size:
        return HeadSplit(size, config.n_head // size, n_kv // size, 1)
    return HeadSplit(size, config.n_head // size, 1, size // n_kv)


def _qkv_rows(config: ModelConfig, split: HeadSplit) -> torch.Tensor:
    """Row indices of the fused q/k/v matrix in per-rank order: [q_r; k_r; v_r] for each rank,
    a replicated KV head's rows repeated in every rank that reads it."""
    hd, nq, nkv = config.head_dim, config.n_head, config.n_kv_head

    def head(base: int, h: int) -> list[int]:
        return list(range(base + h * hd, base + (h + 1) * hd))

    rows: list[int] = []
    for r in range(split.size):
        for h in range(r * split.q_heads, (r + 1) * split.q_heads):
            rows += head(0, h)
        for base in (nq * hd, (nq + nkv) * hd):  # the k rows, then the v rows
            for j in range(split.kv_heads):
                rows += head(base, split.kv_head(r, j))
    return torch.tensor(rows)


def _gate_up_rows(hidden: int, size: int) -> torch.Tensor:
    """Row indices of the fused [gate; up] matrix in per-rank order: [gate_r; up_r]."""
    part = hidden // size
    rows: list[int] = []
    for r in range(size):
        rows += list(range(r * part, (r + 1) * part))
        rows += list(range(hidden + r * part, hidden + (r + 1) * part))
    return torch.tensor(rows)


def _reorder_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """``linear``'s output rows taken in the order ``rows`` (which may repeat some)."""
    with torch.no_grad():
        linear.weight = nn.Parameter(linear.weight[rows.to(linear.weight.device)].contiguous())
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias[rows.to(linear.bias.device)].contiguous())
    linear.out_features = len(rows)


def parallelize(model: Transformer, mesh: DeviceMesh) -> Transformer:
    """Split ``model`` (whole and equal on every rank of ``mesh``) over the mesh's ranks, in
    place: afterwards each rank holds its share of the weights, and a forward on every rank with
    the same inputs gives every rank the whole logits. ``model.config.n_kv_head`` becomes the
    key/value heads this rank stores, so a KV cache built from the config holds its heads only.
    """
    config, size = model.config, mesh.size()
    split = head_split(config, size)
    if size == 1:
        return model
    qkv, gated = _qkv_rows(config, split), config.mlp != "gelu"
    for block in model.h:
        _reorder_rows(block.attn.c_attn, qkv)
        if gated:
            _reorder_rows(block.mlp.c_fc, _gate_up_rows(config.intermediate_size, size))
        # the attention of this rank computes its own heads (the reshapes read these)
        block.attn.n_head, block.attn.n_kv_head = split.q_heads, split.kv_heads
        plan = {
            "attn.c_attn": ColwiseParallel(),
            "attn.c_proj": RowwiseParallel(),
            "mlp.c_fc": ColwiseParallel(),
            "mlp.c_proj": RowwiseParallel(),
        }
        parallelize_module(block, mesh, plan)
    tied = model.lm_head.weight is model.wte.weight
    plan = {
        # vocabulary rows split: each rank looks up the ids it holds, an all-reduce sums them
        "wte": RowwiseParallel(input_layouts=Replicate()),
        # the head's rows split likewise, its logits gathered whole on every rank
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }
    parallelize_module(model, mesh, plan)
    if tied:  # both laid out Shard(0) over the vocabulary: one shard serves both again
        model.lm_head.weight = model.wte.weight
    # only the KV cache reads n_kv_head after construction: it sizes the cache to this rank's
    model.config = replace(config, n_kv_head=split.kv_heads)
    return model


def local_bytes(module: nn.Module) -> int:
    """Bytes of weights this rank holds, parameters and buffers (packed CPU kernels keep
    theirs as buffers): a DTensor by its local shard, a tied matrix once."""
    from torch.distributed.tensor import DTensor

    total = 0
    tensors = [*module.parameters(), *module.buffers()]
    for t in {id(t): t for t in tensors}.values():
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total

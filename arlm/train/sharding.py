"""How a model is spread over the training processes: DDP copies it whole to every rank, FSDP2
shards it.

``ddp`` (``DistributedDataParallel``) keeps the whole model, its gradients and its AdamW moments on
every rank and all-reduces the gradients. ``fsdp`` (``torch.distributed.fsdp.fully_shard``)
shards each transformer block, then the rest of the model (embeddings, final norm, head), over
the ranks: a rank holds 1/world of every parameter, gradient and optimizer moment, all-gathers a
block's weights just before it runs (forward and backward) and reduce-scatters its gradients.
Both average the gradients over ranks, so either follows the run of one process holding the
whole batch.

A checkpoint is the same arlm checkpoint either way: ``gather_full`` collects a sharded state
whole onto rank 0 (one tensor at a time), and ``shard_optimizer_state`` cuts a whole saved
optimizer state back into this world's shards, so a run resumes in any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from arlm.model.transformer import Transformer
from arlm.train.distributed import World

SHARDINGS = ("ddp", "fsdp")


def checkpoint_activations(model: Transformer) -> None:
    """Keep only each block's input for the backward pass and recompute the rest there: the
    activations' memory shrinks from every layer's intermediates to one tensor per block, for
    about a third more compute. The module tree (and so the checkpoint's names) is unchanged."""
    # torch's composable checkpoint: hooks on the block, no wrapper module renaming its weights
    from torch.distributed._composable import checkpoint

    for block in model.h:
        checkpoint(block)


def shard_model(
    model: Transformer, world: World, device: torch.device, sharding: str, bf16: bool
) -> nn.Module:
    """The module the trainer runs forward and backward through: ``model`` itself in one
    process; under torchrun wrapped in DDP, or sharded in place by FSDP2 (``model``'s parameters
    then become DTensors holding this rank's shard)."""
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding={sharding!r} is not allowed; choose one of {SHARDINGS}")
    if not world.distributed:
        return model
    if sharding == "ddp":
        # its wrapper broadcasts rank 0's weights on creation, so every rank starts equal
        return DistributedDataParallel(model)
    mesh = init_device_mesh(device.type, (world.size,))
    # bf16 compute (weights all-gathered in bfloat16), gradients reduced and kept in float32:
    # the master weights and AdamW moments stay float32
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32
    )
    # one unit per block: a block's weights are whole only while it runs; the root unit holds
    # the embeddings, the final norm and the head (the tied head shares wte's shard)
    for block in model.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextmanager
def no_gradient_sync(module: nn.Module) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally, without the all-reduce (DDP) or
    reduce-scatter (FSDP) that the last micro-batch of the step does once for all."""
    if isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def gather_full(tensors: dict[str, torch.Tensor], world: World) -> dict[str, torch.Tensor]:
    """``tensors`` with every DTensor gathered whole (to the CPU): on rank 0 the full tensors,
    on the others an empty dict. A collective: every rank calls it with the same names in the
    same order. Tensors are gathered one at a time, so a rank other than 0 holds at most one
    extra whole tensor; a tensor met twice (wte and its tied head) is gathered once."""
    out: dict[str, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, DTensor):
            if id(tensor) not in gathered:
                # to the host at once: on a GPU the whole model may not fit beside its shards
                gathered[id(tensor)] = tensor.full_tensor().cpu()
            whole = gathered[id(tensor)]
            if not world.is_main:  # rank 0 alone writes it; the others let it go
                gathered[id(tensor)] = whole = whole.new_empty(0)
            tensor = whole
        if world.is_main:
            out[name] = tensor
    return out


def shard_optimizer_state(
    state: dict[int, dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer
) -> dict[int, dict[str, torch.Tensor]]:
    """A whole saved optimizer state (keyed by parameter index, as ``state_dict`` keys it) cut
    into this rank's shards: each moment of a sharded parameter becomes a DTensor laid out as
    its parameter; the rest (the step count, moments of whole parameters) stays as it is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for index, slots in state.items():
        param = params[index]
        out[index] = {
            slot: distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
            if isinstance(param, DTensor) and value.shape == param.shape
            else value
            for slot, value in slots.items()
        }
    return out


def local_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of the parameters, their gradients and the optimizer's state (a
    DTensor counts its local shard): what FSDP divides by the world size and DDP does not."""

    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size()

    params = {id(p): p for p in module.parameters()}.values()  # a tied matrix once
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "params": sum(nbytes(p) for p in params),
        "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(nbytes(v) for v in moments),
    }

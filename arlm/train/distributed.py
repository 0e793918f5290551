"""Data-parallel training under ``torchrun``: which process this is, and the few collectives the
trainer needs.

``torchrun`` starts one process per device and tells each its place through the environment
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``). A process started without them is a world of one,
and every function here is then a no-op, so the trainer has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from arlm.collectives import held_barrier
from arlm.placement import resolve_device as resolve_any_device


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, draws progress and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def resolve_device(device: str, world: World) -> torch.device:
    """``auto`` is CUDA when there is a GPU, else the CPU; a plain ``cuda`` under torchrun is
    this process's own GPU, ``cuda:LOCAL_RANK``."""
    resolved = resolve_any_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", world.local_rank if world.distributed else 0)
    return resolved


def init_world(device: str, timeout_s: float = 1800) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA), or stand alone."""
    world = World(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        size=int(os.environ.get("WORLD_SIZE", 1)),
    )
    resolved = resolve_device(device, world)
    if world.distributed and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(
            backend="nccl" if resolved.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=resolved if resolved.type == "cuda" else None,
        )
    return world, resolved


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def mean_over_ranks(value: float, world: World, device: torch.device) -> float:
    """The mean of ``value`` over every process (each rank's share of the batch is equal)."""
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / world.size


def sum_over_ranks(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values)
    return values


def barrier(world: World) -> None:
    if world.distributed:
        held_barrier()


def broadcast_object(obj: object, world: World) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

"""Starting the ranks of a tensor-parallel model: under torchrun, or by spawning them.

Under ``torchrun --nproc-per-node N`` every process runs the same program, and ``arlm.load(...,
tensor_parallel_size=N)`` joins the process group torchrun set up. A plain process instead
spawns N - 1 workers itself, each started as torchrun would start it (its rank and the
rendezvous in its environment) and running the same ``arlm.load``. Either way every rank loads
the model, keeps its shard (``arlm.model.tensor_parallel``), and the ranks other than 0 then
serve rank 0's engine steps (``arlm.engine.tensor_parallel.run_worker``) until rank 0 closes.
"""

from __future__ import annotations

import multiprocessing
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from arlm.collectives import held_barrier
from arlm.engine.tensor_parallel import TensorParallelGroup

# a worker waits on rank 0 between requests: a server may idle for days
# (gloo keeps it in int32 milliseconds: under 24.8 days)
IDLE_TIMEOUT = timedelta(days=20)
# a spawned worker's rendezvous: rank 0's store, "host:port" (torchrun's ranks have their own)
STORE_ENV = "ARLM_TENSOR_PARALLEL_STORE"


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def rank_device(device: torch.device) -> torch.device:
    """A rank's device: on CUDA its own GPU (``cuda:LOCAL_RANK``), else ``device``."""
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def spawn_workers(size: int, load, load_kwargs: dict) -> tuple[dist.TCPStore, list]:
    """Start ranks 1..size-1, each running ``load(**load_kwargs)`` (``arlm.load``, which serves
    rank 0's steps there); rank 0's rendezvous store (on a free port) and the processes."""
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, wait_for_workers=False)
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads
    workers = []
    for rank in range(1, size):
        env = {
            STORE_ENV: f"127.0.0.1:{store.port}",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(size),
        }
        process = context.Process(target=_worker, args=(env, load, load_kwargs), daemon=True)
        process.start()
        workers.append(process)
    return store, workers


def _worker(env: dict, load, load_kwargs: dict) -> None:
    os.environ.update(env)  # as torchrun would have set it
    load(**load_kwargs)  # serves rank 0's steps, then returns


def join(size: int, device: torch.device, store: dist.TCPStore | None = None):
    """This process's place among the ``size`` ranks: (group, device mesh). Joins torchrun's
    process group (``store`` None) or the one rank 0 spawned its workers into."""
    world = int(os.environ.get("WORLD_SIZE", size)) if store is None else size
    if world != size:
        raise ValueError(
            f"tensor_parallel_size={size} under torchrun with {world} processes: start torchrun "
            f"with --nproc-per-node {size}"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    rank = 0
    if store is None and STORE_ENV in os.environ:  # a worker rank 0 spawned
        host, port = os.environ[STORE_ENV].rsplit(":", 1)
        store, rank = dist.TCPStore(host, int(port), size, is_master=False), int(os.environ["RANK"])
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if store is not None:
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=size, timeout=IDLE_TIMEOUT
            )
        else:  # torchrun's rendezvous, from its environment
            dist.init_process_group(backend, timeout=IDLE_TIMEOUT)
    # the step messages are pickled Python objects: they travel on a CPU group
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT) if backend == "nccl" else None
    mesh = init_device_mesh(device.type, (size,))
    return TensorParallelGroup(dist.get_rank(), size, control), mesh


def leave(workers: list) -> None:
    """Tear the process group down (after the workers were told to stop: every rank leaves)
    and wait for them."""
    if dist.is_initialized():
        held_barrier()  # the model's mesh holds the group: see ``_LATEST_BARRIER``
        dist.destroy_process_group()
    for process in workers:
        process.join(timeout=60)

"""Leaving a process group without a deadlock: what training's data-parallel ranks and a
tensor-parallel model's ranks share (``arlm.train.distributed``, ``arlm.launch``)."""

from __future__ import annotations

import torch.distributed as dist

# The Work of this process's latest barrier, kept until the next one or the process's end. Gloo's
# worker thread drops its reference to a finished Work just after waking the caller; if that drop
# is the last, the worker frees the Work's tensors and must take the GIL to do it. After a closing
# barrier the main thread may destroy the process group (with DDP's reducer, or a tensor-parallel
# model's mesh) holding the GIL, and join that worker: both wait forever. A finished two-rank run
# hung so at exit in 3 of 90 runs under load (torch 2.13). Holding the Work, the worker's drop is
# never the last.
_LATEST_BARRIER: list[dist.Work] = []


def held_barrier() -> None:
    """``dist.barrier()`` over the default group, its Work kept (see ``_LATEST_BARRIER``): the
    last collective before a process group is torn down."""
    work = dist.barrier(async_op=True)
    work.wait()
    _LATEST_BARRIER[:] = [work]

"""Moving small host data to the device and results back without stalling the GPU; and when
arlm's own Triton kernels stand in for PyTorch ops (``fused_inference``).

``torch.tensor(values, device="cuda")`` copies from pageable memory, which makes the host wait
until the GPU has finished everything queued before it: a few such calls per step and the GPU
idles while Python builds the next launch. Staging through pinned memory lets the copy join the
stream's queue instead. On the CPU both helpers are plain conversions.
"""

from __future__ import annotations

import importlib.util
from array import array
from collections.abc import Sequence

import torch

# Triton comes with PyTorch's CUDA wheels for Linux; a CUDA build without it keeps the ops
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def fused_inference(x: torch.Tensor) -> bool:
    """Whether inference ops on ``x`` run as one of arlm's Triton kernels (the model's in
    ``arlm.model.kernels``, the KV store in ``arlm.kv_cache.store_kernel``): on a GPU, with
    no gradients (training needs the ops'), outside ``torch.compile`` (which fuses the ops
    itself)."""
    return (
        x.is_cuda
        and _HAS_TRITON
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def int64_tensor(values: Sequence[int]) -> torch.Tensor:
    """A flat list of ints as an int64 CPU tensor, through ``array`` (its buffer taken as it
    is): 5-7 times faster than ``torch.tensor`` for the thousands of block ids and positions a
    step of many rows lays out."""
    if not values:  # torch.frombuffer refuses an empty buffer
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(array("q", values), dtype=torch.long)


def to_device(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` (a list of numbers, or of equal-length lists) as a tensor on ``device``,
    copied asynchronously on CUDA."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    host = torch.tensor(values, dtype=dtype, pin_memory=True)
    return host.to(device, non_blocking=True)


def pinned_to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host ``tensor`` on ``device``, copied asynchronously (through pinned memory) on CUDA."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device-to-host copy of some tensors, queued on the stream and not yet waited for:
    ``wait`` returns them on the CPU. On the CPU there is nothing to wait for."""

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self._shapes = [(t.shape, t.dtype) for t in tensors]
        self._done: torch.cuda.Event | None = None
        if not tensors or tensors[0].device.type != "cuda":
            self._host = [t.cpu() for t in tensors]
            return
        # one flat float64 buffer: one copy, and integers exact up to 2**53
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        self._flat = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
        self._flat.copy_(flat, non_blocking=True)
        self._done = torch.cuda.Event()
        self._done.record()

    def wait(self) -> list[torch.Tensor]:
        """The tensors on the CPU, once the copy is done (the host waits for the GPU here)."""
        if self._done is None:
            return self._host
        self._done.synchronize()
        out, offset = [], 0
        for shape, dtype in self._shapes:
            n = shape.numel()
            out.append(self._flat[offset : offset + n].view(shape).to(dtype))
            offset += n
        return out


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The ``tensors`` on the CPU, moved in one device-to-host copy: the step's one wait for the
    GPU. Integer values round-trip exactly (as float64, up to 2**53)."""
    return HostCopy(tensors).wait()

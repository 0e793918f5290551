"""Moving small host data to the device and results back without stalling the GPU.

``torch.tensor(values, device="cuda")`` copies from pageable memory, which makes the host wait
until the GPU has finished everything queued before it: a few such calls per step and the GPU
idles while Python builds the next launch. Staging through pinned memory lets the copy join the
stream's queue instead. On the CPU both helpers are plain conversions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The ``tensors`` on the CPU, moved in one device-to-host copy: the step's one wait for the
    GPU. Integer values round-trip exactly (as float64, up to 2**53)."""
    if not tensors or tensors[0].device.type != "cuda":
        return [t.cpu() for t in tensors]
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    host.copy_(flat, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(host[offset : offset + n].view(t.shape).to(t.dtype))
        offset += n
    return out

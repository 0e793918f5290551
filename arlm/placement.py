"""Where a model runs and in which dtype, when the user says ``auto``.

``device="auto"`` is the first CUDA device when there is one, else the CPU. ``dtype="auto"`` is
the dtype the checkpoint stores on CUDA (half the memory and bandwidth of float32 for a bfloat16
checkpoint), and float32 on a CPU, unless the CPU computes the checkpoint's half type natively
(AVX512-BF16 or AMX for bfloat16, AMX-FP16 for float16) and a matmul measured here runs faster
in it: without native support PyTorch converts each half value to float32 and back, so a half
model on such a CPU is slower than a float32 one.
"""

from __future__ import annotations

import functools
import time

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)
# the measured matmul: a batch of 16 rows (a decode step of 16 sequences) through a 2048-wide
# linear layer, the size of a 1B model's projections
_PROBE_ROWS, _PROBE_WIDTH = 16, 2048
# a half dtype is chosen on a CPU only when it is clearly faster, not within timing noise
_CPU_HALF_MIN_SPEEDUP = 1.1


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device; ``"auto"`` is CUDA when there is a GPU, else the CPU."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device; use auto, cpu, cuda or cuda:N") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: this machine has no CUDA GPU; use cpu or auto")
    return resolved


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bfloat16 or float16) in hardware."""
    cpu = torch.cpu  # the feature checks are private but stable since PyTorch 2.1
    if dtype == torch.bfloat16:
        return cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()
    if dtype == torch.float16:
        return cpu._is_amx_fp16_supported()
    return False


def cpu_matmul_seconds(dtype: torch.dtype, repeats: int = 5) -> float:
    """The best time of the probe matmul (16 rows through a 2048-wide linear) in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(_PROBE_ROWS, _PROBE_WIDTH, generator=g).to(dtype)
    w = torch.randn(_PROBE_WIDTH, _PROBE_WIDTH, generator=g).to(dtype)
    torch.nn.functional.linear(x, w)  # warm-up: kernel selection, first touch of the memory
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(4):
            torch.nn.functional.linear(x, w)
        best = min(best, (time.perf_counter() - t) / 4)
    return best


@functools.cache
def cpu_prefers(dtype: torch.dtype) -> bool:
    """Whether a model stored in ``dtype`` should run in it on this CPU: it must be float32,
    or a half type the CPU computes natively that measures faster than float32 (measured once
    per process)."""
    if dtype == torch.float32:
        return True
    if not cpu_has_native(dtype):
        return False
    return cpu_matmul_seconds(torch.float32) >= _CPU_HALF_MIN_SPEEDUP * cpu_matmul_seconds(dtype)


def auto_dtype(stored: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype ``dtype="auto"`` loads a checkpoint stored in ``stored`` as on ``device``."""
    if stored not in (torch.float32, *HALF_DTYPES):
        raise ValueError(f"checkpoint dtype {stored} is not float32, bfloat16 or float16")
    if device.type == "cuda":
        if stored == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return torch.float32  # float16 could overflow where bfloat16 did not
        return stored
    if device.type == "cpu":
        return stored if cpu_prefers(stored) else torch.float32
    return stored

"""RMSNorm in one Triton kernel, for inference on CUDA.

``RMSNorm``'s PyTorch ops are four kernels a norm in bfloat16 (to float32, ``rms_norm``, back to
the input's dtype, times the gain): 132 launches of a decode step of a 16-layer model, each a
few microseconds of a graph replay whatever the rows. Here one program per row does it all
with the same roundings: the row normalised in float32, rounded to the input's dtype, times
the gain in the gain's and input's common dtype (Llama); or, ``plus_one`` (Gemma), times
``1 + gain`` in float32 and rounded once. Imported only where it runs (CUDA, or Triton's
interpreter in the tests), so arlm itself does not need Triton."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_rows(
    X,
    W,
    Y,
    sx,
    sy,
    n,
    eps,
    PLUS_ONE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # one program: one row of n features
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(X + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    h = x * tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if PLUS_ONE:  # noqa: SIM108 (a compile-time branch: each kernel keeps one)
        y = h * (1.0 + w)
    else:  # rounded to the input's dtype first, as the reference implementation does
        y = h.to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + row * sy + cols, y.to(Y.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool) -> torch.Tensor:
    """``RMSNorm``'s output for ``x`` (..., n) and its gain ``weight`` (n,)."""
    n = x.size(-1)
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    # Llama's output takes the common dtype of gain and rounded input; Gemma's the input's
    dtype = x.dtype if plus_one else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(rows.shape, dtype=dtype, device=x.device)
    block = triton.next_power_of_2(n)
    _rms_norm_rows[(rows.size(0),)](
        rows,
        weight,
        y,
        rows.stride(0),
        y.stride(0),
        n,
        eps,
        PLUS_ONE=plus_one,
        BLOCK=block,
        num_warps=num_warps(block),
    )
    return y.view(x.shape)


def num_warps(block: int) -> int:
    """Warps for rows of ``block`` features: 8 values a thread, from 1 warp to 16."""
    return min(16, max(1, block // 256))

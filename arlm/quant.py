"""The int8 and int4 arithmetic that weights (``arlm.model.quantize``) and the KV cache
(``arlm.kv_cache.codec``) share. Each quantizes along the last dimension: one scale (and, for
int4, one minimum) per vector of the last dimension; callers reshape into the groups they want.
"""

from __future__ import annotations

import torch


def quantize_int8(
    x: torch.Tensor, scale_dtype: torch.dtype, tiny: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8: codes in [-127, 127] and a scale per vector, x ≈ codes * scale.

    ``tiny`` floors the scale, so an all-zero vector divides by something (and decodes to 0).
    """
    scale = (x.abs().amax(-1, keepdim=True).float() / 127).clamp_min(tiny).to(scale_dtype)
    # divide by the rounded scale that is stored, so decoding inverts exactly this step
    codes = torch.round(x.float() / scale.float()).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return codes.to(dtype) * scale.to(dtype)


def quantize_int4(
    x: torch.Tensor, scale_dtype: torch.dtype, tiny: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4: codes in [0, 15] packed two per byte (element 2j in the low nibble,
    2j+1 in the high one), x ≈ codes * scale + minimum.

    The minimum spends all 16 levels on the vector's actual range, where a symmetric grid wastes
    a level and part of its range on vectors not centred on 0. Measured on llama-small's held-out
    perplexity with the KV cache quantized: +0.2% asymmetric, +0.9% symmetric.
    """
    xf = x.float()
    lo, hi = xf.amin(-1, keepdim=True), xf.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp_min(tiny).to(scale_dtype)
    low = lo.to(scale_dtype)
    codes = torch.round((xf - low.float()) / scale.float()).clamp_(0, 15).to(torch.uint8)
    return pack_int4(codes), scale, low


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    pairs = codes.unflatten(-1, (-1, 2))  # (..., n/2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The codes (..., 2n) in [0, 15] of ``packed`` (..., n)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    return unpack_int4(packed).to(dtype) * scale.to(dtype) + low.to(dtype)

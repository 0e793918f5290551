"""How keys and values are stored: as floats, or quantized to int8 or int4 with a scale per vector.

A codec turns a tensor of head vectors (..., head_dim) into a few *planes*, tensors with the same
leading shape and their own last dimension and dtype, and back. Caches store planes wherever their
layout puts a position (a contiguous row, a block, a ring slot) and never look inside them.

Quantized codecs keep one scale per (position, head) in float16: with head_dim 64 an int8 vector
costs 64 + 2 bytes instead of 256 (float32), an int4 vector 32 + 4 bytes (codes packed two per
byte, scale and zero point).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arlm import quant

SCALE_DTYPE = torch.float16  # 2 bytes per scale; its 11-bit mantissa is finer than an int8 step
TINY = 1e-6  # floor of a scale, so an all-zero vector divides by something (and decodes to 0)


@dataclass(frozen=True)
class Plane:
    """One stored tensor per position and head: ``width`` elements of ``dtype``."""

    width: int
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.width * self.dtype.itemsize


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with a float16 scale per (position, head) vector."""
    return quant.quantize_int8(x, SCALE_DTYPE, TINY)


def quantize_int4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 with a float16 scale and zero point per (position, head) vector."""
    return quant.quantize_int4(x, SCALE_DTYPE, TINY)


class Codec:
    """Encodes (..., head_dim) vectors into planes and decodes them to ``dtype``."""

    name: str

    def planes(self, head_dim: int) -> list[Plane]:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def decode(self, planes: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def bytes_per_vector(self, head_dim: int) -> int:
        return sum(p.nbytes for p in self.planes(head_dim))


class FloatCodec(Codec):
    """Stores vectors as they are (cast to ``dtype``); decoding returns the stored tensor itself
    when the dtypes agree, so the float cache costs no copy."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.name = str(dtype).removeprefix("torch.")

    def planes(self, head_dim: int) -> list[Plane]:
        return [Plane(head_dim, self.dtype)]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x]

    def decode(self, planes: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return planes[0] if planes[0].dtype == dtype else planes[0].to(dtype)


class Int8Codec(Codec):
    name = "int8"

    def planes(self, head_dim: int) -> list[Plane]:
        return [Plane(head_dim, torch.int8), Plane(1, SCALE_DTYPE)]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(quantize_int8(x))

    def decode(self, planes: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return quant.dequantize_int8(*planes, dtype)


class Int4Codec(Codec):
    name = "int4"

    def planes(self, head_dim: int) -> list[Plane]:
        if head_dim % 2:
            raise ValueError(f"int4 packs two values per byte; head_dim={head_dim} must be even")
        return [Plane(head_dim // 2, torch.uint8), Plane(1, SCALE_DTYPE), Plane(1, SCALE_DTYPE)]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(quantize_int4(x))

    def decode(self, planes: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        return quant.dequantize_int4(*planes, dtype)


FLOAT_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
KV_DTYPES = ("auto", *FLOAT_DTYPES, "int8", "int4")


def make_codec(kv_dtype: str, model_dtype: torch.dtype) -> Codec:
    """The codec for a ``kv_cache_dtype`` name; ``auto`` stores the model's own dtype."""
    if kv_dtype == "auto":
        return FloatCodec(model_dtype)
    if kv_dtype in FLOAT_DTYPES:
        return FloatCodec(FLOAT_DTYPES[kv_dtype])
    if kv_dtype == "int8":
        return Int8Codec()
    if kv_dtype == "int4":
        return Int4Codec()
    raise ValueError(f"kv_cache_dtype={kv_dtype!r} is not supported; choose one of {KV_DTYPES}")

"""The contiguous cache: one buffer per layer holding every position of every row."""

from __future__ import annotations

import torch

from arlm.config import ModelConfig
from arlm.kv_cache.base import (
    DenseCache,
    Rotate,
    alloc_planes,
    layer_views,
    planes_nbytes,
    require_int_position,
)
from arlm.kv_cache.codec import Codec, FloatCodec


class KVCache(DenseCache):
    """Per-layer planes of shape (batch, n_kv_head, max_len, width): positions ``0..max_len-1``
    of ``batch`` rows that advance together. Float storage in the model's dtype (the default)
    returns views of the buffers, so a decode step allocates nothing. A layer with a sliding
    window (``windows``, one per layer; None: every layer sees every position) is handed only
    the positions its queries' windows reach."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        codec: Codec | None = None,
        windows: list[int | None] | None = None,
    ) -> None:
        self.codec = codec or FloatCodec(dtype)
        self.dtype = dtype  # what attention gets back
        lead = (batch_size, n_kv_head, max_len)
        self.k = alloc_planes(self.codec, n_layer, lead, head_dim, device)
        self.v = alloc_planes(self.codec, n_layer, lead, head_dim, device)
        self.batch_size = batch_size
        self.max_len = max_len
        self.windows = windows or [None] * n_layer
        self.length = 0  # positions written so far (the same for every row)
        self._start = self._end = 0  # the positions the current forward writes
        self._first = [0] * n_layer  # per layer, the first position the current forward reads

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        codec: Codec | None = None,
    ) -> KVCache:
        return cls(
            config.n_layer,
            batch_size,
            config.n_kv_head,
            config.head_dim,
            max_len,
            device=device,
            dtype=dtype,
            codec=codec,
            windows=config.layer_windows,
        )

    def _prepare(
        self, start_pos: int | torch.Tensor, T: int, rotate: Rotate | None = None
    ) -> list[torch.Tensor | None]:
        start_pos = require_int_position(start_pos, "contiguous")
        if start_pos + T > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} positions; writing positions "
                f"{start_pos}..{start_pos + T - 1} does not fit"
            )
        self._start, self._end = start_pos, start_pos + T
        self.length = self._end
        views = layer_views(self.windows, start_pos, T, self.k[0][0].device)
        self._first = [first for first, _ in views]
        return [mask for _, mask in views]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s, e, first = self._start, self._end, self._first[layer]
        out = []
        for planes, x in ((self.k[layer], k), (self.v[layer], v)):
            for plane, part in zip(planes, self.codec.encode(x), strict=True):
                plane[:, :, s:e] = part
            out.append(self.codec.decode([p[:, :, first:e] for p in planes], self.dtype))
        return out[0], out[1]

    def reset(self) -> None:
        """Forget every position; the buffers are reused, not reallocated."""
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return planes_nbytes(self.k, self.v)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position costs across all layers, for one sequence."""
        return self.nbytes // (self.max_len * self.batch_size)

    @property
    def tokens(self) -> int:
        return self.length * self.batch_size

    @property
    def capacity(self) -> int:
        return self.max_len * self.batch_size

    @property
    def used_bytes(self) -> int:
        return self.tokens * self.bytes_per_token

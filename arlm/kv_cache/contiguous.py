"""The contiguous cache: one buffer per layer holding every position of every row."""

from __future__ import annotations

import torch

from arlm.config import ModelConfig
from arlm.kv_cache.base import (
    DenseCache,
    Mask,
    RingChunk,
    Rotate,
    alloc_planes,
    layer_lengths,
    layer_views,
    planes_nbytes,
    require_int_position,
    rings_hold,
)
from arlm.kv_cache.codec import Codec, FloatCodec


class KVCache(DenseCache):
    """Per-layer planes of shape (batch, n_kv_head, max_len, width): positions ``0..max_len-1``
    of ``batch`` rows that advance together. Float storage in the model's dtype (the default)
    returns views of the buffers, so a decode step allocates nothing. A layer with a sliding
    window W shorter than ``max_len`` (``windows``, one per layer; None: every layer sees every
    position) stores only its last W positions, in a ring of (batch, n_kv_head, W, width)
    (``layer_lengths``); the cache then only goes on from where it stopped (or from anywhere
    up to it while no ring has wrapped)."""

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
        self.windows = windows or [None] * n_layer
        self.layer_len = layer_lengths(self.windows, max_len)  # positions each layer stores
        self.k, self.v = [], []
        for span in self.layer_len:
            for planes in (self.k, self.v):
                planes += alloc_planes(
                    self.codec, 1, (batch_size, n_kv_head, span), head_dim, device
                )
        self.batch_size = batch_size
        self.max_len = max_len
        # one position of one row in one layer, k and v
        self.position_bytes = 2 * n_kv_head * self.codec.bytes_per_vector(head_dim)
        self.length = 0  # positions written so far (the same for every row)
        self._start = self._end = 0  # the positions the current forward writes
        self._first = [0] * n_layer  # per layer, the first position the current forward reads
        self._rings: dict[int, RingChunk] = {}  # per ring length, a chunk's reads and writes

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
    ) -> list[Mask]:
        start_pos = require_int_position(start_pos, "contiguous")
        if start_pos + T > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} positions; writing positions "
                f"{start_pos}..{start_pos + T - 1} does not fit"
            )
        if not rings_hold(self.layer_len, self.max_len, self.length, 0, start_pos, start_pos):
            raise ValueError(
                f"the KV cache's sliding-window layers keep only their last {min(self.layer_len)}"
                f" positions, and it has written {self.length}: it can go on from position "
                f"{self.length}, not {start_pos} (reset() to start again)"
            )
        self._start, self._end = start_pos, start_pos + T
        self.length = self._end
        device = self.k[0][0].device
        views = layer_views(self.windows, start_pos, T, device)
        self._first = [first for first, _ in views]
        self._rings = {
            span: RingChunk.make(first, start_pos, self._end, span, device)
            for span, (first, _) in zip(self.layer_len, views, strict=True)
            if span < self.max_len and T > 1
        }
        return [mask for _, mask in views]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s, e, first = self._start, self._end, self._first[layer]
        span = self.layer_len[layer]
        if span in self._rings:  # a chunk into a ring: its window read before the ring turns
            ring = self._rings[span]
            return (
                ring.update(self.codec, self.k[layer], k, self.dtype),
                ring.update(self.codec, self.v[layer], v, self.dtype),
            )
        # one position into a ring goes at its offset, over the one that left its window; the
        # query sees the whole ring, in ring order (attention does not care which)
        offset, read = (
            (s % span, slice(0, min(e, span))) if span < self.max_len else (s, slice(first, e))
        )
        out = []
        for planes, x in ((self.k[layer], k), (self.v[layer], v)):
            for plane, part in zip(planes, self.codec.encode(x), strict=True):
                plane[:, :, offset : offset + e - s] = part
            out.append(self.codec.decode([p[:, :, read] for p in planes], self.dtype))
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
        """Bytes one position of one sequence costs stored in every layer."""
        return len(self.layer_len) * self.position_bytes

    @property
    def tokens(self) -> int:
        return max(self.layer_tokens(i) for i in range(len(self.layer_len)))

    @property
    def capacity(self) -> int:
        return max(self.layer_len) * self.batch_size

    def layer_tokens(self, layer: int) -> int:
        return min(self.length, self.layer_len[layer]) * self.batch_size

    def layer_capacity(self, layer: int) -> int:
        return self.layer_len[layer] * self.batch_size

    @property
    def used_bytes(self) -> int:
        n = sum(self.layer_tokens(i) for i in range(len(self.layer_len)))
        return n * self.position_bytes

"""The windowed cache with attention sinks (StreamingLLM, Xiao et al. 2023): bounded memory,
generation past the context length.

It keeps the first ``sink_tokens`` positions (the *sinks*: trained models park attention they
do not need elsewhere on the first tokens, and StreamingLLM finds that evicting them breaks
generation) and the last ``window`` positions, in a fixed buffer of ``sink_tokens + window``
slots: sinks in the first slots, the window in a ring after them. A query at position p sees
the sinks and positions p-window+1..p.

Positions. StreamingLLM gives each key its position *within the cache*: sinks 0..n_sink-1, the
window right after them, the query last, so no distance ever exceeds the cache size. RoPE
attention depends only on the distance between query and key, so the same scores come from
absolute positions for everything but the sinks:

- queries and window keys keep their absolute positions (their distances are the in-cache ones);
- a sink key j, stored rotated at j, is turned further by ``delta = p - c(p)``, where
  c(p) = min(p, n_sink + window - 1) is the query's in-cache position; then its distance to the
  query is c(p) - j, as in the paper.

So keys are stored once, rotated, and never re-rotated; only the few sink keys turn at each step.
The price: angles of absolute positions are computed in float32, so very long runs lose a little
angle precision (about 0.004 rad at position 10^5, at the fastest frequency).
In a forward of T > 1 queries each query needs the sinks at its own angle: the sinks are
repeated once per query, and the mask lets each query see its own copy.
"""

from __future__ import annotations

import torch

from arlm.config import ModelConfig
from arlm.kv_cache.base import (
    DenseCache,
    Mask,
    Rotate,
    alloc_planes,
    planes_nbytes,
    require_int_position,
)
from arlm.kv_cache.codec import Codec, FloatCodec


class WindowedKVCache(DenseCache):
    """Per-layer planes of shape (batch, n_kv_head, sink_tokens + window, width); the rows
    advance together, and only by appending."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        window: int,
        sink_tokens: int = 4,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        codec: Codec | None = None,
    ) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be at least 1")
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens={sink_tokens} must be >= 0")
        self.codec = codec or FloatCodec(dtype)
        self.dtype = dtype
        self.window, self.sink_tokens = window, sink_tokens
        self.slots = sink_tokens + window
        lead = (batch_size, n_kv_head, self.slots)
        self.k = alloc_planes(self.codec, n_layer, lead, head_dim, device)
        self.v = alloc_planes(self.codec, n_layer, lead, head_dim, device)
        self.batch_size = batch_size
        self.length = 0  # positions seen so far; the next forward starts here
        self._rotate: Rotate | None = None
        self._shift: torch.Tensor | None = None  # sink rotation of this forward, or None
        self._chunk = False
        self._slot = self._n = self._copies = 0

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        batch_size: int,
        window: int,
        sink_tokens: int = 4,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        codec: Codec | None = None,
    ) -> WindowedKVCache:
        return cls(
            config.n_layer,
            batch_size,
            config.n_kv_head,
            config.head_dim,
            window,
            sink_tokens,
            device=device,
            dtype=dtype,
            codec=codec,
        )

    def slot_of(self, pos: int) -> int:
        ns = self.sink_tokens
        return pos if pos < ns else ns + (pos - ns) % self.window

    def _prepare(
        self, start_pos: int | torch.Tensor, T: int, rotate: Rotate | None = None
    ) -> list[Mask]:
        return [self._mask(start_pos, T, rotate)] * len(self.k)  # every layer alike

    def _mask(
        self, start_pos: int | torch.Tensor, T: int, rotate: Rotate | None
    ) -> torch.Tensor | None:
        if rotate is None:
            raise ValueError(
                "the windowed KV cache needs rotary positions (it re-positions the sink keys); "
                "this model's positions are learned embeddings"
            )
        start = require_int_position(start_pos, "windowed")
        if start != self.length:
            raise ValueError(
                f"the windowed cache only appends: it has seen {self.length} positions, so the "
                f"next forward starts at {self.length}, not {start}"
            )
        self._rotate = rotate
        device = self.k[0][0].device
        ns, W, cap, L = self.sink_tokens, self.window, self.slots, start
        self.length = L + T
        self._chunk = T > 1
        if T == 1:
            # the slots hold positions 0..L (not full yet) or the sinks and L-W+1..L: all visible
            self._slot, self._n = self.slot_of(L), min(L + 1, cap)
            delta = L - (cap - 1)
            self._shift = torch.tensor([delta], device=device) if delta > 0 and ns else None
            return None

        old = [*range(min(L, ns)), *range(max(ns, L - W), L)]  # held now, in position order
        long = dict(dtype=torch.long, device=device)
        self._old_slots = torch.tensor([self.slot_of(a) for a in old], **long)
        pos = torch.tensor([*old, *range(L, L + T)], **long)  # keys: old, then new
        q = torch.arange(L, L + T, device=device)
        is_sink = pos < ns
        # (T, n_keys): causal, and a non-sink key only within the query's window
        visible = (pos <= q[:, None]) & (is_sink | (pos > q[:, None] - W))
        delta = (q - (cap - 1)).clamp_min(0)
        if ns and int(delta.max()) > 0:
            self._sink_idx = is_sink.nonzero().flatten()
            self._rest_idx = (~is_sink).nonzero().flatten()
            n_s = len(self._sink_idx)
            self._shift = delta.repeat_interleave(n_s)  # (T * n_s,): copy t turned by delta[t]
            self._copies = T
            own = torch.eye(T, dtype=torch.bool, device=device).repeat_interleave(n_s, dim=1)
            sinks = own & visible[:, self._sink_idx].repeat(1, T)  # (T, T * n_s)
            mask = torch.cat((sinks, visible[:, self._rest_idx]), dim=1)
        else:
            self._shift, mask = None, visible
        # of the new positions, the sinks and the last W stay
        keep = [i for i in range(T) if L + i < ns or L + i >= L + T - W]
        self._keep_src = torch.tensor(keep, **long)
        self._keep_slots = torch.tensor([self.slot_of(L + i) for i in keep], **long)
        return mask

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        update = self._update_chunk if self._chunk else self._update_one
        return update(self.k[layer], k, True), update(self.v[layer], v, False)

    def _update_one(self, planes: list[torch.Tensor], x: torch.Tensor, keys: bool) -> torch.Tensor:
        s, ns = self._slot, self.sink_tokens
        for plane, part in zip(planes, self.codec.encode(x), strict=True):
            plane[:, :, s : s + 1] = part
        y = self.codec.decode([p[:, :, : self._n] for p in planes], self.dtype)
        if keys and self._shift is not None:
            y = torch.cat((self._rotate(y[:, :, :ns], self._shift), y[:, :, ns:]), dim=2)
        return y

    def _update_chunk(
        self, planes: list[torch.Tensor], x: torch.Tensor, keys: bool
    ) -> torch.Tensor:
        parts = self.codec.encode(x)
        old = self.codec.decode([p.index_select(2, self._old_slots) for p in planes], self.dtype)
        # the new positions as they will read back from the cache, quantization included
        y = torch.cat((old, self.codec.decode(parts, self.dtype)), dim=2)
        if self._shift is not None:
            sinks = y.index_select(2, self._sink_idx).repeat(1, 1, self._copies, 1)
            if keys:
                sinks = self._rotate(sinks, self._shift)
            y = torch.cat((sinks, y.index_select(2, self._rest_idx)), dim=2)
        for plane, part in zip(planes, parts, strict=True):
            plane.index_copy_(2, self._keep_slots, part.index_select(2, self._keep_src))
        return y

    def reset(self) -> None:
        self.length = 0

    @property
    def nbytes(self) -> int:
        return planes_nbytes(self.k, self.v)

    @property
    def bytes_per_token(self) -> int:
        return self.nbytes // (self.slots * self.batch_size)

    @property
    def tokens(self) -> int:
        return min(self.length, self.slots) * self.batch_size

    @property
    def capacity(self) -> int:
        return self.slots * self.batch_size

    def layer_tokens(self, layer: int) -> int:
        return self.tokens  # every layer holds the same positions

    def layer_capacity(self, layer: int) -> int:
        return self.capacity

    @property
    def used_bytes(self) -> int:
        return self.tokens * self.bytes_per_token

"""The engine's cache: one contiguous *slot* of positions per running sequence.

Per layer, planes of shape (num_slots, n_kv_head, slot_len, width). A sequence owns a slot for
its whole life and its position ``p`` lives at offset ``p`` of that slot, so what attention reads
is always a view: a decode step attends to ``planes[lo:hi + 1, :, :S]`` for the slots ``lo..hi``
of its rows (a length mask hides each row's unused tail), a prefill chunk to its own slot's
first positions. Nothing is gathered: the paged alternative (blocks anywhere in a pool, gathered
into a dense tensor per layer per step) measured 3 to 10 times slower at 16 sequences of 256 to
1,024 positions on this CPU, because the gather copies the whole history of every row in every
layer (see ``benchmarks/engine.py --attention``).

Block accounting, prefix caching and which sequence owns which slot belong to the engine's block
manager (``arlm.engine.block_manager``); this module only stores and attends.

One forward of the engine mixes rows: its tokens are laid out flat, (1, N), as the decode tokens
(one per decoding sequence, in slot order) and then each prefill chunk's tokens. ``step`` returns
the ``Cache`` object for one such forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arlm.config import ModelConfig
from arlm.kv_cache.base import Rotate, alloc_planes, layer_views, planes_nbytes, sdpa
from arlm.kv_cache.codec import Codec, FloatCodec


@dataclass(frozen=True)
class PrefillChunk:
    """``length`` prompt positions of ``slot`` from ``start`` on, written and attended in one
    forward."""

    slot: int
    start: int
    length: int


@dataclass(frozen=True)
class StepLayout:
    """What one forward holds: decode rows (``decode_slots`` ascending, each writing position
    ``decode_positions[i]``) and then prefill chunks, in this token order."""

    decode_slots: list[int]
    decode_positions: list[int]
    chunks: list[PrefillChunk]

    @property
    def num_tokens(self) -> int:
        return len(self.decode_slots) + sum(c.length for c in self.chunks)

    def positions(self) -> list[int]:
        """Every token's position, in the flat order."""
        out = list(self.decode_positions)
        for c in self.chunks:
            out.extend(range(c.start, c.start + c.length))
        return out


class SlotKVCache:
    """``num_slots`` slots of ``slot_len`` positions per layer, through a codec (floats, or
    int8/int4 with a scale per position and head). Slots are allocated as they are first needed,
    up to ``num_slots``, so a model that serves one request at a time holds one slot. A layer
    with a sliding window (``windows``, one per layer; None: none has one) attends only to the
    positions in its queries' windows; its slot still holds every position."""

    def __init__(
        self,
        n_layer: int,
        n_kv_head: int,
        head_dim: int,
        num_slots: int,
        slot_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        codec: Codec | None = None,
        windows: list[int | None] | None = None,
    ) -> None:
        if num_slots < 1 or slot_len < 1:
            raise ValueError(f"num_slots={num_slots} and slot_len={slot_len} must be positive")
        self.codec = codec or FloatCodec(dtype)
        self.dtype = dtype
        self.n_layer, self.n_kv_head, self.head_dim = n_layer, n_kv_head, head_dim
        self.windows = windows or [None] * n_layer
        self.num_slots, self.slot_len = num_slots, slot_len
        self.device = torch.device(device)
        self.k: list[list[torch.Tensor]] = []
        self.v: list[list[torch.Tensor]] = []
        self.lengths = [0] * num_slots  # positions each slot holds
        self.allocated = 0

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        num_slots: int,
        slot_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        codec: Codec | None = None,
    ) -> SlotKVCache:
        return cls(
            config.n_layer,
            config.n_kv_head,
            config.head_dim,
            num_slots,
            slot_len,
            device=device,
            dtype=dtype,
            codec=codec,
            windows=config.layer_windows,
        )

    def reserve(self, slots: int) -> None:
        """Make sure slots ``0..slots-1`` exist: grow the planes (doubling, up to
        ``num_slots``) and carry over what the existing slots hold."""
        if slots <= self.allocated:
            return
        if slots > self.num_slots:
            raise ValueError(f"slot {slots - 1} does not exist; the cache has {self.num_slots}")
        n = min(self.num_slots, max(slots, 2 * self.allocated))
        lead = (n, self.n_kv_head, self.slot_len)
        k = alloc_planes(self.codec, self.n_layer, lead, self.head_dim, self.device)
        v = alloc_planes(self.codec, self.n_layer, lead, self.head_dim, self.device)
        for new, old in ((k, self.k), (v, self.v)):
            for new_planes, old_planes in zip(new, old, strict=False):
                for a, b in zip(new_planes, old_planes, strict=True):
                    a[: self.allocated].copy_(b)
        self.k, self.v, self.allocated = k, v, n

    def copy(self, src: int, dst: int, start: int, end: int) -> None:
        """Copy positions ``start..end-1`` of slot ``src`` into slot ``dst`` (a prefix-cache hit:
        the same tokens at the same positions have the same keys and values)."""
        for planes in (*self.k, *self.v):
            for plane in planes:
                plane[dst, :, start:end] = plane[src, :, start:end]

    def step(self, layout: StepLayout) -> SlotStep:
        """The cache as one forward over ``layout`` sees it."""
        return SlotStep(self, layout)

    @property
    def nbytes(self) -> int:
        return planes_nbytes(self.k, self.v)

    @property
    def bytes_per_token(self) -> int:
        per_vector = self.codec.bytes_per_vector(self.head_dim)
        return 2 * self.n_layer * self.n_kv_head * per_vector

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def capacity(self) -> int:
        return self.allocated * self.slot_len

    @property
    def used_bytes(self) -> int:
        return self.tokens * self.bytes_per_token


class SlotStep:
    """The ``Cache`` of one engine forward: writes each token's key and value at its slot and
    position, and attends decode rows in one batched call over a view of their slots, each
    prefill chunk in one call over a view of its own slot."""

    def __init__(self, cache: SlotKVCache, layout: StepLayout) -> None:
        self.cache, self.layout = cache, layout
        device = cache.device
        long = dict(dtype=torch.long, device=device)
        self.n_decode = len(layout.decode_slots)
        if self.n_decode:
            slots, positions = layout.decode_slots, layout.decode_positions
            self.lo, hi = slots[0], slots[-1]
            rows = hi - self.lo + 1  # slots in between that are not decoding get a dummy row
            self._slots = torch.tensor(slots, **long)
            H, L = cache.n_kv_head, cache.slot_len
            # the rows (slot, head, position) the new vectors go to in a plane seen as
            # (num_slots * n_kv_head * slot_len, width): one index for every layer's writes
            heads = torch.arange(H, device=device)
            rows_of = (self._slots[:, None] * H + heads) * L
            self._write = (rows_of + torch.tensor(positions, **long)[:, None]).flatten()
            self._dense = rows == self.n_decode  # the rows are exactly the slots lo..hi
            self._rows = rows
            self._row_index = self._slots - self.lo
            lengths = [1] * rows  # a dummy row sees one key, so its softmax stays finite
            for s, p in zip(slots, positions, strict=True):
                lengths[s - self.lo] = p + 1
            self._S = max(lengths)
            views = {w: self._decode_view(lengths, w) for w in set(cache.windows)}
            self._decode_views = [views[w] for w in cache.windows]
        # per chunk, per layer: (first key, mask)
        self._chunk_views = [
            layer_views(cache.windows, c.start, c.length, device) for c in layout.chunks
        ]
        for s, p in zip(layout.decode_slots, layout.decode_positions, strict=True):
            cache.lengths[s] = p + 1
        for c in layout.chunks:
            cache.lengths[c.slot] = c.start + c.length

    def _decode_view(
        self, lengths: list[int], window: int | None
    ) -> tuple[int, torch.Tensor | None]:
        """(first key, mask) of the decode rows, each seeing the last ``window`` of its
        ``lengths`` positions (None: all of them); the mask is (rows, 1, 1, keys), or None where
        every row sees every key from the first on."""
        S = self._S
        lows = None if window is None or window >= S else [max(0, n - window) for n in lengths]
        first = 0 if lows is None else min(lows)
        if min(lengths) == S and (lows is None or max(lows) == first):
            return first, None
        long = dict(dtype=torch.long, device=self.cache.device)
        keys = torch.arange(first, S, device=self.cache.device)
        visible = keys < torch.tensor(lengths, **long)[:, None]
        if lows is not None:
            visible &= keys >= torch.tensor(lows, **long)[:, None]
        return first, visible[:, None, None, :]

    def prepare(self, start_pos: int, T: int, rotate: Rotate | None = None) -> None:
        """Nothing to do: the layout already says where every token goes."""
        if self.layout.num_tokens != T:
            raise ValueError(f"this step's layout has {self.layout.num_tokens} tokens, not {T}")

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: (1, n_head, N, hd); k, v: (1, n_kv_head, N, hd), the layout's tokens in order
        cache = self.cache
        codec = cache.codec
        k_planes, v_planes = cache.k[layer], cache.v[layer]
        out = []
        nd = self.n_decode
        if nd:
            for planes, x in ((k_planes, k), (v_planes, v)):
                new = x[0, :, :nd].transpose(0, 1)  # (nd, n_kv_head, hd)
                for plane, part in zip(planes, codec.encode(new), strict=True):
                    flat = plane.view(-1, plane.size(-1))
                    flat.index_copy_(0, self._write, part.reshape(-1, part.size(-1)))
            view = slice(self.lo, self.lo + self._rows)
            first, mask = self._decode_views[layer]
            keys = codec.decode([p[view, :, first : self._S] for p in k_planes], cache.dtype)
            values = codec.decode([p[view, :, first : self._S] for p in v_planes], cache.dtype)
            queries = q[0, :, :nd].transpose(0, 1)[:, :, None]  # (nd, n_head, 1, hd)
            if not self._dense:
                rows = queries.new_zeros(self._rows, *queries.shape[1:])
                queries = rows.index_copy_(0, self._row_index, queries)
            y = sdpa(queries, keys, values, mask)  # (rows, n_head, 1, hd)
            if not self._dense:
                y = y.index_select(0, self._row_index)
            out.append(y[:, :, 0].transpose(0, 1)[None])  # (1, n_head, nd, hd)
        offset = nd
        for chunk, views in zip(self.layout.chunks, self._chunk_views, strict=True):
            s, start, T = chunk.slot, chunk.start, chunk.length
            first, mask = views[layer]
            end = start + T
            for planes, x in ((k_planes, k), (v_planes, v)):
                for plane, part in zip(
                    planes, codec.encode(x[0, :, offset : offset + T]), strict=True
                ):
                    plane[s, :, start:end] = part
            keys = codec.decode([p[s : s + 1, :, first:end] for p in k_planes], cache.dtype)
            values = codec.decode([p[s : s + 1, :, first:end] for p in v_planes], cache.dtype)
            out.append(sdpa(q[:, :, offset : offset + T], keys, values, mask))
            offset += T
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

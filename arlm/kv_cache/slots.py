"""The engine's cache: one contiguous *slot* of positions per running sequence.

Per layer, planes of shape (num_slots, n_kv_head, slot_len, width). A sequence owns a slot for
its whole life and its position ``p`` lives at offset ``p`` of that slot, so what attention reads
is always a view: a decode step attends to ``planes[lo:hi + 1, :, :S]`` for the slots ``lo..hi``
of its rows (a length mask hides each row's unused tail), a prefill chunk to its own slot's
first positions. Nothing is gathered: the paged alternative (blocks anywhere in a pool, gathered
into a dense tensor per layer per step) measured 3 to 10 times slower at 16 sequences of 256 to
1,024 positions on this CPU, because the gather copies the whole history of every row in every
layer (see ``benchmarks/engine.py --attention``).

A sliding-window layer whose window W is shorter than the slot keeps only W positions per slot:
its planes are (num_slots, n_kv_head, W, width), a ring with position ``p`` at offset ``p % W``
(``layer_lengths``), so its memory stops growing at W. A decode query sees exactly the ring, so
it still reads a view (in ring order: attention does not care); a prefill chunk reads the window
before it from the ring, then stores its own last W positions. A ring holds only the last W
positions its slot wrote, so a sequence goes on from where it stopped: ``rewind`` and ``holds``
say what is still there for a rollback or a prefix-cache copy.

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
from arlm.devices import to_device
from arlm.kv_cache.base import (
    RingChunk,
    Rotate,
    alloc_planes,
    layer_lengths,
    layer_views,
    planes_nbytes,
    rings_hold,
    sdpa,
)
from arlm.kv_cache.codec import Codec, FloatCodec
from arlm.kv_cache.decode_attention import decode_attention


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

    def sequence_ends(self) -> list[int]:
        """For every token, in the flat order, the position its sequence reaches in this
        forward (exclusive): one past a decode row's position, a chunk's end."""
        out = [p + 1 for p in self.decode_positions]
        for c in self.chunks:
            out.extend([c.start + c.length] * c.length)
        return out


class SlotKVCache:
    """``num_slots`` slots of ``slot_len`` positions per layer, through a codec (floats, or
    int8/int4 with a scale per position and head). Slots are allocated as they are first needed,
    up to ``num_slots``, so a model that serves one request at a time holds one slot. A layer
    with a sliding window (``windows``, one per layer; None: none has one) attends only to the
    positions in its queries' windows, and stores only those: ``layer_len[i]`` positions per
    slot, the window where it is shorter than ``slot_len``."""

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
        self.layer_len = layer_lengths(self.windows, slot_len)  # positions each layer stores
        # one position of one slot in one layer, k and v
        self.position_bytes = 2 * n_kv_head * self.codec.bytes_per_vector(head_dim)
        self.device = torch.device(device)
        self.k: list[list[torch.Tensor]] = []
        self.v: list[list[torch.Tensor]] = []
        self.lengths = [0] * num_slots  # positions each slot has written, in order
        self.allocated = 0
        self.spare: int | None = None  # a slot no sequence owns (``add_spare_slot``)

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
        self._grow(min(self.num_slots, max(slots, 2 * self.allocated)))

    def add_spare_slot(self) -> None:
        """Allocate every slot and one more that no sequence owns (index ``num_slots``, the
        ``spare``), where the padding rows of a captured decode step write."""
        self.spare = self.num_slots
        self._grow(self.num_slots)

    def _grow(self, n: int) -> None:
        """Planes for ``n`` slots (and the spare), holding what the existing slots hold."""
        rows = n + (self.spare is not None)
        k, v = [], []
        for span in self.layer_len:
            for planes in (k, v):
                lead = (rows, self.n_kv_head, span)
                planes += alloc_planes(self.codec, 1, lead, self.head_dim, self.device)
        for new, old in ((k, self.k), (v, self.v)):
            for new_planes, old_planes in zip(new, old, strict=False):
                for a, b in zip(new_planes, old_planes, strict=True):
                    a[: self.allocated].copy_(b[: self.allocated])
        self.k, self.v, self.allocated = k, v, n

    def copy(self, src: int, dst: int, start: int, end: int) -> None:
        """Copy positions ``start..end-1`` of slot ``src`` into slot ``dst`` (a prefix-cache hit:
        the same tokens at the same positions have the same keys and values); ``dst`` then holds
        positions up to ``end``. A ring copies the last of them it has room for; what ``src``
        still holds is for the caller to ask first (``holds``)."""
        for layer, span in enumerate(self.layer_len):
            planes = (*self.k[layer], *self.v[layer])
            if span == self.slot_len:
                for plane in planes:
                    plane[dst, :, start:end] = plane[src, :, start:end]
                continue
            offsets = torch.arange(max(start, end - span), end, device=self.device) % span
            for plane in planes:
                plane[dst].index_copy_(1, offsets, plane[src].index_select(1, offsets))
        self.lengths[dst] = end

    def holds(self, slot: int, start: int, end: int, resume: int) -> bool:
        """Whether every layer of ``slot`` still holds the positions of ``start..end-1`` that a
        sequence going on from position ``resume`` reads (``rings_hold``): always where no layer
        is a ring, and in a ring only the last positions the slot wrote."""
        return rings_hold(self.layer_len, self.slot_len, self.lengths[slot], start, end, resume)

    def rewind(self, slot: int, position: int) -> int:
        """Go on in ``slot`` from ``position``, at most what it has written: ``position``, or 0
        where a sliding-window ring no longer holds the window before it (it was overwritten
        since), and the sequence must be computed again from the start."""
        if not self.holds(slot, 0, position, position):
            position = 0
        self.lengths[slot] = position
        return position

    def step(self, layout: StepLayout) -> SlotStep:
        """The cache as one forward over ``layout`` sees it."""
        return SlotStep(self, layout)

    @property
    def static_decode(self) -> bool:
        """Whether decode steps can take ``StaticDecode`` (float planes, no rings, a spare
        slot for padding rows, every slot allocated so the planes never move)."""
        return (
            isinstance(self.codec, FloatCodec)
            and all(span == self.slot_len for span in self.layer_len)
            and self.spare is not None
            and self.allocated == self.num_slots
        )

    @property
    def nbytes(self) -> int:
        return planes_nbytes(self.k, self.v)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position of one slot costs stored in every layer."""
        return self.n_layer * self.position_bytes

    def slot_bytes(self, positions: int) -> int:
        """Bytes one slot holding ``positions`` positions uses, each layer up to its length
        (``slot_bytes(slot_len)``: what a slot allocates)."""
        return sum(min(positions, span) for span in self.layer_len) * self.position_bytes

    @property
    def tokens(self) -> int:
        return max(self.layer_tokens(i) for i in range(self.n_layer))

    @property
    def capacity(self) -> int:
        return self.allocated * max(self.layer_len)

    def layer_tokens(self, layer: int) -> int:
        span = self.layer_len[layer]
        return sum(min(n, span) for n in self.lengths)

    def layer_capacity(self, layer: int) -> int:
        return self.allocated * self.layer_len[layer]

    @property
    def used_bytes(self) -> int:
        return sum(self.layer_tokens(i) for i in range(self.n_layer)) * self.position_bytes


class SlotStep:
    """The ``Cache`` of one engine forward: writes each token's key and value at its slot and
    position, and attends decode rows in one batched call over a view of their slots, each
    prefill chunk in one call over a view of its own slot."""

    def __init__(self, cache: SlotKVCache, layout: StepLayout) -> None:
        self.cache, self.layout = cache, layout
        device = cache.device
        self.n_decode = len(layout.decode_slots)
        if self.n_decode:
            slots, positions = layout.decode_slots, layout.decode_positions
            self.lo, hi = slots[0], slots[-1]
            rows = hi - self.lo + 1  # slots in between that are not decoding get a dummy row
            self._slots = to_device(slots, torch.long, device)
            H = cache.n_kv_head
            # the rows (slot, head, offset) the new vectors go to in a plane seen as
            # (num_slots * n_kv_head * span, width), span the layer's length: one index per length
            heads = torch.arange(H, device=device)
            at = to_device(positions, torch.long, device)[:, None]
            self._write = {
                span: (
                    (self._slots[:, None] * H + heads) * span
                    + (at if span == cache.slot_len else at % span)
                ).flatten()
                for span in set(cache.layer_len)
            }
            self._dense = rows == self.n_decode  # the rows are exactly the slots lo..hi
            self._rows = rows
            self._row_index = self._slots - self.lo
            lengths = [1] * rows  # a dummy row sees one key, so its softmax stays finite
            for s, p in zip(slots, positions, strict=True):
                lengths[s - self.lo] = p + 1
            self._S = max(lengths)
            # on CUDA, float layers without a ring read each row's own positions through the
            # decode kernel: no mask, no dummy rows, no per-shape setup of a library's kernel
            self._kernel = cache.device.type == "cuda" and isinstance(cache.codec, FloatCodec)
            if self._kernel:
                self._lengths = to_device([p + 1 for p in positions], torch.long, device)
            views = {
                span: self._decode_view(lengths, span)
                for span in set(cache.layer_len)
                if not (self._kernel and span == cache.slot_len)
            }
            self._decode_views = [views.get(span) for span in cache.layer_len]
        # per chunk, per layer: (first key, mask)
        self._chunk_views = [
            layer_views(cache.windows, c.start, c.length, device) for c in layout.chunks
        ]
        # per chunk, per ring length: where the chunk reads and writes the ring
        self._chunk_rings = [
            {
                span: RingChunk.make(first, c.start, c.start + c.length, span, device)
                for span, (first, _) in zip(cache.layer_len, views, strict=True)
                if span < cache.slot_len
            }
            for c, views in zip(layout.chunks, self._chunk_views, strict=True)
        ]
        for s, p in zip(layout.decode_slots, layout.decode_positions, strict=True):
            cache.lengths[s] = p + 1
        for c in layout.chunks:
            cache.lengths[c.slot] = c.start + c.length

    def _decode_view(self, lengths: list[int], span: int) -> tuple[int, torch.Tensor | None]:
        """(keys, mask) of the decode rows in a layer of ``span`` positions per slot: the rows read
        offsets ``0..keys-1``, each its first min(length, span) (all of a ring once it is full, its
        row's window); the mask is (rows, 1, 1, keys), or None where every row sees them all."""
        seen = [min(n, span) for n in lengths]
        end = min(self._S, span)
        if min(seen) == end:
            return end, None
        long = dict(dtype=torch.long, device=self.cache.device)
        visible = torch.arange(end, **long) < to_device(seen, torch.long, long["device"])[:, None]
        return end, visible[:, None, None, :]

    def prepare(self, start_pos: int, T: int, rotate: Rotate | None = None) -> None:
        """Nothing to do: the layout already says where every token goes."""
        if self.layout.num_tokens != T:
            raise ValueError(f"this step's layout has {self.layout.num_tokens} tokens, not {T}")

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,
    ) -> torch.Tensor:
        # q: (1, n_head, N, hd); k, v: (1, n_kv_head, N, hd), the layout's tokens in order
        cache = self.cache
        codec = cache.codec
        k_planes, v_planes = cache.k[layer], cache.v[layer]
        span = cache.layer_len[layer]
        out = []
        nd = self.n_decode
        if nd:
            write = self._write[span]
            for planes, x in ((k_planes, k), (v_planes, v)):
                new = x[0, :, :nd].transpose(0, 1)  # (nd, n_kv_head, hd)
                for plane, part in zip(planes, codec.encode(new), strict=True):
                    flat = plane.view(-1, plane.size(-1))
                    flat.index_copy_(0, write, part.reshape(-1, part.size(-1)))
        if nd and self._decode_views[layer] is None:  # the kernel (see __init__)
            out.append(
                _kernel_attend(cache, layer, q[:, :, :nd], self._slots, self._lengths, scale)
            )
        elif nd:
            view = slice(self.lo, self.lo + self._rows)
            end, mask = self._decode_views[layer]
            keys = codec.decode([p[view, :, :end] for p in k_planes], cache.dtype)
            values = codec.decode([p[view, :, :end] for p in v_planes], cache.dtype)
            queries = q[0, :, :nd].transpose(0, 1)[:, :, None]  # (nd, n_head, 1, hd)
            if not self._dense:
                rows = queries.new_zeros(self._rows, *queries.shape[1:])
                queries = rows.index_copy_(0, self._row_index, queries)
            y = sdpa(queries, keys, values, mask, scale)  # (rows, n_head, 1, hd)
            if not self._dense:
                y = y.index_select(0, self._row_index)
            out.append(y[:, :, 0].transpose(0, 1)[None])  # (1, n_head, nd, hd)
        offset = nd
        chunks = zip(self.layout.chunks, self._chunk_views, self._chunk_rings, strict=True)
        for chunk, views, rings in chunks:
            s, start, T = chunk.slot, chunk.start, chunk.length
            first, mask = views[layer]
            end = start + T
            if span in rings:  # the window before the chunk comes from the ring, read first
                new = slice(offset, offset + T)
                keys = rings[span].update(
                    codec, [p[s : s + 1] for p in k_planes], k[:, :, new], cache.dtype
                )
                values = rings[span].update(
                    codec, [p[s : s + 1] for p in v_planes], v[:, :, new], cache.dtype
                )
                out.append(sdpa(q[:, :, new], keys, values, mask, scale))
                offset += T
                continue
            for planes, x in ((k_planes, k), (v_planes, v)):
                for plane, part in zip(
                    planes, codec.encode(x[0, :, offset : offset + T]), strict=True
                ):
                    plane[s, :, start:end] = part
            keys = codec.decode([p[s : s + 1, :, first:end] for p in k_planes], cache.dtype)
            values = codec.decode([p[s : s + 1, :, first:end] for p in v_planes], cache.dtype)
            out.append(sdpa(q[:, :, offset : offset + T], keys, values, mask, scale))
            offset += T
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)


class StaticDecode:
    """The ``Cache`` of a decode-only forward whose rows come as device tensors: row b's token
    is at position ``positions[b]`` of slot ``slots[b]``. It writes each row's key and value
    there and attends to the slot's first ``positions[b] + 1`` positions (``decode_attention``).
    Nothing in it depends on a host value, so a forward through it can be captured once per
    batch size and replayed with new contents in the same tensors (``arlm.engine.cuda_graphs``).
    Padding rows point at the cache's spare slot. Needs ``SlotKVCache.static_decode``."""

    def __init__(self, cache: SlotKVCache, slots: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache = cache
        H = cache.n_kv_head
        heads = torch.arange(H, device=slots.device)
        # the rows (slot, head, position) of a plane seen as (slots * n_kv_head * slot_len, hd)
        self._write = ((slots[:, None] * H + heads) * cache.slot_len + positions[:, None]).flatten()
        self._slots, self._lengths = slots, positions + 1
        self._rows = slots.numel()

    def prepare(self, start_pos: int, T: int, rotate: Rotate | None = None) -> None:
        if self._rows != T:
            raise ValueError(f"this decode step has {self._rows} rows, not {T}")

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,
    ) -> torch.Tensor:
        # q: (1, n_head, B, hd); k, v: (1, n_kv_head, B, hd), one token per row
        cache = self.cache
        hd = cache.head_dim
        (k_plane,), (v_plane,) = cache.k[layer], cache.v[layer]
        for plane, x in ((k_plane, k), (v_plane, v)):
            new = x[0].transpose(0, 1).reshape(-1, hd)  # (B * n_kv_head, hd)
            plane.view(-1, hd).index_copy_(0, self._write, new.to(plane.dtype))
        return _kernel_attend(cache, layer, q, self._slots, self._lengths, scale)


def _kernel_attend(
    cache: SlotKVCache,
    layer: int,
    q: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None,
) -> torch.Tensor:
    """Decode rows' queries q (1, n_head, B, hd) over their slots' first ``lengths`` positions
    of ``layer`` (float planes), through ``decode_attention``: (1, n_head, B, hd)."""
    (k_plane,), (v_plane,) = cache.k[layer], cache.v[layer]
    scale = cache.head_dim**-0.5 if scale is None else scale
    y = decode_attention(q[0].transpose(0, 1), k_plane, v_plane, slots, lengths, scale)
    return y.transpose(0, 1)[None]

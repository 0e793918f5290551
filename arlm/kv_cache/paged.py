"""The engine's cache: a pool of fixed-size blocks that sequences take as they grow.

Per layer, planes of shape (num_blocks, n_kv_head, block_size, width). A sequence's positions
live in the blocks of its *block table*: position ``p`` at offset ``p % block_size`` of block
``table[p // block_size]``. Which block belongs to whom, who shares it (prefix-cache hits, the
``n`` samples of a prompt) and when it is copied are the engine's block manager's books
(``arlm.engine.block_manager``); this module only stores, copies and attends.

One forward of the engine mixes rows: its tokens are laid out flat, (1, N), as the decode
tokens (one per decoding sequence) and then each prefill chunk's tokens; ``StepLayout`` says
which row each token belongs to. ``step`` returns the ``Cache`` object for one such forward. All
of its new keys and values are written in one indexed copy per plane per layer.

How decode attention reads the blocks depends on the device, chosen by measurement
(``benchmarks/engine.py --attention``, ``docs/benchmarks.md``):

- on a CPU, one row alone (batch-1 decode) attends over its history held as one tensor from
  step to step (``LoneHistory``, which a lone row's prefill chunks and speculative verify
  steps extend too), and up to ``HELD_ROWS`` decode rows over theirs held in the slots of one
  tensor (``HeldRows``), both within the room the budget leaves (``arlm.kv_cache.held``);
  more rows, or rows past that room, take fused attention calls over the ranges of the pool
  that hold the blocks any row reads: each block is one batch entry, its queries the rows
  that read it (``_BlockReaders``), and each row's partial results are merged by their
  log-sum-exp. No row's history is copied unless the blocks read lie scattered over the
  pool; gathering each row's blocks into a dense tensor instead measured 3 to 10 times slower
  (it copies the whole history of every row in every layer).
- on CUDA, ``decode_attention``'s Triton kernel follows each row's block table, decoding
  quantized blocks as it reads them (a sliding-window layer's rows read their window's
  positions only); on other devices its reference gathers each row's blocks.

A prefill chunk beside other rows gathers its own history (one copy for all of its queries)
and attends with a causal mask.

A sliding-window layer stores every position like the others and masks its queries to their
window (the rings of the slot design are gone: a block outlives the window of one sequence
when another that shares it still reads it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from arlm.config import ModelConfig
from arlm.devices import fused_inference, pinned_to, to_device
from arlm.kv_cache.base import (
    Rotate,
    StoreTarget,
    alloc_planes,
    capped_attention,
    layer_views,
    planes_nbytes,
    sdpa,
)
from arlm.kv_cache.codec import Codec, FloatCodec
from arlm.kv_cache.decode_attention import decode_attention
from arlm.kv_cache.held import LONE_HISTORY_BYTES, HeldRows, LoneHistory, gather_history


@dataclass(frozen=True)
class PagedRow:
    """``length`` positions of one sequence from ``start`` on, written and attended in one
    forward; ``blocks`` is its block table, covering at least positions ``0..start+length-1``."""

    blocks: list[int]
    start: int
    length: int

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class StepLayout:
    """What one forward holds: ``decode`` rows (one position each) and then prefill ``chunks``,
    in this token order."""

    decode: list[PagedRow]
    chunks: list[PagedRow]

    @property
    def rows(self) -> list[PagedRow]:
        return [*self.decode, *self.chunks]

    @property
    def num_tokens(self) -> int:
        return sum(r.length for r in self.rows)

    def positions(self) -> list[int]:
        """Every token's position, in the flat order."""
        return [p for r in self.rows for p in range(r.start, r.end)]

    def sequence_ends(self) -> list[int]:
        """For every token, in the flat order, the position its sequence reaches in this
        forward (exclusive)."""
        return [r.end for r in self.rows for _ in range(r.length)]


class PagedKVCache:
    """``num_blocks`` blocks of ``block_size`` positions per layer, through a codec (floats, or
    int8/int4 with a scale per position and head). Blocks get memory as they are first needed
    (the planes grow by doubling up to ``num_blocks``), so a model serving one short request
    holds a few blocks. ``windows``: one per layer, a sliding window's length or None.

    The cache's budget is what all ``num_blocks`` blocks take and ``held_blocks`` blocks' worth
    more, set aside for the held histories (``LoneHistory``, ``HeldRows``): they take that and
    what the blocks not yet given memory leave (``lone_history_room``)."""

    def __init__(
        self,
        n_layer: int,
        n_kv_head: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        codec: Codec | None = None,
        windows: list[int | None] | None = None,
        held_blocks: int = 0,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks={num_blocks} and block_size={block_size} must be positive"
            )
        self.codec = codec or FloatCodec(dtype)
        self.dtype = dtype
        self.n_layer, self.n_kv_head, self.head_dim = n_layer, n_kv_head, head_dim
        self.windows = windows or [None] * n_layer
        self.num_blocks, self.block_size = num_blocks, block_size
        self.held_blocks = held_blocks
        # one position in one layer, k and v
        self.position_bytes = 2 * n_kv_head * self.codec.bytes_per_vector(head_dim)
        self.device = torch.device(device)
        self.k: list[list[torch.Tensor]] = []
        self.v: list[list[torch.Tensor]] = []
        self.allocated = 0
        self.spare: int | None = None  # a block no sequence owns (``add_spare_block``)
        self.lone_history = LoneHistory(self)
        self.held_rows = HeldRows(self)

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        codec: Codec | None = None,
        held_blocks: int = 0,
    ) -> PagedKVCache:
        return cls(
            config.n_layer,
            config.n_kv_head,
            config.head_dim,
            num_blocks,
            block_size,
            device=device,
            dtype=dtype,
            codec=codec,
            windows=config.layer_windows,
            held_blocks=held_blocks,
        )

    def reserve(self, blocks: int) -> None:
        """Make sure blocks ``0..blocks-1`` have memory: grow the planes (doubling, up to
        ``num_blocks``), keeping what the existing blocks hold."""
        if blocks <= self.allocated:
            return
        if blocks > self.num_blocks:
            raise ValueError(f"block {blocks - 1} does not exist; the pool has {self.num_blocks}")
        self._grow(min(self.num_blocks, max(blocks, 2 * self.allocated)))

    def add_spare_block(self) -> None:
        """Give every block memory, and one more that no sequence owns (id ``num_blocks``, the
        ``spare``), where the padding rows of a captured decode step write."""
        self.spare = self.num_blocks
        self._grow(self.num_blocks)

    def _grow(self, n: int) -> None:
        rows = n + (self.spare is not None)
        lead = (rows, self.n_kv_head, self.block_size)
        k = alloc_planes(self.codec, self.n_layer, lead, self.head_dim, self.device)
        v = alloc_planes(self.codec, self.n_layer, lead, self.head_dim, self.device)
        for new, old in ((k, self.k), (v, self.v)):
            for new_planes, old_planes in zip(new, old, strict=False):
                for a, b in zip(new_planes, old_planes, strict=True):
                    a[: self.allocated].copy_(b[: self.allocated])
        self.k, self.v, self.allocated = k, v, n
        room = self.lone_history_room() * self._history_position
        for held in (self.lone_history, self.held_rows):
            if held.nbytes > room:
                held.release()  # the blocks took the memory it held

    def _planes(self) -> list[torch.Tensor]:
        return [p for layer in (*self.k, *self.v) for p in layer]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy block ``src`` into block ``dst`` for each (src, dst): copy on write."""
        if not pairs:
            return
        src = to_device([s for s, _ in pairs], torch.long, self.device)
        dst = to_device([d for _, d in pairs], torch.long, self.device)
        self.lone_history.reset()
        self.held_rows.reset()
        for plane in self._planes():
            plane.index_copy_(0, dst, plane.index_select(0, src))

    def read_blocks(self, ids: list[int]) -> list[torch.Tensor]:
        """What blocks ``ids`` hold, one tensor per plane (layers' k, then v), on the device."""
        self.write_back()
        index = to_device(ids, torch.long, self.device)
        return [plane.index_select(0, index) for plane in self._planes()]

    def write_back(self) -> None:
        """Store in the blocks what the held histories hold and they do not yet (decode steps
        store there later; ``arlm.kv_cache.held``)."""
        self.lone_history.flush()
        self.held_rows.flush()

    def write_blocks(self, ids: list[int], data: list[torch.Tensor]) -> None:
        """Store ``data`` (as ``read_blocks`` returns it, on any device) in blocks ``ids``."""
        index = to_device(ids, torch.long, self.device)
        self.lone_history.reset()
        self.held_rows.reset()
        for plane, part in zip(self._planes(), data, strict=True):
            plane.index_copy_(0, index, part.to(self.device, non_blocking=True))

    def step(self, layout: StepLayout) -> PagedStep:
        """The cache as one forward over ``layout`` sees it."""
        return PagedStep(self, layout)

    @property
    def static_decode(self) -> bool:
        """Whether decode steps can take ``StaticDecode`` (a spare block for padding rows,
        every block allocated so the planes never move)."""
        return self.spare is not None and self.allocated == self.num_blocks

    def write_cells(self, tables: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Where position ``positions[b]`` of the sequence whose block table is ``tables[b]``
        (B, blocks) lies in the planes seen as rows of (blocks * n_kv_head * block_size,
        width): its first KV head's row; head h's is ``block_size * h`` further."""
        bs = self.block_size
        block = tables.gather(1, (positions // bs)[:, None])[:, 0]
        return block * (self.n_kv_head * bs) + positions % bs

    @property
    def nbytes(self) -> int:
        """The blocks' planes and what ``lone_history`` and ``held_rows`` hold."""
        return planes_nbytes(self.k, self.v) + self.lone_history.nbytes + self.held_rows.nbytes

    def lone_history_room(self) -> int:
        """How many positions the held histories may hold: what the budget (all ``num_blocks``
        blocks and ``held_blocks``) leaves beside the blocks given memory so far, up to
        ``LONE_HISTORY_BYTES``."""
        free = (self.num_blocks + self.held_blocks - self.allocated) * self.block_bytes
        return min(LONE_HISTORY_BYTES, free) // self._history_position

    @property
    def _history_position(self) -> int:
        """Bytes of one position of ``lone_history``: every layer's key and value, unquantized."""
        return 2 * self.n_layer * self.n_kv_head * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position of one sequence costs stored in every layer."""
        return self.n_layer * self.position_bytes

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_token * self.block_size


# A fused attention call costs, with its setup, about what attending over this many more
# positions does (measured at GPT-2's 12 heads of 64 on 2 cores: a call about 25 us, each block
# of 16 positions about 3 us more). It prices ranges read in place against one another and
# against copying the blocks read out, which costs about what attending over them does.
CALL_POSITIONS = 128
# One row alone whose window (past ``LoneHistory``'s cap) reads at most this many positions
# attends over its blocks copied out each step in its table's order, in one plain call: cheaper
# than merging per-block results (at GPT-2's shape on 2 cores: 198 against 320 us a layer at
# 192 positions, 410 against 620 at 960, but 1,231 against 906 at 1,920).
LONE_COPY_POSITIONS = 1024


def _first_seen(position: int, window: int | None) -> int:
    """The first position a query at ``position`` sees under ``window`` (None: all)."""
    return 0 if window is None else max(0, position - window + 1)


class _BlockReaders:
    """For one window length, which decode rows read which blocks, laid out for fused attention
    calls, one per ``segments`` range of the pool (views: no copy) each layer. The ranges hold
    every block read and the gaps between them too short to be worth a call of their own;
    where attending over them would cost more than copying the blocks read out (see
    ``CALL_POSITIONS``), as when a lone row after other traffic reads 8 blocks scattered over
    123, ``index`` (the blocks read) is copied out instead and ``segments`` is None.

    The batch's ``blocks`` entries are the ranges' blocks one after another. Entry i's queries
    are the G heads of each of its (up to R) readers, ``rows[i, r]``; where a block has fewer
    readers (and in the gaps) row 0 fills in, its results left out of the merge. ``mask``
    (entries, 1, R*G, block_size) hides the positions a reader does not see (past its
    position, or before its window). ``pairs[d]`` lists row d's results, as ``entry * R + r``,
    to merge by their log-sum-exps (``pad`` marks the list's padding).

    One row alone whose blocks are copied out (``lone``: its blocks in its table's order, and
    the span of the copy it sees; see ``LONE_COPY_POSITIONS``) needs none of that: copied in
    order, they are its history as it is, attended by one plain call with nothing to merge."""

    def __init__(
        self,
        tables: torch.Tensor,
        positions: torch.Tensor,
        window: int | None,
        block_size: int,
        group: int,
        dtype: torch.dtype,
    ) -> None:
        nd, width = tables.shape
        self.lone: tuple[torch.Tensor, int, int] | None = None
        if nd == 1:  # alone: its blocks in its table's order, and the span of them it sees
            position = int(positions[0])
            seen = _first_seen(position, window)
            lo, hi = seen // block_size, position // block_size + 1
            start = lo * block_size
            lone = (tables[0, lo:hi], seen - start, position + 1 - start)
            if (hi - lo) * block_size <= LONE_COPY_POSITIONS:  # copied whatever the layout
                self.segments = self.index = None
                self.lone = lone
                return
        first = positions - window + 1 if window is not None else torch.zeros_like(positions)
        first = first.clamp(min=0)
        j = torch.arange(width)
        wanted = (j >= first[:, None] // block_size) & (j <= positions[:, None] // block_size)
        row, col = wanted.nonzero(as_tuple=True)  # row by row
        block = tables[row, col]
        order = torch.argsort(block * (nd + 1) + row)  # by block, then row
        read, counts = torch.unique_consecutive(block[order], return_counts=True)
        self.segments, read_entry = _segments(read, block_size)
        self.index = read if self.segments is None else None
        if nd == 1 and self.index is not None:  # more positions, but scattered: copied too
            self.lone = lone
            return
        self.blocks = int(read_entry[-1]) + 1
        # each pair's rank among its block's readers
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel()) - starts
        entry = torch.empty_like(order)
        entry[order] = torch.repeat_interleave(read_entry, counts)
        R = self.readers = int(counts.max())
        self.rows = torch.zeros(self.blocks, R, dtype=torch.long)
        self.rows[entry, rank] = row
        pos = col[:, None] * block_size + torch.arange(block_size)  # (pairs, block_size)
        sees = (pos >= first[row, None]) & (pos <= positions[row, None])
        visible = torch.ones(self.blocks, R, block_size, dtype=torch.bool)  # fill-ins see all
        visible[entry, rank] = sees
        visible = visible.repeat_interleave(group, dim=1)[:, None]  # (blocks, 1, R*G, bs)
        self.mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
        per_row = wanted.sum(1)
        slot = torch.arange(row.numel()) - torch.repeat_interleave(
            torch.cumsum(per_row, 0) - per_row, per_row
        )
        self.pairs = torch.zeros(nd, int(per_row.max()), dtype=torch.long)
        self.pairs[row, slot] = entry * R + rank
        self.pad = torch.ones(self.pairs.shape, dtype=torch.bool)
        self.pad[row, slot] = False
        self.pad = self.pad[..., None, None]


def _segments(
    read: torch.Tensor, block_size: int
) -> tuple[list[tuple[int, int]] | None, torch.Tensor]:
    """The pool ranges [lo, hi) to attend over for the sorted blocks ``read``, and each block's
    entry in the batch they make one after another; (None, 0..n-1) where copying the blocks
    out costs less (see ``CALL_POSITIONS``)."""
    gaps = read[1:] - read[:-1] - 1
    cut = gaps * block_size > CALL_POSITIONS  # a gap wider than a call costs: a range of its own
    span = int(read[-1] - read[0]) + 1 - int(gaps[cut].sum())
    calls = int(cut.sum()) + 1
    if (span - 2 * read.numel()) * block_size + (calls - 1) * CALL_POSITIONS > 0:
        return None, torch.arange(read.numel())
    segment = torch.cat((cut.new_zeros(1), cut)).cumsum(0)  # each block's range
    starts = torch.cat((cut.new_ones(1), cut)).nonzero().flatten()  # the first block of each
    lo = read[starts]
    hi = torch.cat((read[starts[1:] - 1], read[-1:])) + 1
    offset = torch.cumsum(hi - lo, 0) - (hi - lo)
    entry = offset[segment] + read - lo[segment]
    return list(zip(lo.tolist(), hi.tolist(), strict=True)), entry


class PagedStep:
    """The ``Cache`` of one engine forward; see the module docstring."""

    def __init__(self, cache: PagedKVCache, layout: StepLayout) -> None:
        self.cache, self.layout = cache, layout
        bs, H, device = cache.block_size, cache.n_kv_head, cache.device
        cells = [
            r.blocks[p // bs] * H * bs + p % bs for r in layout.rows for p in range(r.start, r.end)
        ]
        self._writes = StepWrites(cache, pinned_to(torch.tensor(cells), device))
        self.n_decode = nd = len(layout.decode)
        self._readers: dict[int | None, _BlockReaders] = {}
        self._lone = cache.lone_history.follow(layout)
        self._held = cache.held_rows.follow(layout)
        # a lone row (decoding or a prompt chunk), or decode rows alone, over float blocks store
        # in their held histories only (written back)
        self._deferred = isinstance(cache.codec, FloatCodec) and (
            self._lone or (self._held and not layout.chunks)
        )
        self._held_masks: dict[int | None, tuple[int, torch.Tensor]] = {}  # first seen, mask
        if nd and not (self._lone or self._held):  # held histories: no tables to build
            width = max(len(r.blocks) for r in layout.decode)
            table = [r.blocks + [0] * (width - len(r.blocks)) for r in layout.decode]
            self._tables = torch.tensor(table, dtype=torch.long)
            self._positions = torch.tensor([r.start for r in layout.decode], dtype=torch.long)
            if device.type != "cpu":
                self._tables_dev = pinned_to(self._tables, device)
                self._lengths_dev = pinned_to(self._positions + 1, device)
        self._chunk_views = [
            layer_views(cache.windows, c.start, c.length, device) for c in layout.chunks
        ]
        # a lone chunk reads its held history instead of its blocks
        self._chunk_blocks = [
            None if self._lone else to_device(c.blocks[: -(-c.end // bs)], torch.long, device)
            for c in layout.chunks
        ]

    def prepare(self, start_pos: int, T: int, rotate: Rotate | None = None) -> None:
        """Nothing to do: the layout already says where every token goes."""
        if self.layout.num_tokens != T:
            raise ValueError(f"this step's layout has {self.layout.num_tokens} tokens, not {T}")

    def store_target(self, layer: int) -> StoreTarget | None:
        """Float blocks that this step's keys and values go to now (not held histories,
        which may store theirs later)."""
        return None if self._deferred else self._writes.target(layer)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,
        stored: bool = False,
        softcap: float | None = None,
    ) -> torch.Tensor:
        # q: (1, n_head, N, hd); k, v: (1, n_kv_head, N, hd), the layout's tokens in order
        cache = self.cache
        hd = cache.head_dim
        scale = hd**-0.5 if scale is None else scale
        k_planes, v_planes = cache.k[layer], cache.v[layer]
        # what the pool holds of this step's tokens is k and v themselves: float blocks of one
        # dtype throughout
        exact = isinstance(cache.codec, FloatCodec) and (
            q.dtype == k.dtype == k_planes[0].dtype == cache.dtype
        )
        # written back later only where the held tensors hold what the pool would
        deferred = self._deferred and exact
        if not (deferred or stored):
            self._writes.store(layer, k, v)
        out = []
        nd = self.n_decode
        if nd and self._held:
            new = k[:, :, :nd], v[:, :, :nd]
            out.append(self._decode_held(layer, q[:, :, :nd], new, scale, softcap, deferred))
        elif nd:
            lone_new = (k[:, :, :nd], v[:, :, :nd]) if deferred else None
            out.append(self._decode(layer, q[:, :, :nd], scale, softcap, lone_new))
        offset = nd
        for chunk, views, blocks in zip(
            self.layout.chunks, self._chunk_views, self._chunk_blocks, strict=True
        ):
            first, mask = views[layer]
            end, T = chunk.end, chunk.length
            at = slice(offset, offset + T)
            if self._lone:
                new = (k[:, :, at], v[:, :, at]) if deferred else None
                keys, values = cache.lone_history.read(layer, chunk, cache.dtype, new)
            elif chunk.start == 0 and exact:
                # a prompt's first chunk with nothing cached before it: its history is this
                # step's own keys and values, as the blocks now hold them (two gathers a chunk
                # and layer fewer, the most of a step of many short prompts)
                keys, values = k[:, :, at], v[:, :, at]
            else:
                keys = gather_history(cache, k_planes, blocks, cache.dtype)
                values = gather_history(cache, v_planes, blocks, cache.dtype)
            keys, values = keys[:, :, first:end], values[:, :, first:end]
            out.append(sdpa(q[:, :, at], keys, values, mask, scale, softcap))
            offset += T
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)

    def _decode(
        self,
        layer: int,
        q: torch.Tensor,
        scale: float,
        softcap: float | None,
        new: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Decode rows' queries q (1, n_head, nd, hd) over what their blocks hold; a lone row's
        keys and values ``new`` where the step left them to be written back."""
        cache = self.cache
        window = cache.windows[layer]
        (k_planes, v_planes) = cache.k[layer], cache.v[layer]
        if self._lone:
            (row,) = self.layout.decode
            keys, values = cache.lone_history.read(layer, row, q.dtype, new)
            seen = _first_seen(row.start, window)
            return sdpa(q, keys[:, :, seen:], values[:, :, seen:], None, scale, softcap)
        if cache.device.type != "cpu":  # the kernel on CUDA, its reference elsewhere
            rows, tables, lengths = q[0].transpose(0, 1), self._tables_dev, self._lengths_dev
            y = decode_attention(
                rows,
                cache.codec,
                k_planes,
                v_planes,
                tables,
                lengths,
                scale,
                window=window,
                softcap=softcap,
            )
            return y.transpose(0, 1)[None]
        readers = self._readers.get(window)
        if readers is None:
            group = q.size(1) // cache.n_kv_head
            readers = _BlockReaders(
                self._tables, self._positions, window, cache.block_size, group, _work(q.dtype)
            )
            self._readers[window] = readers
        return _read_blocks_in_place(cache, k_planes, v_planes, q, readers, scale, softcap)

    def _decode_held(
        self,
        layer: int,
        q: torch.Tensor,
        new: tuple[torch.Tensor, torch.Tensor],
        scale: float,
        softcap: float | None,
        deferred: bool,
    ) -> torch.Tensor:
        """Decode rows' queries over their held slots (``HeldRows``): one call over every
        slot, each masked to its row's positions, from the first any row's window sees; a slot
        no row of this step reads (its row gone) gets a zero query and sees one position, and
        its result is left out."""
        cache, rows = self.cache, self.layout.decode
        held = cache.held_rows
        keys, values = held.read(layer, rows, new, self._writes.head_rows, q.dtype, deferred)
        window = cache.windows[layer]
        if window not in self._held_masks:  # the same in every layer of that window
            first = min(_first_seen(row.start, window) for row in rows)
            seen = torch.zeros(keys.size(0), 1, 1, keys.size(2) - first, dtype=torch.bool)
            seen[..., 0] = True
            for s, row in zip(held.slots, rows, strict=True):
                seen[s, ..., 0] = False
                seen[s, ..., _first_seen(row.start, window) - first : row.end - first] = True
            self._held_masks[window] = first, seen
        first, mask = self._held_masks[window]
        keys, values = keys[:, :, first:], values[:, :, first:]
        queries = q[0].transpose(0, 1)[:, :, None]  # (nd, n_head, 1, hd)
        if held.slots == list(range(keys.size(0))):
            y = sdpa(queries, keys, values, mask, scale, softcap)
        else:
            slot = held.slot_index
            spread = queries.new_zeros(keys.size(0), *queries.shape[1:])
            spread[slot] = queries
            y = sdpa(spread, keys, values, mask, scale, softcap)[slot]
        return y[:, :, 0].transpose(0, 1)[None]


class StepWrites:
    """Where one forward's new keys and values go in the pool, and the one place that writes
    them: ``cells`` (N,) holds token t's first KV head's row of the planes seen as rows of
    width (``PagedKVCache.write_cells``); head h's row is ``block_size * h`` further."""

    def __init__(self, cache: PagedKVCache, cells: torch.Tensor) -> None:
        self.cache, self.cells = cache, cells

    @functools.cached_property
    def head_rows(self) -> torch.Tensor:
        """Every KV head's row, token-major (token t's head h at ``t * n_kv_head + h``), as
        indexed copies take them: worked out once a step, and only where the ops store (on a
        CPU, into quantized blocks, into held histories); the kernels take ``cells``."""
        bs = self.cache.block_size
        heads = torch.arange(0, self.cache.n_kv_head * bs, bs, device=self.cells.device)
        return (self.cells[:, None] + heads).flatten()

    def target(self, layer: int) -> StoreTarget | None:
        """``layer``'s planes and the cells, where its blocks are floats (a quantized codec
        encodes what it stores: ``store`` writes those)."""
        cache = self.cache
        if not isinstance(cache.codec, FloatCodec):
            return None
        (k_plane,), (v_plane,) = cache.k[layer], cache.v[layer]
        return StoreTarget(k_plane, v_plane, self.cells)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k and v (1, n_kv_head, N, hd) through the codec into ``layer``'s planes: one
        indexed copy per plane; float planes on a GPU in one kernel for both
        (``store_kernel``)."""
        cache = self.cache
        if isinstance(cache.codec, FloatCodec) and fused_inference(k):
            from arlm.kv_cache.store_kernel import store_rows

            store_rows(k, v, cache.k[layer][0], cache.v[layer][0], self.cells)
            return
        for planes, x in ((cache.k[layer], k), (cache.v[layer], v)):
            new = x[0].transpose(0, 1)  # (N, n_kv_head, hd)
            for plane, part in zip(planes, cache.codec.encode(new), strict=True):
                flat = plane.view(-1, plane.size(-1))
                flat.index_copy_(0, self.head_rows, part.reshape(-1, part.size(-1)).to(plane.dtype))


def _work(dtype: torch.dtype) -> torch.dtype:
    """The dtype the CPU decode attends in: each block's partial result comes back in the
    inputs' dtype, and in a half type that would round every block's output before the merge,
    so halves attend in float32."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _read_blocks_in_place(
    cache: PagedKVCache,
    k_planes: list[torch.Tensor],
    v_planes: list[torch.Tensor],
    q: torch.Tensor,
    readers: _BlockReaders,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Decode attention on a CPU (see the module docstring): q (1, n_head, nd, hd) ->
    (1, n_head, nd, hd)."""
    _, n_head, nd, hd = q.shape
    H = cache.n_kv_head
    if readers.lone is not None:
        blocks, lo, hi = readers.lone
        keys = gather_history(cache, k_planes, blocks, q.dtype)[:, :, lo:hi]
        values = gather_history(cache, v_planes, blocks, q.dtype)[:, :, lo:hi]
        return sdpa(q, keys, values, None, scale, softcap)
    G, R, n = n_head // H, readers.readers, readers.blocks
    dtype = _work(q.dtype)
    rows = q[0].to(dtype).view(H, G, nd, hd).permute(2, 0, 1, 3)  # (nd, H, G, hd)
    queries = rows.index_select(0, readers.rows.flatten()).view(n, R, H, G, hd)
    queries = queries.transpose(1, 2).reshape(n, H, R * G, hd)

    def batches(planes: list[torch.Tensor]) -> list[torch.Tensor]:  # one per fused call
        if readers.segments is None:
            return [cache.codec.decode([p.index_select(0, readers.index) for p in planes], dtype)]
        return [
            cache.codec.decode([p[lo:hi] for p in planes], dtype) for lo, hi in readers.segments
        ]

    outs, lses = [], []
    entry = 0
    for keys, values in zip(batches(k_planes), batches(v_planes), strict=True):
        span = slice(entry, entry + keys.size(0))
        if softcap is None:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                queries[span], keys, values, attn_mask=readers.mask[span], scale=scale
            )
        else:
            out, lse = capped_attention(
                queries[span], keys, values, readers.mask[span], scale, softcap
            )
        outs.append(out)
        lses.append(lse)
        entry += keys.size(0)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses)
    # one result per (entry, reader); each row's merged by the softmax of their log-sum-exps
    out = out.view(n, H, R, G, hd).transpose(1, 2).reshape(n * R, H, G, hd)
    lse = lse.view(n, H, R, G).transpose(1, 2).reshape(n * R, H, G)
    pairs = readers.pairs.flatten()
    weight = lse.index_select(0, pairs).view(nd, -1, H, G).masked_fill(readers.pad, float("-inf"))
    weight = torch.softmax(weight, dim=1)
    y = out.index_select(0, pairs).view(nd, -1, H, G, hd).mul_(weight[..., None]).sum(1)
    return y.to(q.dtype).reshape(nd, n_head, hd).transpose(0, 1)[None]


class StaticDecode:
    """The ``Cache`` of a forward whose rows are one position each, given as device tensors:
    row b's token is at position ``positions[b]``, its block table row ``tables[b]`` (rows of
    one sequence, a verify row's guesses or a prompt chunk's tokens, share a table). It writes
    every row's key and value there and then attends each row over its table's positions up
    to its own through ``decode_attention`` (a sliding-window layer's rows over their window);
    ``writes[b]`` is that position's cell, as ``PagedKVCache.write_cells`` gives it (the
    graphs work it out on the host, where it would be launches in the graph). Nothing in it
    depends on a host value, so a forward through it can be captured once per batch size and
    replayed with new contents in the same tensors (``arlm.engine.cuda_graphs``). Padding
    rows' tables point at the cache's spare block. ``tiles``: the decode kernel's
    (``decode_attention``), rows of one table read together. Needs
    ``PagedKVCache.static_decode``."""

    def __init__(
        self,
        cache: PagedKVCache,
        tables: torch.Tensor,
        positions: torch.Tensor,
        writes: torch.Tensor,
        tiles: torch.Tensor | None = None,
    ) -> None:
        self.cache = cache
        cache.lone_history.reset()  # its rows write the pool
        cache.held_rows.reset()
        self._writes = StepWrites(cache, writes)
        # a contiguous tensor: the decode kernel reads a row's length by its index
        self._tables, self._lengths, self._tiles = tables, positions + 1, tiles
        self._rows = tables.size(0)

    def prepare(self, start_pos: int, T: int, rotate: Rotate | None = None) -> None:
        if self._rows != T:
            raise ValueError(f"this decode step has {self._rows} rows, not {T}")

    def store_target(self, layer: int) -> StoreTarget | None:
        return self._writes.target(layer)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,
        stored: bool = False,
        softcap: float | None = None,
    ) -> torch.Tensor:
        # q: (1, n_head, B, hd); k, v: (1, n_kv_head, B, hd), one token per row
        cache = self.cache
        hd = cache.head_dim
        if not stored:
            self._writes.store(layer, k, v)
        scale = hd**-0.5 if scale is None else scale
        rows, window = q[0].transpose(0, 1), cache.windows[layer]
        planes = cache.k[layer], cache.v[layer]
        y = decode_attention(
            rows,
            cache.codec,
            *planes,
            self._tables,
            self._lengths,
            scale,
            window=window,
            tiles=self._tiles,
            softcap=softcap,
        )
        return y.transpose(0, 1)[None]

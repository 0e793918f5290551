"""Keys and values held on a CPU beside the paged pool, for decode steps that would otherwise
read their blocks in place (``arlm.kv_cache.paged``): one row alone holds its history as one
tensor (``LoneHistory``), up to ``HELD_ROWS`` rows beside one another hold theirs in the slots of
one tensor (``HeldRows``). Each step extends them by the positions it stores; anything that
writes the pool another way (block copies, block writes, other rows) drops what they hold.

They are written back: a step of decode rows alone, or of one row alone (its prompt chunks
too), over float blocks stores its keys and values in the held tensors only, and the pool gets
them later, one indexed copy per plane for many steps (``flush``), before anything else reads or
writes the blocks (a step of other rows, or of held rows with prompt chunks, a row's history
dropped, the cache's block reads, copies and writes) and before the held memory goes. Storing
each step's positions in the pool as well (scattered writes of one position per head) took
155-160 ms of a 4 x 128-token GPT-2 wave on 2 cores and the write-back 7-11 ms; 77-92 ms of one
row's 128 tokens, written back in 2 ms.

Their memory comes from the KV budget: the share set aside for them and what the blocks not yet
given memory leave (``PagedKVCache.lone_history_room``); the pool grows into that memory only
after giving it back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from arlm.kv_cache.codec import FloatCodec

if TYPE_CHECKING:
    from arlm.kv_cache.paged import PagedKVCache, PagedRow, StepLayout

# What ``LoneHistory`` may hold, all layers' keys and values: it grows with its row, doubling
# from ``LONE_HISTORY_START`` positions, up to as many as this holds (in float32, 7,281
# positions of GPT-2 124M; 8,192 of a 1B Llama's 16 layers of 8 KV heads of 64) and as the
# budget's share for it and its blocks not yet given memory hold
# (``PagedKVCache.lone_history_room``). A longer row reads its blocks in place, merged per
# block: batch-1 decode after a 3,072-token prompt of ``benchmarks/engine.py``'s Llama ran at
# 16-17 tok/s so, at 29-37 held, on 2 cores.
LONE_HISTORY_BYTES = 512 * 2**20
LONE_HISTORY_START = 256


def gather_history(
    cache: PagedKVCache, planes: list[torch.Tensor], blocks: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The positions of ``blocks`` in order, (1, n_kv_head, len(blocks) * block_size, hd), in
    ``dtype``: each plane copied straight into (n_kv_head, blocks, block_size, width), one copy
    (an index_select into a transposed ``out``; a copy and then a transpose took 3 times as
    long)."""
    copies = []
    for plane in planes:
        copy = plane.new_empty(plane.size(1), blocks.numel(), *plane.shape[2:])
        torch.index_select(plane, 0, blocks, out=copy.transpose(0, 1))
        copies.append(copy)
    return cache.codec.decode(copies, dtype).view(1, cache.n_kv_head, -1, cache.head_dim)


class _HeldTensors:
    """Keys and values held on the host beside the pool, per layer, in slots (``LoneHistory``
    has one, ``HeldRows`` several); each says what it holds, writes back what the pool lacks
    in ``flush`` and forgets it in ``reset``."""

    def __init__(self, cache: PagedKVCache) -> None:
        self.cache = cache  # the pool they copy from and write back to
        self.k: list[torch.Tensor | None] = [None] * cache.n_layer
        self.v: list[torch.Tensor | None] = [None] * cache.n_layer

    def _write_back(
        self,
        layer: int,
        spans: list[tuple[int, list[int], int, int]],
        cells: dict[tuple[int, int, int], torch.Tensor],
    ) -> None:
        """Store ``layer``'s held positions ``spans`` (slot, its table, from, to) in the pool
        through each slot's table: one indexed copy per plane. ``cells`` keeps each span's
        rows of the flat planes for the next layer (the same spans in every layer, mostly).
        Only float blocks of the held dtype defer their store, so the values go as held."""
        cache, k, v = self.cache, self.k[layer], self.v[layer]
        H, bs, hd = cache.n_kv_head, cache.block_size, cache.head_dim
        index, keys, values = [], [], []
        for s, table, lo, hi in spans:
            if (s, lo, hi) not in cells:  # rows of the planes seen flat, head-major
                at = torch.arange(lo, hi)
                block = torch.tensor(table)[at // bs]
                heads = torch.arange(H)[:, None] * bs
                cells[s, lo, hi] = (heads + (block * H * bs + at % bs)[None]).flatten()
            index.append(cells[s, lo, hi])
            keys.append(k[s, :, lo:hi].reshape(-1, hd))
            values.append(v[s, :, lo:hi].reshape(-1, hd))
        rows = _joined(index)
        # the planes a forward made are inference tensors; a block read may flush outside one
        with torch.inference_mode():
            for (plane,), held in ((cache.k[layer], keys), (cache.v[layer], values)):
                plane.view(-1, hd).index_copy_(0, rows, _joined(held))

    def release(self) -> None:
        """Drop what is held (the subclass's ``reset``) and give its memory back."""
        self.reset()
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.k, *self.v) if t is not None)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts`` as one tensor: one part as it is (``torch.cat`` would copy it)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _stored_after(stored: int, copied_from: int, row: PagedRow, deferred: bool) -> int:
    """How many of a slot's first positions the pool holds as it does after a step that put
    ``row``'s positions in it: those copied from the blocks (from ``copied_from`` to the row's
    start) and the step's own (stored in the pool too unless ``deferred``) agree with the pool
    where everything before them does, that is where the pool held ``stored`` >= their first."""
    if stored < copied_from:
        return stored
    return row.start if deferred else row.end


def _leading_blocks_in_common(a: list[int], b: list[int]) -> int:
    """How many of the first blocks tables ``a`` and ``b`` share."""
    if a[: len(b)] == b:  # every step of a row goes on through its own table: one C compare
        return len(b)
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _held_capacity(cache: PagedKVCache, need: int, slots: int = 1) -> int:
    """Positions per slot for held tensors that must take ``need``: the power of two that fits
    (at least ``LONE_HISTORY_START``), in whole blocks, at most what the cache's room gives
    each of ``slots``, and never fewer than ``need``."""
    doubled = max(LONE_HISTORY_START, 1 << (need - 1).bit_length())
    whole = -(-doubled // cache.block_size) * cache.block_size
    return max(need, min(whole, cache.lone_history_room() // slots))


class LoneHistory(_HeldTensors):
    """One row alone, step after step (batch-1 generation, one request at a time, its prompt's
    chunks, its speculative verify steps), on a CPU: its history of every layer held as one
    tensor, kept from step to step and grown by the positions each step writes. Copying the
    row's blocks out in every step instead read its whole history twice a layer (the copy,
    then the attention); the slot design read it once, in place, and this reads it once too.
    It takes memory the cache's budget has not given its blocks yet (``lone_history_room``).

    Held position i is what the pool holds at i through ``blocks`` (or will, once written
    back: from ``stored`` on) for every i below ``filled``: only that row's own steps write the
    pool while it is held. ``follow`` writes back and drops it for any other step (another row
    beside it), and so do the cache's block copies and writes; a row with another table (the
    next request, its prompt's first blocks found in the prefix cache) keeps what the first
    blocks both tables share hold. A step copies from the blocks only the positions before its
    own that the history lacks, and takes its own keys and values as they are where it left
    their store to the write-back, else reads them back (a step may write from a position
    below ``filled``: the next token, or again after rejected guesses). Its tensors grow with
    the row, doubling, up to the room the cache has for them at each step; a row past that
    reads its blocks like any other, and the tensors are freed."""

    def __init__(self, cache: PagedKVCache) -> None:
        super().__init__(cache)
        self.blocks: list[int] = []  # the table the positions held were read through
        self.filled = [0] * cache.n_layer  # positions held, per layer
        self.stored = [0] * cache.n_layer  # of them, the first the pool holds too, per layer

    def reset(self) -> None:
        self._keep(0)
        self.blocks = []

    def _keep(self, n: int) -> None:
        """Write back, then hold only the first ``n`` positions (the pool holds them all)."""
        self.flush()
        self.filled = [min(f, n) for f in self.filled]
        self.stored = list(self.filled)

    def flush(self) -> None:
        """Store in the pool the positions held that it lacks (``stored`` to ``filled``)."""
        cells: dict[tuple[int, int, int], torch.Tensor] = {}
        for layer, (stored, filled) in enumerate(zip(self.stored, self.filled, strict=True)):
            if stored < filled:
                self._write_back(layer, [(0, self.blocks, stored, filled)], cells)
                self.stored[layer] = filled

    def follow(self, layout: StepLayout) -> bool:
        """Whether a forward over ``layout`` attends through this history: one row alone (a
        decode row or a chunk), on a CPU, within the room the cache has for it now. What it
        holds stays where the row reads through the same blocks as before; anything else
        drops it (written back first)."""
        rows, cache = layout.rows, self.cache
        # not one row, or one too long to hold: its memory goes back until a lone row comes
        if cache.device.type != "cpu" or len(rows) != 1 or rows[0].end > cache.lone_history_room():
            self.release()
            return False
        (row,) = rows
        shared = _leading_blocks_in_common(row.blocks, self.blocks)
        if shared < len(self.blocks):  # another table: only what the blocks both hold stays
            self._keep(shared * cache.block_size)
        self.blocks = list(row.blocks)
        return True

    def read(
        self,
        layer: int,
        row: PagedRow,
        dtype: torch.dtype,
        new: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The row's keys and values of ``layer`` up to the end of ``row``, each (1,
        n_kv_head, end, hd) in ``dtype``: the held ones and the step's positions, read back
        from their blocks (through the codec, as every step reads them) where the step stored
        them, else its keys and values ``new`` (a step written back later), and what the held
        ones lack before the step's, copied from the blocks."""
        cache = self.cache
        bs, end = cache.block_size, row.end
        k, v = self._room(layer, end, dtype)
        start = min(self.filled[layer], row.start)  # the first position it lacks or rewrites
        read_to = end if new is None else row.start  # where the blocks hold what to read
        if read_to - start == 1:  # a decode step's position, indexed in its block (a few us
            block, offset = self.blocks[start // bs], start % bs  # less than a block copy)
            for planes, held in ((cache.k[layer], k), (cache.v[layer], v)):
                value = cache.codec.decode([p[block, :, offset] for p in planes], dtype)
                held[0, :, start].copy_(value)
        elif read_to > start:
            lo, hi = start // bs, -(-read_to // bs)
            index = torch.tensor(self.blocks[lo:hi], dtype=torch.long)
            for planes, held in ((cache.k[layer], k), (cache.v[layer], v)):
                copied = gather_history(cache, planes, index, dtype)
                held[:, :, start:read_to].copy_(copied[:, :, start - lo * bs : read_to - lo * bs])
        if new is not None:  # (1, n_kv_head, T, hd) each, of the row's T positions
            k[:, :, row.start : end].copy_(new[0])
            v[:, :, row.start : end].copy_(new[1])
        self.stored[layer] = _stored_after(self.stored[layer], start, row, new is not None)
        self.filled[layer] = end
        return k[:, :, :end], v[:, :, :end]

    def _room(self, layer: int, need: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s held tensors, with room for ``need`` positions: grown to the power of two
        that fits, in whole blocks (at least ``LONE_HISTORY_START``, at most the cache's
        ``lone_history_room``), keeping what they hold, or new in another dtype."""
        cache = self.cache
        k, v = self.k[layer], self.v[layer]
        if k is not None and v is not None and k.dtype == dtype and k.size(2) >= need:
            return k, v
        same = k is not None and k.dtype == dtype
        if k is not None and not same:
            self.flush()  # what they hold goes
        kept = self.filled[layer] if same else 0
        capacity = _held_capacity(cache, need)
        grown = []
        for old in (k, v):
            new = torch.empty(1, cache.n_kv_head, capacity, cache.head_dim, dtype=dtype)
            if kept:
                new[:, :, :kept].copy_(old[:, :, :kept])
            grown.append(new)
        self.k[layer], self.v[layer] = grown
        self.filled[layer] = kept
        self.stored[layer] = min(self.stored[layer], kept)
        return grown[0], grown[1]


# Decode rows beside others (a server's few clients) on a CPU attend over held copies of their
# histories (``HeldRows``) while there are at most this many; more read their blocks in place.
HELD_ROWS = 16


class HeldRows(_HeldTensors):
    """Decode rows beside one another on a CPU: each row's history of every layer held in a
    slot of one padded tensor per layer, kept from step to step and extended by the keys and
    values each step stores, so one attention call reads every row's keys, masked to its own
    positions (as the slot design did). Reading the blocks in place instead lays the queries
    out per block, makes fused calls over the pool and merges each row's per-block results:
    GPT-2's engine 4 at once ran 2.5% faster held (``docs/benchmarks.md``). It takes memory the
    cache's budget has not given its blocks (``lone_history_room``), and only while
    ``LoneHistory`` holds none.

    A slot's first ``filled`` positions are what its row's table reaches there, and the pool
    holds its first ``stored`` (the rest is written back). Each step's rows are matched to the
    slots by the blocks of those positions; a slot that no row of the step matches is emptied
    (its row finished or waits), and the cache's block copies and writes empty them all. A
    row's step writes from its ``start`` on: its slot keeps the positions before that, and
    reads the rest back from the blocks (a new row's slot, all of them; a row back from a
    verify step or rejected guesses, the few it lacks)."""

    def __init__(self, cache: PagedKVCache) -> None:
        super().__init__(cache)  # k, v: (slots, n_kv_head, capacity, hd) per layer
        self.tables: list[list[int]] = []  # per slot: the table its positions were read through
        self.filled: list[list[int]] = []  # per slot, per layer: positions held
        self.stored: list[list[int]] = []  # per slot, per layer: positions the pool holds too
        self.slots: list[int] = []  # this step's decode rows' slots, in their order
        self.slot_index = self._positions = torch.zeros(0, dtype=torch.long)  # slots, starts
        self._longest = 0  # this step's: the last position a row reaches, plus one
        self._cells: dict[tuple[int, int], torch.Tensor] = {}  # see ``_cells_of``

    def reset(self) -> None:
        self.flush()
        self.tables, self.filled, self.stored, self.slots = [], [], [], []

    def flush(self) -> None:
        """Store in the pool the positions the slots hold that it lacks (``stored`` to
        ``filled``, per slot and layer), through each slot's table."""
        cells: dict[tuple[int, int, int], torch.Tensor] = {}
        for layer in range(len(self.k)):
            spans = []
            for s, (table, stored, filled) in enumerate(
                zip(self.tables, self.stored, self.filled, strict=True)
            ):
                if stored[layer] < filled[layer]:
                    spans.append((s, table, stored[layer], filled[layer]))
                    stored[layer] = filled[layer]
            if spans:
                self._write_back(layer, spans, cells)

    def follow(self, layout: StepLayout) -> bool:
        """Whether the decode rows of ``layout`` attend through held slots: on a CPU, from 1 to
        ``HELD_ROWS`` of them (one alone is ``LoneHistory``'s), all within the room the budget
        leaves. Matches the step's rows to the slots (see the class docstring)."""
        cache = self.cache
        decode, bs = layout.decode, cache.block_size
        # one row alone is LoneHistory's, and the memory goes to it
        if cache.device.type != "cpu" or len(decode) > HELD_ROWS or len(layout.rows) == 1:
            self.release()
            return False
        if not decode:  # prompts only: the slots go, their memory stays for the rows to come
            self.reset()
            return False
        if layout.chunks:  # they may read blocks a slot has not written back
            self.flush()
        free = set(range(len(self.tables)))
        matched: dict[int, int] = {}
        for i, row in enumerate(layout.rows):
            for s in sorted(free):
                n = -(-min(self.filled[s]) // bs)  # the blocks of the positions it holds
                if n and row.blocks[:n] == self.tables[s][:n]:
                    matched[i] = s
                    free.discard(s)
                    break
        n_layer = len(self.k)
        if any(self.tables[s] for s in free):
            self.flush()
        for s in free:  # no row of this step reads it
            self.tables[s], self.filled[s], self.stored[s] = [], [0] * n_layer, [0] * n_layer
        free_slots = sorted(free)
        self.slots = []
        for i, row in enumerate(decode):
            s = matched.get(i)
            if s is None:
                if free_slots:
                    s = free_slots.pop(0)
                else:
                    s = len(self.tables)
                    self.tables.append([])
                    self.filled.append([0] * n_layer)
                    self.stored.append([0] * n_layer)
            self.slots.append(s)
            self.tables[s] = list(row.blocks)
        for i, row in enumerate(layout.chunks, start=len(decode)):
            if i in matched:  # it writes from its start: only what is before stays held
                s = matched[i]
                self.tables[s] = list(row.blocks)
                self.filled[s] = [min(f, row.start) for f in self.filled[s]]
                self.stored[s] = [min(f, row.start) for f in self.stored[s]]
        # the slots the tensors will have (they never lose one), at the longest row's length
        slots = max([max(self.slots) + 1] + [t.size(0) for t in self.k if t is not None])
        self._longest = max(r.end for r in decode)
        if slots * self._longest > cache.lone_history_room():
            self.release()
            return False
        self.slot_index = torch.tensor(self.slots)
        self._positions = torch.tensor([r.start for r in decode])
        self._cells = {}
        return True

    def read(
        self,
        layer: int,
        rows: list[PagedRow],
        new: tuple[torch.Tensor, torch.Tensor],
        cells: torch.Tensor,
        dtype: torch.dtype,
        deferred: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s keys and values of the slots up to the last of this step's decode
        ``rows``, each (slots, n_kv_head, longest, hd) in ``dtype``: the held ones, the rows'
        new positions (``new``: as the blocks hold them once stored; ``deferred``, the pool
        has not stored them, else it has, at the flat ``cells``), and what a slot lacks before
        them."""
        cache = self.cache
        bs, H, hd = cache.block_size, cache.n_kv_head, cache.head_dim
        slots, longest = max(self.slots) + 1, self._longest
        k, v = self._room(layer, slots, longest, dtype)
        at = self._cells_of(k)
        # what the blocks hold at the rows' positions: the step's keys and values as they are
        # where the codec stores floats of this dtype, else read back through it
        exact = isinstance(cache.codec, FloatCodec) and cache.k[layer][0].dtype == dtype
        for planes, x, held in ((cache.k[layer], new[0], k), (cache.v[layer], new[1], v)):
            if exact:
                value = x[0].transpose(0, 1)  # (rows, n_kv_head, hd)
            else:
                flat = [
                    p.view(-1, p.size(-1)).index_select(0, cells[: len(rows) * H]) for p in planes
                ]
                value = cache.codec.decode(flat, dtype)
            held.view(-1, hd).index_copy_(0, at, value.reshape(-1, hd))
        for s, row in zip(self.slots, rows, strict=True):
            first = min(self.filled[s][layer], row.start)
            if first < row.start:  # what the slot lacks before the step's position
                lo, hi = first // bs, -(-row.start // bs)
                index = torch.tensor(row.blocks[lo:hi], dtype=torch.long)
                for planes, held in ((cache.k[layer], k), (cache.v[layer], v)):
                    copied = gather_history(cache, planes, index, dtype)
                    held[s, :, first : row.start].copy_(
                        copied[0, :, first - lo * bs : row.start - lo * bs]
                    )
            stored = self.stored[s]
            stored[layer] = _stored_after(stored[layer], first, row, deferred)
            self.filled[s][layer] = row.end
        return k[:slots, :, :longest], v[:slots, :, :longest]

    def _cells_of(self, held: torch.Tensor) -> torch.Tensor:
        """The rows of ``held`` (slots, n_kv_head, capacity, hd), seen flat as (slots *
        n_kv_head * capacity, hd), that this step's decode rows' positions go to, row-major
        then head: one ``index_copy_`` puts them in (an advanced-index assignment over slots
        and positions took 34 us a call, 0.8 ms of a 4-row GPT-2 step). The same in every
        layer whose tensors have that shape."""
        slots, H, capacity, _ = held.shape
        cells = self._cells.get((slots, capacity))
        if cells is None:
            first = (self.slot_index[:, None] * H + torch.arange(H)) * capacity
            cells = self._cells[slots, capacity] = (first + self._positions[:, None]).flatten()
        return cells

    def _room(
        self, layer: int, slots: int, need: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``layer``'s held tensors with at least ``slots`` slots of ``need`` positions: grown
        as ``LoneHistory``'s are (doubling, in whole blocks, within the room), keeping what
        they hold, or new in another dtype (and then holding nothing)."""
        cache = self.cache
        k, v = self.k[layer], self.v[layer]
        keep = k is not None and v is not None and k.dtype == dtype
        if keep and k.size(0) >= slots and k.size(2) >= need:
            return k, v
        if k is not None and not keep:
            self.flush()  # what they hold goes
        slots = max(slots, k.size(0) if keep else 0)
        capacity = _held_capacity(cache, need, slots)
        grown = []
        for old in (k, v):
            # zeros: a masked position still enters the scores, and garbage there can be NaN
            new = torch.zeros(slots, cache.n_kv_head, capacity, cache.head_dim, dtype=dtype)
            if keep:
                n, length = old.size(0), min(old.size(2), capacity)
                new[:n, :, :length].copy_(old[:, :, :length])
            grown.append(new)
        if not keep:
            for filled, stored in zip(self.filled, self.stored, strict=True):
                filled[layer] = stored[layer] = 0
        self.k[layer], self.v[layer] = grown
        return grown[0], grown[1]

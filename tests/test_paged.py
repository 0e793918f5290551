"""Paged KV memory: attention over blocks in place, reference counts and copy on write,
preemption by recompute and by swap, the host-memory tier, and the settings' checks."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from arlm.engine import Engine, EngineConfig
from arlm.engine.block_manager import BlockManager, block_hashes
from arlm.engine.sequence import Sequence
from arlm.kv_cache import PagedKVCache, PagedRow, StepLayout, held, make_codec, paged
from arlm.kv_cache.decode_attention import decode_attention_reference
from arlm.sampling import SamplingParams
from tests.conftest import make_model
from tests.numerics import assert_close
from tests.test_engine import _alone, _mixed_params, _prompts

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request, tokenizer):
    return make_model(request.param, vocab_size=tokenizer.vocab_size, seed=5)


def _dense(pool: torch.Tensor, table: list[int], length: int) -> torch.Tensor:
    """A row's first ``length`` positions from its blocks, (n_kv_head, length, hd)."""
    x = pool[table]  # (blocks, H, bs, hd)
    return x.transpose(0, 1).reshape(x.size(1), -1, x.size(-1))[:, :length]


ROWS = {
    # tables sharing a prefix of blocks, lengths inside and across blocks
    "shared": (
        [[3, 9, 4, 20, 21], [3, 9, 4, 30], [1, 2], [5], list(range(10, 20))],
        [17, 12, 5, 0, 37],
    ),
    # one row alone (batch-1 decode), out of order, block 5 of its range not its own
    "alone": ([[2, 4, 3, 6]], [13]),
}


# where block b of the tables lies in a pool of 200: as it is; in clusters of 8 with 20 unread
# blocks between; spread out, every 5th block
PLACES = {"packed": lambda b: b, "clusters": lambda b: b + 20 * (b // 8), "spread": lambda b: 5 * b}
# how many fused calls read them with a call priced at 16 positions (blocks of 4): gaps over 4
# blocks get a call of their own; None: copied out, attending over the gaps would cost more (a
# lone row's copy, in its table's order, is attended as it is)
CALLS = {
    ("shared", "packed"): 2,
    ("shared", "clusters"): 4,
    ("shared", "spread"): None,
    ("alone", "packed"): 1,
    ("alone", "spread"): None,
}


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("n_kv_head", [2, 4])
@pytest.mark.parametrize("rows,place", list(CALLS))
def test_decode_reads_blocks_in_place_as_a_dense_reference(
    window, n_kv_head, rows, place, monkeypatch
):
    """Decode rows at lengths inside and across blocks: the CPU path (fused calls over ranges
    of the pool's blocks, merged by log-sum-exp) equals attention over each row's positions
    gathered, whether the blocks are read in one range, in several, or copied out."""
    monkeypatch.setattr(paged, "CALL_POSITIONS", 16)
    monkeypatch.setattr(paged, "LONE_HISTORY_BYTES", 0)  # a lone row reads blocks as others do
    monkeypatch.setattr(paged, "LONE_COPY_POSITIONS", 0)  # and copies them where scattered
    g = torch.Generator().manual_seed(0)
    H, hd, bs, n_head = n_kv_head, 16, 4, 4
    cache = PagedKVCache(1, H, hd, 200, bs, windows=[window])
    cache.reserve(200)
    for plane in (*cache.k[0], *cache.v[0]):
        plane.copy_(torch.randn(plane.shape, generator=g))
    tables, positions = ROWS[rows]  # each row writes its last position
    tables = [[PLACES[place](b) for b in t] for t in tables]
    layout = StepLayout([PagedRow(t, p, 1) for t, p in zip(tables, positions, strict=True)], [])
    step = cache.step(layout)
    B = len(tables)
    q = torch.randn(1, n_head, B, hd, generator=g)
    k_new = torch.randn(1, H, B, hd, generator=g)
    v_new = torch.randn(1, H, B, hd, generator=g)
    out = step.attend(0, q, k_new, v_new, scale=0.3)
    if window is None:  # (a window of 7 reads a few blocks of each row, often apart)
        readers = step._readers[window]
        segments = readers.segments
        assert (None if segments is None else len(segments)) == CALLS[rows, place]
        assert (readers.lone is not None) == (rows == "alone" and segments is None)
    (k,), (v,) = cache.k[0], cache.v[0]
    for b, (table, p) in enumerate(zip(tables, positions, strict=True)):
        keys, values = _dense(k, table, p + 1), _dense(v, table, p + 1)
        assert torch.equal(keys[:, p], k_new[0, :, b]) and torch.equal(values[:, p], v_new[0, :, b])
        lo = 0 if window is None else max(0, p - window + 1)
        keys, values = keys[:, lo:], values[:, lo:]
        heads = keys.repeat_interleave(n_head // H, 0), values.repeat_interleave(n_head // H, 0)
        want = torch.softmax(q[0, :, b, None] @ heads[0].transpose(1, 2) * 0.3, -1) @ heads[1]
        assert_close(out[0, :, b], want[:, 0], scale=1.0)
    # the CUDA kernel's reference follows the same tables
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    lengths = torch.tensor(positions) + 1
    rows = q[0].transpose(0, 1)
    ref = decode_attention_reference(rows, cache.codec, [k], [v], padded, lengths, 0.3, window)
    assert_close(out[0].transpose(0, 1), ref, scale=1.0)


@pytest.mark.parametrize("place", ["packed", "spread"])
def test_a_lone_windowed_row_of_few_positions_reads_its_table_as_the_general_path_does(
    place, monkeypatch
):
    """Batch-1 decode past what ``LoneHistory`` holds, whose window reads at most
    ``LONE_COPY_POSITIONS``, takes its blocks straight from its table (no sorting of who reads
    what): the same result as the general path's."""
    monkeypatch.setattr(paged, "LONE_HISTORY_BYTES", 0)  # nothing held
    monkeypatch.setattr(paged, "LONE_COPY_POSITIONS", 12)  # position 13 is past it
    g = torch.Generator().manual_seed(1)
    H, hd, bs, n_head = 2, 16, 4, 4
    cache = PagedKVCache(1, H, hd, 200, bs, windows=[7])
    cache.reserve(200)
    for plane in (*cache.k[0], *cache.v[0]):
        plane.copy_(torch.randn(plane.shape, generator=g))
    (table,), (position,) = ROWS["alone"]
    layout = StepLayout([PagedRow([PLACES[place](b) for b in table], position, 1)], [])
    q = torch.randn(1, n_head, 1, hd, generator=g)
    k_new, v_new = torch.randn(2, 1, H, 1, hd, generator=g)
    step = cache.step(layout)
    short = step.attend(0, q, k_new, v_new, scale=0.3)
    readers = step._readers[7]
    assert readers.lone is not None and readers.segments is None  # no ranges were worked out
    monkeypatch.setattr(paged, "LONE_COPY_POSITIONS", 0)
    general = cache.step(layout).attend(0, q, k_new, v_new, scale=0.3)
    assert_close(short, general, scale=1.0)


def _record_copies(monkeypatch) -> list[list[int]]:
    """The blocks of every history copy (``gather_history``, in the pool's steps and the held
    histories) from now on, in order."""
    copies = []
    original = held.gather_history

    def history(*args):
        copies.append(args[2].tolist())
        return original(*args)

    for module in (paged, held):
        monkeypatch.setattr(module, "gather_history", history)
    return copies


def _record_stores(monkeypatch) -> list[PagedKVCache]:
    """The cache of every step's store of its keys and values in the pool, from now on."""
    stores = []
    original = paged.StepWrites.store

    def store(writes, *args):
        stores.append(writes.cache)
        return original(writes, *args)

    monkeypatch.setattr(paged.StepWrites, "store", store)
    return stores


def _fill_randomly(cache, g, blocks: int | None = None) -> None:
    """The first ``blocks`` blocks of ``cache`` (all by default) allocated and holding random
    values, through its codec."""
    blocks = cache.num_blocks if blocks is None else blocks
    cache.reserve(blocks)
    ids = list(range(blocks))
    cache.write_blocks(
        ids, [torch.randn(p.shape, generator=g).to(p.dtype) for p in cache.read_blocks(ids)]
    )


def _attend_dense(cache, table, position, q, scale):
    """Attention of q (1, n_head, 1, hd) over the positions ``cache``'s blocks hold for
    ``table`` up to ``position`` (once the held histories have written back), decoded through
    the codec, within the layer's window."""
    cache.write_back()
    k, v = (
        cache.codec.decode([_dense(p, table, position + 1) for p in planes], torch.float32)
        for planes in (cache.k[0], cache.v[0])
    )
    window = cache.windows[0]
    lo = 0 if window is None else max(0, position - window + 1)
    group = q.size(1) // k.size(0)
    k, v = k[:, lo:].repeat_interleave(group, 0), v[:, lo:].repeat_interleave(group, 0)
    return torch.softmax(q[0] @ k.transpose(1, 2) * scale, -1) @ v  # (n_head, 1, hd)


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("between", ["chunk", "copy", "write", "another table"])
def test_a_lone_row_grows_its_held_history_and_drops_it_when_the_pool_changes(
    kv_dtype, window, between, monkeypatch
):
    """One row decoding alone copies its blocks out once and then adds each step's position
    (indexed in its block: no copy of its history after the first step; over float blocks,
    the step's own keys and values, stored in the pool only later), attending as a cache that
    holds no history does; a step that writes other rows' positions, a block copy or write,
    or another table in between writes back and drops what it holds (but what the blocks a
    table shares with the one before hold), so the next step copies the blocks again and
    reads what they hold now, as the reference's do."""
    copies = _record_copies(monkeypatch)
    stores = _record_stores(monkeypatch)
    g = torch.Generator().manual_seed(2)
    H, hd, bs, n_head = 2, 16, 4, 4
    codec = make_codec(kv_dtype, torch.float32)
    caches = []
    for n in (80, 40):  # the reference's blocks all have memory: it holds nothing
        cache = PagedKVCache(1, H, hd, n, bs, codec=codec, windows=[window])
        _fill_randomly(cache, torch.Generator().manual_seed(3), 40)
        caches.append(cache)
    table = [2, 4, 3, 6, 9]

    def step(layout, T=1):
        q = torch.randn(1, n_head, T, hd, generator=g)
        k_new, v_new = torch.randn(2, 1, H, T, hd, generator=g)
        out = caches[0].step(layout).attend(0, q, k_new, v_new, scale=0.3)
        recorded = len(copies), len(stores)
        want = caches[1].step(layout).attend(0, q, k_new, v_new, scale=0.3)
        del copies[recorded[0] :], stores[recorded[1] :]  # the reference's are not counted
        assert_close(out, want, scale=1.0)

    for position in range(10, 14):
        step(StepLayout([PagedRow(table, position, 1)], []))
    assert copies == [[2, 4, 3]] * 2  # keys and values, at the first step only
    assert len(stores) == (0 if kv_dtype == "float32" else 4)
    if between == "chunk":  # another sequence, which holds block 2 now, prefills into it
        step(StepLayout([], [PagedRow([2], 0, 4)]), T=4)
    elif between == "copy":
        for cache in caches:
            cache.copy_blocks([(7, 2)])
    elif between == "write":
        for cache in caches:
            cache.write_blocks([4], cache.read_blocks([8]))
    else:  # the same positions through another block
        table = [2, 5, 3, 6, 9]
    copies.clear()
    step(StepLayout([PagedRow(table, 14, 1)], []))
    # a table that shares its first block with the one before keeps what that block holds
    first = 1 if between in ("chunk", "another table") else 0
    assert copies == [table[first:4], table[first:4]]
    _assert_same_blocks(*caches, 40)


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_a_lone_rows_held_history_grows_with_it_up_to_what_it_may_hold(kv_dtype, monkeypatch):
    """The held history starts small and doubles as its row grows, keeping what it holds (the
    row's blocks are copied out at the first step only); past what ``LONE_HISTORY_BYTES``
    holds the row reads its blocks as other rows do, and the held tensors are given back."""
    copies = _record_copies(monkeypatch)
    H, hd, bs, n_head = 2, 16, 4, 4
    monkeypatch.setattr(held, "LONE_HISTORY_START", 8)
    monkeypatch.setattr(paged, "LONE_HISTORY_BYTES", 30 * 2 * H * hd * 4)  # 30 float32 positions
    g = torch.Generator().manual_seed(3)
    cache = PagedKVCache(1, H, hd, 80, bs, codec=make_codec(kv_dtype, torch.float32))
    _fill_randomly(cache, g, 40)  # the other 40 blocks' memory is the held history's to take
    table = [17, 3, 30, 8, 12, 25, 1, 9, 33]
    sizes = []
    for position in range(6, 36):
        if position == 30:
            assert copies == [table[:2]] * 2  # keys and values, at the first step only
        q = torch.randn(1, n_head, 1, hd, generator=g)
        k_new, v_new = torch.randn(2, 1, H, 1, hd, generator=g)
        out = cache.step(StepLayout([PagedRow(table, position, 1)], [])).attend(
            0, q, k_new, v_new, scale=0.3
        )
        assert_close(out[0], _attend_dense(cache, table, position, q, 0.3), scale=1.0)
        k = cache.lone_history.k[0]
        sizes.append(None if k is None else k.size(2))
    # positions 6-7 fit 8; 8-15 fit 16; 16-29 fit the 30 it may hold; 30 on: none held
    assert sizes == [8] * 2 + [16] * 8 + [30] * 14 + [None] * 6


def test_a_lone_rows_held_history_takes_only_what_the_budget_leaves_the_blocks(monkeypatch):
    """The held history lives in the memory of the blocks that have none yet: it grows only
    as far as that reaches, and is given back when the blocks take that memory, so the cache
    never holds more than all its blocks would (its budget)."""
    H, hd, bs, n_head = 2, 16, 4, 4
    monkeypatch.setattr(held, "LONE_HISTORY_START", 8)
    g = torch.Generator().manual_seed(6)
    cache = PagedKVCache(1, H, hd, 12, bs)
    budget = cache.num_blocks * cache.block_bytes
    _fill_randomly(cache, g, 4)
    sizes = []
    for position in range(6, 24):
        table = list(range(position // bs + 1))  # the row's blocks, given as it needs them
        cache.reserve(len(table))
        q = torch.randn(1, n_head, 1, hd, generator=g)
        k_new, v_new = torch.randn(2, 1, H, 1, hd, generator=g)
        out = cache.step(StepLayout([PagedRow(table, position, 1)], [])).attend(
            0, q, k_new, v_new, scale=0.3
        )
        assert_close(out[0], _attend_dense(cache, table, position, q, 0.3), scale=1.0)
        assert cache.nbytes <= budget
        k = cache.lone_history.k[0]
        sizes.append(None if k is None else k.size(2))
    # 4 blocks with memory leave 8 (32 positions): 8 held, then 16; block 4 doubles the pool
    # to 8 blocks, which leave 4 (16 positions): the row at position 16 no longer fits
    assert sizes == [8] * 2 + [16] * 8 + [None] * 8
    # held, then the pool takes the rest of the budget: the held tensors are given back
    cache = PagedKVCache(1, H, hd, 12, bs)
    _fill_randomly(cache, g, 4)
    q = torch.randn(1, n_head, 1, hd, generator=g)
    k_new, v_new = torch.randn(2, 1, H, 1, hd, generator=g)
    cache.step(StepLayout([PagedRow([0, 1], 6, 1)], [])).attend(0, q, k_new, v_new)
    assert cache.lone_history.nbytes > 0
    cache.reserve(12)
    assert cache.lone_history.nbytes == 0 and cache.nbytes == budget


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
@pytest.mark.parametrize("window", [None, 7])
def test_a_lone_rows_chunks_and_rejected_guesses_extend_its_held_history(
    kv_dtype, window, monkeypatch
):
    """A row alone through its prompt's chunks, a verify step of four positions and decode
    steps from a position before its end (two guesses rejected): each chunk copies out only
    the blocks of the positions it wrote (over float blocks none, and it stores nothing in the
    pool: it holds its own keys and values, written back later), each decode step no block,
    and every step attends as a cache that holds no history does."""
    copies = _record_copies(monkeypatch)
    stores = _record_stores(monkeypatch)
    H, hd, bs, n_head = 2, 16, 4, 4
    # the reference's blocks all have memory, so it holds no history: it reads its blocks
    caches = [
        PagedKVCache(1, H, hd, n, bs, codec=make_codec(kv_dtype, torch.float32), windows=[window])
        for n in (48, 16)
    ]
    for cache in caches:
        cache.reserve(16)
    table = [5, 1, 7, 3, 9, 11]
    g = torch.Generator().manual_seed(4)
    # (start, length, a chunk): the prompt's two chunks, a decode step, a verify step of the
    # pending token and 3 guesses (14-17), then decode from 16 (guesses at 16 and 17 rejected)
    steps = [(0, 6, True), (6, 7, True), (13, 1, False), (14, 4, True)]
    steps += [(16, 1, False), (17, 1, False), (18, 1, False)]
    for start, length, chunk in steps:
        q = torch.randn(1, n_head, length, hd, generator=g)
        k_new, v_new = torch.randn(2, 1, H, length, hd, generator=g)
        row = [PagedRow(table, start, length)]
        layout = StepLayout([], row) if chunk else StepLayout(row, [])
        stores.clear()
        out = caches[0].step(layout).attend(0, q, k_new, v_new, scale=0.3)
        assert (caches[0] in stores) == (kv_dtype != "float32")
        recorded = len(copies)
        want = caches[1].step(layout).attend(0, q, k_new, v_new, scale=0.3)
        del copies[recorded:]  # the reference's copies are not counted
        assert_close(out, want, scale=1.0)
    blocks = [[5, 1], [1, 7, 3], [3, 9]]  # the chunks' (read back through the codec)
    assert copies == ([] if kv_dtype == "float32" else [b for b in blocks for _ in "kv"])
    _assert_same_blocks(*caches, 16)  # every step's positions written back


# decode rows A, B, C, D (blocks 0-9, 10-19, 20-29, 30-39) and chunks, step by step:
# (decode rows as (table, position), chunks as (table, start, length))
_A, _B, _C, _D = (list(range(10 * i, 10 * i + 10)) for i in range(4))
HELD_STEPS = [
    ([(_A, 12), (_B, 20), (_C, 7)], []),  # every row's slot filled from its blocks
    ([(_A, 13), (_B, 21), (_C, 8)], []),  # then each step reads back one position a row
    ([(_A, 14), (_B, 22), (_C, 9)], [(_D, 0, 6)]),  # D's prompt beside them
    ([(_A, 15), (_B, 23), (_C, 10), (_D, 6)], []),  # D gets a slot
    # B waits; another table writes over its first blocks (as if they were someone else's)
    ([(_A, 16), (_C, 11), (_D, 7)], [([10, 11], 0, 8)]),
    ([(_A, 17), (_B, 24), (_D, 8)], [(_C, 12, 4)]),  # B back (all read again); C verifies 4
    ([(_A, 18), (_B, 25), (_C, 14), (_D, 9)], []),  # C from 14: guesses at 14 and 15 rejected
    ([(_A, 19), (_D, 10)], [(_C, 13, 3)]),  # B gone; C writes 13-15 again, from before its end
    ([(_A, 20), (_C, 16), (_D, 11)], []),  # slots 0, 2 and 3 of 4
]
# the blocks a step of decode rows alone copies out: none but what a slot lacks
HELD_COPIES = {1: [], 6: [[_C[3]]] * 2, 8: [[_C[3]]] * 2}


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_rows_beside_others_attend_over_held_slots_as_over_their_blocks(
    kv_dtype, window, monkeypatch
):
    """Decode rows joining, waiting, verifying guesses and leaving, beside prompt chunks: each
    step through held slots (``HeldRows``) equals the step of a cache that holds nothing and
    reads its blocks; a step of rows that only decode copies no block out and, over float
    blocks, stores nothing in the pool (the slots write back), a row back after a step away
    reads its blocks again, the pool holds what the reference's does whenever it is read, and
    the cache stays within its budget."""
    copies = _record_copies(monkeypatch)
    stores = _record_stores(monkeypatch)
    H, hd, bs, n_head = 2, 16, 4, 4
    g = torch.Generator().manual_seed(6)
    caches = []
    for n in (200, 40):  # the reference's blocks all have memory: it holds nothing
        cache = PagedKVCache(1, H, hd, n, bs, codec=make_codec(kv_dtype, torch.float32))
        cache.windows = [window]
        _fill_randomly(cache, torch.Generator().manual_seed(3), 40)
        caches.append(cache)
    held_rows = caches[0].held_rows
    for i, (decode, chunks) in enumerate(HELD_STEPS):
        layout = StepLayout(
            [PagedRow(t, p, 1) for t, p in decode], [PagedRow(t, p, n) for t, p, n in chunks]
        )
        N = layout.num_tokens
        q = torch.randn(1, n_head, N, hd, generator=g)
        k_new, v_new = torch.randn(2, 1, H, N, hd, generator=g)
        before = len(copies)
        stores.clear()
        out = caches[0].step(layout).attend(0, q, k_new, v_new, scale=0.3)
        held_copies = copies[before:]
        # written back later: decode rows alone over float blocks
        assert (caches[0] in stores) == bool(chunks or kv_dtype != "float32")
        want = caches[1].step(layout).attend(0, q, k_new, v_new, scale=0.3)
        del copies[before + len(held_copies) :]
        assert_close(out, want, scale=1.0)
        assert len(held_rows.slots) == len(decode)
        assert caches[0].nbytes <= caches[0].num_blocks * caches[0].block_bytes
        if i in HELD_COPIES:  # 1: one position a row; 6 and 8: C's rewritten positions
            assert held_copies == HELD_COPIES[i]
        if i == 5:  # B read again from its first block
            assert [_B[:6]] * 2 == [c for c in held_copies if c[:1] == [_B[0]]]
        if i in (3, 6):  # the pool as read (a block copy's source, a swap): what it should be
            _assert_same_blocks(*caches, 40)
    assert held_rows.slots == [0, 2, 3] and held_rows.tables[1] == []
    # A alone reads its history from the blocks (LoneHistory): the slots wrote back first
    layout = StepLayout([PagedRow(_A, 21, 1)], [])
    q, k_new, v_new = torch.randn(3, 1, n_head, 1, hd, generator=g)
    out, want = (c.step(layout).attend(0, q, k_new[:, :H], v_new[:, :H], 0.3) for c in caches)
    assert_close(out, want, scale=1.0)
    _assert_same_blocks(*caches, 40)


def _assert_same_blocks(cache: PagedKVCache, reference: PagedKVCache, n: int) -> None:
    """The first ``n`` blocks of both pools hold the same bits, as a block copy or swap reads
    them."""
    ids = list(range(n))
    for a, b in zip(cache.read_blocks(ids), reference.read_blocks(ids), strict=True):
        assert torch.equal(a, b)


def test_held_slots_stay_within_what_the_budget_leaves_the_blocks():
    """Four short rows take four slots; then one row, longer, beside a chunk would need its
    length in each of the four slots the tensors keep, more than the budget leaves the 20
    blocks given memory: it reads its blocks, and the held slots' memory goes back."""
    g = torch.Generator().manual_seed(2)
    cache = PagedKVCache(1, 2, 16, 40, 4)
    _fill_randomly(cache, g, 20)  # room for 80 positions of held history
    budget = cache.num_blocks * cache.block_bytes
    tables = [list(range(8)), list(range(8, 12)), list(range(12, 16)), list(range(16, 20))]
    steps = [StepLayout([PagedRow(t, 15, 1) for t in tables], [])]  # 4 slots of 16
    steps.append(StepLayout([PagedRow(tables[0], 30, 1)], [PagedRow(tables[1], 12, 2)]))
    for layout, slots in zip(steps, ([0, 1, 2, 3], []), strict=True):
        N = layout.num_tokens
        q, k_new, v_new = torch.randn(3, 1, 4, N, 16, generator=g)
        out = cache.step(layout).attend(0, q, k_new[:, :2], v_new[:, :2], scale=0.3)
        assert cache.held_rows.slots == slots and cache.nbytes <= budget
        for i, r in enumerate(layout.decode):  # over what the blocks hold after the step
            want = _attend_dense(cache, r.blocks, r.start, q[:, :, i : i + 1], 0.3)
            assert_close(out[0, :, i], want[:, 0], scale=1.0)


@pytest.mark.parametrize("kv_dtype", ["int8", "int4"])
def test_quantized_blocks_read_as_they_were_stored(model, kv_dtype):
    """A decode step over int8/int4 blocks equals attention over the dequantized positions."""
    c = model.config
    cache = PagedKVCache.for_model(c, 12, 8, codec=make_codec(kv_dtype, torch.float32))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 500, (1, 20), generator=g)
    cache.reserve(12)
    layout = StepLayout([], [PagedRow([4, 7, 2], 0, 20)])
    with torch.no_grad():
        model(prompt, kv_cache=cache.step(layout), positions=torch.arange(20)[None])
        nxt = torch.randint(1, 500, (1, 1), generator=g)
        decode = StepLayout([PagedRow([4, 7, 2], 20, 1)], [])
        a, _ = model(nxt, kv_cache=cache.step(decode), positions=torch.tensor([[20]]))
        # the same positions as one chunk reading the stored (quantized) history
        b, _ = model(
            nxt,
            kv_cache=cache.step(StepLayout([], [PagedRow([4, 7, 2], 20, 1)])),
            positions=torch.tensor([[20]]),
        )
    assert_close(a, b, scale=float(b.abs().max()))


def _seq(prompt: list[int], bs: int) -> Sequence:
    return Sequence(
        request_id="r",
        index=0,
        token_ids=list(prompt),
        prompt_len=len(prompt),
        params=SamplingParams(),
        generator=None,
        sampler=None,
        text=None,
        end_ids=frozenset(),
        block_hashes=block_hashes(prompt, bs),
    )


def _computed(bm: BlockManager, prompt: list[int]) -> Sequence:
    """A sequence whose whole ``prompt`` has been through a forward: its full blocks registered."""
    seq = _seq(prompt, bm.block_size)
    bm.allocate(seq)
    assert bm.ensure(seq, len(prompt))
    seq.num_cached = len(prompt)
    bm.computed(seq)
    return seq


def test_shared_blocks_are_copied_before_they_are_written():
    bm = BlockManager(16, 4)
    prompt = list(range(1, 14))  # 3 full blocks and one position
    a = _computed(bm, prompt)
    b = _seq(prompt, 4)
    bm.allocate(b)  # the 3 full blocks, by reference
    assert b.block_table == a.block_table[:3] and b.num_cached == 12
    assert [bm.ref[x] for x in a.block_table] == [2, 2, 2, 1]
    # b rolls back into the shared second block (a loop break), then writes: a copy of its own
    b.num_cached = 6
    bm.truncate(b)
    assert bm.ensure(b, 8)
    orders = bm.take_orders()
    assert orders.copy == [(a.block_table[1], b.block_table[1])]
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]
    assert bm.ref[a.block_table[1]] == 1 and bm.ref[b.block_table[1]] == 1
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 16 and bm.num_used_blocks == 0


def test_new_blocks_come_from_free_ones_before_the_prefix_cache_is_evicted():
    """A finished prompt's full blocks stay cached while free blocks are left (the pool grows
    into its budget rather than evict: ``docs/inference.md``), then go least recently freed
    first."""
    bm = BlockManager(8, 4)
    first = _computed(bm, list(range(1, 14)))  # 3 full blocks and one position
    bm.free(first)
    other = _seq(list(range(100, 113)), 4)
    bm.allocate(other)
    assert bm.ensure(other, 13)
    assert sorted(other.block_table) == [3, 4, 5, 6]  # none of the first prompt's cached ones
    again = _seq(list(range(1, 14)), 4)
    bm.allocate(again)
    assert again.block_table == [0, 1, 2] and again.num_cached == 12
    bm.free(again)  # its blocks are freed tail first: 2, 1, 0
    late = _seq(list(range(200, 213)), 4)  # one free block left: then the cached ones
    bm.allocate(late)
    assert bm.ensure(late, 13)
    assert late.block_table == [7, 2, 1, 0]
    assert bm.cached == {}  # the first prompt is no longer found


def test_rows_in_a_copied_block_see_what_the_shared_one_held(model, tokenizer):
    """Through the engine: n samples share the prompt's full blocks; a loop break inside the
    generated text, then more steps, give each sample what it gives alone."""
    prompt = list(range(1, 41))
    params = SamplingParams(max_tokens=30, n=3, temperature=0.9, seed=4, ignore_eos=True)
    engine = Engine(model, tokenizer, config=EngineConfig(kv_block_size=8))
    together = engine.generate([prompt], params, progress=False)[0]
    alone = [
        Engine(
            model, tokenizer, config=EngineConfig(kv_block_size=8, enable_prefix_caching=False)
        ).generate([prompt], params, progress=False)[0][i]
        for i in range(3)
    ]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.usage.cached_prompt_tokens for c in together] == [0, 32, 32]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_requests_give_the_tokens_they_give_alone(model, tokenizer, mode):
    # short prompts, long generations: admitted together, they outgrow the pool as they go
    prompts = [p[:12] for p in _prompts(8, seed=7)]
    params = [replace(sp, max_tokens=40 + 4 * i) for i, sp in enumerate(_mixed_params(8))]
    alone = _alone(model, tokenizer, prompts, params)
    c = model.config
    block = 2 * c.n_layer * c.n_kv_head * c.head_dim * 4 * 8  # bytes of 8 positions, float32
    need = [-(-(len(p) + sp.max_tokens) // 8) for p, sp in zip(prompts, params, strict=True)]
    pool = max(sum(need) // 3, max(need) + 2)  # a third of the peak, and room for the longest
    peak = sum(need)
    config = EngineConfig(
        kv_block_size=8,
        max_num_seqs=8,
        kv_cache_memory_gib=(pool + 0.5) * block / 2**30,
        kv_offload_gib=(peak * block / 2**30) if mode == "swap" else 0.0,
        preemption_mode=mode,
        enable_prefix_caching=False,
    )
    engine = Engine(model, tokenizer, config=config)
    results = engine.generate(prompts, params, progress=False)
    assert [r.token_ids for r in results] == alone
    stats = engine.stats()
    assert stats["preemptions"] > 0
    if mode == "swap":
        assert engine.scheduler.num_swaps > 0
    bm = engine.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    if bm.host is not None:
        assert bm.host.room() == bm.host.num_blocks


def test_evicted_prefix_blocks_come_back_from_the_host_tier_equal(model, tokenizer):
    c = model.config
    block = 2 * c.n_layer * c.n_kv_head * c.head_dim * 4 * 8
    config = EngineConfig(
        kv_block_size=8,
        max_num_seqs=2,
        kv_cache_memory_gib=12.5 * block / 2**30,
        kv_offload_gib=20 * block / 2**30,
    )
    engine = Engine(model, tokenizer, config=config)
    bm, cache = engine.block_manager, engine.runner.cache
    head = list(range(1, 41))  # 5 full blocks
    params = SamplingParams(max_tokens=3, **GREEDY)
    first = engine.generate([head + [7]], params, progress=False)[0]
    held = {bm.cached[d]: d for d in block_hashes(head, 8)}
    before = {d: [t.clone() for t in cache.read_blocks([b])] for b, d in held.items()}
    rng = random.Random(3)
    other = [[rng.randrange(1, 500) for _ in range(60)] for _ in range(2)]
    engine.generate(other, params, progress=False)  # their blocks evict the head's
    assert not any(d in bm.cached for d in before)
    again = engine.generate([head + [7]], params, progress=False)[0]
    assert again.usage.cached_prompt_tokens == 40 and bm.host.hits == 5
    assert again.token_ids == first.token_ids
    for d, planes in before.items():  # bit for bit
        for a, b in zip(planes, cache.read_blocks([bm.cached[d]]), strict=True):
            assert torch.equal(a, b)


def test_memory_settings_are_checked_with_their_numbers(model, tokenizer):
    with pytest.raises(ValueError, match="kv_offload_gib"):
        EngineConfig(kv_offload_gib=-1)
    with pytest.raises(ValueError, match="preemption_mode='later' is not one of"):
        EngineConfig(preemption_mode="later")
    with pytest.raises(ValueError, match="kv_offload_gib=1e-09 holds no KV block"):
        Engine(model, tokenizer, config=EngineConfig(kv_offload_gib=1e-9))

"""Which sequence holds which part of the KV cache, and the prefix cache.

Memory is ``num_slots`` slots of ``blocks_per_slot`` blocks of ``block_size`` positions. A
running sequence owns one slot (so attention reads it as a view, ``arlm.kv_cache.slots``) and
holds the leading blocks of it its positions fill: its ``block_table`` lists them, as global
block ids ``slot * blocks_per_slot + j``, so the blocks in use are exactly what the sequences
hold, each at most one block beyond its last position. A block never belongs to two sequences.

Prefix caching: every full block of a prompt, once computed, is registered under a hash of all
the tokens up to its end (so equal hashes mean equal keys and values: same tokens at the same
positions). A new prompt whose leading blocks are registered reuses them instead of computing
them: in place when the slot it is given is the one holding them, else by a copy from the slot
that does (one memory copy of those positions instead of a forward over them). A finished
sequence's blocks stay registered until its slot is given to a sequence that overwrites them;
free slots are handed out least recently used first, so the oldest cached prefixes go first.

Sliding-window layers keep only the last W positions of a slot (a ring, ``arlm.kv_cache.slots``),
so what a registered block holds there is soon overwritten. A hit is taken only as far as the
slots it comes from still hold, in every layer, what going on from its end reads
(``SlotKVCache.holds``): for a prompt within the window of the sequence it comes from, say.
Likewise a rollback (a loop break) goes back in place only while the rings hold the window
before it; else the sequence is computed again from the start.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict

from arlm.engine.sequence import Sequence
from arlm.kv_cache.slots import SlotKVCache


def block_hashes(token_ids: list[int], block_size: int) -> list[bytes]:
    """One hash per full block of ``token_ids``, each covering every token up to its end."""
    hashes, prev = [], b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = array("q", token_ids[start : start + block_size]).tobytes()
        prev = hashlib.blake2b(prev + block, digest_size=16).digest()
        hashes.append(prev)
    return hashes


class BlockManager:
    """Slots and blocks of ``cache``; see the module docstring."""

    def __init__(self, cache: SlotKVCache, block_size: int, prefix_caching: bool = True) -> None:
        if block_size < 1 or cache.slot_len % block_size:
            raise ValueError(
                f"kv_block_size={block_size} must be a positive divisor of the slot length "
                f"{cache.slot_len}"
            )
        self.cache, self.block_size = cache, block_size
        self.prefix_caching = prefix_caching
        self.blocks_per_slot = cache.slot_len // block_size
        self.free_slots: OrderedDict[int, None] = OrderedDict.fromkeys(range(cache.num_slots))
        # prefix cache: hash -> the slots holding that block; slot -> its registered hashes
        self.cached: dict[bytes, set[int]] = {}
        self.slot_hashes: dict[int, list[bytes]] = {}
        self.hit_tokens = self.queried_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.cache.num_slots * self.blocks_per_slot

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    def can_allocate(self, seq: Sequence) -> bool:
        return bool(self.free_slots)

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` a slot and reuse what the prefix cache holds of its prompt."""
        if not self.free_slots:
            raise RuntimeError("no free slot; ask can_allocate first")
        # at least the last prompt token is always computed: its logits give the first token
        wanted = seq.block_hashes[: (seq.prompt_len - 1) // self.block_size]
        hits = 0
        if self.prefix_caching:
            while hits < len(wanted) and wanted[hits] in self.cached:
                hits += 1
        slot = self._pick_slot(wanted[:hits])
        del self.free_slots[slot]
        in_place = self._common(self.slot_hashes.get(slot, []), wanted[:hits])
        while (copies := self._copies(slot, wanted, hits, in_place)) is None:
            hits -= 1  # a sliding-window ring has lost what going on from the hit's end reads
            in_place = min(in_place, hits)
        self._unregister(slot, keep=in_place)
        self.cache.reserve(slot + 1)
        for src, start, end in copies:
            self.cache.copy(src, slot, start, end)
        for k in range(in_place, hits):
            self._register(slot, k, wanted[k])
        seq.slot = slot
        seq.num_cached = self.cache.rewind(slot, hits * self.block_size)  # it goes on from here
        seq.cached_prompt_tokens = seq.num_cached
        self.hit_tokens += seq.num_cached
        self.queried_tokens += seq.prompt_len
        self._fit_table(seq)

    def _copies(
        self, slot: int, wanted: list[bytes], hits: int, in_place: int
    ) -> list[tuple[int, int, int]] | None:
        """(source slot, start, end) runs that bring ``slot``, which holds the first
        ``in_place`` blocks of ``wanted``, to its first ``hits``, each run from the lowest slot
        holding its blocks; None where what going on from there reads is no longer held."""
        bs, resume = self.block_size, hits * self.block_size
        if not self.cache.holds(slot, 0, in_place * bs, resume):
            return None
        runs: list[tuple[int, int, int]] = []
        for j in range(in_place, hits):
            start, end = j * bs, (j + 1) * bs
            holders = [s for s in self.cached[wanted[j]] if self.cache.holds(s, start, end, resume)]
            if not holders:
                return None
            if runs and runs[-1][0] in holders and runs[-1][2] == start:
                runs[-1] = (runs[-1][0], runs[-1][1], end)  # the run's slot holds this one too
            else:
                runs.append((min(holders), start, end))
        return runs

    def _pick_slot(self, hashes: list[bytes]) -> int:
        """The free slot holding most of ``hashes`` in place; else the least recently used of
        the slots the cache has allocated, so it grows only when they are all busy (growing
        touches new memory: seconds for a few hundred MB in a VM); else the next one to grow."""
        best, best_common = None, 0
        if hashes:
            for slot in self.free_slots:
                common = self._common(self.slot_hashes.get(slot, []), hashes)
                if common > best_common:
                    best, best_common = slot, common
        if best is not None:
            return best
        allocated = self.cache.allocated
        return next((s for s in self.free_slots if s < allocated), min(self.free_slots))

    @staticmethod
    def _common(a: list[bytes], b: list[bytes]) -> int:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n

    def _register(self, slot: int, j: int, digest: bytes) -> None:
        hashes = self.slot_hashes.setdefault(slot, [])
        if len(hashes) == j:
            hashes.append(digest)
            self.cached.setdefault(digest, set()).add(slot)

    def _unregister(self, slot: int, keep: int) -> None:
        """Forget the blocks of ``slot`` from block ``keep`` on (they are about to change)."""
        hashes = self.slot_hashes.get(slot, [])
        for digest in hashes[keep:]:
            holders = self.cached[digest]
            holders.discard(slot)
            if not holders:
                del self.cached[digest]
        del hashes[keep:]

    def computed(self, seq: Sequence) -> None:
        """After a forward: grow the block table, and register the prompt blocks now full."""
        self._fit_table(seq)
        if self.prefix_caching:
            full = min(seq.num_cached, seq.prompt_len) // self.block_size
            have = len(self.slot_hashes.get(seq.slot, []))
            for j in range(have, min(full, len(seq.block_hashes))):
                self._register(seq.slot, j, seq.block_hashes[j])

    def truncate(self, seq: Sequence) -> None:
        """After ``seq`` was rolled back: drop blocks and registrations past what it holds (all
        of them when a sliding-window ring lost the window it goes on from: it starts over)."""
        seq.num_cached = self.cache.rewind(seq.slot, seq.num_cached)
        self._unregister(seq.slot, keep=min(seq.num_cached, seq.prompt_len) // self.block_size)
        self._fit_table(seq)

    def free(self, seq: Sequence) -> None:
        """Return ``seq``'s slot; its registered blocks stay cached until the slot is reused."""
        if seq.slot is None:
            return
        if not self.prefix_caching:
            self._unregister(seq.slot, keep=0)
        self.free_slots[seq.slot] = None  # the end: most recently used
        seq.slot, seq.block_table = None, []

    def _fit_table(self, seq: Sequence) -> None:
        # the blocks the positions fed so far (and the one fed next) fill
        n = math.ceil(min(len(seq.token_ids), self.cache.slot_len) / self.block_size)
        if n != len(seq.block_table):  # a new block every block_size steps, not every step
            base = seq.slot * self.blocks_per_slot
            seq.block_table = list(range(base, base + n))
            seq.peak_blocks = max(seq.peak_blocks, n)

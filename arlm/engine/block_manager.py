"""The books of the KV cache's blocks: who holds which block, who shares it, what it caches.

Only bookkeeping lives here: block ids, reference counts, prefix hashes, free lists. What has
to happen to the cache's tensors comes out as ``Orders`` (copy a block, move one to the host
tier or back), which the model runner carries out before the next forward.

A sequence's ``block_table`` lists the blocks its positions fill, taken one at a time as it
crosses a block boundary (``ensure``), so the blocks in use are what the sequences hold plus at
most one partly filled block each. Free blocks are handed out lowest id first, which keeps the
blocks in use packed at the front of the pool (the CPU's decode attention reads a range of it).

Prefix caching: every full block of a prompt, once computed, is registered under a hash of all
the tokens up to its end (equal hashes: equal keys and values, the same tokens at the same
positions). A new prompt whose leading blocks are registered points its table at them (their
reference count goes up) instead of computing them: a long system prompt shared by many
requests, or the ``n`` samples of one prompt, are stored once. A block whose count drops to 0
stays registered, *evictable*, until the pool needs it (least recently freed first). With a
host tier (``HostTier``) an evicted block's contents move there instead of being dropped, and
come back on a later hit.

A block is written only by a sequence that holds it alone: before a sequence writes into a
block it shares (reference count > 1), it gets a copy of its own (copy on write); writing into
a registered block it holds alone unregisters it.

Preemption frees a sequence's blocks (recompute: it will be computed again from its tokens) or
moves them to the host tier (swap) until the pool has room for it again.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from arlm.engine.sequence import Sequence


def block_hashes(token_ids: list[int], block_size: int, salt: bytes = b"") -> list[bytes]:
    """One hash per full block of ``token_ids``, each covering every token up to its end and
    ``salt``: what else decides its keys and values (the LoRA adapter computing them)."""
    hashes, prev = [], salt
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = array("q", token_ids[start : start + block_size]).tobytes()
        prev = hashlib.blake2b(prev + block, digest_size=16).digest()
        hashes.append(prev)
    return hashes


@dataclass
class Orders:
    """What the cache's tensors must undergo before the next forward: device blocks to host
    blocks (``to_host``: (device, host)), host blocks to device blocks (``from_host``: (host,
    device)), device copies (``copy``: (src, dst)). Every order reads the blocks as they were
    when the orders began (a block freed and taken again in one step is read before it is
    written), so the runner reads all sources first, then writes."""

    to_host: list[tuple[int, int]] = field(default_factory=list)
    from_host: list[tuple[int, int]] = field(default_factory=list)
    copy: list[tuple[int, int]] = field(default_factory=list)
    reserve: int = 0  # blocks 0..reserve-1 have been handed out: the pool must hold them

    def __bool__(self) -> bool:
        return bool(self.to_host or self.from_host or self.copy)


class HostTier:
    """The books of the host-memory tier's blocks: cached prefix blocks (by hash, evictable
    least recently used first) and the blocks of swapped-out sequences (held until resumed)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks))
        self.cached: OrderedDict[bytes, int] = OrderedDict()  # hash -> host block, LRU first
        self.hits = 0  # prefix blocks brought back from the tier

    def take(self) -> int | None:
        """A host block to write, evicting the least recently used cached one if need be."""
        if self.free:
            return self.free.pop()
        if self.cached:
            return self.cached.popitem(last=False)[1]
        return None

    def room(self) -> int:
        return len(self.free) + len(self.cached)


class BlockManager:
    """``num_blocks`` blocks of ``block_size`` positions; see the module docstring."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        prefix_caching: bool = True,
        host_blocks: int = 0,
        watermark: float = 0.01,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.ref = [0] * num_blocks
        self.free_ids = list(range(num_blocks))  # a heap: lowest id first
        self.cached: dict[bytes, int] = {}  # hash -> device block
        self.hash_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, count 0: oldest first
        self.host = HostTier(host_blocks) if host_blocks > 0 else None
        self.watermark = max(1, int(watermark * num_blocks))  # kept free when admitting
        self.orders = Orders()
        self.hit_tokens = self.queried_tokens = 0
        self.peak_in_use = 0
        self.high = 0  # one past the highest block id ever handed out

    # -- counts --------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, positions: int) -> int:
        return math.ceil(positions / self.block_size)

    def take_orders(self) -> Orders:
        """The orders made since the last call (the runner carries them out)."""
        orders, self.orders = self.orders, Orders()
        orders.reserve = self.high
        return orders

    # -- taking and releasing blocks -------------------------------------------------------

    def _take(self) -> int:
        if self.free_ids:
            block = heapq.heappop(self.free_ids)
        else:  # the least recently freed cached block; to the host tier if there is one
            block, _ = self.evictable.popitem(last=False)
            self._evict(block)
        self.ref[block] = 1
        self.high = max(self.high, block + 1)
        self._note_peak()
        return block

    def _evict(self, block: int) -> None:
        digest = self.hash_of.pop(block)
        del self.cached[digest]
        if self.host is not None and digest not in self.host.cached:
            host = self.host.take()
            if host is not None:
                self.host.cached[digest] = host
                self.orders.to_host.append((block, host))

    def _hold(self, block: int) -> None:
        if self.ref[block] == 0:
            del self.evictable[block]
        self.ref[block] += 1
        self._note_peak()

    def _release(self, block: int) -> None:
        self.ref[block] -= 1
        if self.ref[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                heapq.heappush(self.free_ids, block)

    def _note_peak(self) -> None:
        self.peak_in_use = max(self.peak_in_use, self.num_used_blocks)

    # -- sequences -------------------------------------------------------------------------

    def _hits(self, seq: Sequence) -> list[bytes]:
        """The leading prompt blocks of ``seq`` the prefix cache holds (device or host); at
        least the last prompt token is always computed, its logits give the next token."""
        if not self.prefix_caching:
            return []
        wanted = seq.block_hashes[: (seq.prompt_len - 1) // self.block_size]
        hits = []
        for digest in wanted:
            if digest not in self.cached and (self.host is None or digest not in self.host.cached):
                break
            hits.append(digest)
        return hits

    def can_allocate(self, seq: Sequence, watermark: bool = True) -> bool:
        """Whether the pool holds all of ``seq``'s tokens, past its prefix hits, and keeps the
        watermark free (so running sequences can still grow; with nothing running, ask without
        it, so that a prompt as long as the pool still runs)."""
        hits = self._hits(seq)
        on_device = sum(1 for d in hits if d in self.cached and self.ref[self.cached[d]] > 0)
        need = self.blocks_for(len(seq.token_ids)) - on_device
        return self.num_free_blocks - need >= (self.watermark if watermark else 0)

    def allocate(self, seq: Sequence) -> None:
        """Start ``seq``'s table with the blocks the prefix cache holds of its prompt."""
        for digest in self._hits(seq):
            block = self.cached.get(digest)
            if block is not None:
                self._hold(block)
            else:  # from the host tier into a new device block
                host = self.host.cached.pop(digest)  # not evicted by the block it frees
                block = self._take()
                self.host.cached[digest] = host  # most recently used
                self.orders.from_host.append((host, block))
                self.host.hits += 1
                self._register(block, digest)
            seq.block_table.append(block)
        seq.num_cached = len(seq.block_table) * self.block_size
        seq.cached_prompt_tokens = seq.num_cached
        self.hit_tokens += seq.num_cached
        self.queried_tokens += seq.prompt_len

    def ensure(self, seq: Sequence, end: int) -> bool:
        """Make ``seq``'s table cover positions up to ``end`` (exclusive), and the blocks it
        writes from ``seq.num_cached`` on its own; False, changing nothing, when the pool has
        too few free blocks."""
        bs = self.block_size
        first = seq.num_cached // bs
        shared = [
            j
            for j in range(first, min(len(seq.block_table), self.blocks_for(end)))
            if self.ref[seq.block_table[j]] > 1
        ]
        need = self.blocks_for(end) - len(seq.block_table) + len(shared)
        if need > self.num_free_blocks:
            return False
        for j in shared:  # copy on write
            old = seq.block_table[j]
            seq.block_table[j] = new = self._take()
            self.orders.copy.append((old, new))
            self._release(old)
        for j in range(first, len(seq.block_table)):  # its contents are about to change
            block = seq.block_table[j]
            if block in self.hash_of and seq.num_cached < (j + 1) * bs:
                del self.cached[self.hash_of.pop(block)]
        while len(seq.block_table) < self.blocks_for(end):
            seq.block_table.append(self._take())
        seq.peak_blocks = max(seq.peak_blocks, len(seq.block_table))
        return True

    def computed(self, seq: Sequence) -> None:
        """After a forward: register the prompt blocks now full."""
        if not self.prefix_caching:
            return
        full = min(seq.num_cached, seq.prompt_len) // self.block_size
        for j in range(min(full, len(seq.block_hashes))):
            block, digest = seq.block_table[j], seq.block_hashes[j]
            if block not in self.hash_of and digest not in self.cached:
                self._register(block, digest)

    def _register(self, block: int, digest: bytes) -> None:
        self.cached[digest] = block
        self.hash_of[block] = digest

    def truncate(self, seq: Sequence) -> None:
        """After ``seq`` was rolled back to ``seq.num_cached`` positions: release the blocks
        past them."""
        keep = self.blocks_for(seq.num_cached)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        """Release every block of ``seq``; registered ones stay cached until needed."""
        for block in reversed(seq.block_table):  # the tail first: evicted before the head
            self._release(block)
        seq.block_table = []

    # -- swapping --------------------------------------------------------------------------

    def can_swap_out(self, seq: Sequence) -> bool:
        return self.host is not None and self.host.room() - len(seq.block_table) >= 0

    def swap_out(self, seq: Sequence) -> None:
        """Move ``seq``'s blocks to the host tier and release them here."""
        seq.host_table = []
        for block in seq.block_table:
            host = self.host.take()
            self.orders.to_host.append((block, host))
            seq.host_table.append(host)
        self.free(seq)

    def can_swap_in(self, seq: Sequence) -> bool:
        """Room for ``seq``'s blocks and the next one it may take, past the watermark."""
        return self.num_free_blocks - len(seq.host_table) - 1 >= self.watermark

    def swap_in(self, seq: Sequence) -> None:
        """Bring ``seq``'s blocks back from the host tier."""
        for host in seq.host_table:
            block = self._take()
            self.orders.from_host.append((host, block))
            seq.block_table.append(block)
        self.release_host(seq)

    def release_host(self, seq: Sequence) -> None:
        """Return the host blocks of ``seq`` (swapped in, or finished while swapped out)."""
        self.host.free.extend(seq.host_table)
        seq.host_table = []

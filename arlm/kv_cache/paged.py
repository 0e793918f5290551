"""The paged cache: a pool of fixed-size blocks shared by many sequences, each at its own length.

A sequence owns a *block table*, the list of pool blocks holding its positions in order: position
``p`` lives in block ``table[p // block_size]`` at offset ``p % block_size``. Blocks are taken from
the pool as a sequence grows and returned when it is freed, so sequences of different lengths
share one pool without padding, and at most the last block of each sequence is partly empty.

Attention gathers each row's positions into a (batch, n_kv_head, S, head_dim) tensor, S the
longest row, and the mask hides a shorter row's padding: one batched forward serves rows at
their own positions (``start_pos`` a tensor of one position per row).
"""

from __future__ import annotations

import math

import torch

from arlm.config import ModelConfig
from arlm.kv_cache.base import Rotate, alloc_planes, causal_mask, planes_nbytes
from arlm.kv_cache.codec import Codec, FloatCodec


class OutOfBlocksError(RuntimeError):
    """The pool has fewer free blocks than a step needs; ``needed`` and ``free`` say how many."""

    def __init__(self, needed: int, free: int, total: int, block_size: int) -> None:
        super().__init__(
            f"the KV block pool is out of blocks: this step needs {needed} more blocks of "
            f"{block_size} positions but only {free} of {total} are free; free finished "
            "sequences or build a larger pool (num_blocks)"
        )
        self.needed, self.free = needed, free


class BlockPool:
    """The memory: per layer, planes of shape (num_blocks * block_size, n_kv_head, width), a
    slot per position, and the list of free blocks."""

    def __init__(
        self,
        n_layer: int,
        n_kv_head: int,
        head_dim: int,
        num_blocks: int,
        block_size: int = 16,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        codec: Codec | None = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks={num_blocks} and block_size={block_size} must be positive"
            )
        self.codec = codec or FloatCodec(dtype)
        self.dtype = dtype
        self.num_blocks, self.block_size = num_blocks, block_size
        lead = (num_blocks * block_size, n_kv_head)
        self.k = alloc_planes(self.codec, n_layer, lead, head_dim, device)
        self.v = alloc_planes(self.codec, n_layer, lead, head_dim, device)
        self._free = list(range(num_blocks - 1, -1, -1))  # popped from the end: low ids first
        self._in_use = [False] * num_blocks

    @property
    def device(self) -> torch.device:
        return self.k[0][0].device

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def nbytes(self) -> int:
        return planes_nbytes(self.k, self.v)

    @property
    def bytes_per_block(self) -> int:
        return self.nbytes // self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(n, len(self._free), self.num_blocks, self.block_size)
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._in_use[b] = True
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if not self._in_use[b]:
                raise ValueError(f"block {b} is not in use; a block can be freed only once")
            self._in_use[b] = False
            self._free.append(b)


class PagedKVCache:
    """Sequences over a ``BlockPool``. ``rows`` (set with ``set_rows``) are the sequences of the
    next forwards, in batch order; ``add_sequence`` and ``free_sequence`` start and end one."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}
        self.rows: list[int] = []
        self._next_id = 0
        self._write = self._read = torch.empty(0, dtype=torch.long)  # slots of this forward

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        codec: Codec | None = None,
    ) -> PagedKVCache:
        """``batch_size`` sequences as the rows, over a pool of ``num_blocks`` blocks (None:
        enough for every row to reach ``max_len``)."""
        if num_blocks is None:
            num_blocks = batch_size * math.ceil(max_len / block_size)
        pool = BlockPool(
            config.n_layer,
            config.n_kv_head,
            config.head_dim,
            num_blocks,
            block_size,
            device=device,
            dtype=dtype,
            codec=codec,
        )
        cache = cls(pool)
        cache.set_rows([cache.add_sequence() for _ in range(batch_size)])
        return cache

    def add_sequence(self) -> int:
        """Start an empty sequence; its id. It takes no block until positions are written."""
        seq_id, self._next_id = self._next_id, self._next_id + 1
        self.tables[seq_id], self.lengths[seq_id] = [], 0
        return seq_id

    def free_sequence(self, seq_id: int) -> None:
        """End a sequence and return its blocks to the pool."""
        self.pool.free(self.tables.pop(seq_id))
        del self.lengths[seq_id]
        if seq_id in self.rows:
            self.rows = [r for r in self.rows if r != seq_id]

    def set_rows(self, seq_ids: list[int]) -> None:
        unknown = [s for s in seq_ids if s not in self.tables]
        if unknown:
            raise ValueError(f"sequences {unknown} are not in this cache (ended or never added)")
        self.rows = list(seq_ids)

    def prepare(
        self, start_pos: int | torch.Tensor, T: int, rotate: Rotate | None = None
    ) -> torch.Tensor | None:
        B, bs = len(self.rows), self.pool.block_size
        if isinstance(start_pos, torch.Tensor):
            starts = start_pos.tolist()
            if len(starts) != B:
                raise ValueError(f"start_pos has {len(starts)} positions for {B} rows")
        else:
            starts = [start_pos] * B
        for seq, start in zip(self.rows, starts, strict=True):
            if not 0 <= start <= self.lengths[seq]:
                raise ValueError(
                    f"sequence {seq} holds positions 0..{self.lengths[seq] - 1}; a forward may "
                    f"start at 0..{self.lengths[seq]}, not at {start}"
                )
        # take every missing block before touching any table, so a failure changes nothing
        missing = [
            max(0, math.ceil((s + T) / bs) - len(self.tables[q]))
            for q, s in zip(self.rows, starts, strict=True)
        ]
        new_blocks = self.pool.allocate(sum(missing))
        for seq, start, n in zip(self.rows, starts, missing, strict=True):
            table = self.tables[seq]
            table.extend(new_blocks[:n])
            new_blocks = new_blocks[n:]
            keep = math.ceil((start + T) / bs)  # a rewrite from an earlier position drops the tail
            self.pool.free(table[keep:])
            del table[keep:]
            self.lengths[seq] = start + T

        device = self.pool.device
        ends = [s + T for s in starts]
        S = max(ends)
        n_blocks = math.ceil(S / bs)
        # (B, n_blocks) block ids; a shorter row is padded with block 0, hidden by the mask
        table = torch.tensor(
            [self.tables[q] + [0] * (n_blocks - len(self.tables[q])) for q in self.rows],
            device=device,
        )
        offsets = torch.arange(bs, device=device)
        self._read = (table[:, :, None] * bs + offsets).flatten(1)[:, :S]  # (B, S) slots
        start_t = torch.tensor(starts, device=device)
        pos = start_t[:, None] + torch.arange(T, device=device)  # (B, T)
        self._write = (table.gather(1, pos // bs) * bs + pos % bs).flatten()  # (B*T,)
        if len(set(starts)) == 1:
            return causal_mask(starts[0], T, device)
        keys = torch.arange(S, device=device)
        return (keys[None, None, :] <= pos[:, :, None])[:, None]  # (B, 1, T, S)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, _ = k.shape
        out = []
        for planes, x in ((self.pool.k[layer], k), (self.pool.v[layer], v)):
            for plane, part in zip(planes, self.pool.codec.encode(x), strict=True):
                plane[self._write] = part.transpose(1, 2).reshape(B * T, H, -1)
            # (B, S, n_kv_head, head_dim) -> (B, n_kv_head, S, head_dim)
            gathered = self.pool.codec.decode([p[self._read] for p in planes], self.pool.dtype)
            out.append(gathered.transpose(1, 2))
        return out[0], out[1]

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes

    @property
    def bytes_per_token(self) -> int:
        return self.pool.bytes_per_block // self.pool.block_size

    @property
    def tokens(self) -> int:
        return sum(self.lengths.values())

    @property
    def capacity(self) -> int:
        return self.pool.num_blocks * self.pool.block_size

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks in use, partly filled last blocks included."""
        return self.pool.num_used * self.pool.bytes_per_block

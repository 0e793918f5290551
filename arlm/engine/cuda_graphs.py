"""Engine steps replayed from CUDA graphs, one graph per token-count bucket.

A decode step of a small model is a few hundred kernel launches of a few microseconds each;
launched one by one from Python the GPU waits on the host for most of the step. Captured once
as a CUDA graph, the whole forward is one launch. A graph replays fixed tensors, so the inputs
live in static buffers (token ids, positions, block tables, the rows that sample) updated in
place before each replay, and a step of n tokens runs the graph of the smallest bucket >= n
with the extra rows padded: a padding row reads and writes only the cache's spare block and its
logits are dropped.

A row is one position of one sequence, whatever the step asks of it: a decode row's next
token, each position of speculative decoding's verify rows (a pending token and its guesses),
each token of a prompt chunk. Every layer writes all rows' keys and values before any row
attends, each row over its sequence's blocks up to its own position (``StaticDecode``), so a
guess, or a prompt token, reads the positions before it in the same step, as causal attention
over the chunk would. So the steps where prompts join running rows (every step of continuous
batching where a request arrives or a chunked prompt goes on) replay graphs too, as long as
their tokens fit the largest bucket (``max_cudagraph_capture_size``); larger steps, mostly
prefill, run eagerly, where attention over a chunk reads its history once for all its
queries. In the graphs a span's rows (a chunk's tokens, a verify row's positions) reach the
decode kernel in tiles of up to 16 query vectors (``decode_attention.row_tiles``: 4 rows for
Llama's 4 query heads per KV head), each tile reading the history once. The lm head runs
only at the rows that sample (at most ``max_logits``).

The same object runs the same padded forward eagerly where there is no CUDA (``capture``
False), which is how the CPU tests check that padding and bucketing change no row's output.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import torch

from arlm.devices import int64_tensor
from arlm.kv_cache.decode_attention import row_tiles, rows_per_tile
from arlm.kv_cache.paged import PagedKVCache, PagedRow, StaticDecode
from arlm.model.multi_lora import AdapterRows
from arlm.model.transformer import Transformer

# the static inputs' columns, per row: token id, position, how far its sequence reaches in the
# step (LongRoPE picks its factors by it), which row's logits come i-th (row i's entry, for i
# below the bucket's logit rows), the decode kernel's i-th tile (first row, rows: columns TILE
# and TILE + 1), the cell its key and value go to (``StaticDecode``'s ``writes``: worked out on
# the host, where it is a few vector ops a step, not ten launches in the graph), its LoRA
# adapter's slot (-1: none; ``arlm.model.multi_lora``), then the block table from column TABLE on
SELECT, TILE, WRITE, ADAPTER, TABLE = 3, 4, 6, 7, 8

log = logging.getLogger("arlm.engine")


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256 and every 16 past it, up to ``max_batch`` (itself the
    last), as vLLM's capture sizes: a step pads at most 7 rows past 8, 15 past 256."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, min(max_batch, 256), 8))
    sizes += list(range(256, max_batch, 16))
    return [*sizes, max_batch]


class DecodeGraphs:
    """Forwards of ``model`` over ``cache`` for up to ``max_batch`` rows (positions), the head
    at up to ``max_logits`` of them (default: all); see the module docstring."""

    def __init__(
        self,
        model: Transformer,
        cache: PagedKVCache,
        max_batch: int,
        max_blocks: int,
        *,
        capture: bool,
        compile: bool = False,
        max_logits: int | None = None,
        adapters: AdapterRows | None = None,
    ) -> None:
        if not cache.static_decode:
            raise ValueError("decode graphs need a spare block and every block allocated")
        self.model, self.cache, self.adapters = model, cache, adapters
        self.buckets = batch_buckets(max_batch)
        self.max_logits = min(max_logits or max_batch, max_batch)
        self._tile_rows = rows_per_tile(model.config.n_head // model.config.n_kv_head)
        device = cache.device
        largest = self.buckets[-1]
        # per row: the columns before TABLE, then its block table (``max_blocks`` wide);
        # padding rows at position 0 of the spare block, a tile each (the captures' warm-up
        # runs these)
        self._inputs = torch.zeros(largest, TABLE + max_blocks, dtype=torch.long, device=device)
        self._row_tiles = torch.stack(
            [torch.arange(largest), torch.ones(largest, dtype=torch.long)], 1
        )
        self._inputs[:, TILE : TILE + 2] = self._row_tiles
        self._inputs[:, WRITE] = self._spare_cell = cache.spare * cache.n_kv_head * cache.block_size
        self._inputs[:, ADAPTER] = -1
        self._inputs[:, TABLE:] = cache.spare
        # A step writes only the columns its rows' tables reach (a row reads its table up to
        # its own position, never the stale entries past it): rows x (TABLE + the longest
        # table), laid out contiguous in a host buffer, copied in one transfer to a device
        # buffer and from there into the inputs, so a step's host work and bytes follow its
        # tables' lengths, not max_model_len (whose tables are 8,192 blocks wide at 131,072
        # positions). Two host buffers, taken in turn: with overlap scheduling the host fills
        # the next step's while the copy from this one may still be queued (arlm.engine.overlap)
        size = largest * (TABLE + max_blocks)
        self._staging = [torch.zeros(size, dtype=torch.long, pin_memory=capture) for _ in "ab"]
        self._landing = torch.zeros(size, dtype=torch.long, device=device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0
        self.capture_bytes = 0
        self.steps = 0  # decode steps run through the static buffers
        # compiled: one graph for every bucket (the batch size symbolic), its elementwise work
        # (norms, rotary, activations, residuals) fused into fewer kernels, before any capture
        self._step = torch.compile(self._forward, dynamic=True) if compile else self._forward
        if capture:
            self._capture()

    def _forward(self, batch: int) -> torch.Tensor:
        rows = self._inputs[:batch]
        tokens, positions, ends, tables = rows[:, 0], rows[:, 1], rows[:, 2], rows[:, TABLE:]
        select = rows[: min(batch, self.max_logits), SELECT]
        step = StaticDecode(self.cache, tables, positions, rows[:, WRITE], rows[:, TILE : TILE + 2])
        # with adapters loaded every step computes their updates, masked per row: the same
        # kernels whichever rows use which (or none)
        adapters = nullcontext() if self.adapters is None else self.adapters.using(rows[:, ADAPTER])
        with adapters:
            logits, _ = self.model(
                tokens[None],
                kv_cache=step,
                positions=positions[None],
                seq_ends=ends[None],
                logits_at=select,
            )
        return logits[0].float()  # (logit rows, vocab)

    @torch.inference_mode()
    def _capture(self) -> None:
        """Capture every bucket, the largest first so the smaller ones reuse its memory pool."""
        start, before = time.perf_counter(), torch.cuda.memory_reserved(self.cache.device)
        side = torch.cuda.Stream(self.cache.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: kernels compiled, workspaces allocated
            for batch in self.buckets[::-1]:
                self._step(batch)
        torch.cuda.current_stream().wait_stream(side)
        pool = None
        for batch in self.buckets[::-1]:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[batch] = self._step(batch)
            pool = graph.pool()
            self._graphs[batch] = graph
        torch.cuda.synchronize(self.cache.device)
        self.capture_seconds = time.perf_counter() - start
        self.capture_bytes = torch.cuda.memory_reserved(self.cache.device) - before
        log.info(
            "captured %d CUDA graphs (steps of 1 to %d positions) in %.1f s, %.0f MiB",
            len(self._graphs),
            self.max_rows,
            self.capture_seconds,
            self.capture_bytes / 2**20,
        )

    @property
    def max_rows(self) -> int:
        """The most rows a step can have: the largest bucket."""
        return self.buckets[-1]

    def takes(self, rows: int, logits: int) -> bool:
        """Whether a step of ``rows`` positions, ``logits`` of them sampling, fits."""
        return rows <= self.max_rows and logits <= self.max_logits

    def bucket(self, rows: int) -> int:
        """The batch size a step of ``rows`` rows runs at."""
        return next(b for b in self.buckets if b >= rows)

    @torch.inference_mode()
    def run(
        self,
        spans: list[PagedRow],
        tokens: list[int],
        select: list[int],
        fed: torch.Tensor | None = None,
        adapters: list[int] | None = None,
    ) -> torch.Tensor:
        """The logits (len(select), vocab) at rows ``select`` of one step whose rows are each
        span's positions in turn: span s feeds positions ``s.start .. s.end - 1`` of the
        sequence whose block table is ``s.blocks`` (a decode row one, a verify row its pending
        token and guesses, a prompt chunk its tokens), reaching ``s.end`` in this step. The
        first ``len(fed)`` rows' tokens are ``fed``, on the device (ids the step before
        sampled: ``arlm.engine.overlap``); the other rows' are ``tokens``, in order.
        ``adapters``: each row's LoRA adapter slot (None: none uses one)."""
        counts = [s.length for s in spans]
        rows, lengths = sum(counts), [len(s.blocks) for s in spans]
        num_fed = 0 if fed is None else len(fed)
        batch, picked = self.bucket(rows), len(select)
        spare, used = self.cache.spare, max(lengths)
        cols = TABLE + used
        staging = self._staging[self.steps % 2][: batch * cols].view(batch, cols)
        self.steps += 1
        # the kernel's tiles: a span's rows share a table, the padding rows the spare block's;
        # the leading decode rows' (a row each) copied from a ready tensor, the rest built
        lone = next((i for i, n in enumerate(counts) if n != 1), len(counts))
        tiles = row_tiles([*counts[lone:], batch - rows], self._tile_rows, first_row=lone)
        # every number the step needs, converted at once: tokens, positions, how far each
        # row's sequence reaches, the rows that sample, the tiles, the tables' lengths, their
        # blocks
        ints = int64_tensor(
            [
                *tokens,
                *(p for s in spans for p in range(s.start, s.end)),
                *(s.end for s in spans for _ in range(s.length)),
                *select,
                *tiles,
                *lengths,
                *(b for s in spans for b in s.blocks),
                *(adapters or ()),
            ]
        )
        sizes = [len(tokens), rows, rows, picked, len(tiles), len(spans), sum(lengths)]
        sizes.append(len(adapters or ()))
        split = ints.split(sizes)
        tokens_in, positions, ends, picks, tiles_in, table_lengths, blocks, slots = split
        staging[rows:, :TABLE] = 0
        staging[rows:, WRITE] = self._spare_cell
        staging[rows:, TABLE:] = spare
        staging[num_fed:rows, 0] = tokens_in
        staging[:rows, 1] = positions
        staging[:rows, 2] = ends
        if adapters is not None:  # else the column is never read
            staging[:rows, ADAPTER] = slots
            staging[rows:, ADAPTER] = -1
        staging[:picked, SELECT] = picks
        staging[picked:, SELECT] = 0  # padding: row 0's logits again, dropped
        num_tiles = lone + len(tiles) // 2
        staging[:lone, TILE : TILE + 2] = self._row_tiles[:lone]
        staging[lone:num_tiles, TILE : TILE + 2] = tiles_in.view(-1, 2)
        staging[num_tiles:, TILE : TILE + 2] = 0  # past the last tile: no rows
        # each span's table, padded with the spare block to the longest
        tables = torch.full((len(spans), used), spare)
        tables[torch.arange(used) < table_lengths[:, None]] = blocks
        if rows > len(spans):  # a table per position
            tables = tables.repeat_interleave(torch.tensor(counts), dim=0)
        staging[:rows, TABLE:] = tables
        staging[:rows, WRITE] = self.cache.write_cells(tables, positions)
        # this buffer is filled again two steps on; by then the host has waited for the ids
        # sampled after this copy, which is queued before them
        landing = self._landing[: batch * cols].view(batch, cols)
        landing.copy_(staging, non_blocking=True)
        self._inputs[:batch, :cols].copy_(landing)
        if num_fed:
            self._inputs[:num_fed, 0].copy_(fed)
        if batch in self._graphs:
            self._graphs[batch].replay()
            return self._logits[batch][:picked]
        return self._step(batch)[:picked]

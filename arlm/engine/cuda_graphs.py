"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model is a few hundred kernel launches of a few microseconds each;
launched one by one from Python the GPU waits on the host for most of the step. Captured once
as a CUDA graph, the whole forward is one launch. A graph replays fixed tensors, so the inputs
live in static buffers (token ids, positions, block tables) updated in place before each
replay, and a step of n rows runs the graph of the smallest bucket >= n with the extra rows
padded: a padding row reads and writes only the cache's spare block and its logits are dropped.

A row is one position: speculative decoding's verify rows (a pending token and its guesses)
run as one row per position, each with its sequence's block table. Every layer writes all rows'
keys and values before any row attends, so a guess's row reads the positions before it in the
same step, as causal attention over the chunk would.

The same object runs the same padded forward eagerly where there is no CUDA (``capture``
False), which is how the CPU tests check that padding and bucketing change no row's output.
"""

from __future__ import annotations

import time

import torch

from arlm.kv_cache.paged import PagedKVCache, StaticDecode
from arlm.model.transformer import Transformer

# the static inputs' columns, per row: token id, position, how far its sequence reaches in the
# step (LongRoPE picks its factors by it), then the block table from column TABLE on
TABLE = 3


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to ``max_batch`` (itself the last), as vLLM's capture sizes:
    a step pads at most 7 rows past 8."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, max_batch, 8))
    return [*sizes, max_batch]


class DecodeGraphs:
    """Decode-only forwards of ``model`` over ``cache`` for up to ``max_batch`` rows; see the
    module docstring."""

    def __init__(
        self,
        model: Transformer,
        cache: PagedKVCache,
        max_batch: int,
        max_blocks: int,
        *,
        capture: bool,
        compile: bool = False,
    ) -> None:
        if not cache.static_decode:
            raise ValueError("decode graphs need a spare block and every block allocated")
        self.model, self.cache = model, cache
        self.buckets = batch_buckets(max_batch)
        device = cache.device
        largest = self.buckets[-1]
        # per row: the columns before TABLE, then its block table (``max_blocks`` wide);
        # padding rows at position 0 of the spare block
        width = TABLE + max_blocks
        self._inputs = torch.zeros(largest, width, dtype=torch.long, device=device)
        self._inputs[:, TABLE:] = cache.spare
        # two host buffers, taken in turn: with overlap scheduling the host fills the next
        # step's while the copy from this one may still be queued (arlm.engine.overlap)
        self._staging = []
        for _ in range(2):
            staging = torch.zeros(largest, width, dtype=torch.long, pin_memory=capture)
            staging[:, TABLE:] = cache.spare
            self._staging.append(staging)
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
        step = StaticDecode(self.cache, tables, positions)
        logits, _ = self.model(
            tokens[None], kv_cache=step, positions=positions[None], seq_ends=ends[None]
        )
        return logits[0].float()  # (batch, vocab)

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

    @property
    def max_rows(self) -> int:
        """The most rows a step can have: the largest bucket."""
        return self.buckets[-1]

    def bucket(self, rows: int) -> int:
        """The batch size a step of ``rows`` rows runs at."""
        return next(b for b in self.buckets if b >= rows)

    @torch.inference_mode()
    def run(
        self,
        tokens: list[int],
        positions: list[int],
        tables: list[list[int]],
        ends: list[int],
        fed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The next-token logits (rows, vocab) of one decode row per position: row i feeds its
        token at ``positions[i]`` through its block table ``tables[i]``, its sequence reaching
        ``ends[i]`` in this step (its position + 1; a verify row's, the last guess's). The
        first ``len(fed)`` rows' tokens are ``fed``, on the device (ids the step before
        sampled: ``arlm.engine.overlap``); the other rows' are ``tokens``, in order."""
        rows, num_fed = len(positions), 0 if fed is None else len(fed)
        batch = self.bucket(rows)
        staging = self._staging[self.steps % 2]
        self.steps += 1
        staging[rows:batch, :TABLE] = 0
        staging[rows:batch, TABLE:] = self.cache.spare
        if num_fed < rows:
            staging[num_fed:rows, 0] = torch.tensor(tokens)
        staging[:rows, 1] = torch.tensor(positions)
        staging[:rows, 2] = torch.tensor(ends)
        width, spare = staging.size(1) - TABLE, self.cache.spare
        staging[:rows, TABLE:] = torch.tensor([t + [spare] * (width - len(t)) for t in tables])
        # this buffer is filled again two steps on; by then the host has waited for the ids
        # sampled after this copy, which is queued before them
        self._inputs[:batch].copy_(staging[:batch], non_blocking=True)
        if num_fed:
            self._inputs[:num_fed, 0].copy_(fed)
        if batch in self._graphs:
            self._graphs[batch].replay()
            return self._logits[batch][:rows]
        return self._step(batch)[:rows]

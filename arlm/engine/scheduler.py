"""Which sequences run in the next forward, and how many of their positions.

First come, first served. Every step decodes every running sequence (one position each), then
gives what is left of the token budget ``max_num_batched_tokens`` to prompts: first to running
sequences still prefilling, then to waiting ones it admits, at most ``max_num_seqs`` running.
A prompt longer than what is left is split over several steps (chunked prefill), so a long
prompt delays the others' next token by one chunk's forward, not by its whole prefill.

A running sequence holds a slot sized for the longest sequence the engine accepts, so it
never runs out of room mid-generation: there is nothing to preempt, and when memory is short
requests wait for a slot instead (``arlm.engine.block_manager`` says why slots).

A waiting prompt whose first block a running sequence is still prefilling waits until that
prefill is done, then finds those blocks in the prefix cache: ``n`` samples of one prompt, or
many requests with one system prompt, compute their shared head once.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from arlm.engine.block_manager import BlockManager
from arlm.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One forward: ``decode`` rows feed one position; ``prefill`` rows feed ``n`` positions
    from their ``num_cached``."""

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


class Scheduler:
    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int
    ) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={max_num_batched_tokens} must be at least "
                f"max_num_seqs={max_num_seqs}: every running sequence decodes in every step"
            )
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for seq in self.running:
            if seq.num_pending == 1:
                batch.decode.append(seq)
        budget -= len(batch.decode)
        for seq in self.running:
            if seq.num_pending > 1 and budget > 0:
                n = min(seq.num_pending, budget)
                batch.prefill.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq) or self._head_in_prefill(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status, seq.scheduled_time = Status.RUNNING, time.perf_counter()
            self.running.append(seq)
            n = min(seq.num_pending, budget)
            batch.prefill.append((seq, n))
            budget -= n
        return batch

    def _head_in_prefill(self, seq: Sequence) -> bool:
        if not self.block_manager.prefix_caching or not seq.block_hashes:
            return False
        head = seq.block_hashes[0]
        return any(
            r.num_cached < r.prompt_len and r.block_hashes[:1] == [head] for r in self.running
        )

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out of the queues and free its slot."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.block_manager.free(seq)

"""Which sequences run in the next forward, and how many of their positions.

First come, first served. Every step decodes every running sequence (one position each), then
gives what is left of the token budget ``max_num_batched_tokens`` to prompts: first to running
sequences still prefilling, then to swapped-out ones coming back, then to waiting ones it
admits, at most ``max_num_seqs`` running. A prompt longer than what is left is split over
several steps (chunked prefill), so a long prompt delays the others' next token by one chunk's
forward, not by its whole prefill.

Memory is counted in blocks (``arlm.engine.block_manager``): a waiting sequence is admitted
when the pool holds all its tokens past its prefix-cache hits and keeps a small watermark free;
a running one takes a block when it crosses a block boundary. When the pool runs out
mid-generation, the most recently admitted running sequence is *preempted*, until the others
fit: by swap (its blocks to the host tier, back when there is room) where the host tier has room
for it and ``preemption_mode`` allows, else by recompute (its blocks freed; it goes back to the
front of the queue and its prompt and output so far are prefilled again). Either way it goes
on with exactly the tokens it would have produced alone: its sampler, generator and loop state
are untouched, and the recomputed positions are not sampled again. No sequence is admitted in a
step that preempted.

A waiting prompt whose first block a running sequence is still prefilling waits until that
prefill is done, then finds those blocks in the prefix cache: ``n`` samples of one prompt, or
many requests with one system prompt, compute and store their shared head once.

While a step's sampled ids are still on their way to the host (overlap scheduling,
``arlm.engine.overlap``), ``schedule_beside`` schedules the next step the same way around the
rows that sampled them, preempting no one.

With ``block_manager`` None (the windowed cache: one sequence, memory fixed by its window)
there is nothing to count.

With LoRA adapters (``arlm.model.adapter_store``), a sequence is admitted once its adapter is
in one of the model's slots, written over a slot no running sequence holds if need be; one
whose adapter finds no slot waits, and those behind it that fit go ahead (as vLLM's scheduler
skips them), so a step never mixes more adapters than there are slots: requests queued
together are served an adapter's group at a time. Passed over in ``MAX_PASSES`` steps, it
holds back the adapter sequences that came after it was first passed over, so that a steady
stream of requests on the adapters in slots cannot keep it waiting forever: the slots'
sequences finish, and it takes one.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from arlm.engine.block_manager import BlockManager
from arlm.engine.sequence import Sequence, Status
from arlm.model.adapter_store import AdapterStore

PREEMPTION_MODES = ("auto", "recompute", "swap")
# steps a waiting sequence whose LoRA adapter has no slot lets those behind it go first
MAX_PASSES = 64


@dataclass
class ScheduledBatch:
    """One forward: ``decode`` rows feed one position; ``prefill`` rows feed ``n`` positions
    from their ``num_cached``; ``verify`` rows feed their pending token and their guessed ones
    (speculative decoding, ``arlm.engine.speculation``)."""

    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)
    verify: list[tuple[Sequence, list[int]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        spec = sum(1 + len(g) for _, g in self.verify)
        return len(self.decode) + sum(n for _, n in self.prefill) + spec

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill or self.verify)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager | None,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        preemption_mode: str = "auto",
        adapters: AdapterStore | None = None,
    ) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={max_num_batched_tokens} must be at least "
                f"max_num_seqs={max_num_seqs}: every running sequence decodes in every step"
            )
        if preemption_mode not in PREEMPTION_MODES:
            raise ValueError(
                f"preemption_mode={preemption_mode!r} is not one of {', '.join(PREEMPTION_MODES)}"
            )
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        # the most positions a step with running rows takes, where less than the budget: the
        # largest CUDA graph (Engine.use_decode_graphs), so that a prompt joining running rows
        # goes in chunks that keep their steps in the graphs rather than one eager step
        self.mixed_step_tokens: int | None = None
        self.preemption_mode = preemption_mode
        self.adapters = adapters
        self.max_passes = MAX_PASSES
        self.waiting: deque[Sequence] = deque()
        self.swapped: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = self.num_swaps = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def schedule(self, guesses: dict[Sequence, list[int]] | None = None) -> ScheduledBatch:
        """The next forward's rows. ``guesses``: speculative tokens for decoding sequences; a
        decode row verifies them where the token budget and free blocks allow."""
        batch = ScheduledBatch()
        short = False  # a sequence had no room: someone was preempted
        for seq in list(self.running):  # oldest first
            if seq.status is Status.RUNNING and seq.num_pending == 1:
                if self._room(seq, len(seq.token_ids)):
                    batch.decode.append(seq)
                else:
                    short = True
        budget = self._step_tokens(batch) - len(batch.decode)
        if guesses and not short:
            budget = self._speculate(batch, guesses, budget)
        left = self._prefills(batch, budget, preempt=True)
        if short or left is None:  # a sequence scheduled above may have been preempted since
            batch.decode = [s for s in batch.decode if s.status is Status.RUNNING]
            batch.prefill = [(s, n) for s, n in batch.prefill if s.status is Status.RUNNING]
            batch.verify = [(s, g) for s, g in batch.verify if s.status is Status.RUNNING]
            return batch
        self._admit(batch, left)
        return batch

    def schedule_beside(
        self, rows: list[Sequence], ending: int, admits: Callable[[Sequence], bool]
    ) -> ScheduledBatch | None:
        """The forward after one still in flight (``arlm.engine.overlap``): ``rows``, running
        sequences whose next token is that forward's and not yet here, one position each; the
        running ones whose one next id is on the host (rolled back while in flight), one
        position each; then prompts as ``schedule`` gives them the budget, only admitting
        sequences ``admits`` allows (the first it refuses waits, and those behind it).
        ``ending`` running sequences end with the token in flight (by length): their seats may
        be taken. Nothing is preempted, as the sequence to go could be one in flight: None
        where a row would need that."""
        bm = self.block_manager
        if not all(bm.ensure(seq, seq.num_cached + 1) for seq in rows):
            return None
        batch = ScheduledBatch(decode=list(rows))
        for seq in self.running:  # rows in flight have no id pending on the host yet
            if seq.status is Status.RUNNING and seq.num_pending == 1:
                if not bm.ensure(seq, len(seq.token_ids)):
                    return None
                batch.decode.append(seq)
        budget = self._step_tokens(batch) - len(batch.decode)
        left = self._prefills(batch, budget, preempt=False)
        if left is None:
            return None
        self._admit(batch, left, admits, ending)
        return batch

    def _step_tokens(self, batch: ScheduledBatch) -> int:
        """The positions a step may hold, given its decode rows."""
        if batch.decode and self.mixed_step_tokens is not None:
            return min(self.max_num_batched_tokens, self.mixed_step_tokens)
        return self.max_num_batched_tokens

    def _prefills(self, batch: ScheduledBatch, budget: int, preempt: bool) -> int | None:
        """Schedule the running sequences still prefilling, as far as ``budget`` goes; the
        budget left, or None when one had no room (preempting others first if ``preempt``)."""
        short = False
        for seq in list(self.running):
            if seq.status is Status.RUNNING and seq.num_pending > 1 and budget > 0:
                n = min(seq.num_pending, budget)
                if self._room(seq, seq.num_cached + n, preempt):
                    batch.prefill.append((seq, n))
                    budget -= n
                else:
                    short = True
        return None if short else budget

    def _admit(
        self,
        batch: ScheduledBatch,
        budget: int,
        admits: Callable[[Sequence], bool] | None = None,
        ending: int = 0,
    ) -> None:
        """Bring in swapped-out, then waiting sequences, first come first served, while the
        budget, ``max_num_seqs`` (``ending`` of the running not counted), the pool and
        ``admits`` allow; a waiting one whose LoRA adapter has no slot now is passed over."""
        bm = self.block_manager
        limit = self.max_num_seqs + ending
        hold_after = math.inf  # adapter sequences that came later wait behind a starved one
        while self.swapped and budget > 0 and len(self.running) < limit:
            seq = self.swapped[0]
            if not bm.can_swap_in(seq) or (admits is not None and not admits(seq)):
                return
            if not self._place_adapter(seq):  # swapped out first: no one passes it
                hold_after = seq.arrival_time
                break
            self.swapped.popleft()
            bm.swap_in(seq)
            bm.ensure(seq, len(seq.token_ids))  # can_swap_in counted its next block
            self._run(seq)
            batch.decode.append(seq)  # swapped out while decoding: one position pending
            budget -= 1
        passed_over = []
        while self.waiting and budget > 0 and len(self.running) < limit:
            seq = self.waiting[0]
            fits = bm is None or bm.can_allocate(seq, watermark=bool(self.running))
            if not fits or (bm is not None and self._head_in_prefill(seq)):
                break
            if admits is not None and not admits(seq):
                break
            if seq.adapter is not None and (
                seq.arrival_time > hold_after or not self._place_adapter(seq)
            ):
                if seq.passed_since is None:
                    seq.passed_since = time.perf_counter()
                seq.passes += 1
                if seq.passes > self.max_passes:
                    hold_after = min(hold_after, seq.passed_since)
                passed_over.append(self.waiting.popleft())
                continue
            self.waiting.popleft()
            if bm is not None:
                bm.allocate(seq)
            n = min(seq.num_pending, budget)
            if bm is not None:
                bm.ensure(seq, seq.num_cached + n)  # can_allocate counted all its tokens
            self._run(seq)
            batch.prefill.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(passed_over))

    def _place_adapter(self, seq: Sequence) -> bool:
        """Whether ``seq``'s LoRA adapter (if any) is in a slot now, for it to run on:
        written into one that no running sequence holds where it is in none."""
        if seq.adapter is None:
            return True
        slot = self.place_adapter(seq.adapter)
        if slot is None:
            return False
        seq.adapter_slot = slot
        return True

    def place_adapter(self, name: str) -> int | None:
        """The slot of the LoRA adapter ``name``, written over one that no running sequence
        holds where it is in none; None when each slot holds another's running sequences."""
        pinned = {s.adapter_slot for s in self.running if s.adapter is not None}
        return self.adapters.place(name, pinned)

    def next_admission(self) -> Sequence | None:
        """The swapped-out or waiting sequence the next ``schedule`` would bring in first (the
        same first-come test it makes, on the queues' heads), or None."""
        if len(self.running) >= self.max_num_seqs:
            return None
        bm = self.block_manager
        if self.swapped:
            head = self.swapped[0]
            return head if bm.can_swap_in(head) else None
        if not self.waiting:
            return None
        head = self.waiting[0]
        if bm is None:
            return head
        fits = bm.can_allocate(head, watermark=bool(self.running))
        return head if fits and not self._head_in_prefill(head) else None

    def _speculate(self, batch: ScheduledBatch, guesses: dict, budget: int) -> int:
        """Turn decode rows with guesses into verify rows, the guesses cut to the token budget
        left and to blocks free past the admission watermark (a guess never preempts anyone);
        the budget left after them."""
        bm, decode = self.block_manager, []
        for seq in batch.decode:
            extra = guesses.get(seq, [])[: max(budget, 0)]
            if extra and bm is not None:
                need = bm.blocks_for(len(seq.token_ids) + len(extra)) - len(seq.block_table)
                if bm.num_free_blocks - need < bm.watermark or not bm.ensure(
                    seq, len(seq.token_ids) + len(extra)
                ):
                    extra = []
            if extra:
                batch.verify.append((seq, extra))
                budget -= len(extra)
            else:
                decode.append(seq)
        batch.decode = decode
        return budget

    def _run(self, seq: Sequence) -> None:
        if seq.scheduled_time is None:
            seq.scheduled_time = time.perf_counter()
        seq.status = Status.RUNNING
        self.running.append(seq)

    def _room(self, seq: Sequence, end: int, preempt: bool = True) -> bool:
        """Blocks for ``seq`` up to position ``end``, preempting the most recently admitted
        sequences until they fit; False when ``seq`` itself had to go (or, without ``preempt``,
        when they do not fit now)."""
        bm = self.block_manager
        if bm is None:
            return True
        while not bm.ensure(seq, end):
            if not preempt:
                return False
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        bm = self.block_manager
        self.running.remove(seq)
        self.num_preemptions += 1
        swap = self.preemption_mode != "recompute" and seq.num_pending == 1
        if swap and bm.can_swap_out(seq):
            bm.swap_out(seq)
            seq.status = Status.SWAPPED
            self.swapped.append(seq)
            self.num_swaps += 1
            return
        if self.preemption_mode == "swap":
            raise RuntimeError(
                "preemption_mode='swap' needs room in the host tier for the preempted "
                f"sequence's {len(seq.block_table)} blocks; raise kv_offload_gib or use 'auto'"
            )
        bm.free(seq)
        seq.num_cached = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _head_in_prefill(self, seq: Sequence) -> bool:
        if not self.block_manager.prefix_caching or not seq.block_hashes:
            return False
        head = seq.block_hashes[0]
        return any(
            r.num_cached < r.prompt_len and r.block_hashes[:1] == [head] for r in self.running
        )

    def finish(self, seq: Sequence) -> None:
        """Take a finished (or aborted) sequence out of the queues and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.SWAPPED:
            self.swapped.remove(seq)
            self.block_manager.release_host(seq)
        seq.status = Status.FINISHED
        if self.block_manager is not None:
            self.block_manager.free(seq)

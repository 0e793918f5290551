"""Overlap scheduling: step N+1 is scheduled and launched while the device still runs step N.

A plain step waits for its sampled ids to reach the host before anything else happens: the
host appends them, detokenizes, checks stop strings and lengths, then schedules and launches
the next forward, and the GPU idles through all of it. Most of that work does not need step
N's ids. When every row of a step draws its token on the device with no host-side state in the
way (``overlappable``: no loop guard, and processors, if any, that take a token still on the
device; a prompt chunk also scores nothing: ``joinable``), its ids stay on the device with
their copy to the host queued (``TokenChain.launch``), and the next ``Engine.step``:

1. schedules the same rows one position further, their blocks ensured, and what is left of
   the token budget to prompts, as a plain step would: chunks of prompts still prefilling, and
   sequences that join (``Scheduler.schedule_beside``);
2. launches that forward, with step N's ids fed from the device (``ModelRunner.run(fed=)``)
   and the prompts' from the host;
3. only then waits for step N's ids and runs their host side (``TokenChain.land``) while the
   device computes step N+1.

So a step's tokens are handed out one ``step`` call after the forward that made them.
A row that step N's token ends (an end id, a stop string, an abort) has computed one position
in step N+1 for nothing; that result is dropped, and its blocks were freed in stream order
after it. Rows that step N's token ends by length are known before and left out. Anything else
ends the overlap for one step, which then lands step N first and runs as before: a row that
must wait for blocks (the plain step preempts), or a row, or a sequence next in line to join,
with DRY, n-gram bans, a grammar, a loop guard or prompt log-probabilities. Speculative
decoding builds its guesses from the ids themselves, and tensor parallelism sends them to the
other ranks: neither overlaps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from arlm.devices import to_device
from arlm.engine.block_manager import Orders
from arlm.engine.scheduler import ScheduledBatch
from arlm.engine.sequence import Sequence
from arlm.engine.token_chain import DrawnTokens

if TYPE_CHECKING:
    from arlm.engine.engine import Engine

# emit(seq, chunks): hand a landed row's output to the engine
Emit = Callable[[Sequence, list], None]


def overlappable(seq: Sequence) -> bool:
    """Whether ``seq``'s next token can be drawn and fed on with no host step between: no loop
    guard (its bans and breaks follow every token), and only logits processors that can take
    a token still on the device (bias, min_tokens and the penalties can; DRY, n-gram bans and
    grammars read the ids on the host)."""
    return seq.guard is None and seq.sampler.pushable


def joinable(seq: Sequence) -> bool:
    """Whether ``seq`` can run a prompt chunk in a step whose ids stay in flight:
    ``overlappable``, and not scoring its prompt (prompt log-probabilities are recorded on the
    host after their forward)."""
    return overlappable(seq) and seq.params.prompt_logprobs is None


def overlap_for(engine: Engine, wanted: bool | None, tensor_parallel: bool) -> Overlap | None:
    """``engine``'s overlap, or None where its steps do not overlap. ``wanted`` is
    ``EngineConfig.async_scheduling``: None overlaps on CUDA wherever the engine can (a CPU runs
    the forward itself, so there is nothing to overlap); True where it cannot is refused."""
    refused = None
    if engine.block_manager is None:
        refused = "the windowed KV cache (kv_window), which feeds one sequence from the host"
    elif engine.speculator is not None:
        refused = "speculative decoding, whose guesses are made from the ids just sampled"
    elif tensor_parallel:
        refused = "tensor parallelism, which sends each step's ids to the other ranks"
    if wanted and refused:
        raise ValueError(f"async_scheduling does not run with {refused}")
    if wanted is None:
        wanted = engine.device.type == "cuda" and refused is None
    return Overlap(engine) if wanted else None


class Overlap:
    """The step in flight of one engine (see the module docstring); ``steps`` counts the steps
    launched before the one before them had landed."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.in_flight: DrawnTokens | None = None
        self.steps = 0

    def launch(self, batch: ScheduledBatch, orders: Orders | None) -> bool:
        """Run ``batch`` and leave its ids in flight when its rows can all go on without the
        host (``overlappable`` decode rows, ``joinable`` prompts, no verify rows); False,
        having run nothing, otherwise."""
        if batch.verify or not all(overlappable(s) for s in batch.decode):
            return False
        if not all(joinable(s) for s, _ in batch.prefill):
            return False
        self.in_flight = self._run(batch, orders, None)
        return True

    def follow(self, emit: Emit) -> bool:
        """Launch the next step over the rows in flight where it can, then land the step in
        flight; True when the next step was launched (and is now in flight), False when it was
        not, or nothing was in flight."""
        landing = self.in_flight
        if landing is None:
            return False
        self.in_flight = self._next(landing)
        for seq, chunks in self.engine.chain.land(landing):
            emit(seq, chunks)
        return self.in_flight is not None

    def _next(self, landing: DrawnTokens) -> DrawnTokens | None:
        """The step after ``landing``, launched, or None where that step must wait for it."""
        engine = self.engine
        scheduler, limit = engine.scheduler, engine.chain.limit
        alive = [i for i, s in enumerate(landing.seqs) if not s.finished]
        in_flight = {id(landing.seqs[i]) for i in alive}
        # the other running rows are prompts still prefilling in chunks, and like the next
        # sequence to join, they go in only if their tokens can stay on the device too
        if not all(joinable(s) for s in scheduler.running if id(s) not in in_flight):
            return None
        head = scheduler.next_admission()
        if head is not None and not joinable(head):
            return None
        # a row whose token in flight is its last (max_tokens, or the context) stops there
        keep = [
            i
            for i in alive
            if landing.seqs[i].num_generated + 1 < landing.seqs[i].params.max_tokens
            and (limit is None or len(landing.seqs[i].token_ids) + 1 <= limit)
        ]
        rows, ending = [landing.seqs[i] for i in keep], len(alive) - len(keep)
        batch = scheduler.schedule_beside(rows, ending, joinable)
        if not batch:  # (None: a row would preempt another; empty: nothing goes on)
            return None
        fed = landing.tokens
        if len(keep) < len(landing.seqs):
            fed = fed.index_select(0, to_device(keep, torch.long, fed.device))
        engine.steps += 1
        self.steps += 1
        return self._run(batch, engine.block_manager.take_orders(), fed)

    def _run(
        self, batch: ScheduledBatch, orders: Orders | None, fed: torch.Tensor | None
    ) -> DrawnTokens:
        """Forward ``batch`` and sample its rows, leaving the ids in flight; ``fed``, the
        first decode rows' ids, go to their processors first (``SequenceSampler.push``)."""
        engine = self.engine
        logits, rows, _ = engine.runner.run(batch, orders, fed)
        for seq, _ in batch.prefill:  # the prompt blocks it completes, for the prefix cache
            engine.block_manager.computed(seq)
        for i, seq in enumerate(batch.decode[: 0 if fed is None else len(fed)]):
            if seq.sampler.processors:
                seq.sampler.push(fed[i : i + 1])
        return engine.chain.launch(logits, rows)

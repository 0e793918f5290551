"""Overlap scheduling: step N+1 is scheduled and launched while the device still runs step N.

A plain step waits for its sampled ids to reach the host before anything else happens: the
host appends them, detokenizes, checks stop strings and lengths, then schedules and launches
the next forward, and the GPU idles through all of it. Most of that work does not need step
N's ids. When every row of a decode-only step draws its token on the device with no host-side
state in the way (``overlappable``), its ids stay on the device with their copy to the host
queued (``TokenChain.launch``), and the next ``Engine.step``:

1. schedules the same rows one position further (their blocks ensured; no one joins),
2. launches that forward with step N's ids fed from the device (``ModelRunner.run(fed=)``),
3. only then waits for step N's ids and runs their host side (``TokenChain.land``) while the
   device computes step N+1.

So a step's tokens are handed out one ``step`` call after the forward that made them.
A row that step N's token ends (an end id, a stop string, an abort) has computed one position
in step N+1 for nothing; that result is dropped, and its blocks were freed in stream order
after it. Rows that step N's token ends by length are known before and left out. Anything else
ends the overlap for one step, which then lands step N first and runs as before: a sequence
that could join (waiting or swapped out, with room), a row that must wait for blocks
(preemption), or rows with processors or a loop guard. Speculative decoding builds its guesses
from the ids themselves, and tensor parallelism sends them to the other ranks: neither overlaps.
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
    guard (its bans and breaks follow every token) and no logits processors (penalties, DRY,
    bias, min_tokens, n-gram bans and grammars read the ids so far)."""
    return seq.guard is None and not seq.sampler.processors


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
        """Run ``batch`` and leave its ids in flight when it is decode rows only, each
        ``overlappable``; False, having run nothing, otherwise."""
        if batch.prefill or batch.verify or not all(overlappable(s) for s in batch.decode):
            return False
        engine = self.engine
        logits, rows, _ = engine.runner.run(batch, orders)
        self.in_flight = engine.chain.launch(logits, rows)
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
        scheduler, bm, limit = engine.scheduler, engine.block_manager, engine.chain.limit
        alive = [i for i, s in enumerate(landing.seqs) if not s.finished]
        running = {id(s) for s in scheduler.running}
        if running != {id(landing.seqs[i]) for i in alive} or scheduler.can_admit():
            return None
        # a row whose token in flight is its last (max_tokens, or the context) stops there
        keep = [
            i
            for i in alive
            if landing.seqs[i].num_generated + 1 < landing.seqs[i].params.max_tokens
            and (limit is None or len(landing.seqs[i].token_ids) + 1 <= limit)
        ]
        rows = [landing.seqs[i] for i in keep]
        # blocks for one more position each, without preempting anyone (a row left short waits
        # for the plain step, whose scheduler preempts)
        if not rows or not all(bm.ensure(s, s.num_cached + 1) for s in rows):
            return None
        fed = landing.tokens
        if len(keep) < len(landing.seqs):
            fed = fed.index_select(0, to_device(keep, torch.long, fed.device))
        engine.steps += 1
        self.steps += 1
        logits, rows, _ = engine.runner.run(ScheduledBatch(decode=rows), bm.take_orders(), fed)
        return engine.chain.launch(logits, rows)

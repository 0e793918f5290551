"""Overlap scheduling: step N+1 is scheduled and its forward launched while the device still
runs step N.

A plain step waits for its sampled ids to reach the host before anything else happens: the
host appends them, detokenizes, checks stop strings and lengths, then schedules and launches
the next forward, and the GPU idles through all of it. The next forward does not need step N's
ids on the host: they can be fed to it from the device. So a step's ids stay on the device with
their copy to the host queued (``TokenChain.launch``), and the next ``Engine.step``:

1. schedules the same rows one position further, their blocks ensured, and what is left of
   the token budget to prompts as a plain step would: chunks of prompts still prefilling, and
   sequences that join (``Scheduler.schedule_beside``);
2. launches that forward, with step N's ids fed from the device (``ModelRunner.run(fed=)``)
   and the others' from the host;
3. waits for step N's ids and runs their host side (``TokenChain.land``: append, processors'
   and loop guards' state, detokenizing, stop strings, lengths) while the device computes;
4. then samples step N+1 (``TokenChain.launch``), its processors, grammars and loop guards up
   to date with step N's ids, and leaves those ids in flight in turn.

So a step's tokens are handed out one ``step`` call after the forward that made them, and
every row overlaps, whatever its sampling settings. A row that step N's token ends (an end id,
a stop string, an abort) or rolls back (a loop break, a closed thinking section) has computed
one position in step N+1 for nothing: its result is dropped, a rolled-back row is fed again
from the host, and blocks freed or released after that forward are reused only by later ones.
Rows that step N's token ends by length are known before and left out. Anything else ends the
overlap for one step, which then lands step N first and runs as before: a row that must wait
for blocks (the plain step preempts), or a prompt chunk, running or next in line to join,
whose prompt log-probabilities are asked for (``joinable``). Speculative decoding builds its
guesses from the ids themselves, and tensor parallelism sends them to the other ranks: neither
overlaps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from arlm.devices import to_device
from arlm.engine.block_manager import Orders
from arlm.engine.prompt_logprobs import positions_to_score
from arlm.engine.scheduler import ScheduledBatch
from arlm.engine.sequence import Sequence
from arlm.engine.token_chain import DrawnTokens

if TYPE_CHECKING:
    from arlm.engine.engine import Engine

# emit(seq, chunks): hand a landed row's output to the engine
Emit = Callable[[Sequence, list], None]


def joinable(seq: Sequence) -> bool:
    """Whether ``seq``'s prompt positions still to run can go in a step whose ids stay in
    flight: none of them is scored for prompt log-probabilities (those are recorded on the host
    after their forward)."""
    return not positions_to_score(seq, seq.num_cached, seq.num_pending)


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
        """Run ``batch`` and leave its ids in flight when it has no verify rows and no prompt
        chunk it scores (``joinable``); False, having run nothing, otherwise."""
        if batch.verify or not all(joinable(s) for s, _ in batch.prefill):
            return False
        logits, rows, _ = self.engine.forward(batch, orders)
        self.in_flight = self.engine.chain.launch(logits, rows)
        return True

    def follow(self, emit: Emit) -> bool:
        """Launch the next step's forward where it can, land the step in flight, then sample
        the next step's rows that are still valid; True when the next step was launched (and is
        now in flight), False when it was not, or nothing was in flight."""
        landing = self.in_flight
        if landing is None:
            return False
        launched = self._next(landing)
        for seq, chunks in self.engine.chain.land(landing):
            emit(seq, chunks)
        self.in_flight = None
        if launched is None:
            return False
        logits, rows = launched
        # a row the landed tokens ended or rolled back (its next id is on the host again)
        # computed this step for nothing
        valid = [j for j, s in enumerate(rows) if not s.finished and s.num_pending == 0]
        if len(valid) < len(rows):
            logits = logits.index_select(0, to_device(valid, torch.long, logits.device))
            rows = [rows[j] for j in valid]
        self.in_flight = self.engine.chain.launch(logits, rows)
        return True

    def _next(self, landing: DrawnTokens) -> tuple[torch.Tensor, list[Sequence]] | None:
        """The step after ``landing``: its forward launched, its logits and rows that sample;
        or None where that step must wait for ``landing``."""
        engine = self.engine
        scheduler = engine.scheduler
        alive = [i for i, s in enumerate(landing.seqs) if not s.finished]
        in_flight = {id(landing.seqs[i]) for i in alive}
        # the other running rows (prompts prefilling in chunks, rows fed again from the host),
        # like the next sequence to join, go in only if they score no prompt positions
        if not all(joinable(s) for s in scheduler.running if id(s) not in in_flight):
            return None
        head = scheduler.next_admission()
        if head is not None and not joinable(head):
            return None
        # a row whose token in flight is its last (max_tokens, or the context) stops there
        keep = [i for i in alive if not engine.chain.at_length(landing.seqs[i], ahead=1)]
        rows = [landing.seqs[i] for i in keep]
        # their seats may be taken now, unless a loop guard could roll them back instead
        ending = sum(1 for i in set(alive) - set(keep) if landing.seqs[i].guard is None)
        batch = scheduler.schedule_beside(rows, ending, joinable)
        if not batch:  # (None: a row would preempt another; empty: nothing goes on)
            return None
        fed = landing.tokens
        if len(keep) < len(landing.seqs):
            fed = fed.index_select(0, to_device(keep, torch.long, fed.device))
        engine.steps += 1
        self.steps += 1
        logits, rows, _ = engine.forward(batch, engine.block_manager.take_orders(), fed)
        return logits, rows

"""``Sequence``: everything the engine knows about one generation, in one object.

Its token ids are one list, the prompt's and then the generated ones; the sampler's processors,
the loop guard and the text state read that list or follow it one token at a time. The cache
side is ``num_cached`` (how many leading positions have their keys and values in the cache)
and ``block_table`` (the blocks holding them; ``host_table`` while swapped out): the block
manager keeps the tables, the model runner advances ``num_cached`` as it computes positions.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from arlm.engine.outputs import Chunk, Completion, Usage
from arlm.engine.text import TextState
from arlm.loops.detector import LoopReport
from arlm.loops.policy import LoopGuard
from arlm.sampling.params import SamplingParams, TokenLogprob
from arlm.sampling.prompt_logprobs import PromptLogprob
from arlm.sampling.sampler import SequenceSampler


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted, its blocks in the host tier
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One sample of one request. ``index`` tells the ``n`` samples of a request apart."""

    request_id: str
    index: int
    token_ids: list[int]  # the prompt, then every generated id kept so far
    prompt_len: int
    params: SamplingParams
    generator: torch.Generator
    sampler: SequenceSampler
    text: TextState
    end_ids: frozenset[int]
    guard: LoopGuard | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # of the prompt's full blocks
    adapter: str | None = None  # the LoRA adapter's name (arlm.model.adapter_store), or None
    adapter_slot: int = -1  # the slot it is in while the sequence runs, -1: the base model
    passes: int = 0  # steps others went ahead of it while its adapter had no slot
    passed_since: float | None = None  # when that first happened

    status: Status = Status.WAITING
    num_cached: int = 0  # leading positions whose keys and values are in the cache
    block_table: list[int] = field(default_factory=list)
    host_table: list[int] = field(default_factory=list)
    peak_blocks: int = 0
    cached_prompt_tokens: int = 0
    spec_draft_tokens: int = 0  # speculative guesses verified (arlm.engine.speculation)
    spec_accepted_tokens: int = 0  # of those, accepted

    logprobs: list[TokenLogprob] = field(default_factory=list)
    # one per prompt token after the first, when params.prompt_logprobs is set
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)
    reported: dict[int, LoopReport] = field(default_factory=dict)  # "report": index -> loop
    finish_reason: str | None = None
    loop: LoopReport | None = None  # the loop that ended it (finish_reason "repetition")
    error: str | None = None

    arrival_time: float = field(default_factory=time.perf_counter)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_pending(self) -> int:
        """Positions to feed before the next token can be sampled (1 when decoding)."""
        return len(self.token_ids) - self.num_cached

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def truncate(self, keep: int) -> None:
        """Keep the first ``keep`` generated ids (their logprobs and text too)."""
        del self.token_ids[self.prompt_len + keep :]
        del self.logprobs[keep:]
        self.reported = {i: r for i, r in self.reported.items() if i < keep}
        self.num_cached = min(self.num_cached, len(self.token_ids) - 1)

    def chunks(self, settled: int, final: bool = False) -> list[Chunk]:
        """One chunk per generated id now safe to stream, up to ``settled``."""
        return [
            Chunk(
                piece,
                self.token_ids[self.prompt_len + i],
                logprob=self.logprobs[i] if self.logprobs else None,
                loop=self.reported.get(i),
            )
            for i, piece in self.text.release(settled, final)
        ]

    def usage(self, kv_cache_bytes: int, kv_cache_peak_bytes: int) -> Usage:
        start = self.first_token_time or self.finish_time or self.arrival_time
        return Usage(
            prompt_tokens=self.prompt_len,
            completion_tokens=self.num_generated,
            prefill_seconds=start - self.arrival_time,
            decode_seconds=(self.finish_time or start) - start,
            queued_seconds=(self.scheduled_time or self.arrival_time) - self.arrival_time,
            cached_prompt_tokens=self.cached_prompt_tokens,
            kv_cache_bytes=kv_cache_bytes,
            kv_cache_peak_bytes=kv_cache_peak_bytes,
            spec_draft_tokens=self.spec_draft_tokens,
            spec_accepted_tokens=self.spec_accepted_tokens,
        )

    def closing_chunk(self, usage: Usage) -> Chunk:
        guard = self.guard
        return Chunk(
            self.text.rest(),
            finish_reason=self.finish_reason,
            usage=usage,
            loop=self.loop,
            loop_reports=tuple(guard.reports) if guard is not None else (),
            loops_broken=guard.breaks if guard is not None else 0,
            error=self.error,
        )

    def completion(self, usage: Usage) -> Completion:
        guard = self.guard
        return Completion(
            self.text.text,
            self.generated,
            self.finish_reason or "abort",
            usage,
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
            prompt_logprobs=[None, *self.prompt_logprobs]
            if self.params.prompt_logprobs is not None
            else None,
            loop=self.loop,
            loop_reports=list(guard.reports) if guard is not None else [],
            loops_broken=guard.breaks if guard is not None else 0,
            error=self.error,
        )

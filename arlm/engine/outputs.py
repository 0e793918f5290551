"""What generation hands back: text pieces as they become final (``Chunk``), a finished
generation (``Completion``) with its ``Usage``, and the engine's per-step ``RequestOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field

from arlm.loops.detector import LoopReport
from arlm.sampling.params import TokenLogprob
from arlm.sampling.prompt_logprobs import PromptLogprob


@dataclass
class Usage:
    """Token counts and times of one sequence. ``prefill_seconds`` is the time to first token,
    from arrival (queueing included); ``queued_seconds`` the part of it spent waiting."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    queued_seconds: float = 0.0
    cached_prompt_tokens: int = 0  # prompt positions reused from the prefix cache
    kv_cache_bytes: int = 0  # its KV blocks at their most (whole blocks)
    kv_cache_peak_bytes: int = 0  # of those, the bytes its positions filled
    spec_draft_tokens: int = 0  # speculative guesses verified
    spec_accepted_tokens: int = 0  # of those, accepted (each saved a forward)

    @property
    def spec_acceptance_rate(self) -> float:
        """The share of speculative guesses accepted (0 without speculation)."""
        return self.spec_accepted_tokens / self.spec_draft_tokens if self.spec_draft_tokens else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.completion_tokens - 1  # the first token comes out of the prefill
        return steps / self.decode_seconds if self.decode_seconds and steps > 0 else 0.0


class Chunk(str):
    """A piece of streamed text. It is a ``str``, so it prints and joins as one.

    Every generated token comes in one chunk, with its ``token_id`` and, when asked for, its
    ``logprob``; ``loop`` is the loop first reported at that token (the "report" policy). The
    last chunk has no token; it carries ``finish_reason``, ``usage``, ``loop`` (the loop that
    ended generation, finish_reason "repetition"), ``loop_reports``, ``loops_broken`` and, for
    finish_reason "error", ``error``.
    """

    token_id: int | None
    finish_reason: str | None
    usage: Usage | None
    logprob: TokenLogprob | None
    loop: LoopReport | None
    loop_reports: tuple[LoopReport, ...]
    loops_broken: int
    error: str | None

    def __new__(
        cls,
        text: str,
        token_id: int | None = None,
        finish_reason: str | None = None,
        usage: Usage | None = None,
        *,
        logprob: TokenLogprob | None = None,
        loop: LoopReport | None = None,
        loop_reports: tuple[LoopReport, ...] = (),
        loops_broken: int = 0,
        error: str | None = None,
    ) -> Chunk:
        chunk = super().__new__(cls, text)
        chunk.token_id, chunk.finish_reason, chunk.usage = token_id, finish_reason, usage
        chunk.logprob, chunk.loop = logprob, loop
        chunk.loop_reports, chunk.loops_broken, chunk.error = loop_reports, loops_broken, error
        return chunk


@dataclass
class Completion:
    """A finished generation. ``token_ids`` are the generated ids, without the prompt and
    without an end-of-sequence or stop token id that ended it; ``text`` ends before any
    stop string.

    ``logprobs``: one per token id when ``logprobs`` was asked for, else None. With a loop
    policy: ``loop`` is the loop that ended generation (finish_reason "repetition"; the text
    and ids then end after the first copy of its block), ``loop_reports`` every loop reported
    or acted on, ``loops_broken`` how many the "break" policy broke. finish_reason "error":
    this sequence alone failed (``error`` says why); "abort": it was aborted.
    """

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "repetition", "error" or "abort"
    usage: Usage = field(default_factory=Usage)
    logprobs: list[TokenLogprob] | None = None
    loop: LoopReport | None = None
    loop_reports: list[LoopReport] = field(default_factory=list)
    loops_broken: int = 0
    error: str | None = None
    # with SamplingParams.prompt_logprobs: None for the first prompt token (nothing predicts
    # it), then a PromptLogprob per prompt token
    prompt_logprobs: list[PromptLogprob | None] | None = None


@dataclass
class RequestOutput:
    """What one engine step produced for one sequence: its new ``chunks`` (one per token now
    final, then the closing chunk once finished) and, when ``finished``, its ``completion``.
    ``index`` tells the samples of one request (``SamplingParams.n``) apart."""

    request_id: str
    index: int
    chunks: list[Chunk]
    finished: bool = False
    completion: Completion | None = None

    @property
    def text(self) -> str:
        return "".join(self.chunks)

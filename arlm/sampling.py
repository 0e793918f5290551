"""Sampling parameters and the chain that turns next-token logits into a token.

Field names follow the OpenAI and vLLM APIs, and llama.cpp's for DRY. A ``Sampler`` is built once
per request, or once per batch of rows that share parameters, and keeps each row's history: its
prompt, then every token appended since. Each step runs a chain of small processors over the
logits (B, vocab) and draws one token per row, in this order:

    logit_bias, min_tokens, repetition_penalty, presence/frequency_penalty, DRY,
    no_repeat_ngram_size                         (these change greedy choices too)
    temperature, top_k, top_p, min_p, typical_p  (skipped at temperature 0, which takes the argmax)

The processors are in ``arlm.processors``, DRY in ``arlm.dry``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from arlm.dry import Dry, DryBreakers
from arlm.loops.detector import LoopDetectorConfig
from arlm.processors import (
    Filter,
    History,
    LogitBias,
    MinTokens,
    NoRepeatNGram,
    OpenAIPenalty,
    Processor,
    RepetitionPenalty,
    min_p_filter,
    temperature,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

LOOP_POLICIES = ("stop", "break", "report")
DEFAULT_DRY_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")  # llama.cpp's defaults
MAX_LOGPROBS = 20  # OpenAI's limit on alternatives per position


def _check_int(name: str, value: object, low: int, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is not allowed; it must be an integer {allowed}")


def _check_float(name: str, value: object, ok: Callable[[float], bool], allowed: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"{name}={value!r} is not allowed; it must be {allowed}")


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Every default leaves its feature off.

    temperature: 0 is greedy (argmax of the penalized logits); higher flattens the distribution.
    top_k: keep the k most likely tokens (0: all). top_p: keep the smallest set whose probability
    reaches p (1: all). min_p: drop tokens below min_p times the top probability (0: off).
    typical_p: keep the tokens whose surprise is closest to the entropy, up to mass p (1: off).

    repetition_penalty: CTRL's rule as in transformers, for every token in the prompt or the
    output: positive logits are divided by it, negative ones multiplied (1: off).
    presence_penalty, frequency_penalty: OpenAI's rule over the generated tokens,
    ``logit - count * frequency_penalty - (count > 0) * presence_penalty``, in [-2, 2].
    penalty_last_n: these three penalties see only the last n tokens (0: the whole history).
    no_repeat_ngram_size: ban every token that would complete an n-gram already present in the
    prompt or output (0: off).

    DRY ("don't repeat yourself"), with llama.cpp's semantics and defaults: a token that would
    extend a repeat of length L >= dry_allowed_length of earlier text loses
    ``dry_multiplier * dry_base ** (L - dry_allowed_length)`` from its logit (dry_multiplier 0:
    off). dry_penalty_last_n: the window searched (0: the whole history, llama.cpp's -1).
    dry_sequence_breakers: strings that end a repeat; a repeat never spans one, and a token that
    is one is never penalized.

    logit_bias: token id -> value in [-100, 100] added to its logit. min_tokens: the end-of-text
    token, stop_token_ids and stop strings cannot end generation before this many tokens.
    stop: strings that end generation (not included in the text). stop_token_ids: ids that end
    it. ignore_eos: keep going past the end-of-text token. seed: the request's own random
    generator, so the same seed gives the same sample whatever else runs. logprobs: None for
    none; n to return each chosen token's log-probability and the n likeliest alternatives
    (0 to 20), all under the model's raw distribution (before any processor, as vLLM does).

    loop_policy: what to do when the loop detector fires (None: no detection): "stop" ends
    with finish_reason "repetition", keeping one copy of the repeated block; "break" rolls back
    to the second copy, bans its first token there, escalates DRY and continues, and stops as
    "stop" does after max_loop_breaks breaks; "report" only records the loops.
    repetition_detection: the detector's thresholds (a ``LoopDetectorConfig`` or a dict of its
    fields; None: its defaults). Giving it without a loop_policy means "stop".
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 0
    no_repeat_ngram_size: int = 0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 0
    dry_sequence_breakers: list[str] = field(
        default_factory=lambda: list(DEFAULT_DRY_SEQUENCE_BREAKERS)
    )
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    loop_policy: str | None = None
    repetition_detection: LoopDetectorConfig | dict | None = None
    max_loop_breaks: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.dry_sequence_breakers, str):
            self.dry_sequence_breakers = [self.dry_sequence_breakers]
        self.dry_sequence_breakers = list(self.dry_sequence_breakers or [])
        self._check_sampling()
        self._check_penalties()
        self._check_stops()
        self._check_loop_settings()

    def _check_sampling(self) -> None:
        _check_int("max_tokens", self.max_tokens, 0, ">= 0")
        _check_float("temperature", self.temperature, lambda v: v >= 0, ">= 0 (0 means greedy)")
        _check_int("top_k", self.top_k, 0, ">= 0 (0 means off)")
        _check_float("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1] (1 means off)")
        _check_float("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1] (0 means off)")
        _check_float("typical_p", self.typical_p, lambda v: 0 < v <= 1, "in (0, 1] (1 means off)")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, ">= 0, or None")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, f"in [0, {MAX_LOGPROBS}], or None for off")
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(
                    f"logprobs={self.logprobs!r} is not allowed; it must be an integer in "
                    f"[0, {MAX_LOGPROBS}], or None for off"
                )

    def _check_penalties(self) -> None:
        _check_float(
            "repetition_penalty",
            self.repetition_penalty,
            lambda v: v > 0,
            "> 0 (1 means off; above 1 discourages repeats)",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), lambda v: -2 <= v <= 2, "in [-2, 2]")
        _check_int("penalty_last_n", self.penalty_last_n, 0, ">= 0 (0 means the whole history)")
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, ">= 0 (0 means off)")
        _check_float("dry_multiplier", self.dry_multiplier, lambda v: v >= 0, ">= 0 (0: off)")
        _check_float("dry_base", self.dry_base, lambda v: v >= 1, ">= 1")
        _check_int("dry_allowed_length", self.dry_allowed_length, 1, ">= 1")
        _check_int(
            "dry_penalty_last_n", self.dry_penalty_last_n, 0, ">= 0 (0 means the whole history)"
        )
        if any(not isinstance(s, str) or not s for s in self.dry_sequence_breakers):
            raise ValueError(
                f"dry_sequence_breakers={self.dry_sequence_breakers!r} is not allowed; it must "
                "be a list of non-empty strings"
            )
        if not isinstance(self.logit_bias, dict):
            raise ValueError(
                f"logit_bias={self.logit_bias!r} is not allowed; it must map token ids to floats"
            )
        # JSON object keys are strings: accept "50256" as well as 50256
        bias = {}
        for key, value in self.logit_bias.items():
            token = int(key) if isinstance(key, str) and key.isdigit() else key
            _check_int("logit_bias token id", token, 0, ">= 0")
            _check_float(
                f"logit_bias[{token}]", value, lambda v: -100 <= v <= 100, "in [-100, 100]"
            )
            bias[token] = float(value)
        self.logit_bias = bias

    def _check_stops(self) -> None:
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} is not allowed; it must be non-empty strings")
        for token in self.stop_token_ids:
            _check_int("stop_token_ids entry", token, 0, ">= 0")
        _check_int("min_tokens", self.min_tokens, 0, ">= 0")
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens!r} is not allowed; it must be <= max_tokens "
                f"({self.max_tokens})"
            )

    def _check_loop_settings(self) -> None:
        if self.loop_policy is not None and self.loop_policy not in LOOP_POLICIES:
            raise ValueError(
                f"loop_policy={self.loop_policy!r} is not allowed; it must be one of "
                f"{', '.join(LOOP_POLICIES)}, or None for no detection"
            )
        detection = self.repetition_detection
        if isinstance(detection, dict):
            known = [f.name for f in dataclasses.fields(LoopDetectorConfig)]
            unknown = sorted(set(detection) - set(known))
            if unknown:
                raise ValueError(
                    f"repetition_detection has unknown fields {unknown}; allowed: {known}"
                )
            self.repetition_detection = LoopDetectorConfig(**detection)
        elif detection is not None and not isinstance(detection, LoopDetectorConfig):
            raise ValueError(
                f"repetition_detection={detection!r} is not allowed; it must be a "
                "LoopDetectorConfig, a dict of its fields, or None"
            )
        if self.repetition_detection is not None and self.loop_policy is None:
            self.loop_policy = "stop"
        _check_int("max_loop_breaks", self.max_loop_breaks, 0, ">= 0")

    @property
    def detector_config(self) -> LoopDetectorConfig:
        """The loop detector's thresholds: ``repetition_detection`` or the defaults."""
        return self.repetition_detection or LoopDetectorConfig()

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        """Build from keyword arguments, naming any that are not sampling fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown sampling parameters {unknown}; known: {sorted(known)}")
        return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A chosen token's log-probability and the ``top`` likeliest tokens at its position, best
    first, as (token id, log-probability) pairs; all under the model's raw distribution."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Per row, the log-probability of ``tokens`` (B,) under ``logits`` (B, vocab) and the
    ``top`` likeliest alternatives."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0].tolist()
    top = min(top, logp.size(-1))
    if top:
        values, ids = logp.topk(top, dim=-1)
        tops = [
            tuple(zip(i, v, strict=True))
            for i, v in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    else:
        tops = [()] * len(chosen)
    return [
        TokenLogprob(t, lp, alt) for t, lp, alt in zip(tokens.tolist(), chosen, tops, strict=True)
    ]


class Sampler:
    """The processor chain and the draw, for a batch of rows that share ``params``.

    prompts: each row's prompt ids, the start of its history; generated: ids each row has
    generated already (None: none). end_ids: the ids that end a generation (masked until
    ``min_tokens``). dry_breakers: from :func:`dry_sequence_breakers`,
    needed when DRY is on. generators: one per row (None: torch's global generator).
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        prompts: Sequence[Sequence[int]],
        generated: Sequence[Sequence[int]] | None = None,
        *,
        end_ids: Iterable[int] = (),
        dry_breakers: DryBreakers | None = None,
        generators: Sequence[torch.Generator | None] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.params = params
        generated = generated if generated is not None else [[] for _ in prompts]
        self.history = History(
            [[*p, *g] for p, g in zip(prompts, generated, strict=True)], [len(p) for p in prompts]
        )
        self.generators = list(generators) if generators is not None else [None] * len(prompts)
        device = torch.device(device)
        p = params
        self.penalties: list[Processor] = []
        if p.logit_bias:
            self.penalties.append(LogitBias(p.logit_bias, vocab_size, device))
        if p.min_tokens:
            self.penalties.append(MinTokens(p.min_tokens, end_ids))
        if p.repetition_penalty != 1.0:
            self.penalties.append(
                RepetitionPenalty(p.repetition_penalty, vocab_size, p.penalty_last_n, device)
            )
        if p.presence_penalty or p.frequency_penalty:
            self.penalties.append(
                OpenAIPenalty(
                    p.presence_penalty, p.frequency_penalty, vocab_size, p.penalty_last_n, device
                )
            )
        if p.dry_multiplier > 0:
            if dry_breakers is None:
                raise ValueError("DRY is on (dry_multiplier > 0) but no dry_breakers were given")
            self.penalties.append(
                Dry(
                    p.dry_multiplier,
                    p.dry_base,
                    p.dry_allowed_length,
                    p.dry_penalty_last_n,
                    dry_breakers,
                )
            )
        if p.no_repeat_ngram_size:
            self.penalties.append(NoRepeatNGram(p.no_repeat_ngram_size))
        self.warpers: list[Processor] = []
        if p.temperature not in (0.0, 1.0):
            self.warpers.append(Filter(temperature, p.temperature))
        if p.top_k:
            self.warpers.append(Filter(top_k_filter, p.top_k))
        if p.top_p < 1.0:
            self.warpers.append(Filter(top_p_filter, p.top_p))
        if p.min_p > 0.0:
            self.warpers.append(Filter(min_p_filter, p.min_p))
        if p.typical_p < 1.0:
            self.warpers.append(Filter(typical_filter, p.typical_p))
        for proc in self.penalties:
            proc.reset(self.history)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits (B, vocab) after the processors that also apply at temperature 0."""
        logits = logits.float()
        for proc in self.penalties:
            logits = proc(logits, self.history)
        if self.penalties and not torch.isfinite(logits).any(dim=-1).all():
            raise ValueError(
                "every token is banned at this step; loosen no_repeat_ngram_size, min_tokens "
                "or the stop ids"
            )
        return logits

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """One token id per row of ``logits`` (B, vocab) -> (B,)."""
        logits = self.process(logits)
        if self.params.temperature == 0:
            return logits.argmax(dim=-1)
        for proc in self.warpers:
            logits = proc(logits, self.history)
        probs = logits.softmax(dim=-1)
        return torch.cat(
            [torch.multinomial(probs[b], 1, generator=gen) for b, gen in enumerate(self.generators)]
        )

    def append(self, tokens: Sequence[int]) -> None:
        """Add one new token id to every row's history."""
        for ids, token in zip(self.history.rows, tokens, strict=True):
            ids.append(int(token))
        for proc in self.penalties:
            proc.append(self.history)

"""``SamplingParams``: one request's sampling settings, a plain validated schema.

Field names follow the OpenAI and vLLM APIs, and llama.cpp's for DRY. How they are applied is
``arlm.sampling.sampler``'s business.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from arlm.config import option
from arlm.loops.detector import LoopDetectorConfig
from arlm.loops.near import NearLoopConfig, near_config
from arlm.sampling.breakers import DRY_MAX_BREAKER_CHARS
from arlm.sampling.structured import StructuredOutputs
from arlm.validate import check_float, check_int

LOOP_POLICIES = ("stop", "break", "report", "close_thinking")
DEFAULT_DRY_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")  # llama.cpp's defaults

# What one request may ask for. Each bounds work or memory that the step loop spends on the
# request's behalf, per token or per request, and that no ordinary use comes near.
MAX_LOGPROBS = 20  # OpenAI's limit on alternatives per position
MAX_N = 128  # OpenAI's limit on samples of a prompt
MAX_STOP_STRINGS = 32  # each is searched for in the newest text at every token
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # token ids in logit_bias (OpenAI takes 300)
MAX_DRY_SEQUENCE_BREAKERS = 16  # each is matched against the whole vocabulary (llama.cpp: 4)
# A penalty of 100 logits already rules a token out; above these, exp and pow overflow float32.
MAX_DRY_MULTIPLIER = 100.0
MAX_DRY_BASE = 100.0
REPETITION_PENALTY_RANGE = (0.01, 100.0)  # dividing logits by less would overflow float32
MAX_LOOP_BREAKS = 64  # each break rebuilds the sequence's processors from its whole history
# Held bans after a break: 3-grams, measured on the loop bench (docs/loops.md): shorter bans cut
# ordinary phrases, longer ones let near copies of the cycle back in.
DEFAULT_LOOP_BREAK_HOLD = 3
MAX_LOOP_BREAK_HOLD = 64
MAX_CONTRASTIVE_TOP_K = 64  # candidates scored with one extra forward of k rows per step
# Below this a temperature would push logits / temperature past float32's range; it samples
# greedily, as vLLM does below the same value.
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop. Every default leaves its feature off.

    max_tokens: tokens to generate at most. n: independent samples of the prompt; they share
    its prompt's cached keys and values, and sample ``i`` seeds its generator with ``seed + i``.

    temperature: 0 is greedy (argmax of the penalized logits), and so is any temperature below
    ``MIN_SAMPLING_TEMPERATURE`` (1e-5); higher flattens the distribution.
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
    prompt_logprobs: None for none; n for each prompt token's log-probability given the tokens
    before it, its rank and the n likeliest alternatives (0 to 20), computed in the forward that
    prefills the prompt (``Completion.prompt_logprobs``; with max_tokens 0 nothing is sampled).

    loop_policy: what to do when the loop detector fires (None: no detection): "stop" ends
    with finish_reason "repetition", keeping one copy of the repeated block; "break" rolls back
    to the second copy, bans its first token there, escalates DRY and continues, and stops as
    "stop" does after max_loop_breaks breaks; "report" only records the loops;
    "close_thinking", for reasoning models, cuts a loop inside a ``<think>`` section as "stop"
    does, then writes ``</think>`` and lets the model answer (a loop outside one stops).
    repetition_detection: the detector's thresholds (a ``LoopDetectorConfig`` or a dict of its
    fields; None: its defaults). Giving it without a loop_policy means "stop".
    near_repetition_detection: the near-duplicate rule's thresholds (a ``NearLoopConfig`` or a
    dict of its fields; None: off), so cycles whose copies differ in a few tokens count as loops
    too; giving it without a loop_policy means "stop". loop_break_hold: after each break, no
    n-gram of the broken cycle (this n) may be generated again in the request (0: off), so the
    sequence cannot walk back into it.

    penalty_alpha: contrastive search (Su et al. 2022) when > 0, with ``top_k`` candidates per
    step (transformers' names): each step takes, among the k likeliest tokens, the one that
    maximises ``(1 - alpha) * p(token) - alpha * max cosine similarity of its hidden state to
    the context's``. Deterministic; needs top_k >= 1 and temperature 0.

    structured_outputs: constrain the output to a JSON schema, any JSON object, a regular
    expression, a list of choices or an EBNF grammar (``arlm.sampling.structured``; a
    ``StructuredOutputs`` or a dict of its fields, vLLM's names; None: free text).
    """

    max_tokens: int = option(256, help="tokens to generate")
    n: int = option(1, help="samples of each prompt")
    temperature: float = option(1.0, help="0 is greedy")
    top_k: int = option(0, help="keep the k likeliest tokens, 0 = off")
    top_p: float = option(1.0, help="nucleus sampling mass, 1 = off")
    min_p: float = option(0.0, help="drop tokens below min-p x the top one, 0 = off")
    typical_p: float = option(1.0, help="typical sampling mass, 1 = off")
    repetition_penalty: float = option(1.0, help="CTRL's penalty on seen tokens, 1 = off")
    presence_penalty: float = option(0.0, help="OpenAI's, in [-2, 2]")
    frequency_penalty: float = option(0.0, help="OpenAI's, in [-2, 2]")
    penalty_last_n: int = option(0, help="the penalties see the last N tokens, 0 = all")
    no_repeat_ngram_size: int = option(0, help="ban repeating any N-gram, 0 = off")
    dry_multiplier: float = option(0.0, help="DRY's strength, 0 = off")
    dry_base: float = option(1.75, help="DRY's growth per repeated token")
    dry_allowed_length: int = option(2, help="repeats DRY lets pass")
    dry_penalty_last_n: int = option(0, help="DRY's window, 0 = all")
    dry_sequence_breakers: list[str] = option(
        factory=lambda: list(DEFAULT_DRY_SEQUENCE_BREAKERS),
        help="a string that ends a DRY repeat (repeatable; replaces the defaults)",
        flag="--dry-sequence-breaker",
    )
    logit_bias: dict[int, float] = option(
        factory=dict,
        help="add BIAS (-100..100) to token ID's logit (repeatable)",
        metavar="ID=BIAS",
    )
    min_tokens: int = option(0, help="no stopping before N tokens")
    stop: list[str] = option(factory=list, help="a stop string (repeatable)")
    stop_token_ids: list[int] = option(
        factory=list, help="a token id that ends generation (repeatable)", flag="--stop-token-id"
    )
    ignore_eos: bool = option(False, help="keep generating past the end-of-text token")
    seed: int | None = option(None, help="seed for reproducible sampling")
    logprobs: int | None = option(None, help="each token's logprob and N alternatives", metavar="N")
    prompt_logprobs: int | None = None  # the Python API's and the server's, not the CLI's
    # a StructuredOutputs or a dict of its fields (the CLI's --json-schema sets it)
    structured_outputs: StructuredOutputs | dict | None = None
    loop_policy: str | None = option(
        None,
        help="stop at a loop, break it and go on, report it, or close a <think> section it is "
        "in (default: no detection)",
        choices=LOOP_POLICIES,
    )
    # set through the detector's own options (--loop-min-count, ...)
    repetition_detection: LoopDetectorConfig | dict | None = None
    max_loop_breaks: int = option(3, help="breaks before a loop stops generation", metavar="N")
    # set through --near-loop-* options
    near_repetition_detection: NearLoopConfig | dict | None = None
    loop_break_hold: int = option(
        DEFAULT_LOOP_BREAK_HOLD,
        help="after a break, ban every N-gram of the broken cycle for the rest of the request "
        "(0 = off)",
        metavar="N",
    )
    penalty_alpha: float = option(
        0.0, help="contrastive search's degeneration penalty, with --top-k candidates, 0 = off"
    )

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
        self._check_contrastive()
        self._check_structured()

    def _check_sampling(self) -> None:
        check_int("max_tokens", self.max_tokens, 0, ">= 0")
        _check_int_at_most("n", self.n, 1, MAX_N, "(samples of the prompt)")
        check_float("temperature", self.temperature, lambda v: v >= 0, ">= 0 (0 means greedy)")
        check_int("top_k", self.top_k, 0, ">= 0 (0 means off)")
        check_float("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1] (1 means off)")
        check_float("min_p", self.min_p, lambda v: 0 <= v <= 1, "in [0, 1] (0 means off)")
        check_float("typical_p", self.typical_p, lambda v: 0 < v <= 1, "in (0, 1] (1 means off)")
        if self.seed is not None:
            # torch generators take a signed 64-bit seed; sample i uses seed + i
            _check_int_at_most("seed", self.seed, 0, 2**63 - self.n, "or None")
        if self.logprobs is not None:
            _check_int_at_most("logprobs", self.logprobs, 0, MAX_LOGPROBS, "or None for off")
        if self.prompt_logprobs is not None:
            _check_int_at_most(
                "prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS, "or None for off"
            )

    def _check_penalties(self) -> None:
        low, high = REPETITION_PENALTY_RANGE
        check_float(
            "repetition_penalty",
            self.repetition_penalty,
            lambda v: low <= v <= high,
            f"in [{low}, {high}] (1 means off; above 1 discourages repeats)",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            check_float(name, getattr(self, name), lambda v: -2 <= v <= 2, "in [-2, 2]")
        check_int("penalty_last_n", self.penalty_last_n, 0, ">= 0 (0 means the whole history)")
        check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, ">= 0 (0 means off)")
        check_float(
            "dry_multiplier",
            self.dry_multiplier,
            lambda v: 0 <= v <= MAX_DRY_MULTIPLIER,
            f"in [0, {MAX_DRY_MULTIPLIER:g}] (0 means off)",
        )
        check_float(
            "dry_base", self.dry_base, lambda v: 1 <= v <= MAX_DRY_BASE, f"in [1, {MAX_DRY_BASE:g}]"
        )
        check_int("dry_allowed_length", self.dry_allowed_length, 1, ">= 1")
        check_int(
            "dry_penalty_last_n", self.dry_penalty_last_n, 0, ">= 0 (0 means the whole history)"
        )
        _check_strings(
            "dry_sequence_breakers",
            self.dry_sequence_breakers,
            MAX_DRY_SEQUENCE_BREAKERS,
            DRY_MAX_BREAKER_CHARS,  # llama.cpp reads no further
        )
        if not isinstance(self.logit_bias, dict):
            raise ValueError(
                f"logit_bias={self.logit_bias!r} is not allowed; it must map token ids to floats"
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(
                f"logit_bias names {len(self.logit_bias)} token ids; at most {MAX_LOGIT_BIAS} "
                "are allowed"
            )
        # JSON object keys are strings: accept "50256" as well as 50256
        bias = {}
        for key, value in self.logit_bias.items():
            token = int(key) if isinstance(key, str) and key.isdigit() else key
            check_int("logit_bias token id", token, 0, ">= 0")
            check_float(f"logit_bias[{token}]", value, lambda v: -100 <= v <= 100, "in [-100, 100]")
            bias[token] = float(value)
        self.logit_bias = bias

    def _check_stops(self) -> None:
        _check_strings("stop", self.stop, MAX_STOP_STRINGS, MAX_STOP_CHARS)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"stop_token_ids has {len(self.stop_token_ids)} ids; at most "
                f"{MAX_STOP_TOKEN_IDS} are allowed"
            )
        for token in self.stop_token_ids:
            check_int("stop_token_ids entry", token, 0, ">= 0")
        check_int("min_tokens", self.min_tokens, 0, ">= 0")
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
        self.near_repetition_detection = near_config(self.near_repetition_detection)
        given = self.repetition_detection is not None or self.near_repetition_detection is not None
        if given and self.loop_policy is None:
            self.loop_policy = "stop"
        _check_int_at_most("max_loop_breaks", self.max_loop_breaks, 0, MAX_LOOP_BREAKS)
        if self.loop_policy == "close_thinking" and self.logprobs is not None:
            raise ValueError(
                "loop_policy='close_thinking' with logprobs is not allowed: the </think> it "
                "writes was not sampled and has no log-probability"
            )
        _check_int_at_most(
            "loop_break_hold", self.loop_break_hold, 0, MAX_LOOP_BREAK_HOLD, "(0 means off)"
        )

    def _check_contrastive(self) -> None:
        check_float(
            "penalty_alpha", self.penalty_alpha, lambda v: 0 <= v <= 1, "in [0, 1] (0 means off)"
        )
        if not self.penalty_alpha:
            return
        if not 1 <= self.top_k <= MAX_CONTRASTIVE_TOP_K:
            raise ValueError(
                f"top_k={self.top_k!r} is not allowed with penalty_alpha={self.penalty_alpha}: "
                f"contrastive search scores top_k candidates, 1 to {MAX_CONTRASTIVE_TOP_K}"
            )
        if self.temperature >= MIN_SAMPLING_TEMPERATURE:
            raise ValueError(
                f"temperature={self.temperature!r} is not allowed with penalty_alpha="
                f"{self.penalty_alpha}: contrastive search is deterministic; use temperature 0"
            )

    def _check_structured(self) -> None:
        if self.structured_outputs is None:
            return
        self.structured_outputs = StructuredOutputs.from_value(self.structured_outputs)
        if self.ignore_eos and not self.stop_token_ids:
            raise ValueError(
                "ignore_eos with structured_outputs is not allowed: a constrained answer ends "
                "on an end token once it is complete (or name one in stop_token_ids)"
            )
        if self.min_tokens:
            raise ValueError(
                "min_tokens with structured_outputs is not allowed: the answer ends when the "
                "constraint is met, however long that is"
            )

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


def _check_int_at_most(name: str, value: object, low: int, high: int, more: str = "") -> None:
    allowed = f"in [{low}, {high}]" + (f" {more}" if more else "")
    check_int(name, value, low, allowed)
    if value > high:
        raise ValueError(f"{name}={value!r} is not allowed; it must be an integer {allowed}")


def _check_strings(name: str, values: list, max_count: int, max_chars: int) -> None:
    """``values`` must be at most ``max_count`` non-empty strings of at most ``max_chars``."""
    if len(values) > max_count:
        raise ValueError(f"{name} has {len(values)} strings; at most {max_count} are allowed")
    for value in values:
        if not isinstance(value, str) or not value or len(value) > max_chars:
            shown = repr(value) if not isinstance(value, str) else repr(value[:40])
            raise ValueError(
                f"{name} entry {shown} is not allowed; each must be a non-empty string of at "
                f"most {max_chars} characters"
            )


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A chosen token's log-probability and the ``top`` likeliest tokens at its position, best
    first, as (token id, log-probability) pairs; all under the model's raw distribution."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()

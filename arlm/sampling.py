"""Sampling parameters and the chain that turns next-token logits into a token.

Field names follow the OpenAI and vLLM APIs. Each processor maps a batch of logits (B, vocab)
to new logits; ``sample`` then draws one token per row (argmax at temperature 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

LogitsProcessor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    temperature: 0 is greedy (argmax); higher flattens the distribution.
    top_k: keep the k most likely tokens (0: all). top_p: keep the smallest set whose
    probability reaches p (1: all). min_p: drop tokens below min_p times the top probability.
    stop: strings that end generation (not included in the text). stop_token_ids: ids that end it.
    ignore_eos: keep going past the end-of-sequence token. seed: makes sampling reproducible.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 0")
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} must be >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 means off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 means off)")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r} must be in [0, 1] (0 means off)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop={self.stop!r} must be non-empty strings")

    @classmethod
    def from_kwargs(cls, **kwargs) -> SamplingParams:
        """Build from keyword arguments, naming any that are not sampling fields."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown sampling parameters {unknown}; known: {sorted(known)}")
        return cls(**kwargs)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # drop a token when the tokens before it already reach p; the most likely one always stays
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def build_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """The processor chain ``params`` asks for, in application order."""
    chain: list[LogitsProcessor] = []
    if params.temperature > 0 and params.temperature != 1.0:
        chain.append(lambda logits: logits / params.temperature)
    if params.top_k > 0:
        chain.append(lambda logits: top_k_filter(logits, params.top_k))
    if params.top_p < 1.0:
        chain.append(lambda logits: top_p_filter(logits, params.top_p))
    if params.min_p > 0.0:
        chain.append(lambda logits: min_p_filter(logits, params.min_p))
    return chain


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    chain: list[LogitsProcessor],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` (B, vocab) -> (B,)."""
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    for process in chain:
        logits = process(logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

"""Prompt log-probabilities in the engine: which prompt positions a step computes logits for,
and what becomes of those rows.

A sequence whose ``SamplingParams.prompt_logprobs`` is set gets, in every prefill chunk of its
prompt, the logits of each position whose next token is still a prompt token, in the same
forward that writes the chunk's keys and values (the runner's ``logits_at`` selects them after
the rows that sample). Such a sequence takes no prefix-cache hits (a position read from the
cache has no logits) and, with ``max_tokens`` 0, finishes when its prompt is in, sampling
nothing. ``Sequence.prompt_logprobs`` holds one ``PromptLogprob`` per prompt token after the
first; a position already scored (a prompt recomputed) is not scored twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from arlm.engine.sequence import Sequence
from arlm.sampling.prompt_logprobs import prompt_logprobs


def positions_to_score(seq: Sequence, start: int, n: int) -> range:
    """The positions of the prefill chunk ``[start, start + n)`` of ``seq`` whose logits score
    a prompt token (empty unless ``seq`` asked for prompt log-probabilities)."""
    if seq.params.prompt_logprobs is None:
        return range(0)
    first = max(start, len(seq.prompt_logprobs))
    return range(first, min(start + n, seq.prompt_len - 1))


@dataclass
class PromptRows:
    """The prompt positions one step computes logits for: ``(sequence, first position,
    count)`` spans, in the order of their rows after the sampling rows."""

    spans: list[tuple[Sequence, int, int]] = field(default_factory=list)
    logits: torch.Tensor | None = None  # (num_rows, vocab), set by the runner after its forward

    def add(self, seq: Sequence, positions: range) -> None:
        self.spans.append((seq, positions.start, len(positions)))

    def record(self) -> None:
        """Score the spans' next prompt tokens with their ``logits``."""
        targets, tops = [], []
        for seq, first, n in self.spans:
            targets += seq.token_ids[first + 1 : first + 1 + n]
            tops += [seq.params.prompt_logprobs] * n
        scored = iter(prompt_logprobs(self.logits, targets, tops))
        for seq, _, n in self.spans:
            seq.prompt_logprobs.extend(next(scored) for _ in range(n))


def scoring_only(rows: list[Sequence]) -> list[int]:
    """The indices of ``rows`` that asked for no tokens (``max_tokens`` 0: they came for their
    prompt log-probabilities and are done once the prompt is in)."""
    return [i for i, seq in enumerate(rows) if seq.params.max_tokens == 0]

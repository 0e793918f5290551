"""Prompt log-probabilities: how likely the model found each prompt token given the ones
before it, read off the logits of the forward that prefills the prompt.

The logits at prompt position ``p`` predict token ``p + 1``; the first prompt token has no
prediction (OpenAI's and vLLM's ``null``). Each scored token gets its log-probability, its rank
under the model's raw distribution (1: the likeliest) and the ``top`` likeliest alternatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arlm.devices import to_device, to_host


@dataclass(frozen=True, slots=True)
class PromptLogprob:
    """A prompt token's log-probability given the tokens before it, its rank (1 = the
    likeliest token there) and the ``top`` likeliest tokens as (id, log-probability) pairs."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()


def prompt_logprobs(
    logits: torch.Tensor, targets: list[int], tops: list[int]
) -> list[PromptLogprob]:
    """Per row of ``logits`` (P, vocab), the log-probability and rank of ``targets[i]`` and
    that row's ``tops[i]`` likeliest alternatives; one copy to the host for all rows."""
    logp = logits.float().log_softmax(dim=-1)
    index = to_device(targets, torch.long, logits.device)
    chosen = logp.gather(-1, index[:, None])  # (P, 1)
    # ties count in the token's favour, as vLLM ranks
    rank = (logp > chosen).sum(dim=-1) + 1
    values, ids = logp.topk(min(max(tops, default=0), logp.size(-1)), dim=-1)
    chosen, rank, values, ids = (t.tolist() for t in to_host([chosen[:, 0], rank, values, ids]))
    return [
        PromptLogprob(t, lp, r, tuple(zip(i[:k], v[:k], strict=True)))
        for t, lp, r, v, i, k in zip(targets, chosen, rank, values, ids, tops, strict=True)
    ]

"""Contrastive search's choice (Su et al. 2022, "A Contrastive Framework for Neural Text
Generation"): among the k likeliest next tokens, the one whose representation is least like the
context's, traded against its probability.

    score(v) = (1 - alpha) * p(v | x) - alpha * max_j cos(h_v, h_j)

``h_v`` is the last layer's (normed) hidden state at the new position when ``v`` is appended,
and ``h_j`` those of every position of the context, prompt included. A token that would make
the text look like what it already says (a loop's next copy) scores low, so the search is
deterministic and still leaves loops. Transformers' names: ``penalty_alpha`` and ``top_k``.

This module only scores; running the k candidates through the model is the decoder's business
(``arlm.engine.contrastive``). Rows of a batch are independent.
"""

from __future__ import annotations

import torch


def top_candidates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` likeliest tokens of each row of (processed) ``logits`` (B, vocab): their
    probabilities (B, k) under the row's softmax and their ids (B, k), likeliest first."""
    probs = logits.float().softmax(dim=-1)
    return torch.topk(probs, k, dim=-1)


def normalize(hidden: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dimension, in float32 (cosines of unit vectors are dots)."""
    hidden = hidden.float()
    return hidden / hidden.norm(dim=-1, keepdim=True)


def contrastive_scores(
    probs: torch.Tensor, candidates: torch.Tensor, context: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Scores (B, k) of the candidates. ``probs`` (B, k); ``candidates`` (B, k, D) and
    ``context`` (B, S, D) are unit vectors (``normalize``); ``alpha`` in [0, 1]."""
    cosine = candidates @ context.transpose(1, 2)  # (B, k, S)
    penalty = cosine.max(dim=-1).values  # (B, k): the most similar context position
    return (1.0 - alpha) * probs - alpha * penalty


def contrastive_pick(
    probs: torch.Tensor, candidates: torch.Tensor, context: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Index (B,) of each row's best candidate (the first on a tie, as ``argmax``)."""
    return contrastive_scores(probs, candidates, context, alpha).argmax(dim=-1)

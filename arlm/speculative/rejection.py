"""The rejection rule of speculative sampling (Leviathan et al. 2023, Chen et al. 2023): a
guess drawn from the proposer's distribution q is kept with probability min(1, p/q) under the
target's distribution p; otherwise the token is drawn from max(0, p - q), normalised. Either
way the token is distributed exactly as p.

The engine needs it only for a proposer that samples (a draft model at a request's
temperature). A guess that is a point mass (prompt lookup, a greedy draft) needs no separate
rule: keeping it with probability p(d) and otherwise drawing from p without d is the same as
drawing from p and keeping the guess if the draw is it, which is what the engine does
(``arlm.engine.speculation``).
"""

from __future__ import annotations

import torch


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, guess: int, generator: torch.Generator | None
) -> tuple[int, bool]:
    """The token for one position, and whether it is the ``guess``: ``p`` and ``q`` (vocab,)
    are the target's and the proposer's probabilities, ``guess`` a draw from ``q``. Two
    uniforms from ``generator`` at most (one when the guess is kept)."""
    u = torch.rand((), generator=generator, device=p.device, dtype=p.dtype)
    if u * q[guess] < p[guess]:  # u < p/q without dividing by a tiny q
        return guess, True
    residual = (p - q).clamp_min(0)
    total = residual.sum()
    if total <= 0:  # p == q up to rounding, where a rejection has probability 0
        residual, total = p, p.sum()
    v = torch.rand((), generator=generator, device=p.device, dtype=p.dtype)
    cdf = residual.cumsum(dim=-1)
    # right=True skips tokens of probability 0, whose interval of the cdf is empty
    token = torch.searchsorted(cdf, (v * total)[None], right=True)
    return int(token.clamp_(max=p.numel() - 1)), False

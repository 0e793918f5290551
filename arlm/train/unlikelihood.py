"""Unlikelihood training (Welleck et al. 2020, "Neural Text Generation with Unlikelihood
Training"): push down the probability of tokens the model should not repeat.

Token level. At each position t the negative candidates are the earlier targets of the same
window, ``C_t = {y_s : s < t} - {y_t}``, each counted once; the loss adds
``-sum_{c in C_t} log(1 - p(c | x_<t))`` to the cross-entropy. Sequence level. The model
continues prefixes of the batch greedily; every token of the continuation that completes an
n-gram already present earlier (prefix included) is itself the candidate, ``C_t = {y_t}``, and
the loss is ``-log(1 - p(y_t | y_<t))`` there. As in the authors' code, ``1 - p`` is clamped to
at least 1e-5, so a probability of one gives a large loss, not an infinite one.

Each function returns a *sum* and the caller divides by a count that is the same on every rank
(positions, not candidates), so a data-parallel run averages to what one process computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arlm.kv_cache.contiguous import KVCache
from arlm.model.transformer import Transformer

MIN_ONE_MINUS_P = 1e-5  # Welleck et al.'s clamp


def _one_minus_log(logprobs: torch.Tensor) -> torch.Tensor:
    """``-log(clamp(1 - p, 1e-5))`` elementwise from log-probabilities."""
    return -torch.log((1.0 - logprobs.exp()).clamp(min=MIN_ONE_MINUS_P))


def token_candidates(targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, T, vocab) float mask, 1 where a token is a negative candidate of position t: it is
    an earlier target of the row, and not the target at t. Targets -100 are never candidates,
    and a position whose target is -100 has none."""
    B, T = targets.shape
    valid = targets != -100
    earlier = torch.ones(T, T, dtype=torch.bool, device=targets.device).tril(-1)  # s < t
    # (B, T, T): row b, position t, the earlier position s's target
    context = targets.clamp(min=0)[:, None, :].expand(B, T, T)
    counts = valid[:, None, :] & earlier[None] & valid[:, :, None]
    mask = torch.zeros(B, T, vocab_size, device=targets.device)
    # a token seen several times is one candidate: add, then cap at one
    mask.scatter_add_(2, context, counts.float())
    mask = mask.clamp(max=1.0)
    return mask.scatter(2, targets.clamp(min=0)[..., None], 0.0)


def token_unlikelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The token-level unlikelihood term summed over every position and candidate: ``logits``
    (B, T, vocab), ``targets`` (B, T) with -100 ignored."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    mask = token_candidates(targets, logits.size(-1))
    return (_one_minus_log(logprobs) * mask).sum()


def repeated_ngram_mask(tokens: torch.Tensor, n: int, first: int) -> torch.Tensor:
    """(B, T) bool: True at positions ``t >= first`` of ``tokens`` (B, T) that belong to an
    n-gram (inside ``t >= first``) which already occurred earlier in the row, anywhere. Welleck
    et al.'s repeat-n candidates."""
    B, T = tokens.shape
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, row in enumerate(tokens.tolist()):
        seen: set[tuple[int, ...]] = set()
        for start in range(T - n + 1):
            gram = tuple(row[start : start + n])
            if start >= first and gram in seen:
                mask[b, start : start + n] = True
            seen.add(gram)
    return mask.to(tokens.device)


def sequence_unlikelihood(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """The sequence-level term summed over the positions ``mask`` (B, T) marks: there the
    target ``targets`` (B, T) is the one candidate."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (_one_minus_log(chosen) * mask).sum()


@torch.no_grad()
def greedy_continuations(model: Transformer, prefixes: torch.Tensor, length: int) -> torch.Tensor:
    """``prefixes`` (B, P) followed by ``length`` greedy tokens of ``model``: (B, P + length).
    Runs in eval mode (no dropout) through a KV cache, then restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        B, P = prefixes.shape
        cache = KVCache.for_model(
            model.config, B, P + length, device=prefixes.device, dtype=model.wte.weight.dtype
        )
        logits, _ = model(prefixes, kv_cache=cache, start_pos=0, last_only=True)
        out = [prefixes]
        for pos in range(P, P + length):
            token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            out.append(token)
            if pos + 1 < P + length:
                logits, _ = model(token, kv_cache=cache, start_pos=pos, last_only=True)
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)

"""DRY ("don't repeat yourself"), the repetition penalty of llama.cpp, with its semantics.

A token that would extend a repeat of length L >= ``allowed_length`` of earlier text loses
``multiplier * base ** (L - allowed_length)`` from its logit. The repeat that counts ends at the
last token and starts after the latest sequence breaker (a newline, ":", ... found as token
sequences), and a token that is itself a breaker is never penalized. Each step scans the window
once (the Z-algorithm), so its cost is linear in the window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from arlm.devices import to_device
from arlm.sampling.breakers import DryBreakers, dry_sequence_breakers
from arlm.sampling.processors import History, Processor

__all__ = ["Dry", "DryBreakers", "dry_penalties", "dry_sequence_breakers"]

# llama.cpp clamps DRY's exponent so that base ** exponent stays a finite float32.
_FLOAT32_MAX_LOG = 88.7228391


def _z_function(seq: list[int]) -> list[int]:
    """``z[k]``: the length of the longest common prefix of ``seq`` and ``seq[k:]``."""
    n = len(seq)
    z = [0] * n
    left = right = 0
    for k in range(1, n):
        if k < right:
            z[k] = min(right - k, z[k - left])
        while k + z[k] < n and seq[z[k]] == seq[k + z[k]]:
            z[k] += 1
        if k + z[k] > right:
            left, right = k, k + z[k]
    return z


def dry_penalties(
    ids: Sequence[int],
    multiplier: float,
    base: float,
    allowed_length: int,
    breakers: DryBreakers,
) -> dict[int, float]:
    """Token -> the amount DRY subtracts from its logit after ``ids`` (llama.cpp's algorithm).

    The repeat that matters ends at the last token and starts after the latest sequence breaker;
    for each earlier place where the text before it ends with the same L >= allowed_length
    tokens, the token that followed there would extend the repeat and loses
    ``multiplier * base ** (L - allowed_length)`` (the largest L per token counts).
    """
    n = len(ids)
    if n <= allowed_length:
        return {}
    # Step 1: how far back a repeat may reach: up to the latest breaker (and its tail).
    rep_limit = n
    for back in range(n):
        tails = breakers.get(ids[n - 1 - back])
        if tails is None:
            continue
        longest = -1
        for tail in tails:
            if longest < len(tail) <= back and all(
                tail[i] == ids[n - back + i] for i in range(len(tail))
            ):
                longest = len(tail)
        if longest >= 0:
            rep_limit = back - longest
            break
    if rep_limit < allowed_length:
        return {}
    # Step 2: on the reversed ids, z[k] is how many tokens before and at position n-1-k match
    # the tokens at the end.
    z = _z_function(list(reversed(ids)))
    longest_repeat: dict[int, int] = {}
    for k in range(1, n):
        length = min(z[k], rep_limit)
        if length >= allowed_length:
            token = ids[n - k]  # the token that followed that earlier occurrence
            longest_repeat[token] = max(longest_repeat.get(token, 0), length)
    max_exponent = _max_exponent(multiplier, base)
    penalties = {}
    for token, length in longest_repeat.items():
        if () in breakers.get(token, ()):
            continue  # a single-token breaker is never penalized
        exponent = length - allowed_length
        if max_exponent is not None:
            exponent = min(exponent, max_exponent)
        penalties[token] = multiplier * base**exponent
    return penalties


def _max_exponent(multiplier: float, base: float) -> int | None:
    """The largest exponent for which ``multiplier * base ** exponent`` stays a finite float32
    (None: any, for a base so close to 1 that the history's length cannot reach it).

    llama.cpp's clamp, ``log(FLT_MAX) / log(base)``, with room left for a multiplier above 1,
    and applied even when it is 0 (a base above e^88.7): unclamped, ``base ** 1`` alone would
    overflow float32 there, and a Python float a little further on.
    """
    if base <= 1.000001:
        return None
    room = _FLOAT32_MAX_LOG - max(math.log(multiplier), 0.0) if multiplier > 0 else 0.0
    return max(int(room / math.log(base)), 0)


class Dry(Processor):
    """DRY over each row's last ``last_n`` ids (0: all); see :func:`dry_penalties`."""

    def __init__(
        self,
        multiplier: float,
        base: float,
        allowed_length: int,
        last_n: int,
        breakers: DryBreakers,
    ) -> None:
        self.multiplier, self.base, self.allowed_length = multiplier, base, allowed_length
        self.last_n, self.breakers = last_n, breakers

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        rows, tokens, amounts = [], [], []
        for b, ids in enumerate(history.rows):
            window = ids[-self.last_n :] if self.last_n else ids
            penalties = dry_penalties(
                window, self.multiplier, self.base, self.allowed_length, self.breakers
            )
            rows += [b] * len(penalties)
            tokens += penalties.keys()
            amounts += penalties.values()
        if rows:
            index = to_device([rows, tokens], torch.long, logits.device)
            amounts = to_device(amounts, logits.dtype, logits.device)
            logits = logits.index_put(index.unbind(), -amounts, accumulate=True)
        return logits

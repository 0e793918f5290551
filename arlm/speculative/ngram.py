"""Prompt lookup: propose what followed the latest earlier occurrence of a sequence's last n
tokens, in its prompt or its output (n from ``max_n`` down to ``min_n``). No model.

Input-grounded work (rewriting or continuing a given passage, editing a code file) copies long
runs of its prompt, and a loop copies its own last period: both are continued exactly. The
search is ``bytes.rfind`` over the ids packed 8 bytes each, so it runs at C speed over a whole
context each step; nothing is kept between steps, so nothing goes stale when a sequence is
rolled back.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence as Seq
from typing import Protocol

from arlm.speculative.proposer import Guess


class HasTokens(Protocol):
    token_ids: list[int]


def lookup(ids: Seq[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``k`` ids that followed the latest earlier occurrence of the last n of ``ids``,
    for the longest n in ``max_n`` .. ``min_n`` that occurs; [] when none does."""
    if k < 1 or len(ids) < min_n + 1:
        return []
    packed = array("q", ids).tobytes()
    width = 8
    for n in range(min(max_n, len(ids) - 1), min_n - 1, -1):
        pattern = packed[-n * width :]
        # an occurrence must end before the last id, so that something followed it
        end = len(packed) - width
        while (at := packed.rfind(pattern, 0, end)) >= 0:
            if at % width == 0:  # a match that starts inside an id is no match
                return _continue(ids, at // width + n, k)
            end = at + len(pattern) - 1
    return []


def _continue(ids: Seq[int], start: int, k: int) -> list[int]:
    """``k`` ids copied from ``start`` on; past the end, the copy goes on from itself (the
    occurrence is ``len(ids) - start`` ids back, so a loop of that period goes on looping)."""
    out = list(ids[start : start + k])
    period = len(ids) - start
    while len(out) < k:
        out.append(out[len(out) - period])
    return out


class NgramProposer:
    """The ``ngram`` method of ``SpeculativeConfig`` (``prompt_lookup_min``/``_max``)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n

    def propose(self, seqs: list[HasTokens], ks: list[int]) -> list[Guess]:
        """Per sequence, up to ``ks[i]`` guessed next ids (maybe none), each a point mass."""
        return [
            Guess(lookup(s.token_ids, k, self.min_n, self.max_n))
            for s, k in zip(seqs, ks, strict=True)
        ]

    def release(self, seq: HasTokens) -> None:
        """Nothing is kept per sequence."""

"""What the engine asks of a proposer: guesses for a batch of sequences, and to forget one.

A proposer sees the engine's sequences through their ``token_ids`` (the prompt, then every
token kept so far) and ``params``, so a sequence rolled back (rejected guesses, a loop break)
needs no message: a proposer with a cache of its own compares the ids it has cached with the
sequence's and drops what no longer agrees. EAGLE-style heads fit the same interface, reading
the target's hidden states through their own hook.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class Guess:
    """One sequence's guessed next ids. ``probs`` (len(tokens), vocab): the distribution each
    was drawn from, for a proposer that samples; None: each is a point mass (a lookup, or a
    greedy draft), which the engine verifies by drawing the target's own token."""

    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None


class Proposer(Protocol):
    def propose(self, seqs: list, ks: list[int]) -> list[Guess]:
        """Per sequence, up to ``ks[i]`` guessed next token ids (none: no guess)."""
        ...

    def release(self, seq) -> None:
        """``seq`` finished: drop anything kept for it."""
        ...

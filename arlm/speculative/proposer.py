"""What the engine asks of a proposer: guesses for a batch of sequences, and to forget one.

A proposer sees the engine's sequences through their ``token_ids`` only (the prompt, then every
token kept so far), so a sequence rolled back (rejected guesses, a loop break) needs no message:
a proposer with a cache of its own compares the ids it has cached with the sequence's and drops
what no longer agrees. EAGLE-style heads fit the same interface, reading the target's hidden
states through their own hook.
"""

from __future__ import annotations

from typing import Protocol


class Proposer(Protocol):
    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        """Per sequence, up to ``ks[i]`` guessed next token ids (an empty list: no guess)."""
        ...

    def release(self, seq) -> None:
        """``seq`` finished: drop anything kept for it."""
        ...

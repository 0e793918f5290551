"""The ``close_thinking`` loop policy's one question: is a sequence inside a thinking section?

Reasoning models write their thoughts between ``<think>`` and ``</think>`` (the chat template
may open the section in the prompt). A loop there is the model circling in its reasoning;
vLLM's open proposal for reasoning loops, which this policy follows, closes the section at the
loop and lets the model answer from what it has thought. A loop outside one stops generation,
as the ``stop`` policy does.
"""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _last(ids: list[int], marker: tuple[int, ...]) -> int:
    """The start of the last occurrence of ``marker`` in ``ids``, or -1."""
    n = len(marker)
    for i in range(len(ids) - n, -1, -1):
        if tuple(ids[i : i + n]) == marker:
            return i
    return -1


@dataclass(frozen=True)
class ThinkMarkers:
    """The token ids that open and close a thinking section, as this tokenizer writes them."""

    open_ids: tuple[int, ...]
    close_ids: tuple[int, ...]

    @classmethod
    def of(cls, encode) -> ThinkMarkers:
        """From ``encode(text) -> ids`` (without special tokens added)."""
        return cls(tuple(encode(THINK_OPEN)), tuple(encode(THINK_CLOSE)))

    def inside(self, ids: list[int]) -> bool:
        """Whether ``ids`` (a prompt and what followed it) end inside a thinking section: the
        last opening comes after the last closing."""
        opened = _last(ids, self.open_ids)
        return opened >= 0 and opened > _last(ids, self.close_ids)

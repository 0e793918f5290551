"""DRY's sequence breakers as token sequences: llama.cpp's processing, fast enough to run while
other requests wait for the next step.

llama.cpp's rule: a token whose text contains a breaker is a breaker by itself; a token whose
text ends with the beginning of a breaker is one when the tokens of the rest of the breaker
follow it. Done literally, that is a Python loop over the vocabulary per breaker (a second or
more for a 150k vocabulary). ``BreakerIndex`` indexes the vocabulary's texts once, so a breaker
costs one C-speed scan of the joined texts plus work in proportion to the tokens it names (a
breaker starting with "e" names every token ending in "e"), and it keeps the tables it built,
a bounded number of them.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

# llama.cpp ignores breaker text beyond 40 characters and tails beyond 20 tokens.
DRY_MAX_BREAKER_CHARS = 40
DRY_MAX_TAIL_TOKENS = 20
# Tables kept for reuse, one per list of breakers (most requests send the defaults).
MAX_CACHED_BREAKER_TABLES = 64

# Head token -> the token tails that complete a sequence breaker after it (an empty tail: the
# head alone is a breaker).
DryBreakers = dict[int, list[tuple[int, ...]]]


class BreakerIndex:
    """The vocabulary's ``token_texts`` indexed for breaker lookups; ``encode`` tokenizes a
    breaker's rest (without special tokens). ``table(breakers)`` is llama.cpp's table."""

    def __init__(self, token_texts: Sequence[str], encode: Callable[[str], list[int]]) -> None:
        self.texts, self.encode = list(token_texts), encode
        # every text between two separators that no text contains: one str.find over the
        # whole vocabulary finds the texts containing a breaker, never one spanning two texts
        used = set("".join(self.texts))
        self.sep = next(chr(c) for c in itertools.count() if chr(c) not in used)
        self.joined = self.sep + self.sep.join(self.texts) + self.sep
        self.starts, at = [], 1
        for text in self.texts:
            self.starts.append(at)
            at += len(text) + 1
        self.starts.append(at)  # past the last text
        # texts reversed and sorted: those ending with a given string are one run of this list
        self.order = sorted(range(len(self.texts)), key=lambda t: self.texts[t][::-1])
        self.reversed = [self.texts[t][::-1] for t in self.order]
        self._tables: OrderedDict[tuple[str, ...], DryBreakers] = OrderedDict()

    def table(self, breakers: Iterable[str]) -> DryBreakers:
        """Head token -> tails for ``breakers`` (each cut to 40 characters, as llama.cpp)."""
        key = tuple(breakers)
        table = self._tables.get(key)
        if table is not None:
            self._tables.move_to_end(key)
            return table
        found: dict[int, set[tuple[int, ...]]] = {}
        for breaker in dict.fromkeys(b[:DRY_MAX_BREAKER_CHARS] for b in key):
            self._add(breaker, found)
        table = {token: list(tails) for token, tails in found.items()}
        self._tables[key] = table
        if len(self._tables) > MAX_CACHED_BREAKER_TABLES:
            self._tables.popitem(last=False)
        return table

    def _add(self, breaker: str, found: dict[int, set[tuple[int, ...]]]) -> None:
        whole = set()
        if self.sep not in breaker:
            at = self.joined.find(breaker)
            while at >= 0:
                token = bisect.bisect_right(self.starts, at) - 1
                whole.add(token)
                found.setdefault(token, set()).add(())
                at = self.joined.find(breaker, self.starts[token + 1])
        # texts ending with the breaker's first k characters, then its rest's tokens
        for k in range(1, len(breaker)):
            head = breaker[:k]
            if self.sep in head:
                break
            key = head[::-1]
            j = bisect.bisect_left(self.reversed, key)
            tail = None
            while j < len(self.reversed) and self.reversed[j].startswith(key):
                token = self.order[j]
                j += 1
                if token in whole:
                    continue  # it holds the whole breaker: a breaker by itself
                if tail is None:
                    tail = tuple(self.encode(breaker[k:])[:DRY_MAX_TAIL_TOKENS])
                found.setdefault(token, set()).add(tail)


def dry_sequence_breakers(
    token_texts: Sequence[str], encode: Callable[[str], list[int]], breakers: Iterable[str]
) -> DryBreakers:
    """llama.cpp's processing of DRY sequence breakers into token sequences (see the module
    docstring); for many calls over one vocabulary keep a ``BreakerIndex`` instead."""
    return BreakerIndex(token_texts, encode).table(breakers)

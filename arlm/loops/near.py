"""Online detection of near-duplicate loops: cycles whose copies differ in a few items.

The exact detector (``arlm.loops.detector``) needs every copy to be identical, so a model that
changes one token per copy ("item 1 ... item 2 ... item 3 ...", a counter, a synonym) loops for
ever under it. This rule looks at n-gram overlap instead of periodicity.

The rule. Over the last ``window`` items, let ``total`` be the number of n-grams (``ngram``
consecutive items) and ``distinct`` the number of different ones. A near loop is present when
``1 - distinct / total >= min_overlap``: at least that share of the window's n-grams repeat an
earlier n-gram of the window (the seq-rep-n of Welleck et al., over a sliding window).

Why it finds near loops. A cycle of period ``p`` whose copies each carry ``k`` edits
(substitutions, insertions or deletions) has at most ``p`` distinct n-grams from the clean
cycle, plus at most ``ngram`` new ones per edit. So it fires once
``p + c * k * ngram <= (1 - min_overlap) * total``, where ``c`` is the number of copies that
touch the window; an exact cycle (k = 0) fires for every period up to
``(1 - min_overlap) * total``. Text without repeated n-grams never fires.

The report. When it fires, the earliest n-gram of the window that occurs again later in it marks
where the repetition began: its first occurrence starts the first copy, its next occurrence
starts the second. The report is a :class:`~arlm.loops.detector.LoopReport` with that start and
``pattern_size`` the distance between the two, so a policy keeps the first copy and cuts the
rest exactly as it does for an exact loop. The pattern is the first copy as it was written
(later copies may differ from it).

Cost: O(1) per push (a sliding count of n-grams), O(window) when it fires.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable, Iterable
from dataclasses import asdict, dataclass

from arlm.loops.detector import LoopReport
from arlm.validate import check_float, check_int

# Chosen by measurement (docs/loops.md, "Near-duplicate loops"; benchmarks/near_loops.py): in
# no 128-token window of the built-in corpus does the 4-gram overlap of 48 tokens pass 0.511,
# so 0.55 reports none of them; and a window of 48 fits inside the bench's generations, where
# it finds 90% of those that Holtzman's rule calls repetitive. Longer windows tolerate more
# edits per copy (see the bound above) but fire later.
DEFAULT_NEAR_WINDOW = 48
DEFAULT_NEAR_NGRAM = 4
DEFAULT_NEAR_MIN_OVERLAP = 0.55
MAX_NEAR_WINDOW = 4096  # the detector keeps the window's items and n-gram counts


@dataclass(frozen=True)
class NearLoopConfig:
    """Thresholds of the near-duplicate rule (see the module docstring): ``window`` items,
    ``ngram`` items per n-gram, and the share ``min_overlap`` of the window's n-grams that must
    repeat an earlier one for a report."""

    window: int = DEFAULT_NEAR_WINDOW
    ngram: int = DEFAULT_NEAR_NGRAM
    min_overlap: float = DEFAULT_NEAR_MIN_OVERLAP

    def __post_init__(self) -> None:
        check_int("ngram", self.ngram, 1, ">= 1")
        allowed = f"in [ngram + 1 ({self.ngram + 1}), {MAX_NEAR_WINDOW}]"
        check_int("window", self.window, self.ngram + 1, allowed)
        if self.window > MAX_NEAR_WINDOW:
            raise ValueError(
                f"window={self.window!r} is not allowed; it must be an integer {allowed}"
            )
        check_float("min_overlap", self.min_overlap, lambda v: 0 < v <= 1, "in (0, 1]")

    @property
    def ngrams(self) -> int:
        """n-grams in a full window."""
        return self.window - self.ngram + 1


class NearLoopDetector:
    """Watches a stream pushed one item at a time and reports near-duplicate loops.

    ``push`` returns a :class:`LoopReport` whenever the last ``window`` items meet the rule in
    this module's docstring, else ``None``; indices are absolute, as the exact detector's.
    ``overlap`` is the current window's share of repeated n-grams. ``reset()`` forgets the
    stream.
    """

    def __init__(self, config: NearLoopConfig | None = None) -> None:
        self.config = config or NearLoopConfig()
        self.reset()

    def reset(self) -> None:
        """Forget everything pushed so far."""
        self._n = 0
        self._items: deque[Hashable] = deque(maxlen=self.config.window)
        self._grams: deque[tuple] = deque()  # the window's n-grams, oldest first
        self._counts: Counter[tuple] = Counter()

    def __len__(self) -> int:
        return self._n

    @property
    def overlap(self) -> float:
        """``1 - distinct / total`` over the n-grams of the current window (0 when none)."""
        total = len(self._grams)
        return 1.0 - len(self._counts) / total if total else 0.0

    def push(self, item: Hashable) -> LoopReport | None:
        """Add the next item; the near loop present now, or ``None``."""
        cfg = self.config
        self._items.append(item)
        self._n += 1
        if len(self._items) >= cfg.ngram:
            gram = tuple(self._items)[-cfg.ngram :] if cfg.ngram > 1 else (item,)
            self._grams.append(gram)
            self._counts[gram] += 1
            if len(self._grams) > cfg.ngrams:  # its first item left the window
                old = self._grams.popleft()
                left = self._counts[old] - 1
                if left:
                    self._counts[old] = left
                else:
                    del self._counts[old]
        if len(self._grams) < cfg.ngrams or self.overlap < cfg.min_overlap:
            return None
        return self._report()

    def _report(self) -> LoopReport:
        """Where the repetition in the window began: the earliest n-gram seen again."""
        first = self._n - len(self._items)  # absolute index of the window's first item
        seen: dict[tuple, int] = {}
        best: tuple[int, int] | None = None  # (first occurrence, next occurrence)
        for offset, gram in enumerate(self._grams):
            if gram in seen:
                start = seen[gram]
                if best is None or start < best[0]:
                    best = (start, offset)
            else:
                seen[gram] = offset
        # the rule fired, so some n-gram repeats
        assert best is not None
        start, second = best
        items = list(self._items)
        pattern = tuple(items[start:second])
        p = second - start
        position = self._n - 1
        return LoopReport(p, first + start, (position + 1 - first - start) // p, pattern, position)


def find_near_loops(items: Iterable[Hashable], config: NearLoopConfig | None = None) -> list[int]:
    """The indices at which the near rule starts firing over ``items`` (one per episode: the
    rule firing again after a push that did not fire counts anew)."""
    detector = NearLoopDetector(config)
    found, firing = [], False
    for i, item in enumerate(items):
        fired = detector.push(item) is not None
        if fired and not firing:
            found.append(i)
        firing = fired
    return found


def near_config(value: NearLoopConfig | dict | None) -> NearLoopConfig | None:
    """``value`` as a config: a ``NearLoopConfig``, a dict of its fields, or None."""
    if value is None or isinstance(value, NearLoopConfig):
        return value
    if isinstance(value, dict):
        known = list(asdict(NearLoopConfig()))
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"near-loop detection has unknown fields {unknown}; allowed: {known}")
        return NearLoopConfig(**value)
    raise ValueError(
        f"near-loop detection={value!r} is not allowed; it must be a NearLoopConfig, a dict of "
        "its fields, or None"
    )

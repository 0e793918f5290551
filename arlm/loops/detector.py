"""Online detection of exact loops in a stream of hashable items.

The rule. After ``n`` items, a period ``p`` has onset ``start_p``: the smallest ``s >= 0`` with
``items[i] == items[i + p]`` for every ``s <= i < n - p``, so ``items[start_p:]`` is the longest
suffix with period ``p``. A loop is present when some ``p`` in
``[min_pattern_size, max_pattern_size]`` has ``n - start_p >= max(min_count * p, min_span)``.

How it stays cheap. For each period ``p`` let ``r_p`` be the number of trailing positions ``i``
with ``items[i] == items[i + p]``; then ``start_p = n - p - r_p``. When item ``x`` arrives only
the periods ``p`` with ``items[n - p] == x`` keep a nonzero run, and those are exactly the
distances back to the earlier occurrences of ``x`` within the last ``max_pattern_size`` items.
So a push costs O(occurrences of ``x`` in that window) rather than O(max_pattern_size). Once a
loop is being followed, a push only checks the next item of the pattern: O(1). The bookkeeping
skipped meanwhile is rebuilt from the pattern when the loop breaks; that costs at most the
number of items pushed while following, per candidate period of the breaking item, and far
less in practice because other periods match only briefly inside a loop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import asdict, dataclass

from arlm.validate import check_int

# Single-token loops ("\n\n\n...", "the the the") are the commonest degenerate output.
DEFAULT_MIN_PATTERN_SIZE = 1
# Long enough for a block of several paragraphs (~750 English words in BPE tokens); the
# per-push cost depends on how often an item recurs in this window, not on its length.
DEFAULT_MAX_PATTERN_SIZE = 1024
# Two consecutive copies happen in ordinary writing (a refrain, a quoted line); three exact
# copies in a row is the threshold Holtzman et al. (2020) use to call a generation degenerate.
DEFAULT_MIN_COUNT = 3
# Short exact repeats are ordinary text ("ha ha ha", "...", a table rule "|---|---|"); 32 tokens
# (about two lines) of exact periodicity is not. Lower it for coarse items such as lines or
# agent steps.
# Measured (docs/loops.md): the built-in corpus's 112k tokens hold no exactly periodic
# stretch longer than 14 tokens, so every min_span >= 15 reports nothing on them, with
# min_count 2 or 3; 32 is twice that margin. The price: a loop is reported min_span tokens after
# its onset (3 x its period beyond that). Greedy decoding from the small model the main job
# trains loops in 43 of 50 held-out continuations of 128 tokens; the report comes a median 32
# (max 45) tokens after the loop's onset, where min_span 16 would make it 16 and catch 48.
DEFAULT_MIN_SPAN = 32
# The detector keeps a ring of max_pattern_size items, allocated up front: the limit keeps a
# request's detector at a few hundred KiB (64 times the default's period).
MAX_PATTERN_SIZE = 65536


@dataclass(frozen=True)
class LoopDetectorConfig:
    """Thresholds of the loop rule; the first three names follow vLLM's repetition detection.
    ``max_pattern_size`` is at most ``MAX_PATTERN_SIZE`` (65536): the detector holds that many
    items."""

    min_pattern_size: int = DEFAULT_MIN_PATTERN_SIZE
    max_pattern_size: int = DEFAULT_MAX_PATTERN_SIZE
    min_count: int = DEFAULT_MIN_COUNT
    min_span: int = DEFAULT_MIN_SPAN

    def __post_init__(self) -> None:
        check_int("min_pattern_size", self.min_pattern_size, 1, ">= 1")
        allowed = f"in [min_pattern_size ({self.min_pattern_size}), {MAX_PATTERN_SIZE}]"
        check_int("max_pattern_size", self.max_pattern_size, self.min_pattern_size, allowed)
        if self.max_pattern_size > MAX_PATTERN_SIZE:
            raise ValueError(
                f"max_pattern_size={self.max_pattern_size!r} is not allowed; it must be an "
                f"integer {allowed}"
            )
        check_int("min_count", self.min_count, 2, ">= 2")
        check_int("min_span", self.min_span, 0, ">= 0")


@dataclass(frozen=True, slots=True)
class LoopReport:
    """A loop: ``pattern`` repeats from absolute index ``start`` up to ``position`` (inclusive).

    ``count`` is the number of whole copies, ``(position + 1 - start) // pattern_size``; a
    trailing partial copy is part of the loop but not counted.
    """

    pattern_size: int
    start: int
    count: int
    pattern: tuple[Hashable, ...]
    position: int


class LoopDetector:
    """Watches a stream pushed one item at a time and reports exact loops as they form.

    ``push`` returns a :class:`LoopReport` whenever the rule in this module's docstring says a
    loop is present, else ``None``. The first report of a loop names the smallest qualifying
    period; later pushes that continue that period return it grown (same ``start`` and
    ``pattern``, larger ``count`` and ``position``), even if another period also qualifies by
    then. The first push that breaks the period ends the loop: that push applies the rule
    afresh and returns ``None`` unless a different loop is present right there, which is then
    reported and followed instead. ``reset()`` forgets the stream; indices restart at 0.

    Items are compared with ``==`` and looked up by hash, so they must be values (Python ints
    for token ids, not tensors). Memory is bounded by ``max_pattern_size`` items whatever the
    stream length; ``start`` and ``position`` are absolute indices into the stream.
    """

    def __init__(
        self,
        min_pattern_size: int = DEFAULT_MIN_PATTERN_SIZE,
        max_pattern_size: int = DEFAULT_MAX_PATTERN_SIZE,
        min_count: int = DEFAULT_MIN_COUNT,
        min_span: int = DEFAULT_MIN_SPAN,
    ) -> None:
        self.config = LoopDetectorConfig(min_pattern_size, max_pattern_size, min_count, min_span)
        self.reset()

    @classmethod
    def from_config(cls, config: LoopDetectorConfig) -> LoopDetector:
        """A detector with the thresholds of ``config``."""
        return cls(**asdict(config))

    def reset(self) -> None:
        """Forget everything pushed so far."""
        self._n = 0
        # The last max_pattern_size items, item i at slot i % max_pattern_size.
        self._ring: list = [None] * self.config.max_pattern_size
        # item -> ascending indices of its occurrences in the ring.
        self._pos: dict[Hashable, deque[int]] = {}
        # period -> r_p, for the periods whose run is nonzero after the last updated item.
        self._runs: dict[int, int] = {}
        self._report: LoopReport | None = None
        # While a loop is followed, ring, _pos and _runs stay as they were at this index.
        self._frozen_at = -1

    def __len__(self) -> int:
        return self._n

    @property
    def report(self) -> LoopReport | None:
        """The report returned by the latest push (``None`` when no loop is present)."""
        return self._report

    @property
    def unsettled(self) -> int:
        """How many of the latest items a loop reported later could still cover past the first
        copy of its pattern.

        While no loop is being followed, every report that later pushes return has
        ``start + pattern_size >= len(self) - unsettled``: a policy that cuts a loop down to one
        copy never cuts before that index, so the items before it are final. (A period's run
        grows by at most one per push, and the cut point of a loop of period p found at index
        m is m + 1 - r_p.) While a loop is followed, nothing is promised: every item counts.
        """
        if self._report is not None:
            return self._n
        return max(self._runs.values(), default=0)

    def push(self, item: Hashable) -> LoopReport | None:
        """Add the next item; return the loop present now, or ``None``."""
        n = self._n
        self._n = n + 1
        rep = self._report
        if rep is None:
            return self._step(item, n)
        p = rep.pattern_size
        if item != rep.pattern[(n - rep.start) % p]:
            return self._break(item, n, rep)
        rep = LoopReport(p, rep.start, (n + 1 - rep.start) // p, rep.pattern, n)
        self._report = rep
        return rep

    # -- internals ---------------------------------------------------------------------------

    def _qualifies(self, p: int, r: int) -> bool:
        span = p + r
        return span >= self.config.min_count * p and span >= self.config.min_span

    def _step(self, x: Hashable, n: int) -> LoopReport | None:
        """Update the runs for item ``x`` at index ``n`` with nothing followed."""
        cfg = self.config
        min_p, more, min_span = cfg.min_pattern_size, cfg.min_count - 1, cfg.min_span
        runs = self._runs
        new: dict[int, int] = {}
        best = 0
        occurrences = self._pos.get(x)
        if occurrences:
            for j in reversed(occurrences):  # nearest first: ascending period
                p = n - j
                if p < min_p:
                    continue
                r = runs.get(p, 0) + 1
                new[p] = r
                # _qualifies, inlined: this loop is the hot path
                if r >= more * p and r + p >= min_span and not best:
                    best = p
        self._runs = new
        self._append(n, x)
        return self._fire(best, n) if best else None

    def _break(self, x: Hashable, n: int, rep: LoopReport) -> LoopReport | None:
        """Item ``x`` at index ``n`` breaks the followed loop ``rep``: rebuild skipped state."""
        p0, s, pattern = rep.pattern_size, rep.start, rep.pattern
        cap, min_p = self.config.max_pattern_size, self.config.min_pattern_size
        f, ring = self._frozen_at, self._ring

        def item_at(u: int) -> Hashable:
            # From s on the stream is the pattern; older items are still in the frozen ring.
            return pattern[(u - s) % p0] if u >= s else ring[u % cap]

        lo, hi = max(0, n - cap), n - min_p
        candidates = [j for j in self._pos.get(x, ()) if lo <= j <= hi]
        candidates += [j for j in range(max(lo, f + 1), hi + 1) if item_at(j) == x]
        new: dict[int, int] = {}
        best = 0
        for j in reversed(candidates):
            p = n - j
            # r_p at index n - 1: count matches backwards until the frozen runs take over.
            t = n - 1
            while t > f and t >= p and item_at(t) == item_at(t - p):
                t -= 1
            r = n - 1 - t + (self._runs.get(p, 0) if t == f else 0) + 1
            new[p] = r
            if not best and self._qualifies(p, r):
                best = p
        self._runs = new
        self._report = None
        self._thaw(n, pattern, s)
        self._append(n, x)
        return self._fire(best, n) if best else None

    def _thaw(self, n: int, pattern: tuple, s: int) -> None:
        """Write the followed loop's items ``frozen_at + 1 .. n - 1`` into the ring."""
        f, cap, p0 = self._frozen_at, self.config.max_pattern_size, len(pattern)
        if n - (f + 1) <= cap:
            for t in range(f + 1, n):
                self._append(t, pattern[(t - s) % p0])
            return
        # Everything older is overwritten anyway: refill the whole ring.
        self._pos = {}
        for t in range(n - cap, n):
            item = pattern[(t - s) % p0]
            self._ring[t % cap] = item
            self._pos.setdefault(item, deque()).append(t)

    def _append(self, t: int, x: Hashable) -> None:
        cap = self.config.max_pattern_size
        slot = t % cap
        if t >= cap:
            old = self._ring[slot]
            held = self._pos[old]
            held.popleft()  # index t - cap, the oldest occurrence of that item
            if not held:
                del self._pos[old]
        self._ring[slot] = x
        held = self._pos.get(x)
        if held is None:
            self._pos[x] = deque((t,))
        else:
            held.append(t)

    def _fire(self, p: int, n: int) -> LoopReport:
        """Start following the loop of period ``p`` ending at index ``n``."""
        cap = self.config.max_pattern_size
        start = n + 1 - p - self._runs[p]
        block = [self._ring[u % cap] for u in range(n + 1 - p, n + 1)]
        shift = (start - (n + 1 - p)) % p  # the stream is periodic: rotate the last copy
        pattern = tuple(block[shift:] + block[:shift])
        self._frozen_at = n
        self._report = LoopReport(p, start, (n + 1 - start) // p, pattern, n)
        return self._report


def find_loops(items: Iterable[Hashable], **params: int) -> list[LoopReport]:
    """Every loop episode in ``items``: the final report of each, in order of detection.

    ``params`` are :class:`LoopDetector`'s. The detector re-arms by itself when a loop
    breaks, so later loops are found with absolute indices and no reset.
    """
    detector = LoopDetector(**params)
    found: list[LoopReport] = []
    current: LoopReport | None = None
    for item in items:
        rep = detector.push(item)
        if current is not None and (
            rep is None or (rep.start, rep.pattern_size) != (current.start, current.pattern_size)
        ):
            found.append(current)
        current = rep
    if current is not None:
        found.append(current)
    return found

"""What generation does when the loop detector fires: the stop, break, report and
close_thinking policies.

A ``LoopGuard`` watches one sequence's generated ids and decides; it holds no tensors. The
engine (``arlm.engine.Engine``) carries the decisions out: it cuts the ids, and for a
break it rolls the sequence's KV cache back and rebuilds its processors from the ids it keeps.

Keeping one copy. A report says the ids from ``start`` on repeat a block of ``pattern_size``;
the first copy, ``ids[start:start + pattern_size]``, is ordinary text, and the copies after it
are the loop. So ``stop`` keeps ``ids[:start + pattern_size]``, and ``break`` rolls back to the
same point, the onset of the second copy. ``close_thinking`` cuts there too; inside a thinking
section the engine then closes the section and goes on (``arlm.loops.thinking``), elsewhere it
stops.

A break that holds. Rolling back and banning one token at one position lets the model walk back
into the same cycle a few tokens later, or into a copy of it with one token changed: on the
small model of the loop bench, 28% of greedy generations under that break still ended in a
repetition. So each break also *holds*: every n-gram of the broken cycle (read cyclically, so the
seams between copies count too) is banned for the rest of the generation, in the manner of
``no_repeat_ngram_size`` but only for those n-grams. The sequence can then not re-enter that
cycle, nor any near copy of it that shares n consecutive ids, however long it goes on. And the
near-duplicate rule (``arlm.loops.near``), when given, reports the cycles whose copies differ,
which the exact rule never sees.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from arlm.loops.detector import LoopDetector, LoopDetectorConfig, LoopReport
from arlm.loops.near import NearLoopConfig, NearLoopDetector

# Each break doubles DRY's strength, from the request's or from this floor, so the first break
# with DRY off lands on llama.cpp's suggested dry_multiplier of 0.8, and a model that keeps
# returning to a loop meets a steeper penalty each time.
BREAK_DRY_FLOOR = 0.4


@dataclass(frozen=True, slots=True)
class LoopAction:
    """What the decode loop must do after a push.

    kind: ``"stop"`` (end, keeping ``keep`` ids), ``"break"`` (roll back to ``keep`` ids and
    go on), ``"report"`` (a new loop was reported at this id; go on), or ``"close_thinking"``
    (keep ``keep`` ids, then close a thinking section they are inside and go on, else stop).
    """

    kind: str
    report: LoopReport
    keep: int


class LoopGuard:
    """Applies ``policy`` ("stop", "break", "report" or "close_thinking") to a stream of
    generated ids.

    ``reports`` lists one report per loop: under "report" the latest state of each loop seen;
    under "stop" and "break" the report each action was taken on. ``breaks`` counts the loops
    broken; after ``max_breaks`` of them the next loop stops generation.

    near: the near-duplicate rule's thresholds (None: exact loops only); a loop either rule
    reports is acted on. hold: after each break, ban every ``hold``-gram of the broken cycle for
    the rest of the generation (0: only the one id at the rollback point, as before).
    """

    def __init__(
        self,
        policy: str,
        config: LoopDetectorConfig,
        max_breaks: int,
        near: NearLoopConfig | None = None,
        hold: int = 0,
    ) -> None:
        self.policy, self.max_breaks, self.hold = policy, max_breaks, hold
        self.detector = LoopDetector.from_config(config)
        self.near = NearLoopDetector(near) if near is not None else None
        self.breaks = 0
        self.reports: list[LoopReport] = []
        self._bans: dict[int, set[int]] = {}  # index of a generated id -> ids banned there
        self._ids: list[int] = []  # the generated ids, as the held bans read their context
        self._held: dict[tuple[int, ...], set[int]] = {}  # (hold - 1)-gram -> ids banned after
        self._near_firing = False  # whether the near rule fired at the previous push

    def push(self, token_id: int) -> LoopAction | None:
        """Watch the next generated id; the action to take, if any."""
        self._ids.append(token_id)
        report = self.detector.push(token_id)
        near = self.near.push(token_id) if self.near is not None else None
        same_near = near is not None and self._near_firing
        self._near_firing = near is not None
        if report is None:
            report = near
        if report is None:
            return None
        if self.policy == "report":
            latest = self.reports[-1] if self.reports else None
            if same_near or (
                latest is not None
                and (latest.start, latest.pattern_size) == (report.start, report.pattern_size)
            ):
                self.reports[-1] = report  # the same loop, grown
                return None
            self.reports.append(report)
            return LoopAction("report", report, len(self.detector))
        self.reports.append(report)
        keep = report.start + report.pattern_size
        if self.policy == "close_thinking":
            return LoopAction("close_thinking", report, keep)
        if self.policy == "stop" or self.breaks == self.max_breaks:
            return LoopAction("stop", report, keep)
        self.breaks += 1
        # the second copy began with the pattern's first id: ban it there
        self._bans.setdefault(keep, set()).add(report.pattern[0])
        if self.hold:
            self._hold_cycle(report.pattern)
        return LoopAction("break", report, keep)

    def _hold_cycle(self, pattern: tuple) -> None:
        """Ban every ``hold``-gram of the cycle ``pattern`` repeated, seams included."""
        n = self.hold
        cycle = list(pattern) * (n // len(pattern) + 2)  # long enough for every rotation
        for i in range(len(pattern)):
            gram = cycle[i : i + n]
            self._held.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def rewind(self, kept: list[int]) -> None:
        """Start over from the generated ids ``kept`` (after a break)."""
        self.detector.reset()
        for token_id in kept:
            self.detector.push(token_id)
        if self.near is not None:
            self.near.reset()
            for token_id in kept:
                self.near.push(token_id)
            self._near_firing = False
        self._ids = list(kept)
        # bans further on were made for ids that are gone; held cycles stay for good
        self._bans = {i: b for i, b in self._bans.items() if i <= len(kept)}

    def banned(self, index: int) -> set[int]:
        """The ids banned as the generated id number ``index`` (0-based)."""
        banned = self._bans.get(index, set())
        if self._held and index == len(self._ids):
            context = tuple(self._ids[len(self._ids) - self.hold + 1 :]) if self.hold > 1 else ()
            held = self._held.get(context)
            if held and len(context) == self.hold - 1:
                banned = banned | held
        return banned

    @property
    def settled(self) -> int:
        """How many of the generated ids no later action can cut off: safe to stream."""
        n = len(self.detector)
        if self.policy == "report":
            return n
        unsettled = self.detector.unsettled
        if self.near is not None:
            # a near report cuts inside its window at the earliest
            unsettled = max(unsettled, min(n, self.near.config.window))
        return n - unsettled

    def dry_multiplier(self, requested: float, ceiling: float = math.inf) -> float:
        """DRY's strength after the breaks so far: the request's, doubled by each break, and
        at most ``ceiling`` (the largest a sampler takes)."""
        if not self.breaks:
            return requested
        # 2.0 ** 1000 is a finite float; an int power past 1023 would not convert to one
        return min(max(requested, BREAK_DRY_FLOOR) * 2.0 ** min(self.breaks, 1000), ceiling)

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from arlm.loops.detector import LoopDetector, LoopDetectorConfig, LoopReport

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
    """

    def __init__(self, policy: str, config: LoopDetectorConfig, max_breaks: int) -> None:
        self.policy, self.max_breaks = policy, max_breaks
        self.detector = LoopDetector.from_config(config)
        self.breaks = 0
        self.reports: list[LoopReport] = []
        self._bans: dict[int, set[int]] = {}  # index of a generated id -> ids banned there

    def push(self, token_id: int) -> LoopAction | None:
        """Watch the next generated id; the action to take, if any."""
        report = self.detector.push(token_id)
        if report is None:
            return None
        if self.policy == "report":
            latest = self.reports[-1] if self.reports else None
            if latest is not None and (latest.start, latest.pattern_size) == (
                report.start,
                report.pattern_size,
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
        return LoopAction("break", report, keep)

    def rewind(self, kept: list[int]) -> None:
        """Start over from the generated ids ``kept`` (after a break)."""
        self.detector.reset()
        for token_id in kept:
            self.detector.push(token_id)
        # bans further on were made for ids that are gone
        self._bans = {i: b for i, b in self._bans.items() if i <= len(kept)}

    def banned(self, index: int) -> set[int]:
        """The ids banned as the generated id number ``index`` (0-based)."""
        return self._bans.get(index, set())

    @property
    def settled(self) -> int:
        """How many of the generated ids no later action can cut off: safe to stream."""
        if self.policy == "report":
            return len(self.detector)
        return len(self.detector) - self.detector.unsettled

    def dry_multiplier(self, requested: float, ceiling: float = math.inf) -> float:
        """DRY's strength after the breaks so far: the request's, doubled by each break, and
        at most ``ceiling`` (the largest a sampler takes)."""
        if not self.breaks:
            return requested
        # 2.0 ** 1000 is a finite float; an int power past 1023 would not convert to one
        return min(max(requested, BREAK_DRY_FLOOR) * 2.0 ** min(self.breaks, 1000), ceiling)

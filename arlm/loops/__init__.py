"""Loop detection for generated streams, the step guard for agents, and the repetition metrics
of the literature."""

from arlm.loops import metrics
from arlm.loops.detector import (
    DEFAULT_MAX_PATTERN_SIZE,
    DEFAULT_MIN_COUNT,
    DEFAULT_MIN_PATTERN_SIZE,
    DEFAULT_MIN_SPAN,
    LoopDetector,
    LoopDetectorConfig,
    LoopReport,
    find_loops,
)
from arlm.loops.step_guard import GuardConfig, StepGuard, Verdict

__all__ = [
    "DEFAULT_MAX_PATTERN_SIZE",
    "DEFAULT_MIN_COUNT",
    "DEFAULT_MIN_PATTERN_SIZE",
    "DEFAULT_MIN_SPAN",
    "GuardConfig",
    "LoopDetector",
    "LoopDetectorConfig",
    "LoopReport",
    "StepGuard",
    "Verdict",
    "find_loops",
    "metrics",
]

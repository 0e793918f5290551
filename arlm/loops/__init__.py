"""Loop detection for generated streams and the repetition metrics of the literature."""

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

__all__ = [
    "DEFAULT_MAX_PATTERN_SIZE",
    "DEFAULT_MIN_COUNT",
    "DEFAULT_MIN_PATTERN_SIZE",
    "DEFAULT_MIN_SPAN",
    "LoopDetector",
    "LoopDetectorConfig",
    "LoopReport",
    "find_loops",
    "metrics",
]

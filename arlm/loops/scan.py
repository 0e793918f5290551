"""Run the loop detector over a file: text as tokens, words or lines, or agent steps as JSON lines.

The detector works on any stream of hashable items, so the same rule that watches a model's
tokens can watch an agent repeating the same tool call. Each unit has its own default
thresholds: fine units (tokens, words) need a long exact span before a repeat counts as a loop
(the detector's defaults); coarse units (lines, steps) count three identical consecutive
blocks as a loop whatever their length.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from arlm.loops import LoopDetectorConfig, LoopReport, find_loops
from arlm.tokenizer import Tokenizer

UNITS = ("tokens", "words", "lines", "steps")
COARSE = LoopDetectorConfig(min_span=0)


@dataclass(frozen=True)
class ScanHit:
    """A loop in the file: the detector's report, in units, and the lines it spans (1-based)."""

    report: LoopReport
    first_line: int
    last_line: int
    preview: str  # the repeated block, shortened


@dataclass
class _Items:
    items: list
    lines: list[int]  # the 1-based line each item starts on
    show: list[str]  # how each item prints


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from e


def _tokens(text: str, tokenizer: Tokenizer) -> _Items:
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    lines, line = [], 1
    for piece in pieces:
        lines.append(line)
        line += piece.count("\n")
    return _Items(ids, lines, pieces)


def _words(text: str) -> _Items:
    items, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        for word in line.split():
            items.append(word)
            lines.append(number)
    return _Items(items, lines, [w + " " for w in items])


def _lines(text: str) -> _Items:
    # blank lines are layout, not content: three in a row are no loop
    numbered = [(n, line.rstrip()) for n, line in enumerate(text.splitlines(), start=1)]
    kept = [(n, line) for n, line in numbered if line]
    return _Items(
        [line for _, line in kept], [n for n, _ in kept], [line + "\n" for _, line in kept]
    )


def _steps(text: str, path: Path, key: str | None) -> _Items:
    items, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number} is not a JSON value ({e.msg})") from e
        if key is not None:
            if not isinstance(step, dict) or key not in step:
                raise ValueError(f"{path}:{number} has no field {key!r} to compare steps by")
            step = step[key]
        # equal steps compare equal whatever their key order
        items.append(json.dumps(step, sort_keys=True, ensure_ascii=False))
        lines.append(number)
    return _Items(items, lines, [s + "\n" for s in items])


def default_unit(path: str | os.PathLike, tokenizer: Tokenizer | None) -> str:
    """steps for ``.jsonl`` files, else tokens when there is a tokenizer, else lines."""
    if Path(path).suffix == ".jsonl":
        return "steps"
    return "tokens" if tokenizer is not None else "lines"


def default_config(unit: str) -> LoopDetectorConfig:
    """The detector's defaults for fine units; ``min_span=0`` for lines and steps."""
    return COARSE if unit in ("lines", "steps") else LoopDetectorConfig()


def scan_file(
    path: str | os.PathLike,
    unit: str | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    key: str | None = None,
    config: LoopDetectorConfig | None = None,
    **overrides: int,
) -> list[ScanHit]:
    """Every loop in the file at ``path``, in order.

    unit: tokens (needs ``tokenizer``), words, lines or steps (one JSON value per line,
    compared whole or by the field ``key``); None picks by ``default_unit``. config: the
    detector's thresholds (None: ``default_config(unit)``); overrides: single thresholds
    (``min_count=2``, ...) on top.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    unit = unit or default_unit(path, tokenizer)
    if unit not in UNITS:
        raise ValueError(f"unit={unit!r} is not allowed; choose one of {', '.join(UNITS)}")
    if unit == "tokens" and tokenizer is None:
        raise ValueError("scanning tokens needs a tokenizer: give a model (or pick words/lines)")
    if key is not None and unit != "steps":
        raise ValueError(f"key={key!r} picks a field of JSON steps; it does not apply to {unit}")
    text = _read_text(path)
    if unit == "tokens":
        found = _tokens(text, tokenizer)
    elif unit == "words":
        found = _words(text)
    elif unit == "lines":
        found = _lines(text)
    else:
        found = _steps(text, path, key)
    config = replace(config or default_config(unit), **overrides)
    hits = []
    for report in find_loops(found.items, **asdict(config)):
        block = "".join(found.show[report.start : report.start + report.pattern_size])
        preview = block if len(block) <= 60 else block[:57] + "..."
        hits.append(
            ScanHit(report, found.lines[report.start], found.lines[report.position], preview)
        )
    return hits

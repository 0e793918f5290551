"""Files of prompts, as ``arlm generate --prompts-file`` and ``arlm bench serve --prompts-file``
read them: JSON lines with a ``prompt`` field (text or token ids), or one prompt a line."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def read_prompts(path: str) -> list[str | list[int]]:
    """The prompts of a file: JSON lines with a ``prompt`` field, or else one prompt a line."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise FileNotFoundError(f"cannot read {path}: {e.strerror}") from e
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} has no prompts")
    if not lines[0].lstrip().startswith("{"):
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON object ({e.msg})") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not (
            isinstance(prompt, str)
            or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
        ):
            raise ValueError(
                f'{path}:{number}: needs a "prompt" field, a string or a list of token ids'
            )
        prompts.append(prompt)
    return prompts

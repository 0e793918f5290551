"""Files of prompts, as ``arlm generate --prompts-file`` and ``arlm bench serve --prompts-file``
read them: JSON lines with a ``prompt`` field (text or token ids), or one prompt a line.

Every fault is a ``ValueError`` naming the file and line and what a prompt may be."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ALLOWED = 'a "prompt" field: a string, or a list of token ids (integers >= 0)'


def read_prompts(path: str) -> list[str | list[int]]:
    """The prompts of a file: JSON lines with a ``prompt`` field, or else one prompt a line."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as e:
        raise FileNotFoundError(f"cannot read {path}: {e.strerror}") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: byte {data[e.start]:#04x} is not UTF-8; a prompts file is UTF-8 text"
        ) from None
    # numbered as an editor numbers them: "\n" ends a line (str.splitlines would also split at
    # characters JSON strings may hold, such as U+2028)
    lines = [
        (number, line.removesuffix("\r"))
        for number, line in enumerate(text.split("\n"), 1)
        if line.strip()
    ]
    if not lines:
        raise ValueError(f"{path} has no prompts")
    if not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    return [_json_prompt(line, f"{path}:{number}") for number, line in lines]


def _json_prompt(line: str, where: str) -> str | list[int]:
    try:
        record = json.loads(line)
    except RecursionError:
        raise ValueError(f"{where}: nested too deeply to read; each line needs {ALLOWED}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
    except ValueError:  # an integer literal past Python's limit on digits
        raise ValueError(
            f"{where}: a number has more than {sys.get_int_max_str_digits():,} digits; each line "
            f"needs {ALLOWED}"
        ) from None
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if isinstance(prompt, str):
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{where}: the prompt holds a lone surrogate ({prompt[e.start]!r} at character "
                f"{e.start}); text must be valid Unicode, where a \\ud800-\\udfff escape is only "
                "half of a pair"
            ) from None
        return prompt
    if isinstance(prompt, list):
        for i, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(
                    f"{where}: prompt[{i}] is {json.dumps(token)[:40]}, not a token id; each line "
                    f"needs {ALLOWED}"
                )
        return prompt
    raise ValueError(f"{where}: needs {ALLOWED}")

"""Where training text comes from: the built-in corpus, a file, a folder or a glob."""

from __future__ import annotations

import glob
from pathlib import Path

BUILTIN = "builtin"
TEXT_SUFFIXES = (".txt", ".md")


class CorpusError(ValueError):
    """A corpus that cannot be read, with what was wrong and what is accepted."""


def builtin_documents() -> list[str]:
    """The Python Language Reference topics that ship with CPython (``pydoc_data.topics``, about
    465 KB of English prose), one document per topic in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path} is not UTF-8 text ({e})") from e


def load_documents(spec: str) -> list[str]:
    """The documents of a corpus: ``builtin``, a text file, a folder (its ``.txt``/``.md`` files,
    recursively), or a glob pattern. Order is fixed (sorted paths), so splits are deterministic."""
    if spec == BUILTIN:
        return builtin_documents()
    path = Path(spec).expanduser()
    if path.is_file():
        paths = [path]
    elif path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not paths:
            raise CorpusError(f"folder {path} has no {'/'.join(TEXT_SUFFIXES)} files")
    elif glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise CorpusError(f"no files match the pattern {spec!r}")
    else:
        raise CorpusError(
            f"corpus {spec!r} not found; give 'builtin', a text file, a folder of "
            f"{'/'.join(TEXT_SUFFIXES)} files, or a glob pattern"
        )
    documents = [text for text in map(_read, paths) if text.strip()]
    if not documents:
        raise CorpusError(f"corpus {spec!r} is empty: its files hold no text")
    return documents

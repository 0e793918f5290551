"""Where training text comes from: the built-in corpus, text files, JSON-lines files, folders and
glob patterns, read as a stream, so a corpus larger than memory never has to fit in it.

A corpus is a sequence of documents: a text file is one, each line of a JSON-lines file
(``.jsonl``) is one (its ``"text"`` field, as most public corpora ship), the built-in corpus has
one per topic. Documents of nothing but whitespace are left out. ``read_pieces`` yields them in a
fixed order as pieces of bounded size, so a huge file is read and encoded a piece at a time.
"""

from __future__ import annotations

import bisect
import codecs
import glob
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

BUILTIN = "builtin"
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
FOLDER_SUFFIXES = (*TEXT_SUFFIXES, JSONL_SUFFIX)
ACCEPTED = (
    "'builtin', a text file, a JSON-lines file (.jsonl: one JSON object with a \"text\" string "
    "per line), a folder of .txt/.md/.jsonl files (searched recursively) or a glob pattern"
)
# a longer document is read and encoded in pieces of at most this many characters
PIECE_CHARS = 1 << 20
# a line break and the whitespace after it, up to a visible ASCII character (see cut_point)
_LINE_BREAK = re.compile(r"\n[ \t\r\n\x0b\x0c]*(?=[!-~])")
_ASCII_SPACE = " \t\r\n\x0b\x0c"
SAMPLE_WINDOWS = 64  # stretches a tokenizer's sample is drawn from, spread over the corpus


class CorpusError(ValueError):
    """A corpus that cannot be read, with what was wrong and what is accepted."""


def builtin_documents() -> list[str]:
    """The Python Language Reference topics that ship with CPython (``pydoc_data.topics``, about
    465 KB of English prose), one document per topic in a fixed order."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def empty_corpus(spec: str) -> CorpusError:
    return CorpusError(f"corpus {spec!r} is empty: its files hold no text")


@dataclass(frozen=True)
class Source:
    """One file of a corpus, or the built-in topics: how to read it and what identifies it."""

    kind: str  # "text" (one document), "jsonl" (one per line) or "builtin" (one per topic)
    path: Path  # absolute; the built-in corpus's is pydoc_data/topics.py
    size: int  # bytes of text, for progress and sampling
    mtime_ns: int

    def identity(self) -> list:
        """What changes when the content may have: kind, path, size, modification time."""
        return [self.kind, str(self.path), self.size, self.mtime_ns]


def resolve(spec: str) -> list[Source]:
    """The sources of a corpus spec (``ACCEPTED``) in a fixed order (sorted paths), so what is
    built from them is deterministic; ``CorpusError`` when the spec names nothing to read."""
    if not spec.strip():  # Path("") is the current folder: it would be read whole, recursively
        raise CorpusError(f"corpus {spec!r} is empty; give {ACCEPTED} ('.' for this folder)")
    if spec == BUILTIN:
        import pydoc_data.topics

        path = Path(pydoc_data.topics.__file__).resolve()
        size = sum(len(text.encode("utf-8")) for text in builtin_documents())
        return [Source("builtin", path, size, path.stat().st_mtime_ns)]
    path = Path(spec).expanduser()
    if path.is_file():
        paths = [path]
    elif path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FOLDER_SUFFIXES)
        if not paths:
            raise CorpusError(f"folder {path} has no {'/'.join(FOLDER_SUFFIXES)} files")
    elif glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not paths:
            raise CorpusError(f"no files match the pattern {spec!r}")
    else:
        raise CorpusError(f"corpus {spec!r} not found; give {ACCEPTED}")
    sources = []
    for p in paths:
        stat = p.stat()
        kind = "jsonl" if p.suffix == JSONL_SUFFIX else "text"
        sources.append(Source(kind, p.resolve(), stat.st_size, stat.st_mtime_ns))
    return sources


class Position(NamedTuple):
    """Where reading can start again: a source, the bytes of its text before that point, the
    lines before it (JSON lines), and the index of the document there. Positions order as the
    corpus reads."""

    source: int
    offset: int
    line: int
    document: int


START = Position(0, 0, 0, 0)


@dataclass(frozen=True)
class Piece:
    """A document's text, or one part of a long document."""

    text: str
    document: int  # the document's index in the corpus
    end: bool  # the document's last piece (its end-of-text token follows)
    position: Position  # reading from here yields this piece again (and what follows)
    consumed: int  # bytes of the corpus read once this piece is


def consumed_before(sources: list[Source], position: Position) -> int:
    """Bytes of the corpus before ``position``."""
    return sum(source.size for source in sources[: position.source]) + position.offset


def read_pieces(
    sources: list[Source], start: Position = START, piece_chars: int = PIECE_CHARS
) -> Iterator[Piece]:
    """The corpus's documents in order, from ``start`` on: each one piece, or several of at most
    ``piece_chars`` characters when it is longer (cut where ``cut_point`` says)."""
    consumed = sum(source.size for source in sources[: start.source])  # readers add offsets
    document = start.document
    for index in range(start.source, len(sources)):
        source = sources[index]
        at = start if index == start.source else Position(index, 0, 0, document)
        for piece in _READERS[source.kind](source, at, consumed, piece_chars):
            yield piece
            document = piece.document + 1
        consumed += source.size


def count_documents(sources: list[Source], at_most: int) -> int:
    """How many documents the corpus holds, counted no further than ``at_most``. A text file
    counts once its first piece with text is found, so a huge one is not read through."""
    count = 0
    for index, source in enumerate(sources):
        pieces = _READERS[source.kind](source, Position(index, 0, 0, count), 0, PIECE_CHARS)
        for piece in pieces:
            count = piece.document + 1
            if count >= at_most or source.kind == "text":
                break
        pieces.close()
        if count >= at_most:
            break
    return count


def cut_point(text: str, limit: int) -> int:
    """Where a piece of ``text`` (longer than ``limit`` characters) ends, at most ``limit`` in.

    Byte-level BPE with GPT-2's split rule encodes the pieces exactly as it encodes the whole
    text when the cut is in the whitespace between two lines, next to a visible ASCII character:
    before the last character of a whitespace run ("end.\\n\\n|\\nNext", "end.\\n  | Next": the
    run but its last character is one token either way), or after a lone line break
    ("end.\\n|Next"). Such a place is looked for in the last 64K characters; failing that, the
    piece ends after the last line break, or at ``limit``.
    """
    runs = list(_LINE_BREAK.finditer(text, max(1, limit - (1 << 16)), limit + 1))
    for run in reversed(runs):
        if run.end() - run.start() > 1 or text[run.start() - 1] in _ASCII_SPACE:
            return run.end() - 1
        before = text[run.start() - 1]
        if "!" <= before <= "~" or (before > "\x7f" and not before.isspace()):
            return run.end()
    newline = text.rfind("\n", 0, limit)
    return newline + 1 if newline >= 0 else limit


def _blank(text: str) -> bool:
    return not text or text.isspace()


def _split(text: str, document: int, position: Position, consumed: int, limit: int):
    """A document held whole in memory, as pieces (all read again from ``position``)."""
    start = 0
    while len(text) - start > limit:
        cut = start + cut_point(text[start : start + limit + 1], limit)
        yield Piece(text[start:cut], document, False, position, consumed)
        start = cut
    yield Piece(text[start:], document, True, position, consumed)


def _text_pieces(source: Source, at: Position, consumed: int, limit: int) -> Iterator[Piece]:
    """A text file: one document, read a block at a time and cut into pieces."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = at.offset  # bytes of the file before ``buffer``
    started = at.offset > 0  # reading again inside a document whose text began before
    buffer, eof = "", False
    with open(source.path, "rb") as f:
        f.seek(offset)
        while True:
            while not eof and len(buffer) <= limit:
                block = f.read(limit)
                eof = not block
                try:
                    buffer += decoder.decode(block, final=eof)
                except UnicodeDecodeError as e:
                    near = f.tell() - len(block) + e.start
                    raise CorpusError(
                        f"{source.path} is not UTF-8 text (near byte {near}: {e.reason}); "
                        "convert it to UTF-8"
                    ) from e
            if not buffer:
                return
            cut = len(buffer) if len(buffer) <= limit else cut_point(buffer, limit)
            text, buffer = buffer[:cut], buffer[cut:]
            position = Position(at.source, offset, 0, at.document)
            offset += len(text.encode("utf-8"))
            if started or not text.isspace():  # whitespace before a document's text is dropped
                started = True
                yield Piece(text, at.document, eof and not buffer, position, consumed + offset)


def _record_text(raw: bytes, path: Path, line: int) -> str:
    rule = 'each line of a .jsonl file must be one JSON object with a "text" string'
    try:
        record = json.loads(raw)
    except ValueError as e:  # not JSON, or not UTF-8
        raise CorpusError(f"{path}:{line}: not valid JSON ({e}); {rule}") from e
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise CorpusError(f'{path}:{line}: no "text" string in this line\'s JSON; {rule}')
    return record["text"]


def _jsonl_pieces(source: Source, at: Position, consumed: int, limit: int) -> Iterator[Piece]:
    """A JSON-lines file: one document per line, its "text" field; blank lines are skipped."""
    offset, line, document = at.offset, at.line, at.document
    with open(source.path, "rb") as f:
        f.seek(offset)
        for raw in f:
            position = Position(at.source, offset, line, document)
            offset += len(raw)
            line += 1
            if raw.isspace():
                continue
            text = _record_text(raw, source.path, line)
            if not _blank(text):
                yield from _split(text, document, position, consumed + offset, limit)
                document += 1


def _builtin_pieces(source: Source, at: Position, consumed: int, limit: int) -> Iterator[Piece]:
    """The built-in corpus: one document per topic."""
    offset, document = 0, at.document
    for text in builtin_documents():
        size = len(text.encode("utf-8"))
        if offset >= at.offset and not _blank(text):
            position = Position(at.source, offset, 0, document)
            yield from _split(text, document, position, consumed + offset + size, limit)
            document += 1
        offset += size


_READERS = {"text": _text_pieces, "jsonl": _jsonl_pieces, "builtin": _builtin_pieces}


def sample_texts(sources: list[Source], max_bytes: int) -> Iterator[str]:
    """About ``max_bytes`` of the corpus's text, to train a tokenizer on: all of it when it is no
    larger, else ``SAMPLE_WINDOWS`` runs of whole lines spread evenly over it, so a corpus
    ordered by topic or origin is sampled throughout. Lines of JSON that do not parse are passed
    over here; encoding reports them."""
    total = sum(source.size for source in sources)
    if total <= max_bytes:
        yield from (piece.text for piece in read_pieces(sources))
        return
    starts = [0]
    for source in sources:
        starts.append(starts[-1] + source.size)
    window = max(max_bytes // SAMPLE_WINDOWS, 1)
    for k in range(SAMPLE_WINDOWS):
        at = total * k // SAMPLE_WINDOWS
        index = bisect.bisect_right(starts, at) - 1
        offset, left = at - starts[index], window
        while left > 0 and index < len(sources):  # a window runs on into the next sources
            texts, read = _sample_window(sources[index], offset, left)
            yield from texts
            left -= read
            index, offset = index + 1, 0


def _sample_window(source: Source, offset: int, size: int) -> tuple[list[str], int]:
    """The whole lines (or topics) in ``size`` bytes of ``source`` from ``offset``, and the
    bytes read."""
    if source.kind == "builtin":
        texts, seen = [], 0
        for text in builtin_documents():
            if offset <= seen < offset + size:
                texts.append(text)
            seen += len(text.encode("utf-8"))
        return texts, min(size, max(source.size - offset, 0))
    with open(source.path, "rb") as f:
        f.seek(offset)
        skipped = len(f.readline(size)) if offset else 0  # the rest of a line begun before
        data = f.read(max(size - skipped, 0))
        data += f.readline(size)  # and the line the window ends in
    read = skipped + len(data)
    if source.kind == "text":
        return [data.decode("utf-8", errors="replace")], read
    texts = []
    for raw in data.splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
    return texts, read

"""``arlm prepare``: a corpus of any size encoded once into token shards, in bounded memory.

The corpus streams in (``arlm.train.corpus.read_pieces``). Without a tokenizer, one is trained
on a sample spread over the corpus (``sample_texts``). Batches of documents go through the
tokenizer's batch encoder (multithreaded, in Rust) on a worker thread while the next batch is
read, and the ids go straight into the shard files (``ShardWriter``): memory does not grow with
the corpus. The folder's layout and the split rule are described in ``arlm.train.data``.

Resume: each time a shard is complete, ``progress.json`` records for each split its complete
shards and where its next token comes from (a corpus position to read again from, and how many
tokens read from there are in place already). A run in the same folder reads from the earlier
of those positions, passes over the documents of a split that is further on without encoding
them, and writes the same bytes as a run that was never stopped. ``meta.json``, written last,
marks the folder complete.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from arlm.atomic import write_atomic
from arlm.config import PRESETS, option
from arlm.tokenizer import Tokenizer
from arlm.train.corpus import (
    PIECE_CHARS,
    START,
    Piece,
    Position,
    Source,
    consumed_before,
    count_documents,
    empty_corpus,
    read_pieces,
    resolve,
    sample_texts,
)
from arlm.train.data import (
    FORMAT,
    META,
    TAIL,
    TOKENIZER,
    VAL_FRACTION,
    Shards,
    ShardWriter,
    documents_to_split,
    end_of_text,
    is_validation,
    open_shards,
    read_meta,
    split_ranges,
    token_dtype,
)
from arlm.validate import check_float, check_int

PROGRESS = "progress.json"


@dataclass
class PrepareConfig:
    """How a corpus is encoded; ``prepare``'s keyword arguments, ``arlm prepare``'s options."""

    vocab_size: int = option(
        PRESETS["small"]["vocab_size"],  # the default preset's
        help="ids of the tokenizer trained on the corpus",
    )
    tokenizer: str | None = option(
        None, help="encode with this tokenizer.json (or a folder holding one) instead of training"
    )
    shard_tokens: int = option(1 << 24, help="tokens per shard file")  # 32 MiB of uint16
    val_fraction: float = option(
        VAL_FRACTION,
        help="share of the documents held out for validation (of the tokens, for a corpus of "
        "too few documents)",
    )
    tokenizer_sample_bytes: int = option(
        1 << 25, help="bytes of the corpus, spread over it, the tokenizer is trained on"
    )
    batch_bytes: int = option(1 << 21, help="bytes of text per encoding batch")

    def __post_init__(self) -> None:
        check_int("vocab_size", self.vocab_size, 257)  # 256 bytes and the end-of-text token
        check_int("shard_tokens", self.shard_tokens, 1)
        check_int("tokenizer_sample_bytes", self.tokenizer_sample_bytes, 1)
        check_int("batch_bytes", self.batch_bytes, 1)
        check_float("val_fraction", self.val_fraction, lambda f: 0 < f < 1, "between 0 and 1")


_DEFAULTS = PrepareConfig()


def prepare(
    corpus: str,
    out: Path,
    *,
    tokenizer: Tokenizer | None = None,
    vocab_size: int = _DEFAULTS.vocab_size,
    shard_tokens: int = _DEFAULTS.shard_tokens,
    val_fraction: float = _DEFAULTS.val_fraction,
    tokenizer_sample_bytes: int = _DEFAULTS.tokenizer_sample_bytes,
    batch_bytes: int = _DEFAULTS.batch_bytes,
    progress: bool = True,
) -> Shards:
    """Encode ``corpus`` (``arlm.train.corpus.ACCEPTED``) into shards in ``out``; finish an
    interrupted run there, or open a finished one. With ``tokenizer`` None, a tokenizer of
    ``vocab_size`` ids is trained on ``tokenizer_sample_bytes`` of the corpus."""
    config = PrepareConfig(
        vocab_size=vocab_size,
        shard_tokens=shard_tokens,
        val_fraction=val_fraction,
        tokenizer_sample_bytes=tokenizer_sample_bytes,
        batch_bytes=batch_bytes,
    )
    sources = resolve(corpus)
    return _prepare(corpus, sources, Path(out), tokenizer, config, progress)


def load_or_prepare(
    corpus: str,
    cache_dir: Path,
    *,
    vocab_size: int = _DEFAULTS.vocab_size,
    tokenizer: Tokenizer | None = None,
    progress: bool = True,
) -> Shards:
    """The shards training reads: ``corpus`` itself when it is a prepared folder (its tokenizer
    must then be ``tokenizer``, when one is given), else the corpus prepared into
    ``cache_dir/shards/<key>`` on first use and read from there afterwards. The key comes from
    the corpus's files (paths, sizes, modification times), never their contents, and from the
    tokenizer: the given one, or one of ``vocab_size`` ids trained on the corpus."""
    folder = Path(corpus).expanduser()
    if (folder / META).is_file():
        shards = open_shards(folder)
        if tokenizer is not None and tokenizer.to_json() != shards.tokenizer.to_json():
            raise ValueError(
                f"{folder} was prepared with another tokenizer than this run's; train on the "
                "corpus it was prepared from, or prepare it again with --tokenizer"
            )
        return shards
    config = PrepareConfig(vocab_size=vocab_size)
    sources = resolve(corpus)
    if tokenizer is not None:
        # a resumed run brings its own tokenizer: the one trained for it when it began
        trained = cache_dir / "shards" / _key(_settings(sources, None, config))
        if (trained / META).is_file():
            shards = open_shards(trained)
            if shards.tokenizer.to_json() == tokenizer.to_json():
                return shards
    out = cache_dir / "shards" / _key(_settings(sources, tokenizer, config))
    return _prepare(corpus, sources, out, tokenizer, config, progress)


def _settings(sources: list[Source], tokenizer: Tokenizer | None, config: PrepareConfig) -> dict:
    """All the shards depend on: a folder prepared with other settings is neither resumed nor
    reused."""
    if tokenizer is None:
        tokenizer_spec = {
            "vocab_size": config.vocab_size,
            "sample_bytes": config.tokenizer_sample_bytes,
        }
    else:
        tokenizer_spec = {"sha256": hashlib.sha256(tokenizer.to_json().encode()).hexdigest()}
    return {
        "format": FORMAT,
        "corpus": [source.identity() for source in sources],
        "tokenizer": tokenizer_spec,
        "shard_tokens": config.shard_tokens,
        "val_fraction": config.val_fraction,
        "piece_chars": PIECE_CHARS,
    }


def _key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


def _check_settings(out: Path, found: dict, wanted: dict) -> None:
    if found != wanted:
        differ = ", ".join(key for key in wanted if found.get(key) != wanted[key])
        raise ValueError(
            f"{out} holds shards of another corpus or other settings (differing: {differ}); "
            "run with the same corpus and options to resume it, or remove the folder or "
            "choose another to prepare anew"
        )


def _log(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _prepare(
    corpus: str,
    sources: list[Source],
    out: Path,
    tokenizer: Tokenizer | None,
    config: PrepareConfig,
    progress: bool,
) -> Shards:
    settings = _settings(sources, tokenizer, config)
    if (out / META).is_file():
        _check_settings(out, read_meta(out)["settings"], settings)
        (out / PROGRESS).unlink(missing_ok=True)  # left by a run stopped right after finishing
        return open_shards(out)
    if (out / PROGRESS).is_file():
        state = json.loads((out / PROGRESS).read_text())
        _check_settings(out, state["settings"], settings)
        _log(progress, f"resuming the run in {out}")
    else:
        if out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir()):
            raise ValueError(
                f"{out} is not empty and holds no corpus being prepared; choose a new or empty "
                "output folder"
            )
        documents = count_documents(sources, documents_to_split(config.val_fraction))
        if documents == 0:
            raise empty_corpus(corpus)
        split = "document" if documents >= documents_to_split(config.val_fraction) else "tail"
        names = ("train", "val") if split == "document" else (TAIL,)
        state = {
            "settings": settings,
            "split": split,
            "splits": {name: {"shards": 0, "position": START, "skip": 0} for name in names},
            "seconds": 0.0,
            "tokenizer_seconds": 0.0,
        }
        out.mkdir(parents=True, exist_ok=True)
        _save_progress(out, state)
    for temporary in out.glob(".*.tmp"):  # left by a run that was killed mid-write
        temporary.unlink()
    tokenizer = _tokenizer(out, sources, tokenizer, config, state, progress)
    meta = _encode(out, sources, tokenizer, config, state, progress)
    write_atomic(out / META, json.dumps(meta, indent=2).encode())
    (out / PROGRESS).unlink()
    return open_shards(out)


def _save_progress(out: Path, state: dict) -> None:
    write_atomic(out / PROGRESS, json.dumps(state, indent=2).encode())


def _tokenizer(
    out: Path,
    sources: list[Source],
    tokenizer: Tokenizer | None,
    config: PrepareConfig,
    state: dict,
    progress: bool,
) -> Tokenizer:
    """The given tokenizer, or the one trained by the run this one resumes, or a new one."""
    path = out / TOKENIZER
    if tokenizer is not None:
        if not path.is_file():
            tokenizer.save(path)
        return tokenizer
    if path.is_file():
        return Tokenizer.from_file(path)
    sample = min(config.tokenizer_sample_bytes, sum(source.size for source in sources))
    _log(progress, f"training a tokenizer of {config.vocab_size} ids on {sample:,} bytes")
    started = time.perf_counter()
    tokenizer = Tokenizer.train(
        sample_texts(sources, config.tokenizer_sample_bytes), config.vocab_size
    )
    state["tokenizer_seconds"] = time.perf_counter() - started
    tokenizer.save(path)
    _save_progress(out, state)
    return tokenizer


@dataclass
class _Split:
    """One split being written: its shards, the checkpoint it resumes from (reading from
    ``position`` yields ``skip`` tokens already in complete shards), and the tokens it has seen
    from the position of the pieces now being written."""

    writer: ShardWriter
    position: Position
    skip: int
    current: Position = START
    since: int = 0

    def state(self) -> dict:
        return {"shards": self.writer.shards, "position": self.position, "skip": self.skip}


def _encode(
    out: Path,
    sources: list[Source],
    tokenizer: Tokenizer,
    config: PrepareConfig,
    state: dict,
    progress: bool,
) -> dict:
    """Encode the corpus into the shards from the checkpoint in ``state``; returns the meta."""
    dtype, eot = token_dtype(tokenizer.vocab_size), end_of_text(tokenizer)
    by_document = state["split"] == "document"
    started, seconds_before = time.perf_counter(), state["seconds"]
    written = 0  # tokens this run wrote

    def split_of(piece: Piece) -> str:
        if not by_document:
            return TAIL
        return "val" if is_validation(piece.document, config.val_fraction) else "train"

    with ExitStack() as stack:
        splits = {}
        for name, saved in state["splits"].items():
            writer = ShardWriter(out, name, dtype, config.shard_tokens, first=saved["shards"])
            stack.enter_context(writer)
            splits[name] = _Split(writer, Position(*saved["position"]), saved["skip"])
        start = min(split.position for split in splits.values())
        bar = stack.enter_context(
            tqdm(
                total=sum(source.size for source in sources),
                initial=consumed_before(sources, start),
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc="encoding",
                disable=not progress,
                dynamic_ncols=True,
            )
        )
        last: Piece | None = None

        def batches() -> Iterator[list[tuple[Piece, str]]]:
            nonlocal last
            batch, size = [], 0
            for piece in read_pieces(sources, start):
                last = piece
                name = split_of(piece)
                if piece.position < splits[name].position:
                    continue  # in the split's complete shards already
                batch.append((piece, name))
                size += len(piece.text)
                if size >= config.batch_bytes:
                    yield batch
                    batch, size = [], 0
            if batch:
                yield batch

        def write(encoded: list[list[int]], batch: list[tuple[Piece, str]]) -> None:
            nonlocal written
            for (piece, name), ids in zip(batch, encoded, strict=True):
                split = splits[name]
                if piece.end:
                    ids.append(eot)
                if piece.position != split.current:
                    split.current, split.since = piece.position, 0
                drop = 0  # tokens in complete shards, when reading again from a checkpoint
                if piece.position == split.position:
                    drop = min(max(split.skip - split.since, 0), len(ids))
                completed = split.writer.write(np.asarray(ids[drop:], dtype=dtype))
                if completed is not None:
                    split.position, split.skip = piece.position, split.since + drop + completed
                    state["splits"] = {n: s.state() for n, s in splits.items()}
                    state["seconds"] = seconds_before + time.perf_counter() - started
                    _save_progress(out, state)
                split.since += len(ids)
                written += len(ids) - drop
            bar.update(batch[-1][0].consumed - bar.n)
            rate = written / (time.perf_counter() - started)
            bar.set_postfix(docs=f"{batch[-1][0].document + 1:,}", tok_s=f"{rate:,.0f}")

        # one batch is encoded (the tokenizer releases the GIL) while the next one is read
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = deque()
            for batch in batches():
                texts = [piece.text for piece, _ in batch]
                pending.append((pool.submit(tokenizer.encode_batch, texts), batch))
                if len(pending) > 1:
                    future, done = pending.popleft()
                    write(future.result(), done)
            while pending:
                future, done = pending.popleft()
                write(future.result(), done)
        bar.update(bar.total - bar.n)
    # the writers closed without an error: every shard is on disk
    writers = {name: split.writer for name, split in splits.items()}
    return {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "end_of_text": eot,
        "split": state["split"],
        "val_fraction": config.val_fraction,
        **split_ranges(writers, config.val_fraction),
        "documents": last.document + 1,  # the corpus was read to its end
        "bytes": sum(source.size for source in sources),
        "tokens": sum(writer.tokens for writer in writers.values()),
        "seconds": seconds_before + time.perf_counter() - started,
        "tokenizer_seconds": state["tokenizer_seconds"],
        "settings": state["settings"],
    }

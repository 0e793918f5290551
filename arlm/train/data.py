"""Token shards: the on-disk form of an encoded corpus, and the windows training reads from it.

A prepared corpus is a folder (written by ``arlm prepare``, ``arlm.train.prepare``):

    tokenizer.json                 the tokenizer that encoded it
    train_000000.bin, ...          token ids (uint16 when the vocabulary fits, else uint32), each
    val_000000.bin, ...            document followed by the end-of-text token
    meta.json                      written last: its presence means the folder is complete

A split reads its shards as one token stream (``TokenSplit``, memory-mapped), so a window may
straddle two shards. ``meta.json`` says how the corpus was split (``"split"``):

- ``"document"``: a hash of each document's index sends about ``val_fraction`` of the documents
  to validation, so no document is in both splits. Used when validation can expect at least
  ``MIN_VAL_DOCUMENTS`` documents (100 documents at the default tenth).
- ``"tail"``: a corpus of fewer documents (one text file, say) is one series of
  ``tokens_*.bin`` shards; the last ``val_fraction`` of its tokens is validation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arlm.atomic import atomic_path
from arlm.tokenizer import Tokenizer

FORMAT = 1  # of the folder; a folder of another format is prepared again
META = "meta.json"
TOKENIZER = "tokenizer.json"
VAL_FRACTION = 0.1  # share of the documents (or of a tail-split corpus's tokens) held out
MIN_VAL_DOCUMENTS = 10  # fewer expected validation documents: hold out the tail instead
TAIL = "tokens"  # the shards' prefix when the split is the tail of one stream


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "arlm"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def end_of_text(tokenizer: Tokenizer) -> int:
    """The id that follows each document."""
    if not tokenizer.eos_token_ids:
        raise ValueError("the tokenizer has no end-of-text token to separate documents")
    return tokenizer.eos_token_ids[0]


def documents_to_split(val_fraction: float) -> int:
    """The fewest documents a corpus is split by document with: enough that validation can
    expect ``MIN_VAL_DOCUMENTS`` of them."""
    return math.ceil(MIN_VAL_DOCUMENTS / val_fraction - 1e-9)


def is_validation(document: int, val_fraction: float) -> bool:
    """Whether document number ``document`` is held out: decided by a hash of the index, so the
    choice is fixed, spread evenly over the corpus, and needs nothing but the index."""
    digest = hashlib.blake2b(document.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


class TokenSplit:
    """The tokens of one split: its shards read as one stream, ``[start, stop)`` of their
    concatenation. ``len`` is its number of tokens; slicing copies tokens out as an array."""

    def __init__(self, shards: Sequence[np.ndarray], start: int = 0, stop: int | None = None):
        self._shards = [shard for shard in shards if len(shard)]
        # where each shard begins in the concatenation; the last entry is its length
        self._bounds = np.cumsum([0] + [len(shard) for shard in self._shards])
        total = int(self._bounds[-1])
        stop = total if stop is None else stop
        if not 0 <= start <= stop <= total:
            raise ValueError(f"range [{start}, {stop}) is not within the {total} tokens")
        self.start, self.stop = start, stop
        self.dtype = self._shards[0].dtype if self._shards else np.dtype(np.uint16)

    @classmethod
    def open(cls, paths: Sequence[Path], dtype, start: int = 0, stop: int | None = None):
        """Memory-map the shard files ``paths``."""
        return cls([np.memmap(path, dtype=dtype, mode="r") for path in paths], start, stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("a TokenSplit takes slices (split[a:b]), not single indices")
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("a TokenSplit is sliced with step 1 only")
        start, stop = self.start + start, self.start + max(stop, start)
        shard = int(np.searchsorted(self._bounds, start, side="right")) - 1
        parts = []
        while start < stop:  # the range may run over into the next shards
            begin, end = int(self._bounds[shard]), int(self._bounds[shard + 1])
            parts.append(self._shards[shard][start - begin : min(stop, end) - begin])
            start, shard = min(stop, end), shard + 1
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.dtype)

    def tolist(self) -> list[int]:
        return self[:].tolist()

    def windows(self, starts: list[int], block_size: int) -> torch.Tensor:
        """The windows of ``block_size + 1`` tokens that begin at ``starts``: int64 (n, T + 1)."""
        out = np.empty((len(starts), block_size + 1), dtype=np.int64)
        for row, start in enumerate(starts):
            out[row] = self[start : start + block_size + 1]
        return torch.from_numpy(out)


@dataclass
class Shards:
    """A prepared corpus: its splits, the tokenizer that encoded them, the folder they live in,
    and what ``meta.json`` says of them (counts, dtype, how the corpus was split)."""

    train: TokenSplit
    val: TokenSplit
    tokenizer: Tokenizer
    directory: Path
    meta: dict


def read_meta(directory: Path) -> dict:
    """``meta.json`` of a prepared folder."""
    meta = json.loads((Path(directory) / META).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{directory} holds shards of format {meta.get('format')}, not {FORMAT}; "
            "prepare the corpus again"
        )
    return meta


def open_shards(directory: Path) -> Shards:
    """The shards of a complete folder (one with ``meta.json``)."""
    directory = Path(directory)
    meta = read_meta(directory)

    def split(name: str) -> TokenSplit:
        entry = meta[name]
        paths = [directory / shard for shard in entry["shards"]]
        return TokenSplit.open(paths, meta["dtype"], entry["start"], entry["stop"])

    tokenizer = Tokenizer.from_file(directory / TOKENIZER)
    return Shards(split("train"), split("val"), tokenizer, directory, meta)


class ShardWriter:
    """Appends token ids to shards ``{prefix}_000000.bin``, ... of ``shard_tokens`` tokens each
    (the last one shorter). Each shard is written through ``atomic_path``: it appears when it is
    full, or when the writer's block ends without an error; never half-written."""

    def __init__(self, directory: Path, prefix: str, dtype, shard_tokens: int, first: int = 0):
        self.directory, self.prefix = Path(directory), prefix
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards = first  # complete shards
        self.tokens = first * shard_tokens  # in complete shards and the open one
        self._open: ExitStack | None = None
        self._file = None

    def names(self) -> list[str]:
        """The file names of the complete shards."""
        return [f"{self.prefix}_{index:06d}.bin" for index in range(self.shards)]

    def write(self, ids: np.ndarray) -> int | None:
        """Append ``ids``. Returns how many of them went in up to the end of the last shard this
        completed, or None when it completed none."""
        ids = np.asarray(ids, dtype=self.dtype)
        taken, completed = 0, None
        while taken < len(ids):
            if self._open is None:
                self._open = ExitStack()
                name = f"{self.prefix}_{self.shards:06d}.bin"
                tmp = self._open.enter_context(atomic_path(self.directory / name))
                self._file = self._open.enter_context(open(tmp, "wb"))  # noqa: SIM115 (the stack)
            room = self.shard_tokens - self.tokens % self.shard_tokens
            chunk = ids[taken : taken + room]
            self._file.write(chunk.tobytes())
            taken += len(chunk)
            self.tokens += len(chunk)
            if self.tokens % self.shard_tokens == 0:
                self._close(None, None, None)
                completed = taken
        return completed

    def _close(self, *exc_info) -> None:
        stack, self._open, self._file = self._open, None, None
        stack.__exit__(*exc_info)  # without an error: fsync and rename; with one: remove
        if exc_info[0] is None:
            self.shards += 1

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._open is not None:
            self._close(*exc_info)


def split_ranges(writers: dict[str, ShardWriter], val_fraction: float) -> dict:
    """``meta.json``'s "train" and "val": each split's shards and its token range in them."""
    if TAIL in writers:
        shards, total = writers[TAIL].names(), writers[TAIL].tokens
        cut = total - max(int(total * val_fraction), 1)
        ranges = {
            "train": {"shards": shards, "start": 0, "stop": cut},
            "val": {"shards": shards, "start": cut, "stop": total},
        }
    else:
        ranges = {
            name: {"shards": writer.names(), "start": 0, "stop": writer.tokens}
            for name, writer in writers.items()
        }
    for name, entry in ranges.items():
        if entry["stop"] <= entry["start"]:
            raise ValueError(
                f"the {name} split came out empty; use a larger corpus or another val_fraction"
            )
    return ranges


def sample_starts(
    split: TokenSplit, n: int, block_size: int, generator: torch.Generator
) -> list[int]:
    """``n`` uniform starts of windows of ``block_size + 1`` tokens in ``split``, drawn with one
    ``torch.randint`` call on ``generator``."""
    if len(split) <= block_size:
        raise ValueError(
            f"the split holds {len(split)} tokens, too few for windows of {block_size + 1}; "
            "use a larger corpus or a smaller block size"
        )
    return torch.randint(len(split) - block_size, (n,), generator=generator).tolist()


def get_batch(
    split: TokenSplit,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random contiguous windows ``x`` (B, T) and the same windows shifted by one, ``y``."""
    starts = sample_starts(split, batch_size, block_size, generator)
    batch = split.windows(starts, block_size).to(device)
    return batch[:, :-1], batch[:, 1:]

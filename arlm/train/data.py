"""Token shards: a corpus encoded once into ``train.bin``/``val.bin``, read through a memory map."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from arlm.atomic import write_atomic
from arlm.tokenizer import Tokenizer

VAL_FRACTION = 0.1  # the last tenth of the token stream is held out for validation


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "arlm"


def corpus_digest(documents: list[str]) -> str:
    h = hashlib.sha256()
    for doc in documents:
        h.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return h.hexdigest()


@dataclass
class Shards:
    """Memory-mapped token ids of the train and validation splits."""

    train: np.memmap
    val: np.memmap
    directory: Path


def prepare_shards(documents: list[str], tokenizer: Tokenizer, cache_dir: Path) -> Shards:
    """Encode ``documents`` (separated by the end-of-text token) and split them, or reuse the
    shards of an earlier run with the same corpus and tokenizer."""
    key = hashlib.sha256(
        (corpus_digest(documents) + tokenizer.to_json()).encode("utf-8")
    ).hexdigest()[:20]
    directory = Path(cache_dir) / "shards" / key
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        if not tokenizer.eos_token_ids:
            raise ValueError("the tokenizer has no end-of-text token to separate documents")
        eot = tokenizer.eos_token_ids[0]
        ids: list[int] = []
        for doc_ids in tokenizer.encode_batch(documents):
            ids.extend(doc_ids)
            ids.append(eot)
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        tokens = np.asarray(ids, dtype=dtype)
        n_val = max(int(len(tokens) * VAL_FRACTION), 1)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "train.bin", tokens[:-n_val].tobytes())
        write_atomic(directory / "val.bin", tokens[-n_val:].tobytes())
        # written last: its presence means both shards are complete
        meta = {
            "dtype": np.dtype(dtype).name,
            "train_tokens": len(tokens) - n_val,
            "val_tokens": n_val,
        }
        write_atomic(meta_path, json.dumps(meta).encode())
    meta = json.loads(meta_path.read_text())
    return Shards(
        train=np.memmap(directory / "train.bin", dtype=meta["dtype"], mode="r"),
        val=np.memmap(directory / "val.bin", dtype=meta["dtype"], mode="r"),
        directory=directory,
    )


def get_batch(
    data: np.memmap,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random contiguous windows ``x`` (B, T) and the same windows shifted by one, ``y``."""
    if len(data) <= block_size:
        raise ValueError(
            f"the split holds {len(data)} tokens, too few for windows of {block_size + 1}; "
            "use a larger corpus or a smaller block size"
        )
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).tolist()
    windows = np.stack([data[s : s + block_size + 1].astype(np.int64) for s in starts])
    batch = torch.from_numpy(windows).to(device)
    return batch[:, :-1], batch[:, 1:]

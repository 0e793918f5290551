"""What a checkpoint directory stores, read from its headers before any weight is loaded: the
dtype its floating-point weights are saved in and how many bytes they take in a given dtype (so
``dtype="auto"`` can follow the checkpoint, and a model that cannot fit a device is refused before
it is half loaded)."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from arlm.config import DTYPES
from arlm.formats.checkpoint import CheckpointError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
_FLOATS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# bytes per element of the other safetensors dtypes (quantized weights, their packed nibbles)
_OTHER_BYTES = {"F64": 8, "I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1}


@dataclass(frozen=True)
class StoredWeights:
    """dtype: the floating-point dtype most stored weights are in (None when the headers and
    config do not say: pickled weights without a dtype in config.json). float_elements: how many
    floating-point numbers the weights hold; other_bytes: the rest (int8/int4 weights)."""

    dtype: torch.dtype | None
    float_elements: int
    other_bytes: int

    def nbytes(self, dtype: torch.dtype) -> int:
        """The weights' size loaded with their floating-point tensors in ``dtype``."""
        return self.float_elements * dtype.itemsize + self.other_bytes


def _config_dtype(directory: Path) -> torch.dtype | None:
    """The dtype a Hugging Face config.json declares (``dtype``, or ``torch_dtype`` before
    transformers 5), when it names one arlm loads."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    name = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) else None
    return DTYPES.get(name) if isinstance(name, str) else None


def _weight_files(directory: Path) -> list[Path]:
    if (directory / SAFETENSORS_INDEX).is_file():
        index = json.loads((directory / SAFETENSORS_INDEX).read_text())
        return [directory / f for f in sorted(set(index.get("weight_map", {}).values()))]
    return [directory / SAFETENSORS] if (directory / SAFETENSORS).is_file() else []


def stored_weights(path: str | os.PathLike) -> StoredWeights:
    """The weights of the checkpoint directory ``path`` (arlm or Hugging Face), from the
    safetensors headers and config.json; reads no tensor data."""
    directory = Path(path)
    by_dtype: Counter[torch.dtype] = Counter()
    floats = other = 0
    for file in _weight_files(directory):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():  # noqa: SIM118 (a handle cannot be iterated)
                    piece = handle.get_slice(name)
                    n = math.prod(piece.get_shape())
                    kind = piece.get_dtype()
                    if kind in _FLOATS:
                        by_dtype[_FLOATS[kind]] += n
                        floats += n
                    else:
                        other += n * _OTHER_BYTES.get(kind, 1)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({e}); it may be truncated or corrupted"
            ) from e
    dtype = by_dtype.most_common(1)[0][0] if by_dtype else _config_dtype(directory)
    return StoredWeights(dtype, floats, other)

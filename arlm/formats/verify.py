"""Model files checked before memory is committed to them.

A config says how large a model is; the weights' headers say how large its tensors are. Both
come from whoever wrote the folder, so a loader compares them before it builds anything: the
layer count and the sizes that scale a model (vocabulary, width, context) from the headers
alone, then every tensor's shape and dtype against a model built on the meta device. Only then
is data read, a tensor at a time, and each is refused if it holds NaN or infinity. The special
ids a folder declares (end, start and padding of text) are checked against the vocabulary.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from arlm.config import ModelConfig


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be used, with the reason."""


_FLOATS = ("F64", "F32", "F16", "BF16")  # safetensors' names of the float dtypes a model reads
_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# a block's index in a tensor name: arlm's and GPT-2's h.N., the Llama layout's layers.N.
_LAYER = re.compile(r"(?:^|\.)(?:h|layers)\.(\d+)\.")
# the tensors whose shape a config's size fields alone decide, and which field sets each axis
_SIZED_BY = {"wte.weight": ("vocab_size", "n_embd"), "wpe.weight": ("block_size", "n_embd")}


@dataclass(frozen=True)
class StoredTensor:
    """A tensor in a weights file as its header describes it; calling it reads the data."""

    shape: tuple[int, ...]
    dtype: str  # safetensors' name for it: F32, BF16, I8, ...
    read: Callable[[], torch.Tensor]

    def __call__(self) -> torch.Tensor:
        return self.read()

    @classmethod
    def in_file(cls, handle: Any, name: str) -> StoredTensor:
        """Tensor ``name`` of an open safetensors file, from its header (no data is read)."""
        header = handle.get_slice(name)
        return cls(
            tuple(header.get_shape()),
            header.get_dtype(),
            functools.partial(handle.get_tensor, name),
        )

    @classmethod
    def in_memory(cls, tensor: torch.Tensor) -> StoredTensor:
        """A tensor already at hand (an mmap'd pickle's)."""
        return cls(tuple(tensor.shape), _NAMES.get(tensor.dtype, str(tensor.dtype)), lambda: tensor)


def open_safetensors(path: Path) -> dict[str, StoredTensor]:
    """Each tensor of a safetensors file by name, as its header describes it."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        # a safe_open handle has keys() but cannot be iterated
        return {name: StoredTensor.in_file(handle, name) for name in handle.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupted"
        ) from e


def check_layers(n_layer: int, names: Iterable[str], field: str, source: str | Path) -> None:
    """``n_layer`` (named ``field`` in messages) against the blocks the weights hold, before a
    model that deep is built: a config's layer count costs time and memory per layer."""
    found = {int(m.group(1)) for name in names if (m := _LAYER.search(name))}
    if found == set(range(n_layer)):
        return
    held = f"{len(found):,} (numbered {min(found)} to {max(found)})" if found else "none"
    raise CheckpointError(
        f"{field}={n_layer:,}, but the blocks in {source} are {held}; the config and the "
        "weights are not of the same model"
    )


def check_sizes(
    config: ModelConfig,
    tensors: Mapping[str, tuple[str, StoredTensor]],
    where: str,
    keys: Mapping[str, str] | None = None,
) -> None:
    """The config's vocabulary, width and (learned) context against the tensors they size.

    ``tensors`` maps arlm's names (``wte.weight``) to the stored name and tensor; ``keys`` maps
    arlm's field names to the config file's own (a Hugging Face ``hidden_size``) for messages.
    """
    keys = keys or {}
    for name, fields in _SIZED_BY.items():
        if name not in tensors:
            continue  # absent where the layout has none (wpe in rotary models), or reported later
        stored_name, tensor = tensors[name]
        if len(tensor.shape) != len(fields):
            raise CheckpointError(
                f"tensor {stored_name} has shape {tensor.shape}; it needs {len(fields)} dimensions"
            )
        for axis, (field, size) in enumerate(zip(fields, tensor.shape, strict=True)):
            value = getattr(config, field)
            if value != size:
                raise CheckpointError(
                    f"{where}: {keys.get(field, field)}={value:,}, but tensor {stored_name} has "
                    f"{size:,} {('rows', 'columns')[axis]} (shape {tensor.shape}); the config and "
                    "the weights are not of the same model"
                )


def check_tensors(
    expected: Mapping[str, torch.Tensor], stored: Mapping[str, StoredTensor], source: str | Path
) -> None:
    """Every tensor the model holds against the stored one: present, same shape, a dtype that
    converts to the model's (any float for a float; exactly the same for quantized codes)."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model config: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}"
        )
    for name, want in expected.items():
        tensor = stored[name]
        if tensor.shape != tuple(want.shape):
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tensor.shape}, the model config "
                f"expects {tuple(want.shape)}"
            )
        allowed = _FLOATS if want.is_floating_point() else (_NAMES[want.dtype],)
        if tensor.dtype not in allowed:
            raise CheckpointError(
                f"{source}: tensor {name} is stored as {tensor.dtype}; the model config needs "
                f"{' or '.join(allowed)}"
            )


def check_finite(tensor: torch.Tensor, name: str, source: str | Path) -> None:
    """Refuse a float tensor holding NaN or infinity: such weights make every logit NaN.

    One reduction decides almost always (a finite sum has only finite terms); only a sum that
    overflows is looked at element by element."""
    if not tensor.is_floating_point():
        return
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    if bool(torch.isfinite(total)):
        return
    nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
    if nan or inf:
        raise CheckpointError(
            f"{source}: tensor {name} holds {nan:,} NaN and {inf:,} infinite values (of "
            f"{tensor.numel():,}); a model needs finite weights. The file is damaged, or the "
            "training that wrote it diverged"
        )


def tokenizer_ids(tokenizer: Any) -> dict[str, Any]:
    """The end and start ids a loaded tokenizer settled on, as a config file would give them."""
    return {"eos_token_id": tokenizer.eos_token_ids, "bos_token_id": tokenizer.bos_token_id}


def check_special_ids(sources: Mapping[str, Mapping[str, Any]], vocab_size: int) -> None:
    """The special ids each source (a file's name -> its fields) declares, against the model's
    vocabulary, ids 0 to ``vocab_size - 1``.

    An end or start id outside it is a ``CheckpointError``: generation would stop on, or start
    from, a token the model cannot produce or read (and an id past the logits fails every
    request that suppresses ends, as ``min_tokens`` does). A padding id outside it only warns:
    arlm never reads ``pad_token_id``, so the model still runs as it should.
    """
    for source, fields in sources.items():
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            value = fields.get(key)
            if value is None:
                continue
            ids = value if key == "eos_token_id" and isinstance(value, list) else [value]
            wrong = [i for i in ids if not _is_id(i) or not 0 <= i < vocab_size]
            if not wrong:
                continue
            what = f"{source}: {key}={value!r} " + (
                f"holds {wrong[0]!r}, " if len(ids) > 1 else "is "
            )
            what += "outside the vocabulary" if _is_id(wrong[0]) else "not a token id"
            what += f"; ids run from 0 to {vocab_size - 1} (vocab_size={vocab_size})"
            if key == "pad_token_id":
                warnings.warn(
                    f"{what}; arlm never reads pad_token_id, so it is ignored", stacklevel=3
                )
            else:
                raise CheckpointError(what)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

"""Checkpoint directories: safe to load from strangers, never half-written.

A checkpoint is a directory holding ``config.json`` (the resolved ``ModelConfig``),
``model.safetensors`` and ``tokenizer.json``, plus whatever training state a trainer puts beside
them. Nothing is pickled, so loading runs no code. A save first writes every file into a staging
folder, then marks it complete, then moves the files into place; a save interrupted before the
mark leaves the previous checkpoint untouched, one interrupted after it is finished by
``recover``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from arlm.atomic import write_atomic
from arlm.config import ModelConfig
from arlm.model.transformer import Transformer
from arlm.tokenizer import Tokenizer

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_STAGING = ".staging"
_COMPLETE = "COMPLETE"


class CheckpointError(ValueError):
    """A checkpoint directory or file that cannot be used, with the reason."""


def write_files(directory: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Replace ``files`` (name -> contents) in ``directory`` as one unit."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory / _STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name, data in files.items():
        write_atomic(staging / name, data)
    write_atomic(staging / _COMPLETE, json.dumps(sorted(files)).encode())
    recover(directory)


def recover(directory: str | os.PathLike) -> None:
    """Finish a save that was interrupted after its staging folder was complete; discard one
    that was interrupted before."""
    staging = Path(directory) / _STAGING
    if not staging.is_dir():
        return
    if (staging / _COMPLETE).is_file():
        for name in json.loads((staging / _COMPLETE).read_text()):
            if (staging / name).exists():  # absent when an earlier recover already moved it
                os.replace(staging / name, Path(directory) / name)
    shutil.rmtree(staging, ignore_errors=True)


def tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata)


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, with a clear error for a missing or damaged file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return st_load(path.read_bytes())
    except SafetensorError as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupted"
        ) from e


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); it may be truncated") from e


def shares_embedding(config: ModelConfig) -> bool:
    """Whether lm_head's weight is wte's (tied and not quantized), so it is stored once."""
    return config.tie_embeddings and config.quantization is None


def model_files(model: Transformer, tokenizer: Tokenizer) -> dict[str, bytes]:
    """The three files of a model checkpoint, serialised."""
    state = model.state_dict()
    if shares_embedding(model.config):
        state.pop("lm_head.weight", None)  # the same tensor as wte.weight; stored once
    return {
        "config.json": json.dumps(model.config.to_dict(), indent=2).encode(),
        "model.safetensors": tensors_to_bytes(state, {"format": "pt"}),
        "tokenizer.json": tokenizer.to_json().encode(),
    }


def save_model(
    directory: str | os.PathLike,
    model: Transformer,
    tokenizer: Tokenizer,
    extra_files: dict[str, bytes] | None = None,
) -> None:
    """Write a checkpoint (and ``extra_files`` beside it) atomically."""
    write_files(directory, {**model_files(model, tokenizer), **(extra_files or {})})


def load_state(model: Transformer, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``, naming any missing, unexpected or misshapen tensor."""
    expected = model.state_dict()
    if shares_embedding(model.config):
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model config: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, the model config "
                f"expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False)


def load_model(
    directory: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer of an arlm checkpoint directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}")
    for name in MODEL_FILES:
        if not (directory / name).is_file():
            raise CheckpointError(
                f"{directory} has no {name}; an arlm checkpoint holds {', '.join(MODEL_FILES)}"
            )
    try:
        config = ModelConfig.from_dict(read_json(directory / "config.json"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from e
    state = read_tensors(directory / "model.safetensors")
    tokenizer = Tokenizer.from_file(directory / "tokenizer.json")
    model = Transformer(config)
    load_state(model, state, str(directory / "model.safetensors"))
    model.to(device=device, dtype=dtype)
    return model.eval(), tokenizer

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
from arlm.formats.verify import (
    CheckpointError,
    check_finite,
    check_layers,
    check_sizes,
    check_special_ids,
    check_tensors,
    open_safetensors,
    tokenizer_ids,
)
from arlm.model.transformer import Transformer
from arlm.tokenizer import Tokenizer

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_STAGING = ".staging"
_COMPLETE = "COMPLETE"


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


def model_files(
    model: Transformer, tokenizer: Tokenizer, state: dict[str, torch.Tensor] | None = None
) -> dict[str, bytes]:
    """The three files of a model checkpoint, serialised; ``state``: the model's tensors when
    ``model`` does not hold them whole (a sharded model's, gathered; None: its state_dict)."""
    state = dict(model.state_dict() if state is None else state)
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
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a checkpoint (and ``extra_files`` beside it) atomically; ``state`` as in
    ``model_files``."""
    write_files(directory, {**model_files(model, tokenizer, state), **(extra_files or {})})


def load_model(
    directory: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer of an arlm checkpoint directory.

    Nothing is allocated for the model until its config has been checked against the weights'
    headers: the layer count and sizes first, then every tensor's shape and dtype on a model
    built on the meta device. Each tensor is checked for NaN and infinity as it is read.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}")
    for name in MODEL_FILES:
        if not (directory / name).is_file():
            raise CheckpointError(
                f"{directory} has no {name}; an arlm checkpoint holds {', '.join(MODEL_FILES)}"
            )
    config_path, weights = directory / "config.json", directory / "model.safetensors"
    try:
        config = ModelConfig.from_dict(read_json(config_path))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    stored = open_safetensors(weights)
    check_layers(config.n_layer, stored, f"{config_path}: n_layer", weights)
    check_sizes(config, {name: (name, t) for name, t in stored.items()}, str(config_path))
    tokenizer = Tokenizer.from_file(directory / "tokenizer.json")
    check_special_ids(
        {str(directory / "tokenizer.json"): tokenizer_ids(tokenizer)}, config.vocab_size
    )
    with torch.device("meta"):  # no memory and no random init: the weights replace every tensor
        model = Transformer(config)
    expected = model.state_dict()
    if shares_embedding(config):
        expected.pop("lm_head.weight")
    check_tensors(expected, stored, str(weights))
    state = {}
    for name, meta in expected.items():
        tensor = stored[name]()
        check_finite(tensor, name, weights)
        held = tensor.to(meta.dtype)  # the dtype the model holds it in
        if held.data_ptr() == tensor.data_ptr():
            # still the file's memory (safetensors maps the file): a live model must not
            # change, or crash, when the file is rewritten
            held = held.clone()
        state[name] = held
    model.load_state_dict(state, strict=False, assign=True)
    if shares_embedding(config):  # assign replaced wte.weight; point the head at the new tensor
        model.lm_head.weight = model.wte.weight
    model.to(device=device, dtype=dtype)
    return model.eval(), tokenizer

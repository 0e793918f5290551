"""Reading a model from any folder arlm loads: an arlm checkpoint, a Hugging Face model folder,
or a LoRA adapter folder (PEFT's format), whose base model is read and the adapter merged into
it. ``arlm.load``, a draft model and ``arlm train --init-from`` all read through here."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from arlm.formats import hf
from arlm.formats.checkpoint import CheckpointError, load_model
from arlm.formats.hub import resolve
from arlm.formats.peft import apply_adapter, is_adapter_dir, read_adapter
from arlm.model.transformer import Transformer
from arlm.tokenizer import Tokenizer


def weights_dir(path: str | os.PathLike) -> Path:
    """The folder that holds ``path``'s weights: an adapter's base model (a local folder or a
    Hub id, resolved), else ``path`` itself."""
    path = Path(path)
    if not is_adapter_dir(path):
        return path
    base = read_adapter(path).base_model
    if base is None:
        raise CheckpointError(
            f"{path} is a LoRA adapter without base_model_name_or_path in its adapter_config.json; "
            "set it to the base model's folder or Hub id"
        )
    if is_adapter_dir(resolve(base)):
        raise CheckpointError(f"{path}'s base model {base} is an adapter itself; merge it first")
    return resolve(base)


def read_model(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer in the local folder ``path`` (see the module's docstring)."""
    path = Path(path)
    base = weights_dir(path)
    if hf.is_hf_dir(base):
        model, tokenizer = hf.load_hf(base, device=device, dtype=dtype, allow_pickle=allow_pickle)
    else:
        model, tokenizer = load_model(base, device=device, dtype=dtype)
    if base != path:  # a LoRA adapter: fine-tuned with its base's tokenizer, which is read
        apply_adapter(model, path)
    return model, tokenizer

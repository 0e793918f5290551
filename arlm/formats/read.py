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

# adapters trained on adapters (DPO on a LoRA fine-tune, say), deeper than any real chain
MAX_ADAPTERS = 8


def adapter_chain(path: str | os.PathLike) -> tuple[list[Path], Path]:
    """The adapters ``path`` stands for, outermost first, and the folder that holds the model's
    weights: ``path`` itself where it is no adapter. An adapter's base (a local folder or a Hub
    id, resolved) may be an adapter in turn, as ``arlm train --init-from`` an adapter writes."""
    adapters, current = [], Path(path)
    while is_adapter_dir(current):
        if len(adapters) == MAX_ADAPTERS:
            raise CheckpointError(
                f"{path} stands on more than {MAX_ADAPTERS} adapters, each the base of the one "
                "before; merge some (arlm export) or check for a loop"
            )
        base = read_adapter(current).base_model
        if base is None:
            raise CheckpointError(
                f"{current} is a LoRA adapter without base_model_name_or_path in its "
                "adapter_config.json; set it to the base model's folder or Hub id"
            )
        adapters.append(current)
        current = resolve(base)
    return adapters, current


def read_model(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer in the local folder ``path`` (see the module's docstring)."""
    return read_chain(*adapter_chain(path), device=device, dtype=dtype, allow_pickle=allow_pickle)


def read_chain(
    adapters: list[Path],
    base: Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    allow_pickle: bool = False,
) -> tuple[Transformer, Tokenizer]:
    """The model in ``base`` with each of ``adapters`` (``adapter_chain``'s) merged in, the
    innermost first, and its tokenizer."""
    if hf.is_hf_dir(base):
        model, tokenizer = hf.load_hf(base, device=device, dtype=dtype, allow_pickle=allow_pickle)
    else:
        model, tokenizer = load_model(base, device=device, dtype=dtype)
    for adapter in reversed(adapters):  # fine-tuned with its base's tokenizer, which is read
        apply_adapter(model, adapter)
    return model, tokenizer

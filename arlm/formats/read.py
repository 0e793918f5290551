"""Reading a model from any folder arlm loads: an arlm checkpoint, a Hugging Face model folder,
or a LoRA adapter folder (PEFT's format), whose base model is read and the adapter merged into
it. ``arlm.load``, a draft model and ``arlm train --init-from`` all read through here; so do
the adapters a server holds beside its base model, unmerged (``load_lora_modules``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from arlm.formats import hf
from arlm.formats.checkpoint import CheckpointError, load_model
from arlm.formats.hub import resolve
from arlm.formats.peft import (
    apply_adapter,
    is_adapter_dir,
    lora_targets,
    read_adapter,
    read_adapter_tensors,
)
from arlm.model.multi_lora import AdapterRows, MultiLoRALinear, add_adapter_slots
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


def load_lora_modules(model: Transformer, modules: dict[str, str | os.PathLike]) -> AdapterRows:
    """Load each LoRA adapter of ``modules`` (name -> folder or Hub id) into a slot of its own
    beside ``model``'s weights, unmerged (``arlm.model.multi_lora``), so that each request may
    name the one it runs with; the slots' names. Every adapter is read and checked before
    ``model`` is changed. Adapters trained on adapters are refused: merge the chain first."""
    if not modules:
        raise ValueError("lora_modules is empty; give at least one NAME=PATH")
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise ValueError("the model holds LoRA adapter slots already; load them all at once")
    read = {}
    for name, path in modules.items():
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(
                f"LoRA adapter name {name!r} is not allowed; a name is a non-empty text without "
                "leading or trailing spaces (what a request's model field gives)"
            )
        folder = resolve(path)
        if not is_adapter_dir(folder):
            raise CheckpointError(
                f"LoRA adapter {name!r}: {path} is not a LoRA adapter folder (it has no "
                "adapter_config.json naming a peft_type)"
            )
        adapter = read_adapter(folder)
        base = adapter.base_model
        if base is not None and Path(base).is_dir() and is_adapter_dir(base):
            raise CheckpointError(
                f"LoRA adapter {name!r} at {path} was trained on another adapter ({base}); "
                "serve the pair merged (arlm export) or load it whole"
            )
        targets = lora_targets(model, adapter.target_modules)
        tensors = read_adapter_tensors(model, folder, targets, adapter.lora.rank)
        read[name] = (adapter.lora, targets, tensors)
    rank = max(lora.rank for lora, _, _ in read.values())
    slots = {}  # every layer any adapter adapts, its slices as the layer splits its rows
    for _, targets, _ in read.values():
        slots.update(targets)
    weights = model.wte.weight
    rows = AdapterRows(tuple(read), weights.dtype, weights.device)
    layers = add_adapter_slots(model, slots, rank, rows)
    for slot, (lora, _, tensors) in enumerate(read.values()):
        for path, pairs in tensors.items():
            layers[path].load(slot, pairs, lora.scaling)
    return rows

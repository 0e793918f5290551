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
    ALL_LINEAR,
    apply_adapter,
    is_adapter_dir,
    lora_targets,
    read_adapter,
    read_adapter_tensors,
)
from arlm.model.adapter_store import AdapterStore, ServedAdapter
from arlm.model.multi_lora import AdapterRows, MultiLoRALinear, add_adapter_slots
from arlm.model.transformer import Transformer
from arlm.tokenizer import Tokenizer
from arlm.validate import check_int

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


# the largest adapter rank slots take when none is given and none is loaded yet (vLLM's)
DEFAULT_MAX_LORA_RANK = 16


def read_lora_module(model: Transformer, name: str, path: str | os.PathLike) -> ServedAdapter:
    """The adapter called ``name`` in ``path`` (a PEFT folder or Hub id) for serving beside
    ``model``, read and checked; adapters trained on adapters are refused (merge them first)."""
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
    return ServedAdapter(adapter.lora, tensors)


def load_lora_modules(
    model: Transformer,
    modules: dict[str, str | os.PathLike],
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
    max_cpu_loras: int | None = None,
) -> AdapterStore:
    """Give ``model`` slots for ``max_loras`` LoRA adapters at once (default: one per entry of
    ``modules``) of rank up to ``max_lora_rank`` (default: the largest given, else 16), held
    beside its weights unmerged (``arlm.model.multi_lora``), and serve each of ``modules``
    (name -> folder or Hub id) from host memory, written into a slot when a request needs it
    (``arlm.model.adapter_store``); the store, which holds up to ``max_cpu_loras`` adapters
    (default: the more of the adapters given and the slots). With room for adapters beyond
    those given, every adaptable layer gets slots, so that any adapter of the model can be
    added later (``AdapterStore.add``); otherwise only the layers the given adapters adapt.
    Every adapter is read and checked before ``model`` is changed."""
    slots = max(len(modules), 1) if max_loras is None else max_loras
    check_int("max_loras", slots, 1)
    at_least = max(len(modules), slots)
    held = at_least if max_cpu_loras is None else max_cpu_loras
    check_int(
        "max_cpu_loras",
        held,
        at_least,
        f">= the {len(modules)} adapters given and the {slots} slots (max_loras): it is how "
        "many adapters are held in host memory, those in slots among them",
    )
    if any(isinstance(m, MultiLoRALinear) for m in model.modules()):
        raise ValueError("the model holds LoRA adapter slots already; load them all at once")
    read = {name: read_lora_module(model, name, path) for name, path in modules.items()}
    ranks = [adapter.lora.rank for adapter in read.values()]
    rank = max_lora_rank if max_lora_rank is not None else max(ranks, default=DEFAULT_MAX_LORA_RANK)
    check_int("max_lora_rank", rank, max(ranks, default=1), f">= the given ranks {ranks}")
    for name in read:  # before the model changes
        AdapterStore.check_name(name)
    targets = lora_targets(model, ALL_LINEAR)  # every adaptable layer
    if held == len(read):  # only those the adapters adapt
        targets = {path: targets[path] for a in read.values() for path in a.tensors}
    weights = model.wte.weight
    rows = AdapterRows(slots, weights.dtype, weights.device)
    add_adapter_slots(model, targets, rank, rows)
    store = AdapterStore(model, rows, held)
    for name, adapter in read.items():
        store.add(name, adapter)
    return store

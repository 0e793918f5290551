"""LoRA adapters in PEFT's format, which ``peft.PeftModel.from_pretrained`` and vLLM's
``--lora-modules`` read: a folder holding ``adapter_config.json`` and
``adapter_model.safetensors``.

The tensors are named by the Hugging Face model's modules, ``base_model.model.<module>.lora_A
.weight`` (rank, in) and ``.lora_B.weight`` (out, rank); ``arlm.formats.hf``'s layout gives
those names, and the rows of arlm's fused projections each belongs to. Only what arlm computes
is read: plain LoRA on the blocks' attention and dense MLP projections. Any setting that would
make PEFT compute something else (DoRA, per-module ranks, biases, other layers) is refused by
name, never ignored.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from arlm.config import ModelConfig
from arlm.formats.checkpoint import read_json, read_tensors, tensors_to_bytes
from arlm.formats.hf import _layout, hf_model_type
from arlm.formats.verify import CheckpointError, check_finite
from arlm.model.lora import LoRAConfig, Slices, add_lora, lora_modules, merge_lora
from arlm.model.multi_lora import SlicePairs
from arlm.model.transformer import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output head

# the arlm linears an adapter may wrap: each block's attention and dense MLP projections
_ADAPTABLE = re.compile(r"h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
_PREFIX = "base_model.model."  # PEFT's, before the model's own module names

# adapter_config.json keys that, set, make PEFT compute something other than plain LoRA on the
# named modules: what each does, for the message that refuses it
_UNSUPPORTED = {
    "use_dora": "weight-decomposed LoRA (DoRA)",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "whole modules trained beside the adapter",
    "rank_pattern": "a rank of its own for some modules",
    "alpha_pattern": "an alpha of its own for some modules",
    "layers_to_transform": "adapting only some layers",
    "layers_pattern": "adapting only some layers",
    "exclude_modules": "modules left out of target_modules",
    "layer_replication": "layers repeated to deepen the model",
    "target_parameters": "LoRA on parameters rather than modules (experts)",
    "trainable_token_indices": "trained rows of the embedding",
    "alora_invocation_tokens": "activated LoRA (updates only after an invocation)",
    "use_qalora": "quantization-aware LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "routing among adapters",
    "monteclora_config": "Monte Carlo sampling of the updates",
    "kasa_config": "singular values between lora_A and lora_B",
}
# init_lora_weights values under which PEFT leaves the base model's weights alone; others
# (pissa, olora, corda, astra, loftq, mica, lora_ga) change them where PEFT loads the adapter
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "nora")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter folder: its adapter_config.json names a peft_type."""
    config = Path(path) / ADAPTER_CONFIG
    if not config.is_file():
        return False
    try:
        return "peft_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


@dataclass(frozen=True)
class Adapter:
    """An adapter's settings as adapter_config.json holds them."""

    lora: LoRAConfig
    target_modules: tuple[str, ...] | str  # PEFT's: names (suffixes), a regex, or all-linear
    base_model: str | None  # base_model_name_or_path: what the adapter was trained on


def read_adapter(path: str | os.PathLike) -> Adapter:
    """The settings of the PEFT adapter folder ``path``, refused (naming the key and what arlm
    supports) where PEFT would compute something other than plain LoRA."""
    directory = Path(path)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"{directory} has no {name}; a PEFT adapter folder holds {ADAPTER_CONFIG} and "
                f"{ADAPTER_WEIGHTS}"
            )
    config_path = directory / ADAPTER_CONFIG
    c = read_json(config_path)
    if c.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{config_path}: peft_type={c.get('peft_type')!r} is not supported; arlm reads "
            "'LORA' adapters"
        )
    for key, meaning in _UNSUPPORTED.items():
        if c.get(key) not in (None, False, "", [], {}):
            raise CheckpointError(
                f"{config_path}: {key}={c[key]!r} ({meaning}) is not supported; arlm computes "
                f"plain LoRA: {key} must be unset"
            )
    if c.get("bias", "none") != "none":
        raise CheckpointError(
            f"{config_path}: bias={c['bias']!r} (trained biases of the base model) is not "
            "supported; supported: 'none'"
        )
    if c.get("init_lora_weights", True) not in _PLAIN_INITS:
        raise CheckpointError(
            f"{config_path}: init_lora_weights={c['init_lora_weights']!r} changes the base "
            "model's weights where PEFT loads the adapter, which arlm does not; supported: "
            f"{list(_PLAIN_INITS)} (PEFT's path_initial_model_for_weight_conversion converts "
            "such an adapter to plain LoRA)"
        )
    targets = c.get("target_modules")
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        targets = tuple(targets)
    elif not isinstance(targets, str):
        raise CheckpointError(
            f"{config_path}: target_modules={targets!r} is not supported; it must name modules "
            "(a list of names, a regex, or 'all-linear')"
        )
    try:  # PEFT's defaults where a key is left out
        lora = LoRAConfig(
            rank=c.get("r", 8),
            alpha=c.get("lora_alpha", 8),
            dropout=c.get("lora_dropout", 0.0),
            use_rslora=c.get("use_rslora", False),
        )
    except ValueError as e:
        raise CheckpointError(
            f"{config_path}: {e} (read from r, lora_alpha, lora_dropout, use_rslora)"
        ) from e
    return Adapter(lora, targets, c.get("base_model_name_or_path"))


def _hf_modules(config: ModelConfig) -> tuple[dict[str, tuple[tuple[str, int], ...]], set[str]]:
    """The Hugging Face module names of ``config``'s model: arlm path of each adaptable linear
    -> its modules with their rows, in order; and the names of every other module (the same
    for a model whose frozen layers are quantized: QLoRA's adapters are named as LoRA's)."""
    model_type = hf_model_type(config)
    if model_type == "gemma3":
        raise ValueError(
            "adapters for a gemma3 folder are not supported: PEFT names its language model's "
            "modules under the multimodal model's, beside a vision tower's of the same names; "
            "supported: gemma3_text folders"
        )
    # the layout of a float model without adapters, whatever `model` holds (adapters,
    # quantized frozen layers)
    with torch.device("meta"):
        bare = Transformer(replace(config, quantization=None))
    adaptable, others = {}, {"lm_head"}  # a tied head is a module too
    for name, src in _layout(bare, "transformer.", model_type).items():
        modules = tuple(hf.rpartition(".")[0] for hf in src.hf_names)
        if _ADAPTABLE.fullmatch(name):
            adaptable[name.removesuffix(".weight")] = tuple(zip(modules, src.sizes, strict=True))
        else:
            others.update(modules)
    others -= {module for parts in adaptable.values() for module, _ in parts}  # GPT-2's biases
    return adaptable, others


def _matches(target_modules: tuple[str, ...] | str, module: str) -> bool:
    """PEFT's rule: a string is a regex the whole name must match; a name in a list matches the
    module of that name and any whose name ends in ``.`` and it."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in target_modules)


def _short_names(adaptable: dict[str, tuple[tuple[str, int], ...]]) -> list[str]:
    """The adaptable modules' own names (q_proj, k_proj, ...), once each, in model order."""
    modules = (module for parts in adaptable.values() for module, _ in parts)
    return list(dict.fromkeys(module.rpartition(".")[2] for module in modules))


def lora_targets(model: Transformer, target_modules: tuple[str, ...] | str) -> dict[str, Slices]:
    """arlm module path -> its slices, for the Hugging Face modules ``target_modules`` names
    under PEFT's matching rules: the blocks' attention and dense MLP projections (q_proj, ...,
    down_proj; GPT-2's c_attn, c_proj, c_fc; Phi-3's qkv_proj and gate_up_proj).
    ``"all-linear"`` is every one of them; in a mixture of experts, the attention projections,
    as the router and experts take no adapters here."""
    adaptable, others = _hf_modules(model.config)
    names = [module for parts in adaptable.values() for module, _ in parts]
    valid = ", ".join(_short_names(adaptable))
    kind = f"this {hf_model_type(model.config)} model"
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        chosen = set(names)
    else:
        if isinstance(target_modules, str):
            try:
                re.compile(target_modules)
            except re.error as e:
                raise ValueError(f"target_modules {target_modules!r} is not a regex: {e}") from e
        chosen = {n for n in [*names, *others] if _matches(target_modules, n)}
        refused = sorted(chosen & others)
        if refused:
            raise ValueError(
                f"target_modules {target_modules!r} names {', '.join(refused[:3])}"
                f"{', ...' if len(refused) > 3 else ''}, which arlm does not adapt: LoRA applies "
                f"to {kind}'s attention and dense MLP projections ({valid}), not to embeddings, "
                "norms, the output head, or a mixture of experts' router and experts"
            )
        entries = () if isinstance(target_modules, str) else target_modules
        lost = [t for t in entries if not any(_matches((t,), n) for n in names)]
        if lost or not chosen:
            what = f"entry {lost[0]!r}" if lost else f"{target_modules!r}"
            raise ValueError(
                f"target_modules {what} matches no module of {kind}; its adaptable modules are "
                f"{valid} (or {ALL_LINEAR!r}: all of them)"
            )
    return {
        path: tuple((rows, module in chosen) for module, rows in parts)
        for path, parts in adaptable.items()
        if any(module in chosen for module, _ in parts)
    }


def _slice_modules(config: ModelConfig, targets: dict[str, Slices]) -> dict[str, list[str | None]]:
    """arlm path -> for each of its slices, the Hugging Face module whose ``lora_A`` and
    ``lora_B`` it holds, or None where the slice is not adapted."""
    adaptable, _ = _hf_modules(config)
    out = {}
    for path, slices in targets.items():
        if path not in adaptable:
            raise ValueError(f"{path} has LoRA but is not a module that PEFT's format names")
        parts = zip(adaptable[path], slices, strict=True)
        out[path] = [module if on else None for (module, _), (_, on) in parts]
    return out


def _adapter_params(model: Transformer) -> dict[str, nn.Parameter]:
    """PEFT's tensor name -> the parameter of ``model``'s adapters that it holds."""
    wrappers = lora_modules(model)
    if not wrappers:
        raise ValueError("the model has no LoRA modules; add_lora adds them")
    modules = _slice_modules(model.config, {path: w.slices for path, w in wrappers.items()})
    out = {}
    for path, wrapper in wrappers.items():
        adapted = [module for module in modules[path] if module is not None]
        for module, a, b in zip(adapted, wrapper.lora_A, wrapper.lora_B, strict=True):
            out[f"{_PREFIX}{module}.lora_A.weight"] = a
            out[f"{_PREFIX}{module}.lora_B.weight"] = b
    return out


def adapter_files(model: Transformer, adapter: Adapter) -> dict[str, bytes]:
    """adapter_config.json and adapter_model.safetensors (float32) of ``model``'s adapters,
    which must be what ``adapter`` describes; as bytes, for the caller to write with other
    files as one unit. ``all-linear`` is written as the module names it selects here, which
    PEFT and vLLM read alike on every model."""
    targets = lora_targets(model, adapter.target_modules)
    held = {path: w.slices for path, w in lora_modules(model).items()}
    if held != targets:
        raise ValueError(
            f"the model's LoRA modules ({sorted(held)}) are not those target_modules "
            f"{adapter.target_modules!r} selects ({sorted(targets)})"
        )
    configs = {w.config for w in lora_modules(model).values()}
    if configs != {adapter.lora}:
        raise ValueError(f"the model's LoRA modules have {configs}, the adapter {adapter.lora}")
    names = adapter.target_modules
    if isinstance(names, str) and names.lower() == ALL_LINEAR:
        names = _short_names(_hf_modules(model.config)[0])
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": adapter.base_model,
        "r": adapter.lora.rank,
        "lora_alpha": adapter.lora.alpha,
        "lora_dropout": adapter.lora.dropout,
        "use_rslora": adapter.lora.use_rslora,
        "target_modules": names if isinstance(names, str) else list(names),
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        # GPT-2's Conv1D stores its weight transposed; lora_A and lora_B are stored alike
        "fan_in_fan_out": hf_model_type(model.config) == "gpt2",
        "inference_mode": True,
    }
    tensors = {name: p.detach().float() for name, p in _adapter_params(model).items()}
    return {
        ADAPTER_CONFIG: json.dumps(config, indent=2).encode(),
        ADAPTER_WEIGHTS: tensors_to_bytes(tensors, {"format": "pt"}),
    }


def read_adapter_tensors(
    model: Transformer, path: str | os.PathLike, targets: dict[str, Slices], rank: int
) -> dict[str, SlicePairs]:
    """The adapter tensors of folder ``path`` for ``targets`` (``lora_targets``' of its config)
    at ``rank``: arlm path -> each slice's (A (rank, in), B (rows, rank)); every tensor checked
    (present, no others, shape, finite) before any is returned."""
    file = Path(path) / ADAPTER_WEIGHTS
    stored = read_tensors(file)
    modules = _slice_modules(model.config, targets)
    shapes = {}
    for module_path, slices in targets.items():
        layer = model.get_submodule(module_path)
        in_features = getattr(layer, "base", layer).in_features
        for module, (rows, _) in zip(modules[module_path], slices, strict=True):
            if module is not None:
                shapes[f"{_PREFIX}{module}.lora_A.weight"] = (rank, in_features)
                shapes[f"{_PREFIX}{module}.lora_B.weight"] = (rows, rank)
    missing = [name for name in shapes if name not in stored]
    if missing:
        raise CheckpointError(
            f"{file}: tensor {missing[0]} is missing ({len(missing)} missing in all); the "
            "adapter's target_modules select its module"
        )
    unexpected = sorted(set(stored) - set(shapes))
    if unexpected:
        raise CheckpointError(
            f"{file}: unexpected tensors {unexpected[:5]} (of {len(unexpected)}); the adapter's "
            "target_modules do not select them, or arlm does not adapt their modules"
        )
    for name, shape in shapes.items():
        tensor = stored[name]
        if tuple(tensor.shape) != shape or not tensor.is_floating_point():
            raise CheckpointError(
                f"{file}: tensor {name} is {tensor.dtype} of shape {tuple(tensor.shape)}; "
                f"the model and adapter_config.json imply a float tensor of {shape}"
            )
        check_finite(tensor, name, file)
    return {
        module_path: [
            None
            if m is None
            else (stored[f"{_PREFIX}{m}.lora_A.weight"], stored[f"{_PREFIX}{m}.lora_B.weight"])
            for m in slice_modules
        ]
        for module_path, slice_modules in modules.items()
    }


def load_adapter_weights(model: Transformer, path: str | os.PathLike) -> None:
    """Copy the adapter tensors of folder ``path`` into ``model``, which has adapters on the same
    modules already (``add_lora``); every tensor is checked before any is copied."""
    wrappers = lora_modules(model)
    if not wrappers:
        raise ValueError("the model has no LoRA modules; add_lora adds them")
    rank = next(iter(wrappers.values())).config.rank
    targets = {p: w.slices for p, w in wrappers.items()}
    tensors = read_adapter_tensors(model, path, targets, rank)
    with torch.no_grad():
        for p, wrapper in wrappers.items():
            pairs = [pair for pair in tensors[p] if pair is not None]
            for (a, b), lora_a, lora_b in zip(pairs, wrapper.lora_A, wrapper.lora_B, strict=True):
                lora_a.copy_(a)
                lora_b.copy_(b)


def apply_adapter(model: Transformer, path: str | os.PathLike) -> None:
    """Merge the PEFT adapter in folder ``path`` into ``model``'s weights, for inference: the
    model then computes what PEFT computes with the adapter, at no extra cost. Its parameters
    are left frozen."""
    adapter = read_adapter(path)
    add_lora(model, adapter.lora, lora_targets(model, adapter.target_modules))
    try:
        load_adapter_weights(model, path)
    finally:  # on a refused file every lora_B is still zero: the weights come back unchanged
        merge_lora(model)

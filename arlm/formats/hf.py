"""Hugging Face model folders: import GPT-2, Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3
(text) checkpoints; export to them.

Import reads ``config.json``, safetensors weights (one file or shards) and ``tokenizer.json`` with
json, safetensors, tokenizers and torch alone: running an imported model does not need
``transformers``. Export writes a folder that ``transformers`` loads with ``AutoModelForCausalLM``
and ``AutoTokenizer`` and that gives the same logits.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import SafetensorError, safe_open

from arlm.atomic import atomic_path
from arlm.config import (
    LAYER_TYPES,
    ModelConfig,
    check_size,
    longrope_attention_factor,
    resolve_dtype,
)
from arlm.formats.checkpoint import CheckpointError, read_json, tensors_to_bytes
from arlm.formats.verify import (
    StoredTensor,
    check_finite,
    check_layers,
    check_sizes,
    check_special_ids,
    tokenizer_ids,
)
from arlm.model.quantize import require_float
from arlm.model.transformer import Transformer
from arlm.tokenizer import Tokenizer

# mistral, qwen2, qwen3, phi3 and the mixtures of experts mixtral, qwen3_moe and qwen2_moe run
# as the llama family; gemma2, gemma3_text, and the text model of a gemma3 folder (which also
# holds a vision tower), as the gemma family
HF_MODEL_TYPES = (
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "mixtral",
    "qwen3_moe",
    "qwen2_moe",
    "gemma2",
    "gemma3_text",
    "gemma3",
)

# config keys that change the math where set (to other than the default given here): refused by
# name rather than ignored, except in the model_types that implement them
_UNIMPLEMENTED = {
    "attn_logit_softcapping": None,  # Gemma 2's tanh cap on attention scores
    "final_logit_softcapping": None,  # Gemma's tanh cap on the logits
    "partial_rotary_factor": 1.0,  # rotary angles on only part of each head
    "use_bidirectional_attention": False,  # EmbeddingGemma: not a causal language model
}
_IMPLEMENTED_BY = {
    "attn_logit_softcapping": ("gemma2",),
    "final_logit_softcapping": ("gemma2", "gemma3_text"),
    "partial_rotary_factor": ("phi3",),
}

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

# tensors some checkpoints carry that the model derives itself: GPT-2's causal-mask buffers and
# old Llama exports' rotary frequencies
_DERIVED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|\.rotary_emb\.inv_freq$")

# arlm module inside a block -> the Llama-layout modules it is made of, concatenated in order
_LLAMA_BLOCK = {
    "ln_1": ("input_layernorm",),
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.q_norm": ("self_attn.q_norm",),
    "attn.k_norm": ("self_attn.k_norm",),
    "attn.c_proj": ("self_attn.o_proj",),
    "ln_2": ("post_attention_layernorm",),
    "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.c_proj": ("mlp.down_proj",),
}
_LLAMA_TOP = {"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight"}
# Phi-3 stores q, k, v as one matrix and gate, up as another, in arlm's row order
_PHI3_BLOCK = {
    **_LLAMA_BLOCK,
    "attn.c_attn": ("self_attn.qkv_proj",),
    "mlp.c_fc": ("mlp.gate_up_proj",),
}
# Gemma 3 normalises before and after attention and the MLP; its post_attention_layernorm is the
# norm after attention, not the norm before the MLP that Llama's is
_GEMMA_BLOCK = {
    **_LLAMA_BLOCK,
    "post_attn_norm": ("post_attention_layernorm",),
    "ln_2": ("pre_feedforward_layernorm",),
    "post_mlp_norm": ("post_feedforward_layernorm",),
}
# a mixture of experts: the router, and each expert {e}'s gated MLP (Mixtral's w1 is the gate,
# w3 the up projection, w2 the down projection)
_MIXTRAL_BLOCK = {
    **_LLAMA_BLOCK,
    "mlp.router": ("block_sparse_moe.gate",),
    "mlp.experts.c_fc": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3"),
    "mlp.experts.c_proj": ("block_sparse_moe.experts.{e}.w2",),
}
_QWEN3_MOE_BLOCK = {
    **_LLAMA_BLOCK,
    "mlp.router": ("mlp.gate",),
    "mlp.experts.c_fc": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"),
    "mlp.experts.c_proj": ("mlp.experts.{e}.down_proj",),
}
# Qwen2-MoE's adds a shared expert and its gate
_QWEN2_MOE_BLOCK = {
    **_QWEN3_MOE_BLOCK,
    "mlp.shared_expert.c_fc": ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
    "mlp.shared_expert.c_proj": ("mlp.shared_expert.down_proj",),
    "mlp.shared_gate": ("mlp.shared_expert_gate",),
}
_BLOCKS = {
    "phi3": _PHI3_BLOCK,
    "mixtral": _MIXTRAL_BLOCK,
    "qwen3_moe": _QWEN3_MOE_BLOCK,
    "qwen2_moe": _QWEN2_MOE_BLOCK,
    "gemma2": _GEMMA_BLOCK,
    "gemma3_text": _GEMMA_BLOCK,
    "gemma3": _GEMMA_BLOCK,
}

# config.json's names for the sizes that are checked against the weights, in messages
_GPT2_SIZE_KEYS = {"n_layer": "n_layer", "n_embd": "n_embd", "block_size": "n_positions"}
_SIZE_KEYS = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size"}

# a gemma3 folder's language model, under the names transformers 5 saves (model.language_model.)
# or those on the Hub (language_model.model.); the vision tower and projector are not read
_GEMMA3_TEXT_PREFIXES = {
    "model.language_model.": "model.",
    "language_model.model.": "model.",
    "language_model.lm_head.": "lm_head.",
    "lm_head.": "lm_head.",
}


def is_hf_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Hugging Face model folder: its config.json names a ``model_type``."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


# ---------------------------------------------------------------------------------------------
# config.json -> ModelConfig


def _require(hf_config: dict[str, Any], key: str) -> Any:
    if hf_config.get(key) is None:
        raise ValueError(
            f"the config has no {key!r}, which a {hf_config['model_type']} config needs"
        )
    return hf_config[key]


def _gpt2_fields(c: dict[str, Any]) -> dict[str, Any]:
    act = c.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):  # both are the tanh approximation arlm uses
        raise ValueError(
            f"activation_function={act!r} is not supported; supported: 'gelu_new', "
            "'gelu_pytorch_tanh'"
        )
    if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError(
            "only GPT-2's standard attention scaling (1/sqrt(head_dim)) is supported; this config "
            "sets scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true"
        )
    n_embd = _require(c, "n_embd")
    return dict(
        family="gpt2",
        n_layer=_require(c, "n_layer"),
        n_head=_require(c, "n_head"),
        n_embd=n_embd,
        block_size=c.get("n_positions") or _require(c, "n_ctx"),
        intermediate_size=c.get("n_inner") or 4 * n_embd,
        norm_eps=c.get("layer_norm_epsilon", 1e-5),
        bias=True,
        tie_embeddings=c.get("tie_word_embeddings", True),
    )


def _rope_fields(c: dict[str, Any], head_dim: int) -> dict[str, Any]:
    # transformers 5 writes one `rope_parameters` dict; older configs (most of the Hub) write
    # `rope_theta` and `rope_scaling` beside each other
    model_type, params = c["model_type"], c.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            f"rope_parameters per layer type ({sorted(params)}) is not supported for "
            f"{model_type}; supported: one rope_parameters dict for every layer"
        )
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    scaling = dict(c.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"})
    # transformers 5 moves partial_rotary_factor into the rope dict; older configs keep it beside
    partial = scaling.pop("partial_rotary_factor", None)
    if partial is None:
        partial = c.get("partial_rotary_factor", 1.0)
    if partial != 1.0 and model_type not in _IMPLEMENTED_BY["partial_rotary_factor"]:
        raise ValueError(
            f"rope_parameters.partial_rotary_factor is not supported for {model_type}; "
            "supported: 1.0 (every channel rotates)"
        )
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    if model_type == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # what transformers reads Phi-3's older names as
    if kind == "longrope" and scaling.get("original_max_position_embeddings") is None:
        # Phi-3 keeps it beside the rope dict (transformers' default: max_position_embeddings)
        original = c.get("original_max_position_embeddings") or c["max_position_embeddings"]
        scaling["original_max_position_embeddings"] = original
    return dict(
        rope_theta=float(theta),
        rope_scaling=None if kind == "default" else {"rope_type": kind, **scaling},
        # transformers rotates int(head_dim * factor) channels
        rotary_dim=int(head_dim * partial),
    )


def _window_fields(c: dict[str, Any], n_layer: int, block_size: int) -> dict[str, Any]:
    """``sliding_window`` and ``layer_types`` the way transformers reads them: Mistral, Mixtral
    and Phi-3 slide on every layer, Qwen3-MoE too with ``use_sliding_window``; Qwen2 and Qwen3
    only with it, on the layers ``layer_types`` names (by default those from
    ``max_window_layers`` on); Llama never."""
    model_type, window = c["model_type"], c.get("sliding_window")
    # slide on every layer where a window is set (Qwen3-MoE's only with use_sliding_window)
    every_layer = model_type in ("mistral", "phi3", "mixtral", "qwen3_moe")
    types = None
    flagged = ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe")  # slide only with use_sliding_window
    if model_type == "llama" or (model_type in flagged and not c.get("use_sliding_window")):
        window = None
    elif not every_layer and window is not None:
        types = c.get("layer_types")
        if types is None and model_type == "qwen2_moe":  # every other layer below the limit
            start = c.get("max_window_layers", 28)
            types = [
                "sliding_attention" if i % 2 == 0 and i < start else "full_attention"
                for i in range(n_layer)
            ]
        if types is not None and set(types) - set(LAYER_TYPES):
            raise ValueError(
                f"layer_types {sorted(set(types) - set(LAYER_TYPES))} are not supported; "
                f"supported: {LAYER_TYPES}"
            )
        if types is None:
            start = c.get("max_window_layers", 28)
            types = [
                "sliding_attention" if i >= start else "full_attention" for i in range(n_layer)
            ]
    # a window as long as the context cuts nothing: the model runs as plain causal attention
    if window is None or window >= block_size or types and "sliding_attention" not in types:
        return dict(sliding_window=None, layer_types=None)
    if types is not None and "full_attention" not in types:
        types = None  # every layer slides: the config's default
    return dict(sliding_window=window, layer_types=types)


def _llama_fields(c: dict[str, Any]) -> dict[str, Any]:
    model_type = c["model_type"]
    hidden, heads = _require(c, "hidden_size"), _require(c, "num_attention_heads")
    block_size = _require(c, "max_position_embeddings")
    n_layer = _require(c, "num_hidden_layers")
    act = c.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r} is not supported; supported: 'silu'")
    if model_type == "qwen2":  # Qwen2 has biases on q, k and v only
        bias, qkv_bias = False, True
    elif model_type == "qwen2_moe":
        bias, qkv_bias = False, c.get("qkv_bias", True)
    elif model_type in ("qwen3", "qwen3_moe", "mixtral"):
        # attention_bias would put biases on q, k, v and o, not the MLP
        if c.get("attention_bias", False):
            raise ValueError(
                f"attention_bias=true is not supported for {model_type} (biases on the "
                "attention's four projections but not the MLP's); supported: attention_bias false"
            )
        bias = qkv_bias = False
    else:
        bias = c.get("attention_bias", False)
        if c.get("mlp_bias", False) != bias:
            raise ValueError(
                f"attention_bias={bias} with mlp_bias={c.get('mlp_bias', False)} is not "
                "supported; arlm's Llama layout has biases on all linears or on none"
            )
        qkv_bias = bias
    head_dim = c.get("head_dim") or hidden // heads
    fields = dict(
        family="llama",
        n_layer=n_layer,
        n_head=heads,
        n_embd=hidden,
        block_size=block_size,
        n_kv_head=c.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        intermediate_size=_require(c, "intermediate_size"),
        norm_eps=c.get("rms_norm_eps", 1e-6),
        bias=bias,
        qkv_bias=qkv_bias,
        tie_embeddings=c.get("tie_word_embeddings", False),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        **_rope_fields(c, head_dim),
        **_window_fields(c, n_layer, block_size),
    )
    return fields | _expert_fields(c)  # a mixture's intermediate_size is each expert's


# MixtralConfig's, Qwen3MoeConfig's and Qwen2MoeConfig's defaults: experts per layer, experts per
# token
_EXPERT_DEFAULTS = {"mixtral": (8, 2), "qwen3_moe": (128, 8), "qwen2_moe": (60, 4)}


def _expert_fields(c: dict[str, Any]) -> dict[str, Any]:
    """A mixture of experts' sizes and routing (mixtral, qwen3_moe, qwen2_moe), as transformers
    reads them; their ``intermediate_size`` is each expert's."""
    model_type = c["model_type"]
    if model_type not in _EXPERT_DEFAULTS:
        return {}
    experts, per_token = _EXPERT_DEFAULTS[model_type]
    if model_type == "mixtral":
        if c.get("router_jitter_noise", 0.0):
            raise ValueError(
                f"router_jitter_noise={c['router_jitter_noise']!r} is not supported for mixtral "
                "(training noise on the router's input); supported: 0.0"
            )
        hidden, renormalize = _require(c, "intermediate_size"), True
    else:
        # Qwen's mixtures may keep dense MLPs on some layers; arlm's blocks are all alike
        if c.get("decoder_sparse_step", 1) != 1 or c.get("mlp_only_layers"):
            raise ValueError(
                f"decoder_sparse_step={c.get('decoder_sparse_step', 1)!r} with mlp_only_layers="
                f"{c.get('mlp_only_layers')!r} is not supported for {model_type} (dense MLPs on "
                "some layers); supported: decoder_sparse_step 1 and no mlp_only_layers"
            )
        hidden, renormalize = _require(c, "moe_intermediate_size"), c.get("norm_topk_prob", False)
    # transformers 5 saves num_local_experts for both; Qwen's own configs say num_experts
    experts = c.get("num_local_experts", c.get("num_experts", experts))
    # transformers adds the balancing loss only where the config asks for the router's logits
    coef = c.get("router_aux_loss_coef", 0.001) if c.get("output_router_logits") else 0.0
    shared = None
    if model_type == "qwen2_moe":
        shared = _require(c, "shared_expert_intermediate_size")
    return dict(
        n_experts=experts,
        n_experts_per_tok=c.get("num_experts_per_tok", per_token),
        norm_topk_prob=bool(renormalize),
        round_router_weights=model_type != "mixtral",
        intermediate_size=hidden,
        shared_expert_size=shared,
        router_aux_loss_coef=coef,
    )


# Gemma2Config's defaults, which transformers gives the keys a config.json leaves out: the gemma
# layout with one rope theta for every layer, no norms on queries and keys, tanh caps on the
# attention scores and the logits, and every other layer sliding
_GEMMA2_DEFAULTS = dict(
    vocab_size=256_000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    sliding_window_pattern=2,  # layers 1, 3, 5, ... full attention
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    rope_theta=10_000.0,
)
# Gemma3TextConfig's, which transformers derives from Gemma2Config's (the text_config of gemma3
# folders on the Hub leaves out many keys)
_GEMMA3_DEFAULTS = dict(
    _GEMMA2_DEFAULTS,
    vocab_size=262_208,
    max_position_embeddings=131_072,
    sliding_window_pattern=6,  # every 6th layer full attention, when layer_types is not given
    attn_logit_softcapping=None,
    final_logit_softcapping=None,
    rope_theta=1_000_000.0,  # the full-attention layers'
    rope_local_base_freq=10_000.0,  # the sliding-window layers'
)


def _gemma3_rope(c: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full-attention and sliding-window layers' rope dicts, each with its rope_theta."""
    params = c.get("rope_parameters") or {}
    if set(params) - set(LAYER_TYPES):
        raise ValueError(
            f"rope_parameters with keys {sorted(params)} is not supported for gemma3: its rope "
            f"is given per layer type, under {list(LAYER_TYPES)}"
        )
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    full.update(c.get("rope_scaling") or {})  # older configs: rope_scaling is the global layers'
    full.setdefault("rope_theta", c["rope_theta"])
    local.setdefault("rope_theta", c["rope_local_base_freq"])
    for params, kind in ((full, "full_attention"), (local, "sliding_attention")):
        params["rope_type"] = params.pop("rope_type", params.pop("type", "default"))
        if params.pop("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"rope_parameters.{kind}.partial_rotary_factor is not supported for gemma3; "
                "supported: 1.0"
            )
    if local["rope_type"] != "default":
        raise ValueError(
            f"rope_parameters.sliding_attention rope_type {local['rope_type']!r} is not supported "
            "for gemma3; supported: 'default' (the sliding-window layers turn unscaled)"
        )
    return full, local


def _gemma_fields(c: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2 and Gemma 3 (text) configs, with their defaults where a key is left out."""
    gemma2 = c["model_type"] == "gemma2"
    name = "gemma2" if gemma2 else "gemma3"
    c = {**(_GEMMA2_DEFAULTS if gemma2 else _GEMMA3_DEFAULTS), **c}
    act = c["hidden_activation"]
    if act not in ("gelu_pytorch_tanh", "gelu_new"):  # both are the tanh approximation
        raise ValueError(
            f"hidden_activation={act!r} is not supported for {name}; supported: "
            "'gelu_pytorch_tanh', 'gelu_new'"
        )
    if c.get("attention_bias"):
        raise ValueError(
            f"attention_bias=true is not supported for {name} (biases on the attention's four "
            "projections but not the MLP's); supported: attention_bias false"
        )
    n_layer, window = c["num_hidden_layers"], c["sliding_window"]
    types = c.get("layer_types")
    if types is None:  # as transformers derives them
        pattern = c["sliding_window_pattern"]
        types = [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)
        ]
    bad = sorted(set(types) - set(LAYER_TYPES))
    if bad:
        raise ValueError(f"layer_types {bad} are not supported; supported: {LAYER_TYPES}")
    if len(types) != n_layer:
        raise ValueError(f"layer_types has {len(types)} entries for {n_layer} layers")
    if "sliding_attention" not in types:
        window = None
    elif window is None:
        raise ValueError("the config names sliding_attention layers but sets sliding_window: null")
    if gemma2:  # one rope for every layer
        rope = _rope_fields(c, c["head_dim"])
        theta, scaling, local_theta = rope["rope_theta"], rope["rope_scaling"], None
    else:
        # unlike the llama family's, a window as long as the context is kept: it says which
        # layers turn by the local rope theta
        full, local = _gemma3_rope(c)
        theta, local_theta = float(full["rope_theta"]), float(local["rope_theta"])
        scaling = {k: v for k, v in full.items() if k != "rope_theta"}
        scaling = None if scaling["rope_type"] == "default" else scaling
    return dict(
        family="gemma",
        n_layer=n_layer,
        n_head=c["num_attention_heads"],
        n_embd=c["hidden_size"],
        block_size=c["max_position_embeddings"],
        n_kv_head=c["num_key_value_heads"],
        head_dim=c["head_dim"],
        intermediate_size=c["intermediate_size"],
        norm_eps=c["rms_norm_eps"],
        bias=False,
        tie_embeddings=c["tie_word_embeddings"],
        qk_norm=not gemma2,
        attn_scale=c["query_pre_attn_scalar"] ** -0.5,
        attn_softcap=c.get("attn_logit_softcapping") if gemma2 else None,
        logit_softcap=c.get("final_logit_softcapping"),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=None if window is None else local_theta,
        sliding_window=window,
        layer_types=None if window is None or "full_attention" not in types else list(types),
        vocab_size=c["vocab_size"],
    )


def _text_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The config of the language model: a gemma3 folder's text_config, else the config."""
    if hf_config.get("model_type") != "gemma3":
        return hf_config
    text = {"model_type": "gemma3_text", **(hf_config.get("text_config") or {})}
    # transformers ties the head by the outer config's setting
    if "tie_word_embeddings" in hf_config:
        text["tie_word_embeddings"] = hf_config["tie_word_embeddings"]
    return text


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face ``config.json`` (``HF_MODEL_TYPES``). A setting
    that changes the math and that arlm does not implement is refused, by name."""
    model_type = hf_config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; supported: {list(HF_MODEL_TYPES)}"
        )
    c = _text_config(hf_config)
    # the layer count first, by config.json's name for it: lists are built per layer below
    layers = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    if layers in c:
        check_size(layers, c[layers], "n_layer")
    for key, default in _UNIMPLEMENTED.items():
        if c.get(key, default) not in (None, default) and c[
            "model_type"
        ] not in _IMPLEMENTED_BY.get(key, ()):
            raise ValueError(
                f"{key}={c[key]!r} is not supported for {c['model_type']}; arlm does not "
                f"implement it (supported: {default})"
            )
    if c["model_type"] in ("gemma2", "gemma3_text"):
        fields = _gemma_fields(c)
    else:
        fields = _gpt2_fields(c) if model_type == "gpt2" else _llama_fields(c)
        fields["vocab_size"] = _require(c, "vocab_size")
    return ModelConfig(extra={"hf_model_type": model_type}, **fields)


# ---------------------------------------------------------------------------------------------
# tensor names and layouts, shared by import and export


@dataclass(frozen=True)
class _Source:
    """The Hugging Face tensors one arlm tensor is made of."""

    hf_names: tuple[str, ...]  # concatenated along dim 0, in this order
    sizes: tuple[int, ...]  # each one's length along dim 0 of the arlm tensor
    transpose: bool  # GPT-2's Conv1D stores (in, out) where nn.Linear holds (out, in)


def _layout(model: Transformer, prefix: str, model_type: str) -> dict[str, _Source]:
    """arlm tensor name -> its Hugging Face source, for every tensor a ``model_type`` checkpoint
    stores."""
    config = model.config
    hd = config.head_dim
    block = _BLOCKS.get(model_type, _LLAMA_BLOCK)
    layout = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if config.tie_embeddings:
                continue  # the embedding matrix, stored once
            layout[name] = _Source((name,), (tensor.shape[0],), False)
        elif config.family == "gpt2":
            # same names; every 2-d weight inside a block is a Conv1D
            conv = name.startswith("h.") and tensor.dim() == 2
            layout[name] = _Source((prefix + name,), (tensor.shape[0],), conv)
        elif name in _LLAMA_TOP:
            layout[name] = _Source((_LLAMA_TOP[name],), (tensor.shape[0],), False)
        else:
            layer, module, kind = re.fullmatch(r"h\.(\d+)\.(.+)\.(\w+)", name).groups()
            expert = re.fullmatch(r"mlp\.experts\.(\d+)\.(\w+)", module)
            if expert is None:
                parts = block[module]
            else:  # one expert's MLP: its number in the names
                e, linear = expert.groups()
                parts = tuple(p.format(e=e) for p in block[f"mlp.experts.{linear}"])
            if len(parts) == 1:
                sizes = (tensor.shape[0],)
            elif module == "attn.c_attn":
                sizes = (config.n_head * hd, config.n_kv_head * hd, config.n_kv_head * hd)
            elif module == "mlp.shared_expert.c_fc":
                sizes = (config.shared_expert_size, config.shared_expert_size)
            else:  # mlp.c_fc
                sizes = (config.intermediate_size, config.intermediate_size)
            hf_names = tuple(f"model.layers.{layer}.{part}.{kind}" for part in parts)
            layout[name] = _Source(hf_names, sizes, False)
    return layout


# ---------------------------------------------------------------------------------------------
# import


_PICKLE_REFUSED = (
    "{directory} holds only pickled weights ({files}); loading a pickle can run arbitrary code, "
    "so arlm reads safetensors. Convert it once where you trust the files:\n"
    '  python -c "from transformers import AutoModelForCausalLM as M; '
    "M.from_pretrained('{directory}').save_pretrained('{directory}', safe_serialization=True)\"\n"
    "or pass allow_pickle=True (--allow-pickle) to load it with torch.load(weights_only=True)."
)


def _weight_files(directory: Path, single: str, index: str) -> list[str] | None:
    """The files of one weight format: the shards its index lists, or the single file; None when
    the folder has neither."""
    if (directory / index).is_file():
        weight_map = read_json(directory / index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{directory / index} has no weight_map")
        files = sorted(set(weight_map.values()))
    elif (directory / single).is_file():
        files = [single]
    else:
        return None
    for file in files:
        if not (directory / file).is_file():
            raise CheckpointError(f"{directory / file} is listed in {index} but missing")
    return files


def _open_weights(directory: Path, allow_pickle: bool) -> dict[str, StoredTensor]:
    """Name -> each stored tensor's header; tensors are read one at a time, when called."""
    readers = {}
    files = _weight_files(directory, SAFETENSORS, SAFETENSORS_INDEX)
    if files is not None:
        for file in files:
            try:
                handle = safe_open(str(directory / file), framework="pt", device="cpu")
            except SafetensorError as e:
                raise CheckpointError(
                    f"{directory / file} is not a readable safetensors file: {e}"
                ) from e
            # a safe_open handle has keys() but cannot be iterated
            readers.update({k: StoredTensor.in_file(handle, k) for k in handle.keys()})  # noqa: SIM118
        return readers
    files = _weight_files(directory, PICKLE, PICKLE_INDEX)
    if files is None:
        raise CheckpointError(
            f"{directory} has no weights; looked for {SAFETENSORS}, {SAFETENSORS_INDEX} (sharded), "
            f"{PICKLE} and {PICKLE_INDEX}"
        )
    if not allow_pickle:
        raise CheckpointError(_PICKLE_REFUSED.format(directory=directory, files=", ".join(files)))
    for file in files:
        # weights_only unpickles tensors and plain containers only; mmap reads them when used
        state = torch.load(directory / file, map_location="cpu", weights_only=True, mmap=True)
        for k, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(
                    f"{directory / file}: {k} is a {type(tensor).__name__}, not a tensor"
                )
            readers[k] = StoredTensor.in_memory(tensor)
    return readers


def _load_state(
    model: Transformer,
    readers: dict[str, StoredTensor],
    source: Path,
    device: torch.device | str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """arlm's state dict from the stored tensors, each checked against the config's shape."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in readers) else ""
    layout = _layout(model, prefix, model.config.extra["hf_model_type"])
    # names first, so a wrong folder fails before gigabytes are read
    used = {hf_name: name for name, src in layout.items() for hf_name in src.hf_names}
    missing = [hf_name for hf_name in used if hf_name not in readers]
    if missing:
        raise CheckpointError(
            f"{source}: tensor {missing[0]} is missing (arlm's {used[missing[0]]}); "
            f"{len(missing)} missing in all"
        )
    if model.config.tie_embeddings:
        used["lm_head.weight"] = "wte.weight"  # some exports store the tied copy too
    unexpected = sorted(k for k in readers if k not in used and not _DERIVED.search(k))
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensors {unexpected[:5]} (of {len(unexpected)}); config.json "
            f"describes a {model.config.extra['hf_model_type']} model without them"
        )
    config = model.config
    keys = _GPT2_SIZE_KEYS if config.family == "gpt2" else _SIZE_KEYS
    whole = {
        n: (s.hf_names[0], readers[s.hf_names[0]]) for n, s in layout.items() if len(s.sizes) == 1
    }
    check_sizes(config, whole, str(source / "config.json"), keys)
    # every shape from the headers, so a wrong folder fails before any data is read
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    for name, src in layout.items():
        for hf_name, size in zip(src.hf_names, src.sizes, strict=True):
            expected = (size, *shapes[name][1:])
            if src.transpose:
                expected = expected[::-1]
            if readers[hf_name].shape != expected:
                raise CheckpointError(
                    f"{source}: tensor {hf_name} has shape {readers[hf_name].shape}, but "
                    f"config.json implies {expected}"
                )
    state = {}
    for name, src in layout.items():
        parts = []
        for hf_name in src.hf_names:
            tensor = readers[hf_name]()
            check_finite(tensor, hf_name, source)
            parts.append(tensor.t() if src.transpose else tensor)
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts)
        tensor = tensor.to(device=device, dtype=dtype, memory_format=torch.contiguous_format)
        if tensor.data_ptr() == parts[0].data_ptr():
            # still the file's memory (safetensors and mmap'd pickles map the file): a live model
            # must not change, or crash, when the file is rewritten
            tensor = tensor.clone()
        state[name] = tensor
    return state


def _special_id(tk: tokenizers.Tokenizer, token: Any) -> int | None:
    # tokenizer_config.json writes a special token as a string or as {"content": ...}
    if isinstance(token, dict):
        token = token.get("content")
    return tk.token_to_id(token) if isinstance(token, str) else None


def _load_tokenizer(directory: Path, hf_config: dict[str, Any]) -> Tokenizer:
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"{directory} has no tokenizer.json; arlm reads only that file (a Hugging Face fast "
            "tokenizer). Make it once with:\n"
            '  python -c "from transformers import AutoTokenizer as T; '
            f"T.from_pretrained('{directory}').save_pretrained('{directory}')\""
        )
    try:
        tk = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise CheckpointError(f"{path} is not a valid tokenizer.json: {e}") from e
    gen_path = directory / "generation_config.json"
    generation = read_json(gen_path) if gen_path.is_file() else {}
    tok_path = directory / "tokenizer_config.json"
    tok_config = read_json(tok_path) if tok_path.is_file() else {}

    # generation_config.json is what transformers' generate stops on; config.json is older
    eos = generation.get("eos_token_id")
    if eos is None:
        eos = hf_config.get("eos_token_id")
    if eos is None:
        eos = _special_id(tk, tok_config.get("eos_token"))
    bos = generation.get("bos_token_id")
    if bos is None:
        bos = hf_config.get("bos_token_id")
    if bos is None:
        bos = _special_id(tk, tok_config.get("bos_token"))

    # transformers >= 4.50 saves the template as its own file; before, inside tokenizer_config
    template_path = directory / "chat_template.jinja"
    if template_path.is_file():
        template = template_path.read_text()
    else:
        template = tok_config.get("chat_template")
        if isinstance(template, list):  # named templates; generation uses the one named default
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return Tokenizer(
        tk,
        eos_token_ids=None if eos is None else [eos] if isinstance(eos, int) else eos,
        chat_template=template,
        bos_token_id=bos,
    )


def _language_model(readers: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """A gemma3 folder's language-model tensors, under the names a gemma3_text folder gives them."""
    out = {}
    for name, read in readers.items():
        for old, new in _GEMMA3_TEXT_PREFIXES.items():
            if name.startswith(old):
                out[new + name.removeprefix(old)] = read
                break
    return out


def load_hf(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    allow_pickle: bool = False,
) -> tuple[Transformer, Tokenizer]:
    """The model (in eval mode) and tokenizer of a Hugging Face model folder.

    ``dtype`` None loads float32 whatever the checkpoint stores (exact, and runs on every device);
    pass ``"bfloat16"`` to halve the memory. Pickled weights (``pytorch_model.bin``) are refused
    unless ``allow_pickle``; then they load with ``torch.load(weights_only=True)``.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"no model folder at {directory}")
    hf_config = read_json(directory / "config.json")
    try:
        config = config_from_hf(hf_config)
    except ValueError as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from e
    dtype = resolve_dtype(dtype)
    tokenizer = _load_tokenizer(directory, hf_config)  # before the weights: fail fast
    generation = directory / "generation_config.json"
    declared = {
        str(generation): read_json(generation) if generation.is_file() else {},
        str(directory / "config.json"): hf_config,
        f"{directory}'s tokenizer (tokenizer_config.json's special tokens)": tokenizer_ids(
            tokenizer
        ),
    }
    check_special_ids(declared, config.vocab_size)
    readers = _open_weights(directory, allow_pickle)
    if hf_config["model_type"] == "gemma3":
        readers = _language_model(readers)
    # the layer count before a model that deep is built: the rest is checked on the meta model
    layers = "n_layer" if config.family == "gpt2" else "num_hidden_layers"
    check_layers(config.n_layer, readers, f"{directory / 'config.json'}: {layers}", directory)
    # built on the meta device: no memory, no random init; the loaded tensors are then assigned
    # in place, so the weights exist once (the rotary frequencies are computed on the CPU anyway)
    with torch.device("meta"):
        model = Transformer(config)
    state = _load_state(model, readers, directory, device, dtype)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:  # assign replaced wte.weight; point the head at the new tensor
        model.lm_head.weight = model.wte.weight
    return model.eval(), tokenizer


# ---------------------------------------------------------------------------------------------
# export


def hf_model_type(config: ModelConfig) -> str:
    """The Hugging Face model_type whose module names ``config``'s model goes by (adapters name
    its modules so): the one it was imported from, else the one ``export_hf`` writes."""
    if "hf_model_type" in config.extra:
        return config.extra["hf_model_type"]
    return _hf_config(config, None, torch.float32)["model_type"]


def _hf_config(
    config: ModelConfig, tokenizer: Tokenizer | None, dtype: torch.dtype
) -> dict[str, Any]:
    """config.json for ``config``; ``tokenizer`` None: without special ids."""
    eos = [] if tokenizer is None else tokenizer.eos_token_ids
    common = dict(
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=None if tokenizer is None else tokenizer.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        dtype=str(dtype).removeprefix("torch."),
    )
    if config.n_experts is not None and config.family != "llama":
        raise ValueError(
            "a mixture of experts has a Hugging Face layout in the llama family only (mixtral, "
            f"qwen3_moe); this is a {config.family}-family model"
        )
    gemma2 = config.family == "gemma" and not config.qk_norm
    if config.attn_softcap is not None and not gemma2:
        raise ValueError(
            f"attn_softcap={config.attn_softcap} has a Hugging Face layout in gemma2 only (a "
            f"gemma-family model without q/k norms); this is a {config.family}-family model "
            f"with qk_norm={config.qk_norm}"
        )
    if config.family == "gpt2":
        if not config.bias or config.qkv_bias != config.bias or config.n_kv_head != config.n_head:
            raise ValueError(
                "a gpt2-family model exports to Hugging Face GPT-2 only with biases everywhere "
                f"and n_kv_head == n_head; this one has bias={config.bias}, "
                f"qkv_bias={config.qkv_bias}, n_kv_head={config.n_kv_head}, n_head={config.n_head}"
            )
        return dict(
            architectures=["GPT2LMHeadModel"],
            model_type="gpt2",
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_inner=config.intermediate_size,
            activation_function="gelu_new",
            layer_norm_epsilon=config.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    if config.family == "gemma":
        return _gemma_config(config, common)
    llama = dict(
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        hidden_act="silu",
        rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling,
        attention_dropout=0.0,
        **common,
    )
    windows = config.layer_windows
    sliding = [w is not None for w in windows]
    # Qwen's way to say which layers slide: every layer from max_window_layers on, and (since
    # transformers 4.5x) layer_types, which says it per layer
    qwen_windows = dict(
        use_sliding_window=any(sliding),
        sliding_window=config.sliding_window,
        max_window_layers=sliding.index(True) if any(sliding) else config.n_layer,
        layer_types=_layer_types(windows),
    )
    if config.n_experts is not None:
        return _moe_config(config, llama)
    if _phi3_layout(config):
        return _phi3_config(config, llama)
    if config.rotary_dim != config.head_dim:
        raise ValueError(
            f"rotary_dim={config.rotary_dim} (of head_dim={config.head_dim}) with bias="
            f"{config.bias}, qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm} on layers "
            f"{_layer_types(windows)} has no Hugging Face layout; supported: partial rotary in "
            "phi3 (no biases, no qk_norm, a window on every layer or none)"
        )
    if config.qk_norm:
        if config.bias or config.qkv_bias:
            raise ValueError(
                f"qk_norm with bias={config.bias}, qkv_bias={config.qkv_bias} has no Hugging Face "
                "layout; supported: qk_norm without biases (qwen3)"
            )
        return dict(
            architectures=["Qwen3ForCausalLM"],
            model_type="qwen3",
            attention_bias=False,
            **qwen_windows,
            **llama,
        )
    if config.qkv_bias and not config.bias:
        # note: transformers 5 tokenizes any qwen2 folder with Qwen2's own pre-tokenizer, not the
        # one in tokenizer.json; right for a model that came from Qwen2, not for other tokenizers
        return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", **qwen_windows, **llama)
    if config.qkv_bias != config.bias:
        raise ValueError(
            f"bias={config.bias} with qkv_bias={config.qkv_bias} has no Hugging Face layout; "
            "supported: biases everywhere or nowhere (llama), or on q/k/v only (qwen2)"
        )
    if any(sliding):
        if config.bias or not all(sliding):
            raise ValueError(
                f"a sliding window with bias={config.bias} on layers {_layer_types(windows)} has "
                "no Hugging Face layout; supported: every layer sliding without biases (mistral), "
                "or q/k/v biases (qwen2) or qk_norm (qwen3) with any layers sliding"
            )
        return dict(
            architectures=["MistralForCausalLM"],
            model_type="mistral",
            sliding_window=config.sliding_window,
            **llama,
        )
    return dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        attention_bias=config.bias,
        mlp_bias=config.bias,
        **llama,
    )


def _layer_types(windows: list[int | None]) -> list[str]:
    return ["full_attention" if w is None else "sliding_attention" for w in windows]


def _phi3_layout(config: ModelConfig) -> bool:
    """Whether a llama-family model exports as phi3: it must (partial rotary, LongRoPE) or came
    from one, and phi3 can hold it (no biases, no q/k norms, a window on every layer or none)."""
    windows = {w is None for w in config.layer_windows}
    fits = not (config.bias or config.qkv_bias or config.qk_norm) and len(windows) == 1
    wants = config.rotary_dim != config.head_dim or config.rope_type == "longrope"
    return fits and (wants or config.extra.get("hf_model_type") == "phi3")


def _phi3_config(config: ModelConfig, llama: dict[str, Any]) -> dict[str, Any]:
    # transformers rotates int(head_dim * partial_rotary_factor) channels: find the factor that
    # gives rotary_dim back (rotary_dim / head_dim can land a hair below it)
    partial = config.rotary_dim / config.head_dim
    while int(config.head_dim * partial) < config.rotary_dim:
        partial = math.nextafter(partial, 2.0)
    rope = dict(config.rope_scaling or {})
    original = rope.pop("original_max_position_embeddings", config.block_size)
    # transformers derives the attention factor from the two context lengths; it is written only
    # where the model's differs
    derived = longrope_attention_factor(rope.get("factor"), original, config.block_size)
    if rope.get("attention_factor") == derived:
        del rope["attention_factor"]
    return dict(
        llama,
        architectures=["Phi3ForCausalLM"],
        model_type="phi3",
        rope_scaling=rope or None,
        partial_rotary_factor=partial,
        original_max_position_embeddings=original,
        sliding_window=config.sliding_window,
        pad_token_id=None,  # transformers' default (32000) would be past a smaller vocabulary
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )


def _moe_config(config: ModelConfig, llama: dict[str, Any]) -> dict[str, Any]:
    """qwen2_moe (a shared expert), qwen3_moe (q/k norms) or mixtral."""
    windows = config.layer_windows
    sliding = [w is not None for w in windows]
    qwen2 = config.shared_expert_size is not None
    if (
        config.bias
        or config.qkv_bias
        and not qwen2
        or config.rotary_dim != config.head_dim
        or qwen2
        and config.qk_norm
        or len(set(sliding)) > 1
        and not qwen2
    ):
        raise ValueError(
            f"a mixture of experts with bias={config.bias}, qkv_bias={config.qkv_bias}, "
            f"qk_norm={config.qk_norm}, shared_expert_size={config.shared_expert_size}, "
            f"rotary_dim={config.rotary_dim} of head_dim={config.head_dim} on layers "
            f"{_layer_types(windows)} has no Hugging Face layout; supported: mixtral and "
            "qwen3_moe (q/k norms), without biases, a window on every layer or on none, and "
            "qwen2_moe (a shared expert, q/k/v biases or none, windows on any layers); every "
            "channel rotating"
        )
    experts = dict(
        num_experts_per_tok=config.n_experts_per_tok,
        # transformers adds the balancing loss only where the router's logits are asked for
        output_router_logits=config.router_aux_loss_coef > 0,
        router_aux_loss_coef=config.router_aux_loss_coef,
        sliding_window=config.sliding_window,
    )
    qwen = dict(
        num_experts=config.n_experts,
        moe_intermediate_size=config.intermediate_size,
        norm_topk_prob=config.norm_topk_prob,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=any(sliding),
    )
    if qwen2:
        return dict(
            llama,
            architectures=["Qwen2MoeForCausalLM"],
            model_type="qwen2_moe",
            qkv_bias=config.qkv_bias,
            shared_expert_intermediate_size=config.shared_expert_size,
            layer_types=_layer_types(windows),
            **qwen,
            **experts,
        )
    if config.qk_norm:
        return dict(
            llama,
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            attention_bias=False,
            **qwen,
            **experts,
        )
    if not config.norm_topk_prob:
        raise ValueError(
            "norm_topk_prob=False without q/k norms or a shared expert has no Hugging Face "
            "layout: mixtral always rescales a token's expert weights to sum to 1 (qwen3_moe, "
            "with q/k norms, and qwen2_moe, with a shared expert, need not)"
        )
    return dict(
        llama,
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        num_local_experts=config.n_experts,
        **experts,
    )


def _gemma_config(config: ModelConfig, common: dict[str, Any]) -> dict[str, Any]:
    """gemma2 (no q/k norms, one rope theta) or gemma3_text (q/k norms)."""
    gemma2 = not config.qk_norm
    if config.bias or config.qkv_bias:
        raise ValueError(
            f"a gemma-family model with bias={config.bias}, qkv_bias={config.qkv_bias} has no "
            "Hugging Face layout; supported: gemma2 and gemma3_text (no biases)"
        )
    if gemma2 and config.rope_local_theta is not None:
        raise ValueError(
            f"rope_local_theta={config.rope_local_theta} without q/k norms has no Hugging Face "
            "layout: gemma2 turns every layer by one rope theta, and gemma3_text has q/k norms"
        )
    windows = config.layer_windows
    local_theta = config.rope_local_theta
    if local_theta is None:  # the sliding-window layers turn as the global ones
        sliding = any(w is not None for w in windows)
        if not gemma2 and config.rope_scaling is not None and sliding:
            raise ValueError(
                f"rope_scaling={config.rope_scaling} on the sliding-window layers has no "
                "Hugging Face layout; gemma3_text scales only the full-attention layers' rope "
                "(set rope_local_theta)"
            )
        local_theta = config.rope_theta
    # query_pre_attn_scalar is an int in transformers; attn_scale is its inverse square root
    scalar = config.head_dim if config.attn_scale is None else config.attn_scale**-2
    if abs(scalar - round(scalar)) < 1e-6 * scalar:
        scalar = round(scalar)
    layout = dict(
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=scalar,
        sliding_window=config.sliding_window,
        layer_types=_layer_types(windows),
        final_logit_softcapping=config.logit_softcap,
        attn_logit_softcapping=config.attn_softcap,
        rope_theta=config.rope_theta,
        rope_scaling=config.rope_scaling,
        attention_bias=False,
        attention_dropout=0.0,
        **common,
    )
    if gemma2:
        return dict(layout, architectures=["Gemma2ForCausalLM"], model_type="gemma2")
    return dict(
        layout,
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        rope_local_base_freq=local_theta,
    )


def _hf_tensors(model: Transformer, model_type: str) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    out = {}
    # the names transformers' save_pretrained writes for GPT-2 carry the `transformer.` prefix
    for name, src in _layout(model, "transformer.", model_type).items():
        parts = state[name].split(list(src.sizes))
        for hf_name, part in zip(src.hf_names, parts, strict=True):
            out[hf_name] = (part.t() if src.transpose else part).contiguous()
    return out


def _tokenizer_config(tokenizer: Tokenizer, config: ModelConfig) -> dict[str, Any]:
    tk = tokenizers.Tokenizer.from_str(tokenizer.to_json())
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_ids
    out: dict[str, Any] = dict(
        # the generic class reads tokenizer.json as it is, with no model-specific rebuilding
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=config.block_size,
        clean_up_tokenization_spaces=False,  # decode must give back exactly the text
        bos_token=None if bos is None else tk.id_to_token(bos),
        eos_token=tk.id_to_token(eos[0]) if eos else None,
    )
    if tokenizer.chat_template is not None:
        out["chat_template"] = tokenizer.chat_template
    return out


def export_hf(model: Transformer, tokenizer: Tokenizer, out_dir: str | os.PathLike) -> None:
    """Write ``model`` and ``tokenizer`` as a Hugging Face folder (safetensors, config.json,
    generation_config.json, tokenizer.json, tokenizer_config.json).

    gpt2-family models become model_type gpt2; llama-family ones llama, mistral (a window on every
    layer), qwen2 (biases on q/k/v only), qwen3 (q/k norms) or phi3 (partial rotary, LongRoPE, or
    a model that came from phi3), or with experts mixtral, qwen3_moe (q/k norms) or qwen2_moe (a
    shared expert); gemma-family ones gemma2 (no q/k norms) or gemma3_text.
    ``out_dir`` must not exist or be empty; it appears complete or not at all.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; choose a new path")
    config = model.config
    require_float(config, "Hugging Face export")
    dtype = model.wte.weight.dtype
    hf_config = _hf_config(config, tokenizer, dtype)
    generation = {
        k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config[k] is not None
    }
    files = {
        "config.json": json.dumps(hf_config, indent=2).encode(),
        "generation_config.json": json.dumps(generation, indent=2).encode(),
        SAFETENSORS: tensors_to_bytes(
            _hf_tensors(model, hf_config["model_type"]), {"format": "pt"}
        ),
        "tokenizer.json": tokenizer.to_json().encode(),
        "tokenizer_config.json": json.dumps(
            _tokenizer_config(tokenizer, config), indent=2
        ).encode(),
    }
    with atomic_path(out_dir, directory=True) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)

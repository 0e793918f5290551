"""Hugging Face model folders: import GPT-2, Llama, Mistral, Qwen2 and Qwen3 checkpoints; export
to them.

Import reads ``config.json``, safetensors weights (one file or shards) and ``tokenizer.json`` with
json, safetensors, tokenizers and torch alone: running an imported model does not need
``transformers``. Export writes a folder that ``transformers`` loads with ``AutoModelForCausalLM``
and ``AutoTokenizer`` and that gives the same logits.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors import SafetensorError, safe_open

from arlm.atomic import atomic_path
from arlm.config import LAYER_TYPES, ModelConfig, resolve_dtype
from arlm.formats.checkpoint import CheckpointError, read_json, tensors_to_bytes
from arlm.model.quantize import require_float
from arlm.model.transformer import Transformer
from arlm.tokenizer import Tokenizer

# mistral, qwen2 and qwen3 run as the llama family
HF_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")

# config keys that change the math where set, which arlm does not implement: refused by name
# rather than ignored (a family that has one of them is refused by its model_type already)
_UNIMPLEMENTED = {
    "attn_logit_softcapping": None,  # Gemma 2's tanh cap on attention scores
    "final_logit_softcapping": None,  # Gemma 2/3's tanh cap on the logits
    "partial_rotary_factor": 1.0,  # rotary angles on only part of each head
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


def _rope_fields(c: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 writes one `rope_parameters` dict; older configs (most of the Hub) write
    # `rope_theta` and `rope_scaling` beside each other
    params = c.get("rope_parameters") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            f"rope_parameters per layer type ({sorted(params)}) is not supported for "
            f"{c['model_type']}; supported: one rope_parameters dict for every layer"
        )
    theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
    scaling = dict(c.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"})
    # transformers 5 moves partial_rotary_factor into the rope dict: checked with the others
    if scaling.pop("partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError(
            "rope_parameters.partial_rotary_factor is not supported for "
            f"{c['model_type']}; supported: 1.0 (every channel rotates)"
        )
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return dict(rope_theta=float(theta), rope_scaling=scaling)


def _window_fields(c: dict[str, Any], n_layer: int, block_size: int) -> dict[str, Any]:
    """``sliding_window`` and ``layer_types`` the way transformers reads them: Mistral slides on
    every layer; Qwen2 and Qwen3 only with ``use_sliding_window``, on the layers ``layer_types``
    names (by default those from ``max_window_layers`` on); Llama never."""
    model_type, window = c["model_type"], c.get("sliding_window")
    types = None
    if model_type == "llama" or (model_type != "mistral" and not c.get("use_sliding_window")):
        window = None
    elif model_type != "mistral" and window is not None:
        types = c.get("layer_types")
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
    elif model_type == "qwen3":  # attention_bias would put biases on q, k, v and o, not the MLP
        if c.get("attention_bias", False):
            raise ValueError(
                "attention_bias=true is not supported for qwen3 (biases on the attention's four "
                "projections but not the MLP's); supported: attention_bias false"
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
    return dict(
        family="llama",
        n_layer=n_layer,
        n_head=heads,
        n_embd=hidden,
        block_size=block_size,
        n_kv_head=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or hidden // heads,
        intermediate_size=_require(c, "intermediate_size"),
        norm_eps=c.get("rms_norm_eps", 1e-6),
        bias=bias,
        qkv_bias=qkv_bias,
        tie_embeddings=c.get("tie_word_embeddings", False),
        qk_norm=model_type == "qwen3",
        **_rope_fields(c),
        **_window_fields(c, n_layer, block_size),
    )


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` of a Hugging Face ``config.json`` (gpt2, llama, mistral, qwen2 or
    qwen3). A setting that changes the math and that arlm does not implement is refused, by name.
    """
    model_type = hf_config.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ValueError(
            f"model_type={model_type!r} is not supported; supported: {list(HF_MODEL_TYPES)}"
        )
    for key, default in _UNIMPLEMENTED.items():
        if hf_config.get(key, default) not in (None, default):
            raise ValueError(
                f"{key}={hf_config[key]!r} is not supported for {model_type}; arlm does not "
                f"implement it (supported: {default})"
            )
    fields = _gpt2_fields(hf_config) if model_type == "gpt2" else _llama_fields(hf_config)
    return ModelConfig(
        vocab_size=_require(hf_config, "vocab_size"),
        extra={"hf_model_type": model_type},
        **fields,
    )


# ---------------------------------------------------------------------------------------------
# tensor names and layouts, shared by import and export


@dataclass(frozen=True)
class _Source:
    """The Hugging Face tensors one arlm tensor is made of."""

    hf_names: tuple[str, ...]  # concatenated along dim 0, in this order
    sizes: tuple[int, ...]  # each one's length along dim 0 of the arlm tensor
    transpose: bool  # GPT-2's Conv1D stores (in, out) where nn.Linear holds (out, in)


def _layout(model: Transformer, prefix: str) -> dict[str, _Source]:
    """arlm tensor name -> its Hugging Face source, for every tensor a checkpoint stores."""
    config = model.config
    hd = config.head_dim
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
            parts = _LLAMA_BLOCK[module]
            if module == "attn.c_attn":
                sizes = (config.n_head * hd, config.n_kv_head * hd, config.n_kv_head * hd)
            elif module == "mlp.c_fc":
                sizes = (config.intermediate_size, config.intermediate_size)
            else:
                sizes = (tensor.shape[0],)
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
    "or pass allow_pickle=True to load it with torch.load(weights_only=True)."
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


def _open_weights(directory: Path, allow_pickle: bool) -> dict[str, Callable[[], torch.Tensor]]:
    """Name -> reader of each stored tensor; tensors are read one at a time, when asked for."""
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
            readers.update({k: functools.partial(handle.get_tensor, k) for k in handle.keys()})  # noqa: SIM118
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
        readers.update({k: functools.partial(state.__getitem__, k) for k in state})
    return readers


def _load_state(
    model: Transformer,
    readers: dict[str, Callable[[], torch.Tensor]],
    source: Path,
    device: torch.device | str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """arlm's state dict from the stored tensors, each checked against the config's shape."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in readers) else ""
    layout = _layout(model, prefix)
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
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    state = {}
    for name, src in layout.items():
        parts = []
        for hf_name, size in zip(src.hf_names, src.sizes, strict=True):
            tensor = readers[hf_name]()
            expected = (size, *shapes[name][1:])
            if src.transpose:
                expected = expected[::-1]
            if tuple(tensor.shape) != expected:
                raise CheckpointError(
                    f"{source}: tensor {hf_name} has shape {tuple(tensor.shape)}, but config.json "
                    f"implies {expected}"
                )
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
    readers = _open_weights(directory, allow_pickle)
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


def _hf_config(config: ModelConfig, tokenizer: Tokenizer, dtype: torch.dtype) -> dict[str, Any]:
    eos = tokenizer.eos_token_ids
    common = dict(
        vocab_size=config.vocab_size,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        dtype=str(dtype).removeprefix("torch."),
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


def _hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    out = {}
    # the names transformers' save_pretrained writes for GPT-2 carry the `transformer.` prefix
    for name, src in _layout(model, "transformer.").items():
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

    gpt2-family models become model_type gpt2; llama-family ones llama, or qwen2 when only q/k/v
    have biases. ``out_dir`` must not exist or be empty; it appears complete or not at all.
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
        SAFETENSORS: tensors_to_bytes(_hf_tensors(model), {"format": "pt"}),
        "tokenizer.json": tokenizer.to_json().encode(),
        "tokenizer_config.json": json.dumps(
            _tokenizer_config(tokenizer, config), indent=2
        ).encode(),
    }
    with atomic_path(out_dir, directory=True) as staging:
        for name, data in files.items():
            (staging / name).write_bytes(data)

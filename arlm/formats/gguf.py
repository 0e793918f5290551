"""GGUF export: one file that llama.cpp (and the tools built on it) loads.

The file follows llama.cpp's own converter (``convert_hf_to_gguf.py``) for its ``gpt2``,
``llama`` (Mixtral's experts too), ``qwen3``, ``qwen3moe``, ``qwen2moe``, ``phi3``, ``gemma2``
and ``gemma3`` architectures: the same tensor names and metadata keys, q and k rows reordered
for the llama architecture's RoPE (the others rotate halves, as arlm does), each layer's experts
stacked into one tensor per projection, norms, biases and routers kept in float32, and Q8_0
falling back to f16 for rows that are not a multiple of its 32-value blocks.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from arlm.atomic import atomic_path
from arlm.config import ModelConfig
from arlm.model.quantize import require_float
from arlm.model.transformer import RMSNorm, Transformer, rope_frequencies
from arlm.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType
# --type -> (general.file_type, the type of the matrices)
TYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
}

# arlm module inside block i -> the llama.cpp tensors in blk.i its rows are split into, in order
_GPT2_BLOCK = {
    "ln_1": ("attn_norm",),
    "attn.c_attn": ("attn_qkv",),  # llama.cpp's gpt2 reads q, k, v fused, in arlm's row order
    "attn.c_proj": ("attn_output",),
    "ln_2": ("ffn_norm",),
    "mlp.c_fc": ("ffn_up",),
    "mlp.c_proj": ("ffn_down",),
}
_LLAMA_BLOCK = {
    "ln_1": ("attn_norm",),
    "attn.c_attn": ("attn_q", "attn_k", "attn_v"),
    "attn.q_norm": ("attn_q_norm",),
    "attn.k_norm": ("attn_k_norm",),
    "attn.c_proj": ("attn_output",),
    "ln_2": ("ffn_norm",),
    "mlp.c_fc": ("ffn_gate", "ffn_up"),
    "mlp.c_proj": ("ffn_down",),
}


# Phi-3 fuses q, k, v into one matrix and gate, up into another, as arlm does
_PHI3_BLOCK = {**_LLAMA_BLOCK, "attn.c_attn": ("attn_qkv",), "mlp.c_fc": ("ffn_up",)}
# Gemma 3 also normalises what attention and the MLP add (ln_2 is its pre_feedforward norm)
_GEMMA3_BLOCK = {
    **_LLAMA_BLOCK,
    "post_attn_norm": ("post_attention_norm",),
    "post_mlp_norm": ("post_ffw_norm",),
}
# a mixture of experts: its router, and each projection of all its experts stacked in one tensor
_EXPERTS = {
    "mlp.router": ("ffn_gate_inp",),
    "mlp.experts.c_fc": ("ffn_gate_exps", "ffn_up_exps"),
    "mlp.experts.c_proj": ("ffn_down_exps",),
}
# Qwen2-MoE's shared expert and its gate
_SHARED_EXPERT = {
    "mlp.shared_expert.c_fc": ("ffn_gate_shexp", "ffn_up_shexp"),
    "mlp.shared_expert.c_proj": ("ffn_down_shexp",),
    "mlp.shared_gate": ("ffn_gate_inp_shexp",),
}
# Gemma 2's the same, without q/k norms
_BLOCKS = {
    "gpt2": _GPT2_BLOCK,
    "phi3": _PHI3_BLOCK,
    "gemma2": _GEMMA3_BLOCK,
    "gemma3": _GEMMA3_BLOCK,
}


def architecture(config: ModelConfig) -> str:
    """llama.cpp's architecture for ``config``: gpt2, llama (with or without experts), qwen3
    (q/k norms), qwen3moe (q/k norms and experts), qwen2moe (experts and a shared one), phi3
    (part of each head rotating, LongRoPE, or a model that came from phi3), gemma3 (the gemma
    family) or gemma2 (the gemma family without q/k norms)."""
    if config.family == "gemma":
        return "gemma3" if config.qk_norm else "gemma2"
    if config.shared_expert_size is not None:
        return "qwen2moe"
    if config.qk_norm:
        return "qwen3" if config.n_experts is None else "qwen3moe"
    if config.n_experts is not None:
        return config.family  # llama.cpp's llama holds Mixtral's experts
    partial = config.family == "llama" and config.rotary_dim != config.head_dim
    if partial or config.rope_type == "longrope" or config.extra.get("hf_model_type") == "phi3":
        return "phi3"
    return config.family


def _llama_cpp_attn_scale(config: ModelConfig, arch: str) -> float:
    # llama.cpp does not read gemma's attention scale: it takes 1/sqrt(head_dim), except for the
    # 27B models (Gemma 3's 62 layers, Gemma 2's 46), where it takes 1/sqrt(n_embd / n_head)
    if config.n_layer == {"gemma3": 62, "gemma2": 46}[arch]:
        return (config.n_embd // config.n_head) ** -0.5
    return config.head_dim**-0.5


def _check_gemma(config: ModelConfig, arch: str) -> None:
    """What llama.cpp's gemma3 (q/k norms) and gemma2 (none, capped scores) run as arlm does."""
    if config.bias or config.qkv_bias:
        raise ValueError(
            f"llama.cpp's {arch} architecture has no biases; this model has bias={config.bias}, "
            f"qkv_bias={config.qkv_bias}"
        )
    scale = config.attn_scale or config.head_dim**-0.5
    expected = _llama_cpp_attn_scale(config, arch)
    if abs(scale - expected) > 1e-6 * expected:
        raise ValueError(
            f"attn_scale={scale:.6g}: llama.cpp's {arch} does not read the attention scale; it "
            f"uses {expected:.6g} for a model of {config.n_layer} layers, so the file would "
            "compute another model (supported: query_pre_attn_scalar = head_dim)"
        )
    if arch == "gemma2":
        if config.rope_scaling is not None:
            raise ValueError(
                f"rope_scaling type {config.rope_type!r}: llama.cpp's gemma2 turns its rope "
                "unscaled; supported: none"
            )
        if not config.tie_embeddings:
            raise ValueError(
                "an untied output projection: llama.cpp's gemma2 reads the token embeddings as "
                "its output matrix; supported: tie_embeddings=True"
            )
        return
    if config.rope_scaling is not None and config.rope_type != "linear":
        raise ValueError(
            f"rope_scaling type {config.rope_type!r}: llama.cpp's gemma3 scales its rope only "
            "linearly; supported: 'linear' or none"
        )
    sliding = any(w is not None for w in config.layer_windows)
    if sliding and config.rope_local_theta is None and config.rope_scaling is not None:
        raise ValueError(
            "rope_scaling on the sliding-window layers: llama.cpp's gemma3 turns them unscaled; "
            "supported: rope_local_theta set (the sliding-window layers' own rope)"
        )


def _check_phi3(config: ModelConfig) -> None:
    if config.bias or config.qkv_bias or config.n_head * config.head_dim != config.n_embd:
        raise ValueError(
            "llama.cpp's phi3 architecture has no biases and n_head * head_dim == n_embd; this "
            f"model has bias={config.bias}, qkv_bias={config.qkv_bias}, n_head={config.n_head}, "
            f"head_dim={config.head_dim}, n_embd={config.n_embd}"
        )
    if config.rope_scaling is not None and config.rope_type != "longrope":
        raise ValueError(
            f"rope_scaling type {config.rope_type!r}: llama.cpp's phi3 reads only LongRoPE's "
            "factors; supported: 'longrope' or none"
        )


def _check_experts(config: ModelConfig, arch: str) -> None:
    if config.family != "llama":
        raise ValueError(
            f"a {config.family}-family mixture of experts: llama.cpp runs experts in its llama, "
            "qwen3moe and qwen2moe architectures only (the llama family)"
        )
    if config.bias:
        raise ValueError(
            f"bias=True: llama.cpp's {arch} experts have no biases; supported: bias=False"
        )
    # llama.cpp's qwen2moe never rescales a token's expert weights to sum to 1, the others always
    rescaled = arch != "qwen2moe"
    if config.norm_topk_prob != rescaled:
        does = "rescales" if rescaled else "does not rescale"
        raise ValueError(
            f"norm_topk_prob={config.norm_topk_prob}: llama.cpp {does} each token's expert "
            f"weights to sum to 1 in its {arch} architecture, so the file would compute another "
            f"model; supported: norm_topk_prob={rescaled}"
        )
    if arch == "qwen2moe" and (config.qk_norm or config.n_head * config.head_dim != config.n_embd):
        raise ValueError(
            f"llama.cpp's qwen2moe has no q/k norms and n_head * head_dim == n_embd; this model "
            f"has qk_norm={config.qk_norm}, n_head={config.n_head}, head_dim={config.head_dim}, "
            f"n_embd={config.n_embd}"
        )


def _check_model(config: ModelConfig) -> None:
    require_float(config, "GGUF export")
    arch = architecture(config)
    if config.n_experts is not None:
        _check_experts(config, arch)
    if config.attn_softcap is not None and arch != "gemma2":
        raise ValueError(
            f"attn_softcap={config.attn_softcap}: llama.cpp caps attention scores in its gemma2 "
            f"architecture only (a gemma-family model without q/k norms); this model's is {arch}"
        )
    if arch in ("gemma2", "gemma3"):
        return _check_gemma(config, arch)
    if arch == "phi3":
        _check_phi3(config)
    elif config.positions == "rope" and (
        config.rotary_dim != config.head_dim or config.rope_type not in ("default", "llama3")
    ):
        raise ValueError(
            f"rotary_dim={config.rotary_dim} of head_dim={config.head_dim} with rope_scaling "
            f"type {config.rope_type!r}: llama.cpp's {arch} architecture rotates every channel "
            "and scales its rope only as Llama 3 does; supported there: both defaults"
        )
    if config.sliding_window is not None:
        raise ValueError(
            f"sliding_window={config.sliding_window}: llama.cpp's {architecture(config)} "
            "architecture has no sliding-window attention, so the file would compute another "
            "model; supported: models without a sliding window (or one as long as the context)"
        )
    if config.qk_norm and (config.bias or config.qkv_bias):
        raise ValueError(
            f"qk_norm with bias={config.bias}, qkv_bias={config.qkv_bias}: llama.cpp's qwen3 "
            "architecture has no biases; supported: qk_norm without biases"
        )
    # llama.cpp's llama architecture treats every linear bias as optional, its gpt2 needs them all
    if config.family == "gpt2" and not (config.bias and config.qkv_bias):
        raise ValueError(
            "llama.cpp's gpt2 architecture needs biases on every linear and norm; this model has "
            f"bias={config.bias}, qkv_bias={config.qkv_bias} (supported: both True)"
        )


def _llama_rope_order(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q or k projection (weight or bias) from rotate-half order to llama.cpp's.

    arlm, like Hugging Face, rotates element i of a head with element i + head_dim/2; llama.cpp's
    llama architecture rotates neighbours 2i and 2i+1. Within each head, row i moves to 2i and row
    i + head_dim/2 to 2i+1, which is the permutation llama.cpp's converter applies.
    """
    # (n_head, 2 halves, head_dim/2, ...) -> (n_head, head_dim/2, 2, ...)
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _rope_factors(config: ModelConfig) -> torch.Tensor:
    """Llama 3's per-frequency divisors: llama.cpp divides each base frequency by its factor."""
    base = rope_frequencies(dataclasses.replace(config, rope_scaling=None))
    return base / rope_frequencies(config)


def _stack_experts(state: dict[str, torch.Tensor], config: ModelConfig) -> None:
    """Each layer's experts as llama.cpp reads them: one (n_experts, rows, columns) tensor per
    projection, in ``state`` under ``h.{i}.mlp.experts.{c_fc,c_proj}.weight``."""
    for i in range(config.n_layer):
        for linear in ("c_fc", "c_proj"):
            names = [f"h.{i}.mlp.experts.{e}.{linear}.weight" for e in range(config.n_experts)]
            state[f"h.{i}.mlp.experts.{linear}.weight"] = torch.stack([state.pop(n) for n in names])


def gguf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights in float32 under llama.cpp's names, split and reordered as it reads them.

    A tied output projection is left out: llama.cpp then uses ``token_embd.weight`` for it.
    """
    config = model.config
    _check_model(config)
    arch = architecture(config)
    state = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    # llama.cpp's RMSNorm multiplies by its weight; Gemma's by 1 + weight
    for name, module in model.named_modules():
        if isinstance(module, RMSNorm) and module.plus_one:
            state[f"{name}.weight"] = state[f"{name}.weight"] + 1
    out = {"token_embd.weight": state["wte.weight"]}
    if config.family == "gpt2":
        out["position_embd.weight"] = state["wpe.weight"]
    elif config.rope_type == "llama3":
        out["rope_freqs.weight"] = _rope_factors(config)
    elif config.rope_type == "longrope":  # llama.cpp divides each frequency by its factor
        out["rope_factors_long.weight"] = torch.tensor(config.rope_scaling["long_factor"])
        out["rope_factors_short.weight"] = torch.tensor(config.rope_scaling["short_factor"])

    block = _BLOCKS.get(arch, _LLAMA_BLOCK)
    if config.n_experts is not None:
        block = {**block, **_EXPERTS}
        _stack_experts(state, config)
    if config.shared_expert_size is not None:
        block = {**block, **_SHARED_EXPERT}
        for i in range(config.n_layer):  # llama.cpp reads the gate as a vector
            state[f"h.{i}.mlp.shared_gate.weight"] = state[f"h.{i}.mlp.shared_gate.weight"][0]
    q, kv = config.n_head * config.head_dim, config.n_kv_head * config.head_dim
    sizes = {
        "attn.c_attn": [q, kv, kv],
        "mlp.c_fc": [config.intermediate_size] * 2,
        "mlp.experts.c_fc": [config.intermediate_size] * 2,
        "mlp.shared_expert.c_fc": [config.shared_expert_size] * 2,
    }
    # llama.cpp's llama rotates neighbouring pairs; the others rotate halves, as arlm does
    pairs = arch == "llama"
    rope_heads = {"attn_q": config.n_head, "attn_k": config.n_kv_head} if pairs else {}
    for i in range(config.n_layer):
        for module, names in block.items():
            for kind in ("weight", "bias"):
                tensor = state.get(f"h.{i}.{module}.{kind}")
                if tensor is None:
                    continue
                # the rows of a weight, or of each expert's in a stack
                rows = -2 if kind == "weight" else 0
                parts = tensor.split(sizes[module], rows) if len(names) > 1 else (tensor,)
                for name, part in zip(names, parts, strict=True):
                    if name in rope_heads:
                        part = _llama_rope_order(part, rope_heads[name])
                    out[f"blk.{i}.{name}.{kind}"] = part

    for kind in ("weight", "bias"):
        if f"ln_f.{kind}" in state:
            out[f"output_norm.{kind}"] = state[f"ln_f.{kind}"]
    if not config.tie_embeddings or arch == "qwen2moe":  # llama.cpp's qwen2moe needs its own
        out["output.weight"] = state["lm_head.weight"]
    return {name: t.contiguous() for name, t in out.items()}


def _encode(name: str, data: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    # as llama.cpp's converter: vectors (norms, biases, rope factors), learned positions and
    # routers stay float32, because most of llama.cpp reads them only in float32 (and a rounded
    # router picks other experts)
    if data.ndim == 1 or name == "position_embd.weight" or name.endswith("ffn_gate_inp.weight"):
        qtype = Q.F32
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        # Q8_0 packs each row in blocks of 32 values; other row lengths are stored as f16
        return gguf.quants.quantize(data, Q.F16), Q.F16


def _vocab(tokenizer: Tokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges as llama.cpp's ``gpt2`` tokenizer model reads them."""
    data = json.loads(tokenizer.to_json())
    model, pre = data["model"], data.get("pre_tokenizer") or {}
    if (
        model["type"] != "BPE"
        or data.get("normalizer") is not None
        or pre.get("type") != "ByteLevel"
        or not pre.get("use_regex", True)
        or pre.get("add_prefix_space", False)
    ):
        raise ValueError(
            "GGUF export supports byte-level BPE with GPT-2's pre-tokenization and no normalizer "
            "(what arlm trains, and GPT-2's tokenizer); this tokenizer has model "
            f"{model['type']!r}, pre_tokenizer {pre.get('type')!r} "
            f"(use_regex={pre.get('use_regex')}, add_prefix_space={pre.get('add_prefix_space')}), "
            f"normalizer {(data.get('normalizer') or {}).get('type')!r}"
        )
    tokens = {i: t for t, i in model["vocab"].items()}
    types = dict.fromkeys(tokens, int(gguf.TokenType.NORMAL))
    for added in data.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = int(
            gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
        )
    if max(tokens) >= n_vocab:
        raise ValueError(
            f"the tokenizer has token id {max(tokens)}, but the model's vocab_size is {n_vocab}; "
            "every id must have an embedding row"
        )
    # embedding rows no token uses (a vocabulary padded for speed) get placeholder tokens, as
    # llama.cpp's converter writes them: llama.cpp needs one token per row
    names = [tokens.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    kinds = [types.get(i, int(gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    # tokenizers >= 0.20 writes a merge as a pair, older ones as "a b"; byte-level tokens hold no
    # spaces, so the joined form is unambiguous
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return names, kinds, merges


def _add_metadata(
    writer: gguf.GGUFWriter, config: ModelConfig, name: str, file_type: gguf.LlamaFileType
) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_vocab_size(config.vocab_size)
    if config.n_experts is not None:
        writer.add_expert_count(config.n_experts)
        writer.add_expert_used_count(config.n_experts_per_tok)
        # llama.cpp's llama sizes its experts by feed_forward_length, its qwen3moe by this
        writer.add_expert_feed_forward_length(config.intermediate_size)
    if config.shared_expert_size is not None:
        writer.add_expert_shared_feed_forward_length(config.shared_expert_size)
    if config.family == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.rotary_dim)
        writer.add_key_length(config.head_dim)  # llama.cpp's default is n_embd / n_head
        writer.add_value_length(config.head_dim)
        _add_rope_and_windows(writer, config)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_rope_and_windows(writer: gguf.GGUFWriter, config: ModelConfig) -> None:
    """RoPE scalings, gemma's sliding-window layers and caps, as llama.cpp reads them."""
    scaling = config.rope_scaling or {}
    if config.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif config.rope_type == "longrope":  # the factors themselves are tensors
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        writer.add_rope_scaling_attn_factors(scaling["attention_factor"])
    if config.family != "gemma":
        return
    windows = config.layer_windows
    # per layer, whether it slides, and the window: written even where no layer slides, since
    # llama.cpp's gemma2 without them slides every other layer over 4,096 positions
    writer.add_sliding_window(config.sliding_window or config.block_size)
    writer.add_sliding_window_pattern([w is not None for w in windows])
    writer.add_rope_freq_base_swa(config.rope_local_theta or config.rope_theta)
    if config.logit_softcap is not None:
        writer.add_final_logit_softcapping(config.logit_softcap)
    if config.attn_softcap is not None:
        writer.add_attn_logit_softcapping(config.attn_softcap)


def _add_tokenizer(
    writer: gguf.GGUFWriter, tokenizer: Tokenizer, vocab: tuple[list[str], list[int], list[str]]
) -> None:
    names, kinds, merges = vocab
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex, which ByteLevel(use_regex) applies
    writer.add_token_list(names)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_ids:
        # GGUF has one eos id; llama.cpp also stops on tokens it recognises by their text
        # (<|endoftext|>, <|eot_id|>, <|im_end|>, ...)
        writer.add_eos_token_id(tokenizer.eos_token_ids[0])
    # whether encoding adds markers (Llama's BOS comes from the tokenizer's post-processor)
    plain = tokenizer.encode("a", add_special_tokens=False)
    marked = tokenizer.encode("a")
    added = len(marked) > len(plain)
    writer.add_add_bos_token(added and marked[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(added and marked[-1] in tokenizer.eos_token_ids)
    if tokenizer.chat_template is not None:
        writer.add_chat_template(tokenizer.chat_template)


def export_gguf(
    model: Transformer, tokenizer: Tokenizer, path: str | os.PathLike, *, type: str = "f32"
) -> None:
    """Write ``model`` and ``tokenizer`` as one GGUF file for llama.cpp.

    gpt2-family models become llama.cpp's ``gpt2`` architecture, llama-family ones ``llama``
    (Llama 3 rope scaling as a ``rope_freqs`` tensor), ``qwen3`` with q/k norms, or ``phi3``
    (partial rotary, LongRoPE factors as tensors); gemma-family ones ``gemma3``, or ``gemma2``
    without q/k norms (norm weights written as 1 + weight, sliding-window layers as a per-layer
    pattern, the caps on the logits and on gemma2's attention scores). A sliding window is
    refused except in the gemma ones: llama.cpp runs the other architectures without one.
    ``type`` is how the matrices are stored: ``f32`` (exact), ``f16`` or ``q8_0`` (8-bit blocks;
    rows not a multiple of 32 values as f16); vectors and position embeddings are float32
    whatever the type.
    ``general.name`` is the file name without its suffix. ``path`` must not exist; the file
    appears complete or not at all.
    """
    if type not in TYPES:
        raise ValueError(f"type={type!r} is not supported; choose one of {list(TYPES)}")
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists; choose a new path")
    config = model.config
    file_type, qtype = TYPES[type]
    tensors = gguf_tensors(model)  # checks the model, before any file is made
    vocab = _vocab(tokenizer, config.vocab_size)  # checks the tokenizer, likewise

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, architecture(config))
        try:
            _add_metadata(writer, config, path.stem, file_type)
            _add_tokenizer(writer, tokenizer, vocab)
            for name, tensor in tensors.items():
                data, dtype = _encode(name, tensor.numpy(), qtype)
                writer.add_tensor(name, data, raw_dtype=dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

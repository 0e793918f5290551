"""Model configuration: one dataclass for the transformer families arlm runs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from arlm.validate import check_float, check_int


def option(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, **cli: Any):
    """A dataclass field that is also a command-line option: ``help`` is its ``--help`` text,
    ``cli`` extras (``flag``, ``choices``, ``metavar``) shape the flag ``arlm.cli`` derives."""
    metadata = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


FAMILIES = ("gpt2", "llama", "gemma")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's names
# RoPE variants: Llama 3's per-band rescaling, plain linear stretching (Gemma 3's global layers),
# and LongRoPE's per-frequency factors (Phi-3); "default" is none
ROPE_TYPES = ("default", "llama3", "linear", "longrope")
QUANT_METHODS = ("int8", "int4")  # weight-only; see arlm.model.quantize
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Bounds on sizes far past any released model's (the largest vocabularies are ~262k ids, the
# deepest stacks ~130 layers, the longest contexts ~10M positions). A config past one is damaged
# or hostile: it is refused before anything is built, where it would otherwise ask for memory no
# machine has. Loading also checks every size against the weights' own shapes (arlm.formats).
SIZE_LIMITS = {
    "vocab_size": 1 << 22,
    "n_layer": 1 << 10,
    "n_head": 1 << 10,
    "n_kv_head": 1 << 10,
    "n_embd": 1 << 16,
    "head_dim": 1 << 12,
    "intermediate_size": 1 << 20,
    "n_experts": 1 << 12,
    "block_size": 1 << 25,
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """A torch dtype from a dtype or its name; ``None`` means float32, which every device runs."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(
        f"dtype={dtype!r} is not supported; choose one of {list(DTYPES)} "
        "or torch.float32, torch.bfloat16, torch.float16"
    )


def check_size(name: str, value: object, field: str | None = None) -> None:
    """``value`` must be an int from 1 to ``SIZE_LIMITS[field]`` (``field`` defaults to
    ``name``; ``name`` is what the message calls it, e.g. a Hugging Face config's key)."""
    limit = SIZE_LIMITS[field or name]
    check_int(name, value, 1, f"from 1 to {limit:,}")
    if value > limit:
        raise ValueError(
            f"{name}={value:,} is not allowed; it must be an integer from 1 to {limit:,}: no "
            "released model comes near it, so the config is damaged"
        )


def longrope_attention_factor(factor: float | None, original: int, block_size: int) -> float:
    """LongRoPE's scaling of cos and sin where a config gives none, as transformers derives it:
    from ``factor``, or how far the context was stretched (``block_size / original``)."""
    factor = factor or block_size / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


@dataclass
class ModelConfig:
    """Sizes and layout of a decoder-only transformer.

    ``family`` picks the layout: ``gpt2`` (learned positions, LayerNorm, GELU MLP, biases),
    ``llama`` (rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases) or
    ``gemma`` (Gemma 2 and 3: the llama layout with RMSNorm gains of 1 + weight computed in
    float32, a second norm after attention and after the MLP, a GeGLU MLP with tanh GELU, and
    embeddings scaled by sqrt(n_embd); Gemma 2 also caps its attention scores, ``attn_softcap``).
    The rotary families also cover Mistral, Qwen2, Qwen3 and Phi-3: a ``head_dim`` of its own,
    RMSNorm on each head's queries and keys (``qk_norm``), sliding-window attention on some or
    all layers, rotation of part of each head (``rotary_dim``), and RoPE scalings
    (``rope_scaling``). With ``n_experts`` every block's MLP is a sparse mixture of experts
    (Mixtral, Qwen3-MoE, Qwen2-MoE): each token runs through ``n_experts_per_tok`` of
    ``n_experts`` MLPs of ``intermediate_size`` hidden units, chosen and weighted by a router,
    and through a gated shared expert where ``shared_expert_size`` is set.
    """

    family: str = "gpt2"
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # context length: the most positions the model is trained to see
    n_kv_head: int | None = None  # None: same as n_head; fewer is grouped-query attention
    head_dim: int | None = None  # None: n_embd // n_head; rotary models may choose another
    intermediate_size: int | None = None  # None: 4*n_embd (gpt2) or ~8/3*n_embd (llama)
    norm_eps: float = 1e-5
    bias: bool | None = None  # biases on linears and norms; None: True for gpt2, False for llama
    qkv_bias: bool | None = None  # bias on the q/k/v projection only (Qwen2); None: same as bias
    tie_embeddings: bool = True  # the output projection shares the token-embedding matrix
    rope_theta: float = 10000.0
    # {"rope_type": "llama3" | "linear" | "longrope", ...} with the keys HF configs give it;
    # longrope also needs "original_max_position_embeddings" and gets its "attention_factor" here
    rope_scaling: dict[str, Any] | None = None
    rotary_dim: int | None = None  # channels of each head that rotate, the first; None: head_dim
    # rope_theta of the sliding-window layers, which also turn unscaled (Gemma 3's local layers);
    # None: every layer turns as the full-attention ones do
    rope_local_theta: float | None = None
    attn_scale: float | None = None  # attention scores' multiplier; None: 1/sqrt(head_dim)
    logit_softcap: float | None = None  # logits become cap * tanh(logits / cap); None: no cap
    # attention scores (after the scale) become cap * tanh(score / cap) before the softmax
    # (Gemma 2); None: no cap
    attn_softcap: float | None = None
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before the rotation (Qwen3)
    # a query sees only itself and the sliding_window - 1 positions before it, on the layers
    # layer_types names "sliding_attention" (None: every layer); the rest see every position
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full_attention" or "sliding_attention"
    # a mixture of experts in every block's MLP place: None is one dense MLP
    n_experts: int | None = None
    n_experts_per_tok: int = 2  # experts each token runs through (the router's top k)
    # the top k router probabilities rescaled to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob)
    norm_topk_prob: bool = True
    # the routing weights rounded to the model's dtype before they scale the experts' outputs,
    # as transformers' Qwen3-MoE does; False keeps them float32 (Mixtral). Only bfloat16 and
    # float16 models see a difference, and a tie between experts can turn on it
    round_router_weights: bool = False
    # hidden units of one more expert that every token runs through, its output scaled by a
    # sigmoid gate of the token (Qwen2-MoE's shared expert); None: none
    shared_expert_size: int | None = None
    # training adds this times the router's load-balancing loss (Switch Transformer's, as
    # transformers computes it over all layers' routing); 0 turns it off
    router_aux_loss_coef: float = 0.01
    dropout: float = 0.0
    quantization: str | None = None  # weight-only "int8" or "int4" linear layers; None: float
    quant_group_size: int = 32  # int4: input weights sharing one scale and minimum
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (e.g. the HF model_type)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not supported; choose one of {FAMILIES}")
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            check_size(name, getattr(self, name))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        check_size("head_dim", self.head_dim)
        if self.family == "gpt2" and self.head_dim * self.n_head != self.n_embd:
            raise ValueError(
                f"head_dim={self.head_dim} with n_head={self.n_head} must give n_embd="
                f"{self.n_embd} in the gpt2 family; a head_dim of its own is for rotary models"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE turns pairs of values")
        rotary = (self.rotary_dim, self.rope_scaling, self.rope_local_theta)
        if self.positions != "rope" and (
            self.qk_norm or self.sliding_window is not None or any(x is not None for x in rotary)
        ):
            raise ValueError(
                "qk_norm, sliding_window, rotary_dim, rope_scaling and rope_local_theta are for "
                f"the rotary families, not {self.family!r}"
            )
        if self.rotary_dim is None and self.positions == "rope":
            self.rotary_dim = self.head_dim
        if self.rotary_dim is not None and (
            not isinstance(self.rotary_dim, int)
            or not 2 <= self.rotary_dim <= self.head_dim
            or self.rotary_dim % 2
        ):
            raise ValueError(
                f"rotary_dim={self.rotary_dim!r} must be an even number from 2 to "
                f"head_dim={self.head_dim}"
            )
        for name in ("attn_scale", "logit_softcap", "attn_softcap", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive number or None")
        self._check_windows()
        check_size("n_kv_head", self.n_kv_head)
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_kv_head={self.n_kv_head} must be a positive divisor of n_head={self.n_head}"
            )
        if self.intermediate_size is None:
            if self.family == "gpt2":
                self.intermediate_size = 4 * self.n_embd
            else:  # SwiGLU has three matrices: 2/3 of 4*n_embd keeps the parameter count
                self.intermediate_size = 64 * -(-(8 * self.n_embd // 3) // 64)
        check_size("intermediate_size", self.intermediate_size)
        self._check_experts()
        if self.bias is None:
            self.bias = self.family == "gpt2"
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.quantization is not None and self.quantization not in QUANT_METHODS:
            raise ValueError(
                f"quantization={self.quantization!r} is not supported; choose one of "
                f"{QUANT_METHODS} (or None for float weights)"
            )
        if self.quant_group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"quant_group_size={self.quant_group_size!r} is not supported; choose one of "
                f"{INT4_GROUP_SIZES}"
            )
        if self.rope_scaling is not None:
            self._check_rope_scaling()

    @property
    def rope_type(self) -> str:
        """The RoPE scaling in use: one of ``ROPE_TYPES``."""
        scaling = self.rope_scaling or {}
        return scaling.get("rope_type", scaling.get("type", "default"))

    def _check_rope_scaling(self) -> None:
        kind = self.rope_type
        if kind not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling type {kind!r} is not supported; supported: {ROPE_TYPES}"
            )
        needs = {
            "llama3": (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ),
            "linear": ("factor",),
            "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
        }.get(kind, ())
        missing = [k for k in needs if self.rope_scaling.get(k) is None]
        if missing:
            raise ValueError(
                f"rope_scaling type {kind!r} needs {missing}; it has {self.rope_scaling}"
            )
        if kind != "longrope":
            return
        scaling = self.rope_scaling = dict(self.rope_scaling)  # filled in below: not the caller's
        for key in ("short_factor", "long_factor"):
            if len(scaling[key]) != self.rotary_dim // 2:
                raise ValueError(
                    f"rope_scaling {key} has {len(scaling[key])} entries; it needs one per rotated "
                    f"pair, rotary_dim / 2 = {self.rotary_dim // 2}"
                )
        check_int(
            "original_max_position_embeddings", scaling["original_max_position_embeddings"], 1
        )
        if scaling.get("attention_factor") is None:
            scaling["attention_factor"] = longrope_attention_factor(
                scaling.get("factor"), scaling["original_max_position_embeddings"], self.block_size
            )

    def _check_experts(self) -> None:
        if self.n_experts is None:
            if self.shared_expert_size is not None:
                raise ValueError(
                    f"shared_expert_size={self.shared_expert_size} is an expert beside the "
                    "routed ones, but n_experts is None (a dense MLP)"
                )
            return
        check_size("n_experts", self.n_experts)
        if self.shared_expert_size is not None:
            check_size("shared_expert_size", self.shared_expert_size, "intermediate_size")
        rule = f"from 1 to n_experts={self.n_experts}"
        check_int("n_experts_per_tok", self.n_experts_per_tok, 1, rule)
        if self.n_experts_per_tok > self.n_experts:
            raise ValueError(
                f"n_experts_per_tok={self.n_experts_per_tok} is not allowed; it must be an "
                f"integer {rule}"
            )
        check_float("router_aux_loss_coef", self.router_aux_loss_coef, lambda x: x >= 0, ">= 0")

    def _check_windows(self) -> None:
        if self.sliding_window is not None:
            check_int("sliding_window", self.sliding_window, 1)
        if self.rope_local_theta is not None and self.sliding_window is None:
            raise ValueError(
                f"rope_local_theta={self.rope_local_theta} is the sliding-window layers' theta, "
                "but sliding_window is None"
            )
        if self.layer_types is None:
            return
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.n_layer:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries; it needs one per layer "
                f"(n_layer={self.n_layer})"
            )
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"layer_types {bad} are not supported; supported: {LAYER_TYPES}")
        if self.sliding_window is None and "sliding_attention" in self.layer_types:
            raise ValueError(
                "layer_types names sliding_attention layers, but sliding_window is None"
            )

    @property
    def layer_windows(self) -> list[int | None]:
        """Each layer's attention window: ``sliding_window``, or None where it sees everything."""
        if self.sliding_window is None:
            return [None] * self.n_layer
        types = self.layer_types or ["sliding_attention"] * self.n_layer
        return [self.sliding_window if t == "sliding_attention" else None for t in types]

    @property
    def positions(self) -> str:
        """``learned`` absolute position embeddings or ``rope`` rotary embeddings."""
        return "learned" if self.family == "gpt2" else "rope"

    @property
    def norm(self) -> str:
        """``layernorm``, ``rmsnorm``, or ``rmsnorm_plus_one`` (Gemma's gain of 1 + weight)."""
        return {"gpt2": "layernorm", "llama": "rmsnorm", "gemma": "rmsnorm_plus_one"}[self.family]

    @property
    def mlp(self) -> str:
        """``gelu`` (one hidden layer), ``swiglu`` or ``geglu`` (gated by SiLU or tanh GELU)."""
        return {"gpt2": "gelu", "llama": "swiglu", "gemma": "geglu"}[self.family]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named configuration (see ``PRESETS``), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    # ~1M parameters: for tests and quick experiments.
    "tiny": dict(vocab_size=2048, n_layer=4, n_head=4, n_embd=128, block_size=128),
    # The default: learns the built-in corpus in about five minutes on two CPU cores.
    "small": dict(vocab_size=4096, n_layer=4, n_head=4, n_embd=256, block_size=256),
    # A Llama-layout counterpart of tiny, with grouped-query attention.
    "llama-tiny": dict(
        family="llama",
        vocab_size=2048,
        n_layer=4,
        n_head=4,
        n_kv_head=2,
        n_embd=128,
        block_size=128,
    ),
    # A Llama-layout counterpart of small: rotary positions, for the windowed KV cache.
    "llama-small": dict(
        family="llama",
        vocab_size=4096,
        n_layer=4,
        n_head=4,
        n_kv_head=2,
        n_embd=256,
        block_size=256,
    ),
    # GPT-2 small (124M).
    "gpt2": dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024),
}

"""Model configuration: one dataclass for both transformer families arlm runs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from arlm.validate import check_int


def option(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, **cli: Any):
    """A dataclass field that is also a command-line option: ``help`` is its ``--help`` text,
    ``cli`` extras (``flag``, ``choices``, ``metavar``) shape the flag ``arlm.cli`` derives."""
    metadata = {"help": help, **cli}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


FAMILIES = ("gpt2", "llama")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Hugging Face's names
QUANT_METHODS = ("int8", "int4")  # weight-only; see arlm.model.quantize
INT4_GROUP_SIZES = (32, 64, 128, 256)

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


@dataclass
class ModelConfig:
    """Sizes and layout of a decoder-only transformer.

    ``family`` picks the layout: ``gpt2`` (learned positions, LayerNorm, GELU MLP, biases) or
    ``llama`` (rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases). The
    llama family also covers Mistral, Qwen2 and Qwen3: a ``head_dim`` of its own, RMSNorm on each
    head's queries and keys (``qk_norm``), and sliding-window attention on some or all layers.
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
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", ...} as in HF configs
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before the rotation (Qwen3)
    # a query sees only itself and the sliding_window - 1 positions before it, on the layers
    # layer_types names "sliding_attention" (None: every layer); the rest see every position
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # per layer "full_attention" or "sliding_attention"
    dropout: float = 0.0
    quantization: str | None = None  # weight-only "int8" or "int4" linear layers; None: float
    quant_group_size: int = 32  # int4: input weights sharing one scale and minimum
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (e.g. the HF model_type)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r} is not supported; choose one of {FAMILIES}")
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            check_int(name, getattr(self, name), 1)
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
            self.head_dim = self.n_embd // self.n_head
        check_int("head_dim", self.head_dim, 1)
        if self.family == "gpt2" and self.head_dim * self.n_head != self.n_embd:
            raise ValueError(
                f"head_dim={self.head_dim} with n_head={self.n_head} must give n_embd="
                f"{self.n_embd} in the gpt2 family; a head_dim of its own is for rotary models"
            )
        if self.positions == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even: RoPE turns pairs of values")
        if (self.qk_norm or self.sliding_window is not None) and self.family != "llama":
            raise ValueError(
                f"qk_norm and sliding_window are for the llama family, not {self.family!r}"
            )
        self._check_windows()
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_kv_head={self.n_kv_head} must be a positive divisor of n_head={self.n_head}"
            )
        if self.intermediate_size is None:
            if self.family == "gpt2":
                self.intermediate_size = 4 * self.n_embd
            else:  # SwiGLU has three matrices: 2/3 of 4*n_embd keeps the parameter count
                self.intermediate_size = 64 * -(-(8 * self.n_embd // 3) // 64)
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
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("llama3", "default"):
                raise ValueError(
                    f"rope_scaling type {kind!r} is not supported; supported: 'llama3', 'default'"
                )

    def _check_windows(self) -> None:
        if self.sliding_window is not None:
            check_int("sliding_window", self.sliding_window, 1)
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
        return "layernorm" if self.family == "gpt2" else "rmsnorm"

    @property
    def mlp(self) -> str:
        return "gelu" if self.family == "gpt2" else "swiglu"

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

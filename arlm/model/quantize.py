"""Weight-only quantization of a model's linear layers, as stored in a checkpoint.

``int8``: one signed byte per weight and a float32 scale per output channel (row),
w ~= q * scale with q in [-127, 127].
``int4``: two weights per byte and, per group of ``group_size`` weights along the input, a
scale and a minimum, w ~= q * scale + min with q in [0, 15] (GGUF's q4_1 idea).

Activations stay in the model's dtype. Every linear layer in the blocks and the output
projection is quantized; a mixture of experts' routers and gate, embeddings and norms are not (the
embedding reads one row per token, so its size costs memory, not decode time). A tied output
projection gets its own quantized copy. These modules compute by dequantizing the weight, which
works on every device; ``arlm.model.packing`` swaps in the fast CPU kernels. The arithmetic is
``arlm.quant``'s.

Gradients flow through them to their inputs, so LoRA adapters train over a quantized frozen
model (QLoRA, ``arlm train --lora-rank R --quantize int4``): the backward pass dequantizes the
weight again rather than keeping the forward's float copy, so the frozen model stays quantized
in memory through a training step, a layer's float weight alive only while it computes.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from arlm import quant
from arlm.config import INT4_GROUP_SIZES, QUANT_METHODS


class _DequantizedProduct(torch.autograd.Function):
    """``x @ W^T`` for a quantized layer's frozen ``W``, dequantized in the forward and again
    in the backward: autograd keeps no float copy of ``W`` between them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: _QuantizedLinear) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, x.dtype
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return (grad @ ctx.layer.dequantize(grad.dtype)).to(ctx.dtype), None


class _QuantizedLinear(nn.Module):
    """What the quantized layers share: a forward through their dequantized weight, and scales
    that keep their dtype."""

    _kept_dtype = ("weight_scale", "weight_min")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not (torch.is_grad_enabled() and x.requires_grad):
            return F.linear(x, self.dequantize(x.dtype), bias)
        out = _DequantizedProduct.apply(x, self)
        return out if bias is None else out + bias

    def _apply(self, fn, recurse=True):
        # casting the model to bfloat16 moves the scales to its device but keeps them as they
        # were quantized: rounding them would change every weight of the layer
        kept = {n: getattr(self, n) for n in self._kept_dtype if hasattr(self, n)}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            setattr(self, name, old.to(getattr(self, name).device))
        return self


class Int8Linear(_QuantizedLinear):
    """A linear layer with int8 weights and a scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach().float()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        codes, scale = quant.quantize_int8(w, torch.float32, 1e-12)
        module.weight, module.weight_scale = codes, scale[:, 0]
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), linear.bias.requires_grad)
        return module.to(linear.weight.device)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.weight_scale[:, None]).to(dtype)


class Int4Linear(_QuantizedLinear):
    """A linear layer with 4-bit weights, a scale and a minimum per group of inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(
                f"int4 groups of {group_size} do not divide the {in_features} inputs of a linear "
                f"layer; choose a group size in {INT4_GROUP_SIZES} that divides it"
            )
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        # two weights per byte: input 2j in the low nibble, input 2j+1 in the high one
        self.register_buffer(
            "weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
        )
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.bfloat16))
        self.register_buffer("weight_min", torch.zeros(out_features, groups, dtype=torch.bfloat16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
        n, k = linear.weight.shape
        w = linear.weight.detach().float().reshape(n, k // group_size, group_size)
        packed, scale, low = quant.quantize_int4(w, torch.bfloat16, 1e-8)
        module.weight = packed.reshape(n, k // 2)
        module.weight_scale, module.weight_min = scale[..., 0], low[..., 0]
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), linear.bias.requires_grad)
        return module.to(linear.weight.device)

    def codes(self) -> torch.Tensor:
        """The 4-bit codes (out_features, in_features) as uint8 in [0, 15]."""
        return quant.unpack_int4(self.weight)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        q = self.codes().float().reshape(n, k // g, g)
        w = q * self.weight_scale.float()[..., None] + self.weight_min.float()[..., None]
        return w.reshape(n, k).to(dtype)


def quantized_linear(
    in_features: int, out_features: int, bias: bool, method: str, group_size: int
) -> nn.Module:
    """An empty quantized linear layer of ``method``, for a checkpoint's tensors to fill."""
    if method == "int8":
        return Int8Linear(in_features, out_features, bias)
    return Int4Linear(in_features, out_features, bias, group_size)


def quantize(model: nn.Module, method: str, group_size: int = 32, head: bool = True) -> nn.Module:
    """Quantize ``model`` (a ``Transformer`` with float weights) in place and return it; its
    config records the method, so ``save_model`` writes a checkpoint that loads quantized.
    ``head`` False keeps the output projection float (QLoRA training: the chunked loss reads
    its weight; such a model is not saved whole)."""
    if method not in QUANT_METHODS:
        raise ValueError(f"quantization {method!r} is not supported; choose one of {QUANT_METHODS}")
    if model.config.quantization is not None:
        raise ValueError(f"the model is already quantized ({model.config.quantization})")
    config = replace(model.config, quantization=method, quant_group_size=group_size)
    swaps = {}  # built before any is made, so a layer that cannot be quantized changes nothing
    for name, module in model.named_modules():
        # every linear layer of the blocks and the head, but a mixture of experts' routers and
        # shared expert's gate, and served LoRA adapters' slots (arlm.model.multi_lora)
        gate = name.endswith((".router", ".shared_gate", ".lora_a", ".lora_b"))
        layer = name.startswith("h.") and not gate or (head and name == "lm_head")
        if isinstance(module, nn.Linear) and layer:
            if method == "int8":
                swaps[name] = Int8Linear.from_linear(module)
            else:
                swaps[name] = Int4Linear.from_linear(module, group_size)
    if not swaps:
        raise ValueError(
            "the model has no float nn.Linear layers to quantize (a model from arlm.load has "
            "packed ones); pass quantize= to arlm.load, or quantize the model load_model returns"
        )
    for name, new in swaps.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    model.config = config
    return model


def require_float(config, purpose: str) -> None:
    """Refuse ``purpose`` for a model whose weights are quantized (it needs the float ones)."""
    if config.quantization is not None:
        raise ValueError(
            f"{purpose} needs float weights and this model is quantized "
            f"({config.quantization}); use the checkpoint it was quantized from"
        )

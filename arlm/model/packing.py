"""CPU kernels for inference: each linear layer's weight laid out once, at load, for the fastest
matmul this machine offers.

Decoding one token reads every weight once, so a decode step is as fast as its matrix-vector
products stream weights from memory. PyTorch's default float kernel runs a batch-1 product on one
thread, at about 17 GB/s on the 2 cores here. The kernels below were picked by measuring them there
(benchmarks/decode.py -v prints the comparison for the output projection):

- float32 / bfloat16: oneDNN with the weight reordered once, 2.5-3x ``F.linear``'s speed;
- int8: fbgemm's dynamically quantized linear (it quantizes the activations on each call),
  12x faster than ``aten._weight_int8pack_mm``;
- int4: the group-wise int4 kernel, with bfloat16 activations (float32 ones run 40x slower).

Packed layers compute the same function as the layers they replace and write the same
``state_dict``, but they are for inference only (no gradients). ``pack`` skips a layer whose
kernel this build or processor lacks, and everything off the CPU.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from arlm.model.quantize import Int4Linear, Int8Linear


def _onednn_supports(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return dtype == torch.float32


class PackedLinear(nn.Module):
    """A float linear layer with its weight reordered for oneDNN."""

    def __init__(self, linear: nn.Linear, *, shared: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A batch-size hint of 1 keeps the plain layout, for which oneDNN picks an AVX2 kernel;
        # any larger hint blocks the weight for its AVX-512 kernel: GPT-2's 49 linear layers at
        # batch 1 took 8.9 ms against 13.3 ms, and larger batches gain more
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 64)
        self.bias = linear.bias
        if shared:  # the embedding's matrix too: keeping a reference to it costs nothing
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def unpack(self) -> nn.Linear:
        """The float layer this was packed from (a copy of its weight in the plain layout)."""
        weight = self.packed.to_dense()
        bias = self.bias is not None
        linear = nn.utils.skip_init(  # no initial draw: every weight is copied in
            nn.Linear, self.in_features, self.out_features, bias=bias, dtype=weight.dtype
        ).requires_grad_(False)
        linear.weight.copy_(weight)
        if bias:
            linear.bias.copy_(self.bias)
        return linear

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not hasattr(self, "weight"):
            destination[prefix + "weight"] = self.packed.to_dense()
        super()._save_to_state_dict(destination, prefix, keep_vars)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


# Without VNNI, x86 sums pairs of uint8 x int8 products in saturating int16, so activations get
# 7 bits (PyTorch's default for dynamic quantization); with VNNI the sums are int32 and the full
# 8 bits halve the rounding error
_REDUCE_RANGE = not {"avx512_vnni", "avx_vnni"} & _cpu_flags()


class PackedInt8Linear(nn.Module):
    """An ``Int8Linear`` on fbgemm: int8 weights times activations quantized per call."""

    def __init__(self, linear: Int8Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        zero_points = torch.zeros(linear.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated, not their kernels
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(
                linear.weight, linear.weight_scale.double(), zero_points, 0
            )
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.bias = linear.bias  # the kernel holds a float32 copy; this one is what is saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.float(), self.packed, _REDUCE_RANGE)
        return y.to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias, as Int8Linear
        qweight, _ = torch.ops.quantized.linear_unpack(self.packed)
        destination[prefix + "weight"] = qweight.int_repr()
        destination[prefix + "weight_scale"] = qweight.q_per_channel_scales().float()


class PackedInt4Linear(nn.Module):
    """An ``Int4Linear`` on the group-wise int4 kernel; it keeps the stored tensors too (half a
    byte per weight) for ``state_dict``."""

    def __init__(self, linear: Int4Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size = linear.group_size
        self.register_buffer("weight", linear.weight)
        self.register_buffer("weight_scale", linear.weight_scale)
        self.register_buffer("weight_min", linear.weight_min)
        self.bias = linear.bias
        # the kernel wants whole tiles of 16 output rows; padded rows are sliced off the result
        n_pad = -linear.out_features % 16
        codes = nn.functional.pad(linear.codes().to(torch.int32), (0, 0, 0, n_pad))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
        # the kernel computes (q - 8) * scale + zero; arlm stores q * scale + min
        scale = linear.weight_scale.float()
        zero = linear.weight_min.float() + 8 * scale
        sz = torch.stack((scale, zero), dim=-1)  # (out, groups, 2)
        sz = nn.functional.pad(sz, (0, 0, 0, 0, 0, n_pad), value=0.0)
        self.scales_and_zeros = sz.transpose(0, 1).contiguous().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16),
            self.packed,
            self.group_size,
            self.scales_and_zeros,
        )
        y = y[:, : self.out_features].to(x.dtype).reshape(*lead, self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def _int8_kernel_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def pack(model: nn.Module) -> nn.Module:
    """Swap every linear layer of ``model`` (an arlm ``Transformer``) for its CPU kernel, in
    place; returns the model. Layers off the CPU, or without a kernel here, stay as they are."""
    tied = getattr(model, "lm_head", None) is not None and (
        getattr(model.lm_head, "weight", None) is model.wte.weight
    )
    swaps = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight = module.weight
            if weight.device.type == "cpu" and _onednn_supports(weight.dtype):
                swaps[name] = PackedLinear(module, shared=tied and name == "lm_head")
        elif isinstance(module, Int8Linear):
            if module.weight.device.type == "cpu" and _int8_kernel_available():
                swaps[name] = PackedInt8Linear(module)
        elif isinstance(module, Int4Linear) and module.weight.device.type == "cpu":
            swaps[name] = PackedInt4Linear(module)
    for name, new in swaps.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of linear-layer weights, scales included, that one decode step of one sequence
    reads, whichever layout holds them (an embedding lookup reads one row per token and is not
    counted; of a mixture of experts, the router and the experts a token runs through)."""
    config = getattr(model, "config", None)
    n_experts = getattr(config, "n_experts", None)
    total = 0.0
    for name, module in model.named_modules():
        share = n_experts and ".experts." in name and config.n_experts_per_tok / n_experts
        total += _linear_bytes(module) * (share or 1)
    return round(total)


def _linear_bytes(module: nn.Module) -> int:
    """A linear layer's weight bytes, scales included (0 for any other module)."""
    if isinstance(module, nn.Linear):
        return module.weight.numel() * module.weight.element_size()
    if isinstance(module, PackedLinear):
        return module.packed.numel() * module.packed.element_size()
    if isinstance(module, Int8Linear | PackedInt8Linear):
        return module.in_features * module.out_features + 4 * module.out_features
    if isinstance(module, Int4Linear | PackedInt4Linear):
        return module.weight.numel() + 2 * 2 * module.weight_scale.numel()
    return 0

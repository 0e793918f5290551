"""Low-rank adapters (LoRA): a frozen linear layer plus a trained update ``scaling * B @ A``
of rank ``r``, as PEFT computes it.

arlm fuses projections that Hugging Face keeps apart (q, k and v in ``attn.c_attn``; gate and
up in ``mlp.c_fc``), while an adapter has one ``A`` and one ``B`` per Hugging Face projection.
A ``LoRALinear`` therefore adapts slices of its output rows, each with its own pair, and
leaves the others as they are: the same numbers as PEFT on the unfused model, with the base
matmul still done once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from arlm.validate import check_float, check_int

# (rows, adapted) along a linear's output, in order: the projections fused into it
Slices = tuple[tuple[int, bool], ...]


@dataclass(frozen=True)
class LoRAConfig:
    """The hyperparameters of an adapter, under PEFT's names: ``rank`` is ``r``, ``alpha``
    ``lora_alpha``, ``dropout`` ``lora_dropout`` (on the adapter's input, in training)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        check_float("alpha", self.alpha, lambda a: a > 0, "> 0")
        check_float("dropout", self.dropout, lambda p: 0 <= p < 1, "in [0, 1)")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora={self.use_rslora!r} is not allowed; it must be a bool")

    @property
    def scaling(self) -> float:
        """What ``B @ A`` is multiplied by: ``alpha / rank``, or with rank-stabilised LoRA
        ``alpha / sqrt(rank)`` (which keeps the update's size from shrinking as the rank grows)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus low-rank updates on slices of its output rows.

    ``lora_A`` holds one (rank, in_features) matrix per adapted slice, drawn as PEFT draws it;
    ``lora_B`` one (rows, rank) matrix per adapted slice, zero at first, so that a new adapter
    leaves the model's output unchanged. Both stay float32 whatever the base's dtype: updates
    of a few units of bfloat16's precision would round away."""

    def __init__(self, base: nn.Linear, config: LoRAConfig, slices: Slices) -> None:
        super().__init__()
        rows = [r for r, _ in slices]
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in rows):
            raise ValueError(f"slices {slices} must each have an integer number of rows >= 1")
        if sum(rows) != base.out_features:
            raise ValueError(
                f"slices {slices} cover {sum(rows)} output rows; the linear layer has "
                f"{base.out_features}, and the slices must cover them all"
            )
        if not any(adapted for _, adapted in slices):
            raise ValueError(f"slices {slices} adapt nothing; at least one must be adapted")
        base.requires_grad_(False)
        self.base = base
        self.config = config
        self.slices = tuple((r, bool(adapted)) for r, adapted in slices)
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.enabled = True  # off: the base layer alone (``adapters_disabled``)
        device, rank = base.weight.device, config.rank
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for r, adapted in self.slices:
            if adapted:
                a = torch.empty(rank, base.in_features, device=device)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's own init, as PEFT's
                self.lora_A.append(a)
                self.lora_B.append(torch.zeros(r, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        # every adapted slice's A in one pass over the input: (..., adapted slices * rank)
        low = F.linear(self.dropout(x).to(self.lora_A[0].dtype), self._stacked_a())
        flat_out, flat_low = out.reshape(-1, out.size(-1)), low.reshape(-1, low.size(-1))
        if flat_out.dtype != flat_low.dtype:  # a half-precision base: summed in float32
            flat_out = flat_out.float()
        # base output + scaling * low @ B (block-diagonal over the slices) in one fused product:
        # no separate update tensor to scale and add
        y = torch.addmm(flat_out, flat_low, self._block_b().t(), alpha=self.config.scaling)
        return y.to(out.dtype).view(out.shape)  # rounded once to the base's dtype, as PEFT does

    def _stacked_a(self) -> torch.Tensor:
        """The adapted slices' A, one above the other: (adapted slices * rank, in_features)."""
        return self.lora_A[0] if len(self.lora_A) == 1 else torch.cat(tuple(self.lora_A))

    def _block_b(self) -> torch.Tensor:
        """(out_features, adapted slices * rank): each adapted slice's B in its own rows and its
        own A's columns, zeros elsewhere, so one product applies every slice's update (its
        zeros cost a few multiply-adds a row beside the base's in_features)."""
        rank, columns = self.config.rank, self.config.rank * len(self.lora_B)
        if len(self.slices) == 1:  # the whole output, one pair
            return self.lora_B[0]
        blocks, i = [], 0
        for rows, adapted in self.slices:
            if adapted:
                blocks.append(F.pad(self.lora_B[i], (i * rank, columns - (i + 1) * rank)))
                i += 1
            else:
                blocks.append(self.lora_B[0].new_zeros(rows, columns))
        return torch.cat(blocks)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The base weight plus ``scaling * B @ A`` on each adapted slice: one matrix that
        computes what this module does, for inference without the adapter's cost. Summed in
        float32 and rounded once to the base's dtype."""
        weight = self.base.weight
        delta = self._block_b() @ self._stacked_a()
        return (weight.float() + delta * self.config.scaling).to(weight.dtype)


def add_lora(model: nn.Module, config: LoRAConfig, targets: dict[str, Slices]) -> None:
    """Freeze every parameter of ``model``, then wrap each linear layer named in ``targets``
    (module path -> its slices) in a ``LoRALinear``: after this only the adapters train.

    The adapters' ``A`` are drawn from torch's global generator, in ``targets``' order, so a
    seeded run draws the same adapter."""
    if not targets:
        raise ValueError("targets is empty; name at least one linear module to adapt")
    for path in targets:  # every name checked before the model is changed
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"the model has no module {path!r} to adapt") from None
        if not isinstance(module, nn.Linear):
            hint = " (it already has LoRA)" if isinstance(module, LoRALinear) else ""
            raise ValueError(
                f"{path} is a {type(module).__name__}{hint}; LoRA wraps float nn.Linear layers "
                "(a quantized model takes adapters once loaded unquantized)"
            )
    model.requires_grad_(False)
    for path, slices in targets.items():
        parent, _, name = path.rpartition(".")
        wrapped = LoRALinear(model.get_submodule(path), config, slices)
        setattr(model.get_submodule(parent), name, wrapped)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Module path -> each ``LoRALinear`` in ``model``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Inside, ``model`` computes what its frozen base does, its adapters skipped: the
    reference model of preference training, with no second copy of the weights."""
    wrappers = lora_modules(model).values()
    for wrapper in wrappers:
        wrapper.enabled = False
    try:
        yield
    finally:
        for wrapper in wrappers:
            wrapper.enabled = True


def merge_lora(model: nn.Module) -> None:
    """Put each ``LoRALinear``'s base linear back in its place, holding the merged weight: the
    model computes what it did with the adapters, at the cost it had without them. Parameters
    stay frozen (``add_lora`` froze them); this is for inference and export."""
    wrappers = lora_modules(model)
    if any(not isinstance(w.base, nn.Linear) for w in wrappers.values()):
        raise ValueError(
            "the adapters sit on quantized layers (QLoRA), which hold no float weights to merge "
            "them into; load the adapter with its float base (arlm.load on the run folder)"
        )
    for path, wrapper in wrappers.items():
        base = wrapper.base
        with torch.no_grad():
            base.weight.copy_(wrapper.merged_weight())
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, base)

"""Many LoRA adapters served at once over one base model, each row of a batch with its own.

Merging an adapter (``arlm.model.lora.merge_lora``) costs nothing per token but gives a model
per adapter. Serving several fine-tunes of one base, the base's weights are held once and each
adapted linear layer keeps every loaded adapter's ``A`` and ``B`` beside it, in slots. A step's
rows each name a slot (or none: the base alone), and the layer adds each row's own update.

The update is computed for every slot at once and masked per row: ``x @ A_all^T`` over all
slots' stacked ``A`` (a few hundred columns beside the base's thousands), each row's columns
of slots other than its own multiplied by zero, then one product with all slots' ``B``. Two
dense products with no branch on which rows use which adapter, so the step is the same
sequence of kernels whatever the mix, as a CUDA graph replays it; its cost grows with the
number of slots (about ``2 * slots * projections * rank / in_features`` of the base's), which
is why they are few (vLLM's ``max_loras``). Each slot's block is ``slices * rank`` wide (the
widest adapter's rank, smaller ranks zero-padded); an adapter's scaling is folded into its
``B``, so slots of different ranks and alphas mix. A slot can be filled and freed while the
model serves (``MultiLoRALinear.load``): ``arlm.model.adapter_store`` keeps more adapters than
slots in host memory and writes each into a slot when a request needs it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from arlm.model.lora import Slices
from arlm.model.packing import PackedLinear
from arlm.validate import check_int

# one adapted layer's (A (rank, in), B (rows, rank)) per slice of its output, None where the
# adapter leaves that projection alone
SlicePairs = list[tuple[torch.Tensor, torch.Tensor] | None]


class AdapterRows:
    """The adapter slots of one model's ``MultiLoRALinear`` layers, and which slot each token
    of the next forward uses: set by whoever runs the model (the engine's runner) before each
    forward.

    ``names[i]`` is the adapter in slot i, None while the slot is free; the adapters' owner
    (``arlm.model.adapter_store.AdapterStore``) writes them and the slots' weights. ``mask`` is
    (tokens, slots), one where a token uses that slot, or None when no token of the forward
    uses any (the base alone, at no cost); only ``using`` sets it."""

    def __init__(self, slots: int, dtype: torch.dtype, device: torch.device) -> None:
        check_int("slots", slots, 1)
        self.names: list[str | None] = [None] * slots
        self.dtype, self.device = dtype, device
        self._slots = torch.arange(slots, device=device)
        self.mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.names)

    @contextmanager
    def using(self, slots: torch.Tensor | None) -> Iterator[None]:
        """Inside, the model's tokens use ``slots`` ((tokens,) ints on the model's device, -1
        for the base alone), or none (None); after, none, so that a forward outside the
        engine's (a draft's, a contrastive search's) sees the base. Captured in a CUDA graph,
        the mask is computed from the static tensor ``slots`` at every replay."""
        self.mask = None if slots is None else (slots[:, None] == self._slots).to(self.dtype)
        try:
            yield
        finally:
            self.mask = None


class MultiLoRALinear(nn.Module):
    """A linear layer (float, quantized or packed: anything with ``in_features`` and
    ``out_features``) plus the updates of every slot of ``rows``, each row of the input its
    own. ``slices`` are the output rows of the projections fused into the layer, as in
    ``LoRALinear``; slot blocks are ``len(slices) * rank`` wide."""

    def __init__(self, base: nn.Module, slices: Slices, rank: int, rows: AdapterRows) -> None:
        super().__init__()
        self.base, self.rows = base, rows
        self.slices = tuple(r for r, _ in slices)
        if sum(self.slices) != base.out_features:
            raise ValueError(f"slices {slices} do not cover the {base.out_features} output rows")
        self.rank = rank
        width = len(rows) * len(self.slices) * rank
        kw = dict(bias=False, dtype=rows.dtype, device=rows.device)
        # linear layers of their own, so that ``arlm.model.packing.pack`` gives them the CPU
        # kernel it gives the base (on a CPU, interleaving oneDNN's products with ATen's costs
        # each a thread-pool hand-over: a 2048 x 3072 layer's base product measured 1.6 ms
        # beside unpacked adapter products, 0.5 ms alone); quantization leaves them float
        self.lora_a = nn.Linear(base.in_features, width, **kw).requires_grad_(False)
        self.lora_b = nn.Linear(width, base.out_features, **kw).requires_grad_(False)
        nn.init.zeros_(self.lora_a.weight)
        nn.init.zeros_(self.lora_b.weight)

    @torch.no_grad()
    def load(self, slot: int, pairs: SlicePairs, scaling: float) -> None:
        """Put an adapter in ``slot``: ``pairs`` holds each slice's (A (rank, in), B (rows,
        rank)), or None where the adapter leaves that projection alone (zeros there); its
        ``scaling`` is folded into ``B``. Slots packed for the CPU's kernel are written
        unpacked and packed again."""
        if len(pairs) != len(self.slices):
            raise ValueError(f"{len(pairs)} slices given; this layer has {len(self.slices)}")
        packed = isinstance(self.lora_a, PackedLinear)
        lora_a = self.lora_a.unpack() if packed else self.lora_a
        lora_b = self.lora_b.unpack() if packed else self.lora_b
        block = len(self.slices) * self.rank
        a = lora_a.weight[slot * block : (slot + 1) * block].zero_()
        b = lora_b.weight[:, slot * block : (slot + 1) * block].zero_()
        row = 0
        for i, (rows, pair) in enumerate(zip(self.slices, pairs, strict=True)):
            if pair is not None:
                pair_a, pair_b = pair
                if pair_a.size(0) > self.rank:
                    raise ValueError(f"rank {pair_a.size(0)} exceeds the slots' {self.rank}")
                cols = slice(i * self.rank, i * self.rank + pair_a.size(0))
                a[cols] = pair_a
                b[row : row + rows, cols] = pair_b.float() * scaling
            row += rows
        if packed:
            self.lora_a, self.lora_b = PackedLinear(lora_a), PackedLinear(lora_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        mask = self.rows.mask
        if mask is None:
            return out
        low = self.lora_a(x)  # (..., slots * block): every slot's A at once
        masked = low.view(mask.size(0), mask.size(1), -1) * mask[:, :, None]
        return out + self.lora_b(masked.view(low.shape))


def add_adapter_slots(
    model: nn.Module, targets: dict[str, Slices], rank: int, rows: AdapterRows
) -> dict[str, MultiLoRALinear]:
    """Wrap each linear layer of ``model`` named in ``targets`` in a ``MultiLoRALinear`` with
    ``len(rows)`` empty slots of ``rank``; the wrappers by module path."""
    wrapped = {}
    for path, slices in targets.items():
        parent, _, name = path.rpartition(".")
        module = MultiLoRALinear(model.get_submodule(path), slices, rank, rows)
        setattr(model.get_submodule(parent), name, module)
        wrapped[path] = module
    return wrapped

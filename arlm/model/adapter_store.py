"""The LoRA adapters one model serves: every adapter held in host memory, the few that running
sequences use written into the model's slots (``arlm.model.multi_lora``) when one needs them.

A step's cost grows with the slots, not with the adapters served, so slots are few (vLLM's
``max_loras``) while the adapters a server answers to may be many (its ``max_cpu_loras``).
The engine's scheduler admits a sequence only once its adapter is in a slot
(``AdapterStore.place``): one already there, else a free slot, else the least recently used
slot that no running sequence holds, overwritten. A sequence whose adapter finds no such slot
waits while others go ahead. Writing a slot copies one adapter's matrices into place, so the
step's kernels and a CUDA graph's addresses stay as they are.

The prefix cache keys an adapter's blocks by the adapter (``AdapterStore.key``), not by its
slot: blocks computed under an adapter stay hits for it after it left a slot and came back, and
are never hits for the next adapter in that slot or for one loaded later under the same name.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch.nn as nn

from arlm.model.lora import LoRAConfig
from arlm.model.multi_lora import AdapterRows, MultiLoRALinear, SlicePairs


@dataclass(frozen=True)
class ServedAdapter:
    """A LoRA adapter read and checked for serving (``arlm.formats.read.read_lora_module``):
    its settings and each adapted layer's (A, B) per slice, on the host."""

    lora: LoRAConfig
    tensors: dict[str, SlicePairs]


class AdapterStore:
    """The LoRA adapters ``model`` serves by name, at most ``max_adapters`` of them, each in
    host memory, and which of them ``rows``' slots hold. Whoever changes it keeps forwards from
    running meanwhile (the engine's loop thread, between steps)."""

    def __init__(self, model: nn.Module, rows: AdapterRows, max_adapters: int) -> None:
        self.rows, self.max_adapters = rows, max_adapters
        self.layers = {p: m for p, m in model.named_modules() if isinstance(m, MultiLoRALinear)}
        self._adapters: dict[str, ServedAdapter] = {}
        self._keys: dict[str, bytes] = {}
        self._added = 0  # adapters ever added, so that each one's key is its own
        self._last_use = [0] * len(rows)  # per slot, for least-recently-used replacement
        self._clock = 0
        self.slot_writes = 0  # adapters written into slots, the first time or after another

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters served, in the order they were added."""
        return tuple(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    @staticmethod
    def check_name(name: str) -> None:
        """Refuse a name no request's model field could give."""
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(
                f"LoRA adapter name {name!r} is not allowed; a name is a non-empty text without "
                "leading or trailing spaces (what a request's model field gives)"
            )

    def check_known(self, name: str) -> None:
        """A ValueError naming the adapters served, where none is called ``name``."""
        if name not in self._adapters:
            served = ", ".join(self._adapters) or "none"
            raise ValueError(f"no LoRA adapter named {name!r} is loaded; loaded: {served}")

    def add(self, name: str, adapter: ServedAdapter) -> None:
        """Serve ``adapter`` as ``name`` (into a slot once a sequence needs it). Refused,
        changing nothing, for a name in use, a full store, or what the slots cannot hold."""
        self.check_name(name)
        if name in self._adapters:
            raise ValueError(f"a LoRA adapter named {name!r} is loaded already")
        if len(self._adapters) >= self.max_adapters:
            raise ValueError(
                f"all {self.max_adapters} LoRA adapters this model holds are loaded "
                f"({', '.join(self._adapters)}); unload one first, or start with a larger "
                "max_cpu_loras"
            )
        outside = sorted(set(adapter.tensors) - set(self.layers))
        if outside:
            raise ValueError(
                f"LoRA adapter {name!r} adapts {outside[0]}, which has no slots here: slots were "
                "made for the layers of the adapters loaded at start; start with room for more "
                "adapters than given (max_loras or max_cpu_loras) to give every layer slots"
            )
        rank = next(iter(self.layers.values())).rank
        if adapter.lora.rank > rank:
            raise ValueError(
                f"LoRA adapter {name!r} has rank {adapter.lora.rank}, above the slots' {rank}; "
                "start with a larger max_lora_rank"
            )
        self._added += 1
        self._adapters[name] = adapter
        self._keys[name] = f"lora {name}#{self._added}".encode()

    def remove(self, name: str) -> None:
        """Stop serving ``name``, freeing its slot if it has one (the caller makes sure no
        sequence runs on it)."""
        self.check_known(name)
        del self._adapters[name], self._keys[name]
        if name in self.rows.names:  # its weights stay there until another adapter's are written
            self.rows.names[self.rows.names.index(name)] = None

    def key(self, name: str) -> bytes:
        """What the prefix cache mixes into the hashes of blocks computed with ``name``."""
        return self._keys[name]

    def place(self, name: str, pinned: Collection[int]) -> int | None:
        """The slot holding ``name``, written there now if it is in none: a free slot first,
        else the least recently used one outside ``pinned`` (the slots running sequences hold);
        None when every slot is pinned to another adapter."""
        self.check_known(name)
        names = self.rows.names
        if name in names:
            slot = names.index(name)
        else:
            free = [i for i, held in enumerate(names) if held is None]
            idle = free or [i for i in range(len(names)) if i not in pinned]
            if not idle:
                return None
            slot = min(idle, key=self._last_use.__getitem__)
            self._write(slot, name)
        self._clock += 1
        self._last_use[slot] = self._clock
        return slot

    def _write(self, slot: int, name: str) -> None:
        """Put ``name``'s matrices in ``slot``: zeros in the layers it leaves alone, as the
        slot may have held another adapter there."""
        adapter = self._adapters[name]
        for path, layer in self.layers.items():
            pairs = adapter.tensors.get(path, [None] * len(layer.slices))
            layer.load(slot, pairs, adapter.lora.scaling)
        self.rows.names[slot] = name
        self.slot_writes += 1

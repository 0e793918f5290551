"""The host-memory tier of the paged KV cache: blocks the device pool evicts or swaps out.

A second pool of blocks shaped like the device pool's (one plane per codec plane per layer, k
then v), in host memory: pinned on CUDA, so copies either way are DMA transfers queued on the
stream rather than waits for the GPU. On a CPU it is simply a second region of memory, which is
how its logic is tested where there is no GPU. Which block is where belongs to the engine's
block manager (``arlm.engine.block_manager.HostTier``); this pool only stores.
"""

from __future__ import annotations

import torch

from arlm.kv_cache.paged import PagedKVCache


class HostKVPool:
    """``num_blocks`` host blocks for ``cache``'s contents."""

    def __init__(self, cache: PagedKVCache, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be positive")
        pin = cache.device.type == "cuda"
        self.num_blocks = num_blocks
        self.planes = [
            torch.zeros(
                num_blocks,
                cache.n_kv_head,
                cache.block_size,
                p.width,
                dtype=p.dtype,
                pin_memory=pin,
            )
            for _ in range(2 * cache.n_layer)
            for p in cache.codec.planes(cache.head_dim)
        ]

    def read(self, ids: list[int]) -> list[torch.Tensor]:
        index = torch.tensor(ids, dtype=torch.long)
        return [plane.index_select(0, index) for plane in self.planes]

    def write(self, ids: list[int], data: list[torch.Tensor]) -> None:
        index = torch.tensor(ids, dtype=torch.long)
        for plane, part in zip(self.planes, data, strict=True):
            plane.index_copy_(0, index, part.to("cpu"))

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.planes)

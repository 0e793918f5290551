"""Key/value caches: what makes each decode step cost one token's work.

Attention talks to a cache through two calls and never knows which kind it holds:

- ``attn_mask(start_pos, T)``: once per forward, the mask for T queries at positions
  ``start_pos .. start_pos+T-1`` over the keys ``update`` will return, or ``None`` when
  plain causal alignment is right (one query seeing every key, or a prefill from position 0).
- ``update(layer, start_pos, k, v)``: store the new keys and values of one layer and return
  all keys and values the queries may attend to.
"""

from __future__ import annotations

import torch

from arlm.config import ModelConfig


class KVCache:
    """Contiguous per-layer buffers of shape (batch, n_kv_head, max_len, head_dim)."""

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0  # positions written so far (the same for every row)

    @classmethod
    def for_model(
        cls,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        return cls(
            config.n_layer,
            batch_size,
            config.n_kv_head,
            config.head_dim,
            max_len,
            device=device,
            dtype=dtype,
        )

    def attn_mask(self, start_pos: int, T: int) -> torch.Tensor | None:
        if start_pos + T > self.max_len:
            raise ValueError(
                f"the KV cache holds {self.max_len} positions; writing positions "
                f"{start_pos}..{start_pos + T - 1} does not fit"
            )
        if T == 1 or start_pos == 0:
            return None
        device = self.k[0].device
        keys = torch.arange(start_pos + T, device=device)
        queries = torch.arange(start_pos, start_pos + T, device=device)
        return keys[None, :] <= queries[:, None]  # (T, start_pos + T)

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + k.size(2)
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        if layer == len(self.k) - 1:
            self.length = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        """Forget every position; the buffers are reused, not reallocated."""
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache's tensors."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one position costs across all layers, for one sequence."""
        return self.nbytes // (self.max_len * self.batch_size)

    @property
    def capacity(self) -> int:
        return self.max_len

"""Key/value caches: what makes each decode step cost one token's work, and what grows with
every token: 2 x layers x kv heads x head dim x bytes per element, per position, per sequence.

Attention talks to a cache through two calls and never knows which kind it holds:

- ``prepare(start_pos, T, rotate)``: once per forward, for T new positions from ``start_pos``.
  ``rotate`` turns keys by rotary positions; the windowed cache uses it to re-position its sink
  keys.
- ``attend(layer, q, k, v)``: store one layer's new keys and values, (B, n_kv_head, T,
  head_dim), already rotated at their absolute positions, and return the attention output of
  the queries (B, n_head, T, head_dim) over everything they may see (scaled, and capped where
  the model caps its scores: Gemma 2's ``softcap``, ``base.capped_attention``).

The kinds: ``KVCache`` (contiguous rows that advance together: scoring), ``WindowedKVCache``
(attention sinks + a recent window), and ``PagedKVCache``, the engine's: a pool of blocks that
sequences take as they grow, each at its own length, read in place (``PagedStep`` is one
forward's view of it; ``HostKVPool`` the host-memory tier behind it). Each stores through a
codec: floats, or int8/int4 with a scale per position and head, dequantized on the way to
attention. ``CacheConfig`` picks kind and codec.

A model's sliding-window layers (``ModelConfig.layer_windows``) store only their window in the
contiguous cache: a ring of W positions per row, so their memory stops growing at W while
full-attention layers keep every position (``base.layer_lengths``). The paged cache stores
every position and masks each query to its window.

Accounting on every kind: ``nbytes`` (allocated), ``used_bytes`` (holding positions),
``bytes_per_token`` (one position in every layer), ``tokens`` and ``capacity`` (positions, in
the layers that hold the most), and per layer ``layer_tokens(i)`` and ``layer_capacity(i)``.
"""

from arlm.kv_cache.base import Cache, Rotate
from arlm.kv_cache.codec import KV_DTYPES, Codec, make_codec
from arlm.kv_cache.config import CacheConfig
from arlm.kv_cache.contiguous import KVCache
from arlm.kv_cache.offload import HostKVPool
from arlm.kv_cache.paged import PagedKVCache, PagedRow, PagedStep, StepLayout
from arlm.kv_cache.windowed import WindowedKVCache

__all__ = [
    "KV_DTYPES",
    "Cache",
    "CacheConfig",
    "Codec",
    "HostKVPool",
    "KVCache",
    "PagedKVCache",
    "PagedRow",
    "PagedStep",
    "Rotate",
    "StepLayout",
    "WindowedKVCache",
    "make_codec",
]

"""Key/value caches: what makes each decode step cost one token's work, and what grows with
every token: 2 x layers x kv heads x head dim x bytes per element, per position, per sequence.

Attention talks to a cache through two calls and never knows which kind it holds:

- ``prepare(start_pos, T, rotate)``: once per forward, for T new positions from ``start_pos``
  (an int, or one position per row for the paged cache). The cache makes room and returns the
  attention mask over the keys ``update`` will return: (T, S) or (B, 1, T, S), True where a
  query may look, or ``None`` when plain causal alignment is right (one query seeing every key,
  or a prefill from position 0). ``rotate`` turns keys by rotary positions; the windowed cache
  uses it to re-position its sink keys.
- ``update(layer, k, v)``: store one layer's new keys and values, (B, n_kv_head, T, head_dim),
  already rotated at their absolute positions, and return everything the queries attend to,
  (B, n_kv_head, S, head_dim) in the model's dtype.

The kinds: ``KVCache`` (contiguous), ``PagedKVCache`` over a ``BlockPool`` (rows at their own
lengths), ``WindowedKVCache`` (attention sinks + a recent window). Each stores through a codec:
floats, or int8/int4 with a scale per position and head, dequantized on the way to attention.
``CacheConfig`` picks kind and codec. Accounting on every kind: ``nbytes`` (allocated),
``used_bytes`` (holding positions), ``bytes_per_token``, ``tokens``, ``capacity``.
"""

from arlm.kv_cache.base import Cache, Rotate
from arlm.kv_cache.codec import KV_DTYPES, Codec, make_codec
from arlm.kv_cache.config import CacheConfig
from arlm.kv_cache.contiguous import KVCache
from arlm.kv_cache.paged import BlockPool, OutOfBlocksError, PagedKVCache
from arlm.kv_cache.windowed import WindowedKVCache

__all__ = [
    "KV_DTYPES",
    "BlockPool",
    "Cache",
    "CacheConfig",
    "Codec",
    "KVCache",
    "OutOfBlocksError",
    "PagedKVCache",
    "Rotate",
    "WindowedKVCache",
    "make_codec",
]

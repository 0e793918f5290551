"""``CacheConfig``: which cache kind a loaded model generates and scores with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arlm.config import ModelConfig, option
from arlm.kv_cache.base import Cache
from arlm.kv_cache.codec import KV_DTYPES, make_codec
from arlm.kv_cache.contiguous import KVCache
from arlm.kv_cache.windowed import WindowedKVCache


@dataclass(frozen=True)
class CacheConfig:
    """The KV cache settings ``arlm.load`` takes as ``kv_cache_dtype``, ``kv_window`` and
    ``kv_sink_tokens``. The defaults: every position kept, in the model's dtype. (How the engine
    lays sequences out, in slots of blocks, is ``EngineConfig``'s.)"""

    dtype: str = option(
        "auto",
        help="KV cache storage; int8/int4 are quantized (auto: the model's dtype)",
        flag="--kv-cache-dtype",
        choices=KV_DTYPES,
    )
    window: int | None = option(
        None,
        help="keep only the sink tokens and the last N positions: bounded memory, generation "
        "past the context (rotary models)",
        flag="--kv-window",
    )
    # StreamingLLM keeps 4
    sink_tokens: int = option(
        4, help="with --kv-window, the first positions always kept", flag="--kv-sink-tokens"
    )

    def __post_init__(self) -> None:
        if self.dtype not in KV_DTYPES:
            raise ValueError(
                f"kv_cache_dtype={self.dtype!r} is not supported; choose one of {KV_DTYPES}"
            )
        if self.window is not None and self.window < 1:
            raise ValueError(f"kv_window={self.window} must be a positive integer")
        if self.sink_tokens < 0:
            raise ValueError(f"kv_sink_tokens={self.sink_tokens} must be >= 0")

    @property
    def kind(self) -> str:
        """``full`` (every position kept) or ``windowed``."""
        return "windowed" if self.window is not None else "full"

    @property
    def unbounded(self) -> bool:
        """Whether generation may run past the model's context length."""
        return self.window is not None

    def check(self, config: ModelConfig) -> None:
        """Refuse settings the model cannot run, saying why."""
        if self.window is not None and config.positions != "rope":
            raise ValueError(
                f"kv_window needs a model with rotary positions; this {config.family} model has "
                f"learned absolute position embeddings, one per position 0..{config.block_size - 1}"
                ". A windowed cache re-positions kept keys (the sinks sit next to the recent "
                "window) and runs past the context, and a learned table has neither relative "
                "positions to shift nor embeddings past its last row; use a Llama-family model"
            )
        if self.window is not None and config.sliding_window is not None:
            raise ValueError(
                f"kv_window={self.window} with a model whose layers have a sliding_window of "
                f"{config.sliding_window}: the StreamingLLM cache would show those layers its "
                "sink tokens, which the model's own window hides; load without kv_window (the "
                "model's window already bounds what its sliding layers attend to)"
            )
        make_codec(self.dtype, torch.float32).planes(config.head_dim)  # int4 needs an even dim

    def build(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Cache:
        """A cache of this kind for ``batch_size`` rows of up to ``max_len`` positions (the
        windowed kind holds ``sink_tokens + window`` whatever ``max_len``); ``dtype`` is the
        model's, what attention computes in."""
        self.check(config)
        codec = make_codec(self.dtype, dtype)
        kw = dict(device=device, dtype=dtype, codec=codec)
        if self.window is not None:
            return WindowedKVCache.for_model(
                config, batch_size, self.window, self.sink_tokens, **kw
            )
        return KVCache.for_model(config, batch_size, max_len, **kw)

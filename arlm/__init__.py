"""arlm: a complete autoregressive language-model stack on PyTorch."""

from arlm import loops
from arlm.api import LM, Score, load
from arlm.config import ModelConfig
from arlm.engine import Chunk, Completion, Engine, EngineConfig
from arlm.kv_cache import CacheConfig
from arlm.sampling import SamplingParams, TokenLogprob
from arlm.tokenizer import Tokenizer

__all__ = [
    "LM",
    "CacheConfig",
    "Chunk",
    "Completion",
    "Engine",
    "EngineConfig",
    "ModelConfig",
    "SamplingParams",
    "Score",
    "TokenLogprob",
    "Tokenizer",
    "load",
    "loops",
]

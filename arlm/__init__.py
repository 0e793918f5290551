"""arlm: a complete autoregressive language-model stack on PyTorch."""

from arlm import loops
from arlm.api import LM, Score, load
from arlm.config import ModelConfig
from arlm.generate import Chunk, Completion
from arlm.sampling import SamplingParams
from arlm.tokenizer import Tokenizer

__all__ = [
    "LM",
    "Chunk",
    "Completion",
    "ModelConfig",
    "SamplingParams",
    "Score",
    "Tokenizer",
    "load",
    "loops",
]

"""arlm: a complete autoregressive language-model stack on PyTorch."""

from arlm.config import ModelConfig

__all__ = ["ModelConfig"]

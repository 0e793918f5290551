"""The transformer (one file to read top to bottom), weight quantization and the CPU kernels."""

from arlm.model.transformer import Transformer, apply_rope, rope_frequencies

__all__ = ["Transformer", "apply_rope", "rope_frequencies"]

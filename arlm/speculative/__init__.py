"""Speculative decoding's parts that need no engine: the configuration, prompt lookup, the
proposer interface and the rejection-sampling rule. The draft-model proposer
(``arlm.speculative.draft``) runs a model through the engine's runner, so it sits above the
engine; the verification is the engine's own (``arlm.engine.speculation``).
"""

from arlm.speculative.config import SpeculativeConfig
from arlm.speculative.ngram import NgramProposer

__all__ = ["NgramProposer", "SpeculativeConfig"]

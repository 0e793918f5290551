"""Sampling: ``SamplingParams`` (the request schema), the logits processors, DRY, and the
sampler that draws one token per row, each row with its own parameters."""

from arlm.sampling.params import SamplingParams, TokenLogprob
from arlm.sampling.processors import min_p_filter, top_k_filter, top_p_filter, typical_filter
from arlm.sampling.sampler import SequenceSampler, sample, token_logprobs

__all__ = [
    "SamplingParams",
    "SequenceSampler",
    "TokenLogprob",
    "min_p_filter",
    "sample",
    "token_logprobs",
    "top_k_filter",
    "top_p_filter",
    "typical_filter",
]

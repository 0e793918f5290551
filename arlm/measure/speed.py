"""``arlm bench``: how fast a model prefills and decodes here, through the one decode loop."""

from __future__ import annotations

import resource
import statistics
import sys
from dataclasses import dataclass

import torch

from arlm.api import LM
from arlm.engine import Completion
from arlm.model.packing import weight_bytes


@dataclass
class BenchResult:
    """Medians over the timed runs (the first, warm-up run is not counted)."""

    prompt_tokens: int
    new_tokens: int
    runs: int
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    time_to_first_token_ms: float
    kv_cache_bytes: int  # the sequence's KV blocks at their most (whole blocks)
    kv_cache_peak_bytes: int  # of those, the bytes its positions filled
    peak_memory_bytes: int  # process peak RSS on CPU, peak allocated device memory on CUDA
    weight_bytes: int  # of the linear layers' weights a decode step reads (see packing)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes


def bench(lm: LM, prompt_tokens: int = 64, new_tokens: int = 128, runs: int = 3) -> BenchResult:
    """Greedy generation of ``new_tokens`` after a random prompt of ``prompt_tokens`` ids, once to
    warm up and then ``runs`` times; end-of-sequence is ignored so every run decodes in full."""
    context = lm.config.block_size
    if prompt_tokens < 1 or new_tokens < 1 or runs < 1:
        raise ValueError(
            f"prompt_tokens={prompt_tokens}, new_tokens={new_tokens} and runs={runs} "
            "must all be at least 1"
        )
    if prompt_tokens + new_tokens - 1 > context and not lm.cache_config.unbounded:
        raise ValueError(
            f"{prompt_tokens} prompt + {new_tokens} new tokens do not fit the model's context "
            f"of {context}; lower them so their sum is at most {context + 1}"
        )
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, lm.config.vocab_size, (prompt_tokens,), generator=generator)
    completions: list[Completion] = []
    for _ in range(runs + 1):
        completions.append(
            lm.generate(prompt.tolist(), max_tokens=new_tokens, temperature=0, ignore_eos=True)
        )
    timed = [c.usage for c in completions[1:]]
    return BenchResult(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        runs=runs,
        prefill_tokens_per_second=statistics.median(u.prefill_tokens_per_second for u in timed),
        decode_tokens_per_second=statistics.median(u.decode_tokens_per_second for u in timed),
        time_to_first_token_ms=statistics.median(u.prefill_seconds for u in timed) * 1e3,
        kv_cache_bytes=timed[0].kv_cache_bytes,
        kv_cache_peak_bytes=timed[0].kv_cache_peak_bytes,
        peak_memory_bytes=_peak_memory(lm.device),
        weight_bytes=weight_bytes(lm.model),
    )

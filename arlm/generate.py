"""Sequential inference: prefill the prompt once, then one token per decode step over the cache.

This is arlm's one decode loop; everything that generates text goes through ``stream``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from arlm.kv_cache import KVCache
from arlm.model import Transformer
from arlm.sampling import SamplingParams, build_processors, sample
from arlm.tokenizer import Tokenizer


@torch.inference_mode()
def prefill(model: Transformer, idx: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
    """Run the prompt (B, T) in one parallel pass, filling the cache; next-token logits (B, V)."""
    logits, _ = model(idx, kv_cache=kv_cache, start_pos=0, last_only=True)
    return logits[:, -1]


@torch.inference_mode()
def decode_step(
    model: Transformer, tokens: torch.Tensor, kv_cache: KVCache, pos: int
) -> torch.Tensor:
    """Feed one new token per row (B,) at position ``pos``; next-token logits (B, V)."""
    logits, _ = model(tokens[:, None], kv_cache=kv_cache, start_pos=pos)
    return logits[:, -1]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_seconds: float = 0.0  # also the time to first token
    decode_seconds: float = 0.0
    kv_cache_bytes: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.completion_tokens - 1  # the first token comes out of the prefill
        return steps / self.decode_seconds if self.decode_seconds and steps > 0 else 0.0


class Chunk(str):
    """A piece of streamed text. It is a ``str``, so it prints and joins as one; the last chunk
    of a stream also carries ``finish_reason`` and ``usage``."""

    token_id: int | None
    finish_reason: str | None
    usage: Usage | None

    def __new__(
        cls,
        text: str,
        token_id: int | None = None,
        finish_reason: str | None = None,
        usage: Usage | None = None,
    ) -> Chunk:
        chunk = super().__new__(cls, text)
        chunk.token_id, chunk.finish_reason, chunk.usage = token_id, finish_reason, usage
        return chunk


@dataclass
class Completion:
    """A finished generation. ``token_ids`` are the generated ids, without the prompt and
    without an end-of-sequence or stop token id that ended it; ``text`` ends before any
    stop string."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
    usage: Usage = field(default_factory=Usage)


def check_prompt(prompt_ids: list[int], tokenizer: Tokenizer, context: int) -> list[int]:
    """The ids to prefill: the prompt, or the start token for an empty prompt."""
    if not prompt_ids:
        if tokenizer.bos_token_id is None:
            raise ValueError("the prompt is empty and the tokenizer has no start token to use")
        prompt_ids = [tokenizer.bos_token_id]
    if len(prompt_ids) > context:
        raise ValueError(
            f"the prompt is {len(prompt_ids)} tokens, longer than the model's context of "
            f"{context} tokens; shorten it to at most {context}"
        )
    return prompt_ids


def _stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could still become the start of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
) -> Iterator[Chunk]:
    """Generate from ``prompt_ids``, yielding text as it becomes final.

    Text that might be the beginning of a stop string is held back until it is known not to be.
    """
    device = next(model.parameters()).device
    context = model.config.block_size
    prompt_ids = check_prompt(prompt_ids, tokenizer, context)
    usage = Usage(prompt_tokens=len(prompt_ids))
    if params.max_tokens == 0:
        yield Chunk("", finish_reason="length", usage=usage)
        return

    # the last sampled token is never fed back, so the cache needs one position less
    max_len = min(len(prompt_ids) + params.max_tokens - 1, context)
    kv_cache = KVCache.for_model(
        model.config, 1, max_len, device=device, dtype=model.wte.weight.dtype
    )
    usage.kv_cache_bytes = kv_cache.nbytes
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    chain = build_processors(params)
    eos = set() if params.ignore_eos else set(tokenizer.eos_token_ids)
    eos |= set(params.stop_token_ids)
    max_stop = max((len(s) for s in params.stop), default=0)
    decoder = tokenizer.decoder()

    t0 = time.perf_counter()
    logits = prefill(model, torch.tensor([prompt_ids], device=device), kv_cache)
    pos = len(prompt_ids)
    text, emitted, n_generated = "", 0, 0
    finish_reason = "length"
    while True:
        token = sample(logits, params, chain, generator)
        token_id = int(token[0])
        if n_generated == 0:
            usage.prefill_seconds = time.perf_counter() - t0
            t0 = time.perf_counter()
        if token_id in eos:
            finish_reason = "stop"
            break
        n_generated += 1
        text += decoder.push(token_id)
        if params.stop:
            # a stop string can only end inside the newest text, so search just the tail
            search_from = max(0, emitted - max_stop)
            hits = [i for s in params.stop if (i := text.find(s, search_from)) >= 0]
            if hits:
                cut = min(hits)
                usage.completion_tokens = n_generated
                usage.decode_seconds = time.perf_counter() - t0
                yield Chunk(text[emitted:cut], token_id, finish_reason="stop", usage=usage)
                return
        release = len(text) - _stop_holdback(text, params.stop)
        yield Chunk(text[emitted:release], token_id)
        emitted = release
        if n_generated == params.max_tokens or pos >= context:
            break
        logits = decode_step(model, token, kv_cache, pos)
        pos += 1
    if finish_reason == "length":
        text += decoder.flush()
    usage.completion_tokens = n_generated
    usage.decode_seconds = time.perf_counter() - t0
    yield Chunk(text[emitted:], finish_reason=finish_reason, usage=usage)


def complete(
    model: Transformer, tokenizer: Tokenizer, prompt_ids: list[int], params: SamplingParams
) -> Completion:
    """Run ``stream`` to the end and collect its chunks."""
    pieces, token_ids = [], []
    for chunk in stream(model, tokenizer, prompt_ids, params):
        pieces.append(chunk)
        if chunk.token_id is not None:
            token_ids.append(chunk.token_id)
    # the last chunk always carries the finish reason and usage
    return Completion("".join(pieces), token_ids, chunk.finish_reason, chunk.usage)

"""Sequential inference: prefill the prompt once, then one token per decode step over the cache.

This is arlm's one decode loop; everything that generates text goes through ``stream``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

from arlm.dry import DryBreakers, dry_sequence_breakers
from arlm.kv_cache import Cache, CacheConfig
from arlm.loop_policy import LoopGuard
from arlm.loops import LoopReport
from arlm.model import Transformer
from arlm.sampling import Sampler, SamplingParams, TokenLogprob, token_logprobs
from arlm.tokenizer import Tokenizer


@torch.inference_mode()
def prefill(model: Transformer, idx: torch.Tensor, kv_cache: Cache) -> torch.Tensor:
    """Run the prompt (B, T) in one parallel pass, filling the cache; next-token logits (B, V)."""
    logits, _ = model(idx, kv_cache=kv_cache, start_pos=0, last_only=True)
    return logits[:, -1]


@torch.inference_mode()
def decode_step(
    model: Transformer, tokens: torch.Tensor, kv_cache: Cache, pos: int
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
    kv_cache_bytes: int = 0  # allocated by the cache
    kv_cache_peak_bytes: int = 0  # the most of those holding positions (paged: blocks in use)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.completion_tokens - 1  # the first token comes out of the prefill
        return steps / self.decode_seconds if self.decode_seconds and steps > 0 else 0.0


class Chunk(str):
    """A piece of streamed text. It is a ``str``, so it prints and joins as one.

    Every generated token comes in one chunk, with its ``token_id`` and, when asked for, its
    ``logprob``; ``loop`` is the loop first reported at that token (the "report" policy). The
    last chunk has no token; it carries ``finish_reason``, ``usage``, ``loop`` (the loop that
    ended generation, finish_reason "repetition"), ``loop_reports`` and ``loops_broken``.
    """

    token_id: int | None
    finish_reason: str | None
    usage: Usage | None
    logprob: TokenLogprob | None
    loop: LoopReport | None
    loop_reports: tuple[LoopReport, ...]
    loops_broken: int

    def __new__(
        cls,
        text: str,
        token_id: int | None = None,
        finish_reason: str | None = None,
        usage: Usage | None = None,
        *,
        logprob: TokenLogprob | None = None,
        loop: LoopReport | None = None,
        loop_reports: tuple[LoopReport, ...] = (),
        loops_broken: int = 0,
    ) -> Chunk:
        chunk = super().__new__(cls, text)
        chunk.token_id, chunk.finish_reason, chunk.usage = token_id, finish_reason, usage
        chunk.logprob, chunk.loop = logprob, loop
        chunk.loop_reports, chunk.loops_broken = loop_reports, loops_broken
        return chunk


@dataclass
class Completion:
    """A finished generation. ``token_ids`` are the generated ids, without the prompt and
    without an end-of-sequence or stop token id that ended it; ``text`` ends before any
    stop string.

    ``logprobs``: one per token id when ``logprobs`` was asked for, else None. With a loop
    policy: ``loop`` is the loop that ended generation (finish_reason "repetition"; the text
    and ids then end after the first copy of its block), ``loop_reports`` every loop reported
    or acted on, ``loops_broken`` how many the "break" policy broke.
    """

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or stop string), "length" or "repetition"
    usage: Usage = field(default_factory=Usage)
    logprobs: list[TokenLogprob] | None = None
    loop: LoopReport | None = None
    loop_reports: list[LoopReport] = field(default_factory=list)
    loops_broken: int = 0


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


def dry_breakers(tokenizer: Tokenizer, breakers: list[str]) -> DryBreakers:
    """DRY's sequence breakers as token sequences of ``tokenizer`` (llama.cpp's processing)."""
    return dry_sequence_breakers(
        tokenizer.token_texts, lambda s: tokenizer.encode(s, add_special_tokens=False), breakers
    )


def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    cache: CacheConfig | None = None,
) -> Iterator[Chunk]:
    """Generate from ``prompt_ids``, yielding text as it becomes final.

    ``cache`` picks the KV cache kind (None: contiguous, in the model's dtype); a windowed cache
    lets generation run past the model's context length.

    Each generated token goes out in one chunk once its text is final. Text is held back while
    it might still be cut: while it might be the beginning of a stop string, and, under the
    "stop" and "break" loop policies, while a loop found later could still cut it off
    (``LoopGuard.settled``: a token or two in ordinary text, the repeats while a loop forms). So
    the chunks always join to the completion's text, and streamed text is never taken back.
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
    cache = cache or CacheConfig()
    kv_cache = cache.build(model.config, 1, max_len, device=device, dtype=model.wte.weight.dtype)
    usage.kv_cache_bytes = kv_cache.nbytes
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    eos = set() if params.ignore_eos else set(tokenizer.eos_token_ids)
    eos |= set(params.stop_token_ids)
    guard = None
    if params.loop_policy is not None:
        guard = LoopGuard(params.loop_policy, params.detector_config, params.max_loop_breaks)
    breakers: DryBreakers | None = None  # found once DRY is on: requested, or after a break

    def make_sampler(generated: list[int]) -> Sampler:
        nonlocal breakers
        p = params
        if guard is not None and guard.breaks:
            p = replace(params, dry_multiplier=guard.dry_multiplier(params.dry_multiplier))
        if p.dry_multiplier > 0 and breakers is None:
            breakers = dry_breakers(tokenizer, params.dry_sequence_breakers)
        return Sampler(
            p,
            model.config.vocab_size,
            [prompt_ids],
            [generated],
            end_ids=eos,
            dry_breakers=breakers,
            generators=[generator],
            device=device,
        )

    sampler = make_sampler([])
    max_stop = max((len(s) for s in params.stop), default=0)
    decoder = tokenizer.decoder()
    ids: list[int] = []  # the generated ids kept so far
    ends: list[int] = []  # ends[i]: len(text) once ids[i] is decoded
    logprobs: list[TokenLogprob] = []
    reported: dict[int, LoopReport] = {}  # "report" policy: index -> loop first reported there
    text, emitted, sent = "", 0, 0  # sent: how many ids have gone out, one chunk each
    finish_reason, loop, peak_bytes = "length", None, 0

    t0 = time.perf_counter()
    logits = prefill(model, torch.tensor([prompt_ids], device=device), kv_cache)
    pos = len(prompt_ids)
    first = True
    while True:
        raw_logits = logits
        banned = guard.banned(len(ids)) if guard is not None else ()
        if banned:
            logits = logits.clone()
            logits[:, sorted(banned)] = float("-inf")
        token = sampler(logits)
        token_id = int(token[0])
        if first:
            usage.prefill_seconds = time.perf_counter() - t0
            t0, first = time.perf_counter(), False
        if token_id in eos:
            finish_reason = "stop"
            break
        ids.append(token_id)
        sampler.append([token_id])
        if params.logprobs is not None:
            logprobs += token_logprobs(raw_logits, token, params.logprobs)
        text += decoder.push(token_id)
        ends.append(len(text))
        action = guard.push(token_id) if guard is not None else None
        if action is not None and action.kind != "report":
            # keep the ids up to the end of the loop's first copy
            del ids[action.keep :], ends[action.keep :], logprobs[action.keep :]
            if action.kind == "stop":
                finish_reason, loop = "repetition", action.report
                text = text[: ends[-1]] if ends else ""
                break
            # break: carry on from the kept ids, with a fresh cache (every cache kind can be
            # refilled from position 0; the windowed one cannot rewind)
            guard.rewind(ids)
            decoder = tokenizer.decoder()
            text = "".join(decoder.push(t) for t in ids)
            sampler = make_sampler(ids)
            peak_bytes = max(peak_bytes, kv_cache.used_bytes)
            kv_cache = cache.build(
                model.config, 1, max_len, device=device, dtype=model.wte.weight.dtype
            )
            logits = prefill(model, torch.tensor([prompt_ids + ids], device=device), kv_cache)
            pos = len(prompt_ids) + len(ids)
            continue
        if action is not None:
            reported[len(ids) - 1] = action.report
        release = len(text)
        if params.stop and len(ids) >= params.min_tokens:
            # a stop string counts from the min_tokens-th token's text on, and can only end
            # inside the newest text, so search just the tail
            floor = ends[params.min_tokens - 2] if params.min_tokens >= 2 else 0
            search_from = max(floor, emitted - max_stop)
            hits = [i for s in params.stop if (i := text.find(s, search_from)) >= 0]
            if hits:
                text = text[: min(hits)]
                finish_reason = "stop"
                break
            release -= _stop_holdback(text, params.stop)
        settled = guard.settled if guard is not None else len(ids)
        for i in range(sent, settled):
            end = max(emitted, min(ends[i], release))
            lp = logprobs[i] if logprobs else None
            yield Chunk(text[emitted:end], ids[i], logprob=lp, loop=reported.get(i))
            emitted = end
        sent = max(sent, settled)
        if len(ids) == params.max_tokens or (pos >= context and not cache.unbounded):
            break
        logits = decode_step(model, token, kv_cache, pos)
        pos += 1
    if finish_reason == "length":
        text += decoder.flush()
    for i in range(sent, len(ids)):  # all that is left is final now
        end = max(emitted, min(ends[i], len(text)))
        lp = logprobs[i] if logprobs else None
        yield Chunk(text[emitted:end], ids[i], logprob=lp, loop=reported.get(i))
        emitted = end
    usage.completion_tokens = len(ids)
    usage.kv_cache_peak_bytes = max(peak_bytes, kv_cache.used_bytes)
    usage.decode_seconds = time.perf_counter() - t0
    yield Chunk(
        text[emitted:],
        finish_reason=finish_reason,
        usage=usage,
        loop=loop,
        loop_reports=tuple(guard.reports) if guard is not None else (),
        loops_broken=guard.breaks if guard is not None else 0,
    )


def complete(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    cache: CacheConfig | None = None,
) -> Completion:
    """Run ``stream`` to the end and collect its chunks."""
    pieces, token_ids, logprobs = [], [], []
    for chunk in stream(model, tokenizer, prompt_ids, params, cache):
        pieces.append(chunk)
        if chunk.token_id is not None:
            token_ids.append(chunk.token_id)
            logprobs.append(chunk.logprob)
    # the last chunk always carries the finish reason, usage and loop outcome
    return Completion(
        "".join(pieces),
        token_ids,
        chunk.finish_reason,
        chunk.usage,
        logprobs=logprobs if params.logprobs is not None else None,
        loop=chunk.loop,
        loop_reports=list(chunk.loop_reports),
        loops_broken=chunk.loops_broken,
    )

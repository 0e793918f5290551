"""Contrastive search for one prompt at a time, on a contiguous KV cache of ``top_k`` rows.

Each step needs the hidden state of every one of the k candidate tokens (``arlm.sampling.
contrastive``). They are computed in one batched forward: the cache holds k rows that share the
sequence's history, candidate i is fed to row i at the next position, and the forward returns
the k hidden states and the k next-token logits at once. The chosen candidate's row is then
copied over the others at that position (its keys and values; the other candidates' entries
are discarded), and its logits are the next step's, so a step costs one forward of k rows of
one token, the price of greedy decoding with k rows instead of one.

This runs beside the engine until the engine runs it per row (the k candidate rows of each
sequence in its flat batch, their KV entries discarded after the step): ``LM.generate`` routes
a request with ``penalty_alpha > 0`` here, and the engine refuses one.
"""

from __future__ import annotations

import time

import torch

from arlm.engine.outputs import Completion, Usage
from arlm.kv_cache.contiguous import KVCache
from arlm.model.transformer import Transformer
from arlm.sampling.contrastive import contrastive_scores, normalize, top_candidates
from arlm.sampling.params import SamplingParams
from arlm.sampling.sampler import ALL_BANNED, SequenceSampler
from arlm.tokenizer import Tokenizer

# What contrastive search does not do (yet); each is refused by name.
UNSUPPORTED = {
    "n": lambda p: p.n != 1,
    "loop_policy": lambda p: p.loop_policy is not None,
    "dry_multiplier": lambda p: p.dry_multiplier > 0,
    "stop": lambda p: bool(p.stop),
    "logprobs": lambda p: p.logprobs is not None,
}


def check_contrastive(params: SamplingParams) -> None:
    """Raise ``ValueError`` for settings contrastive search cannot combine with."""
    bad = [name for name, refused in UNSUPPORTED.items() if refused(params)]
    if bad:
        raise ValueError(
            f"contrastive search (penalty_alpha={params.penalty_alpha}) does not support "
            f"{', '.join(bad)}; leave {'them' if len(bad) > 1 else 'it'} at the default"
        )


def _keep_row(cache: KVCache, row: int, pos: int) -> None:
    """Copy position ``pos`` of ``row`` over every row, in every layer (rings at their slot)."""
    for layer, span in enumerate(cache.layer_len):
        at = pos % span if span < cache.max_len else pos
        for planes in (cache.k[layer], cache.v[layer]):
            for plane in planes:  # (rows, n_kv_head, span, width)
                plane[:, :, at] = plane[row, :, at]


class _LastBlock:
    """Keeps the residual stream (B, T, n_embd) after the last block of each forward: the
    final norm of it is the hidden state contrastive search compares (the model's ``ln_f``
    input). A block returns the stream before its own output is added (see ``Block``)."""

    def __init__(self, model: Transformer) -> None:
        self.output: torch.Tensor | None = None
        self.handle = model.h[-1].register_forward_hook(self._keep)

    def _keep(self, module, args, output) -> None:
        x, pending = output
        self.output = x + pending


@torch.inference_mode()
def contrastive_generate(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    end_ids: frozenset[int],
) -> Completion:
    """Continue ``prompt_ids`` by contrastive search with ``params.penalty_alpha`` and
    ``params.top_k``; stops at an id of ``end_ids`` (not kept), at ``max_tokens`` or at the
    model's context. The prompt must fit the context (the caller checks it)."""
    check_contrastive(params)
    started = time.perf_counter()
    k, alpha = params.top_k, params.penalty_alpha
    cfg = model.config
    device = model.wte.weight.device
    prompt_len = len(prompt_ids)
    max_len = min(prompt_len + params.max_tokens, cfg.block_size)
    token_ids = list(prompt_ids)
    stop_ids = set() if params.ignore_eos else set(end_ids)
    stop_ids |= set(params.stop_token_ids)
    sampler = SequenceSampler(
        params, cfg.vocab_size, token_ids, prompt_len, end_ids=stop_ids, device=device
    )
    cache = KVCache.for_model(cfg, k, max_len, device=device, dtype=model.wte.weight.dtype)
    last = _LastBlock(model)
    try:
        idx = torch.tensor([prompt_ids], device=device).expand(k, prompt_len)
        logits, _ = model(idx, kv_cache=cache, start_pos=0, last_only=True)
        context = normalize(model.ln_f(last.output[:1]))  # (1, S, D)
        logits = logits[:1, -1]  # (1, vocab): every row saw the same prompt
        prefilled = time.perf_counter()
        finish = "length"
        for pos in range(prompt_len, max_len):
            processed = sampler.process(logits.float())
            if not torch.isfinite(processed).any():
                raise ValueError(ALL_BANNED)
            probs, ids = top_candidates(processed, k)  # (1, k) each
            out, _ = model(ids.view(k, 1), kv_cache=cache, start_pos=pos, last_only=True)
            hidden = normalize(model.ln_f(last.output[:, -1]))  # (k, D)
            scores = contrastive_scores(probs, hidden[None], context, alpha)
            # a banned token (-inf) can fill the last places of the top k: never pick it
            allowed = torch.isfinite(processed.gather(-1, ids))
            j = int(scores.masked_fill(~allowed, float("-inf")).argmax(dim=-1)[0])
            token = int(ids[0, j])
            if token in stop_ids:
                finish = "stop"
                break
            _keep_row(cache, j, pos)
            context = torch.cat((context, hidden[None, j : j + 1]), dim=1)
            logits = out[j : j + 1, -1]
            token_ids.append(token)
            sampler.appended()
    finally:
        last.handle.remove()
    done = time.perf_counter()
    generated = token_ids[prompt_len:]
    usage = Usage(
        prompt_tokens=prompt_len,
        completion_tokens=len(generated),
        prefill_seconds=prefilled - started,
        decode_seconds=done - prefilled,
    )
    return Completion(tokenizer.decode(generated), generated, finish, usage)

"""A request checked against the model and turned into its sequences.

Everything a step could otherwise refuse is refused here, when the request is added, with the
reason: a prompt empty without a start token, with ids outside the vocabulary, or longer than
the engine accepts; stop ids or a logit bias outside the vocabulary; more positions than the
windowed cache allows. (``SamplingParams`` checked the rest when they were made.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from arlm.engine.block_manager import block_hashes
from arlm.engine.sequence import Sequence
from arlm.engine.text import TextState
from arlm.engine.token_chain import TokenChain
from arlm.loops.policy import LoopGuard
from arlm.sampling.params import SamplingParams
from arlm.sampling.structured import GrammarCompiler
from arlm.tokenizer import Tokenizer


class InvalidRequest(ValueError):
    """A request the engine cannot run as given; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_prompt(
    tokenizer: Tokenizer, vocab: int, context: int, max_len: int | None, prompt: str | list[int]
) -> list[int]:
    """The token ids of ``prompt``, or a ValueError saying why the engine cannot run it."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        if tokenizer.bos_token_id is None:
            raise ValueError("the prompt is empty and the tokenizer has no start token to use")
        ids = [tokenizer.bos_token_id]
    # a bool is an int to Python, not a token id
    bad = [t for t in ids if isinstance(t, bool) or not (isinstance(t, int) and 0 <= t < vocab)]
    if bad:
        raise ValueError(
            f"prompt token ids {bad[:5]} are not in this vocabulary (ids 0..{vocab - 1})"
        )
    limit = context if max_len is None else max_len
    if len(ids) > limit:
        what = f"the model's context of {context} tokens"
        if limit < context:
            what = f"max_model_len={limit} (the model's context is {context} tokens)"
        raise ValueError(
            f"the prompt is {len(ids)} tokens, longer than {what}; shorten it to at most {limit}"
        )
    return ids


def check_params(
    params: SamplingParams,
    vocab: int,
    window_max_len: int | None,
    prompt_len: int,
    *,
    grammars: Callable[[], GrammarCompiler],
    rewindable: bool,
) -> None:
    """Raise ``InvalidRequest`` for what ``params`` ask that this model cannot do. A
    structured output's grammar is compiled here, once, into the cache of the compiler that
    ``grammars()`` gives (called only for such a request: building the compiler loads the
    grammar library and reads the whole vocabulary, a cost a free request must not pay); a cache
    that cannot rewind (not ``rewindable``) computes no prompt position's logits."""
    if params.penalty_alpha > 0:  # contrastive search is not per row yet
        raise InvalidRequest(
            "contrastive search (penalty_alpha > 0) runs one prompt at a time through "
            "LM.generate, not in the engine's batches yet",
            "penalty_alpha",
        )
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias)):
        bad = sorted(t for t in ids if t >= vocab)
        if bad:
            raise InvalidRequest(
                f"{name} names token ids {bad[:5]} that are not in this vocabulary "
                f"(ids 0..{vocab - 1})",
                name,
            )
    limit = window_max_len
    if limit is not None and prompt_len + params.max_tokens > limit:
        raise InvalidRequest(
            f"max_tokens={params.max_tokens} with a prompt of {prompt_len} tokens is more than "
            f"the {limit} positions a sequence may reach (max_model_len); lower max_tokens",
            "max_tokens",
        )
    if params.structured_outputs is not None:
        try:
            grammars().compile(params.structured_outputs)
        except ValueError as e:
            raise InvalidRequest(str(e), "structured_outputs") from None
    if params.prompt_logprobs is not None and not rewindable:
        raise InvalidRequest(
            "prompt_logprobs needs every prompt position's logits, which the windowed KV "
            "cache (kv_window) does not compute; load without kv_window",
            "prompt_logprobs",
        )


def new_sequences(
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    tokenizer: Tokenizer,
    chain: TokenChain,
    end_ids: frozenset[int],
    block_size: int,
    device: torch.device,
    adapter: str | None = None,
    salt: bytes = b"",
) -> list[Sequence]:
    """The ``params.n`` samples of one request, run with the LoRA adapter called ``adapter``
    (None: the base model), whose prompt blocks' hashes take ``salt`` (an adapter's blocks are
    its own)."""
    # prompt log-probabilities need every prompt position computed, so such a sequence neither
    # takes nor offers prefix-cache hits
    hashes = block_hashes(prompt_ids, block_size, salt) if params.prompt_logprobs is None else []
    ends = set() if params.ignore_eos else set(end_ids)
    ends |= set(params.stop_token_ids)
    seqs = []
    for index in range(params.n):
        generator = torch.Generator(device=device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed + index)
        token_ids = list(prompt_ids)
        guard = None
        if params.loop_policy is not None:  # with the near-duplicate rule, a break's bans
            guard = LoopGuard(
                params.loop_policy,
                params.detector_config,
                params.max_loop_breaks,
                near=params.near_repetition_detection,
                hold=params.loop_break_hold,
            )
        seqs.append(
            Sequence(
                request_id=request_id,
                index=index,
                token_ids=token_ids,
                prompt_len=len(prompt_ids),
                params=params,
                generator=generator,
                sampler=chain.sampler(params, token_ids, len(prompt_ids), ends),
                text=TextState(tokenizer, params.stop, params.min_tokens),
                end_ids=frozenset(ends),
                guard=guard,
                block_hashes=hashes,
                adapter=adapter,
            )
        )
    return seqs

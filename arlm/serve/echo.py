"""Prompt log-probabilities in the completions API's shapes: OpenAI's ``echo`` with
``logprobs`` (the prompt's tokens first in ``logprobs``, the first one ``null``) and vLLM's
``prompt_logprobs`` field (per prompt token, ``null`` first, then ``{token id: {"logprob",
"rank", "decoded_token"}}`` for the token itself and its likeliest alternatives)."""

from __future__ import annotations

from arlm.sampling.prompt_logprobs import PromptLogprob
from arlm.serve.responses import LogprobFormatter, logprob_value


def echoed(
    formatter: LogprobFormatter,
    prompt_ids: list[int],
    scored: list[PromptLogprob | None],
    generated: dict | None,
) -> dict:
    """The completions ``logprobs`` of an echoed prompt (``scored``: None, then one per prompt
    token) followed by the generated tokens' (``generated``, already in that shape, its
    offsets counted from the end of the prompt's text)."""
    tokens = [formatter.text(t) for t in prompt_ids]
    offsets, offset = [], 0
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    out = {
        "tokens": tokens,
        "token_logprobs": [None if lp is None else logprob_value(lp.logprob) for lp in scored],
        "top_logprobs": [
            None if lp is None else {formatter.text(t): logprob_value(v) for t, v in lp.top}
            for lp in scored
        ],
        "text_offset": offsets,
    }
    if generated is not None:
        for key in out:
            out[key] += generated[key]
    return out


def vllm_prompt_logprobs(
    formatter: LogprobFormatter, scored: list[PromptLogprob | None]
) -> list[dict | None]:
    """vLLM's ``prompt_logprobs``: each scored token with its rank, then its alternatives
    (ranked 1, 2, ... in order), keyed by token id."""
    out: list[dict | None] = []
    for lp in scored:
        if lp is None:
            out.append(None)
            continue
        entry = {
            str(lp.token_id): {
                "logprob": logprob_value(lp.logprob),
                "rank": lp.rank,
                "decoded_token": formatter.text(lp.token_id),
            }
        }
        for rank, (t, v) in enumerate(lp.top, 1):
            entry.setdefault(
                str(t),
                {"logprob": logprob_value(v), "rank": rank, "decoded_token": formatter.text(t)},
            )
        out.append(entry)
    return out

"""Engine outputs in OpenAI's response shapes: whole completions, streamed chunks, logprobs
(the completions API's and the chat API's), usage, and arlm's loop fields.

Each choice is one sequence: prompt ``p``'s sample ``i`` is choice ``p * n + i``, as OpenAI
numbers them. Loop fields are extras that OpenAI clients ignore: ``loop`` (the loop that ended
the choice, finish_reason "repetition"), ``loop_reports`` (every loop reported or broken, when
that is more than ``loop``) and ``loops_broken``; each only when it says something.

Every body is strict JSON: a NaN log-probability (a model whose weights are not finite) fails
its request with a ``ValueError`` instead of writing ``NaN``, and a token of probability zero
gets OpenAI's -9999.0 instead of ``-Infinity``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from arlm.engine.outputs import Chunk, Completion, RequestOutput
from arlm.sampling.params import TokenLogprob
from arlm.tokenizer import Tokenizer

# what OpenAI reports for a token of probability zero; JSON has no -Infinity
ZERO_PROBABILITY_LOGPROB = -9999.0


def sse(data: dict | str) -> str:
    """One server-sent event; ``ValueError`` for a NaN or infinity anywhere in ``data``."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, allow_nan=False)}\n\n"


def logprob_value(value: float) -> float:
    """A log-probability as JSON can hold it (see the module's doc)."""
    if math.isnan(value):
        raise ValueError(
            "the model's log-probabilities are NaN: its logits are not finite, so its weights "
            "may be corrupt"
        )
    return max(value, ZERO_PROBABILITY_LOGPROB)


def envelope(request_id: str, kind: str, model: str, created: int) -> dict:
    return {"id": request_id, "object": kind, "created": created, "model": model}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def loop_fields(source: Chunk | Completion) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if source.loop is not None:
        out["loop"] = _loop(source.loop)
    if source.loop_reports and list(source.loop_reports) != [source.loop]:
        out["loop_reports"] = [_loop(r) for r in source.loop_reports]
    if source.loops_broken:
        out["loops_broken"] = source.loops_broken
    return out


def _loop(report) -> dict:
    out = asdict(report)
    out["pattern"] = list(out["pattern"])
    return out


class LogprobFormatter:
    """Token log-probabilities in the completions shape (``tokens``, ``token_logprobs``,
    ``top_logprobs``, ``text_offset``) or the chat shape (``content``: ``token``, ``logprob``,
    ``bytes``, ``top_logprobs``). A token's text is its own decoding."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.texts = tokenizer.token_texts

    def text(self, token_id: int) -> str:
        """``token_id``'s text; "" for an id past the tokenizer's (a padded vocabulary)."""
        return self.texts[token_id] if token_id < len(self.texts) else ""

    def completions(self, logprobs: list[TokenLogprob], offset: int) -> dict:
        tokens = [self.text(lp.token_id) for lp in logprobs]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [logprob_value(lp.logprob) for lp in logprobs],
            "top_logprobs": [
                {self.text(t): logprob_value(v) for t, v in lp.top} for lp in logprobs
            ],
            "text_offset": offsets,
        }

    def chat(self, logprobs: list[TokenLogprob]) -> dict:
        return {"content": [self._chat_entry(lp) for lp in logprobs]}

    def _chat_entry(self, lp: TokenLogprob) -> dict:
        entry = self._token(lp.token_id, lp.logprob)
        entry["top_logprobs"] = [self._token(t, v) for t, v in lp.top]
        return entry

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.text(token_id)
        return {"token": text, "logprob": logprob_value(logprob), "bytes": list(text.encode())}


def has_tokens(out: RequestOutput) -> bool:
    """Whether a step gave ``out`` tokens. Each gets an event even when its text is held back
    (a possible stop string, half a character) or empty, so a client sees every token come."""
    return any(c.token_id is not None for c in out.chunks)


def token_logprobs(chunks: list[Chunk]) -> list[TokenLogprob]:
    return [c.logprob for c in chunks if c.token_id is not None and c.logprob is not None]

"""The tokenizer endpoints, in vLLM's shapes: ``POST /tokenize`` (a text, or chat messages
through the chat template), ``POST /detokenize`` and ``GET /tokenizer_info``. Evaluation
harnesses (lm-evaluation-harness's ``local-completions``) find them and tokenize with the
server's own tokenizer instead of loading one of their own."""

from __future__ import annotations

from pydantic import Field

from arlm.serve.errors import APIError
from arlm.serve.protocol import ChatMessage, _Body
from arlm.tokenizer import Tokenizer


class TokenizeRequest(_Body):
    """vLLM's ``/tokenize`` body: ``prompt`` (a text) or ``messages`` (a chat, rendered
    through the chat template as ``/v1/chat/completions`` renders it)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[dict] | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


def chat_body(req: TokenizeRequest) -> dict:
    """The ``/v1/chat/completions`` body that renders ``req``'s messages (none generated)."""
    if req.prompt is not None:
        raise APIError.bad_request("give either prompt or messages, not both", "messages")
    body: dict = {
        "messages": [m.model_dump(exclude_none=True) for m in req.messages],
        "add_generation_prompt": req.add_generation_prompt,
        "max_tokens": 0,
    }
    if req.tools is not None:
        body["tools"] = req.tools
    return body


def tokenized(tokenizer: Tokenizer, ids: list[int], max_len: int | None, token_strs: bool) -> dict:
    return {
        "count": len(ids),
        "max_model_len": max_len,
        "tokens": ids,
        "token_strs": [tokenizer.token_texts[i] for i in ids] if token_strs else None,
    }


def detokenize(tokenizer: Tokenizer, ids: list[int], vocab_size: int) -> dict:
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError.bad_request(
            f"tokens {bad[:5]} are not in this vocabulary (ids 0..{vocab_size - 1})", "tokens"
        )
    return {"prompt": tokenizer.decode(ids)}


def tokenizer_info(tokenizer: Tokenizer, max_len: int | None) -> dict:
    """What vLLM's ``/tokenizer_info`` reports: the special tokens' texts, the chat template,
    the context length."""

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tokenizer.token_texts[token_id]

    eos = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": text(eos),
        "bos_token": text(tokenizer.bos_token_id),
        "pad_token": None,
        "unk_token": None,
        "chat_template": tokenizer.chat_template,
        "model_max_length": max_len,
        "vocab_size": tokenizer.vocab_size,
    }

"""A generation request's body turned into what the engine runs: the parsed request, its
``SamplingParams`` and the token ids of its prompts.

This is all the work a client's bytes drive before the engine: JSON and field checks, the model
name, the chat template, the prompt's size in bytes (checked before tokenizing, so an 8 MB text
is refused without being tokenized), tokenizing, the context length. It is plain and
synchronous so that it can run where the event loop is not: in a thread for small completion
bodies, in a worker process (``arlm.serve.workers``) for chat requests and large bodies.
Every failure is an ``APIError`` (a 4xx), in the order a client would fix them.
"""

from __future__ import annotations

from dataclasses import dataclass

from arlm.sampling.params import SamplingParams
from arlm.serve.agent_guard import guard_config, judge, report, warning_message
from arlm.serve.errors import APIError
from arlm.serve.protocol import ChatCompletionRequest, CompletionRequest, parse
from arlm.tokenizer import DEFAULT_MAX_TEMPLATE_CHARS, Tokenizer

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


@dataclass(frozen=True)
class PrepareSetup:
    """What a ``Preparer`` needs, in a form a worker process can be sent: the tokenizer as
    JSON, the model name and its context length, the limits and the server's loop defaults."""

    tokenizer_json: str
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    chat_template: str | None
    model_name: str
    max_len: int | None
    max_prompt_bytes: int | None
    loop_policy: str | None
    loop_detection: dict | None
    sampling_defaults: dict | None = None  # the model's generation_config.json defaults
    agent_loop_guard: str | None = None  # the guard preset for chats that set none
    # the LoRA adapters a request's model may name; None: adapters come and go while the
    # server runs, so the engine checks the name when the request reaches it
    adapters: tuple[str, ...] | None = ()


@dataclass
class Prepared:
    """A request ready for the engine. ``request`` is the parsed body with its prompts or
    messages emptied (they are in ``prompts`` as token ids), so that it is cheap to send back
    from a worker."""

    request: CompletionRequest | ChatCompletionRequest
    params: SamplingParams
    prompts: list[list[int]]
    guard: dict | None = None  # the agent loop guard's report (arlm.serve.agent_guard)


def model_not_found(model: str, served: tuple[str, ...]) -> APIError:
    """The 404 for a request's ``model`` that is none of ``served``."""
    names = ", ".join(repr(name) for name in served)
    return APIError(
        404,
        f"the model {model!r} does not exist; this server serves {names}",
        param="model",
        code="model_not_found",
    )


def prompt_byte_limit(tokenizer: Tokenizer, max_len: int | None) -> int | None:
    """The longest prompt text, in UTF-8 bytes, that could fit in ``max_len`` tokens: the
    longest token's text, plus one byte for the space a tokenizer may strip when it decodes a
    token alone, times ``max_len`` (None when the context is unbounded, a windowed cache)."""
    if max_len is None:
        return None
    longest = max(len(text.encode()) for text in tokenizer.token_texts)
    return max_len * (longest + 1)


class Preparer:
    """Runs ``prepare`` for one model; build it with ``from_setup`` in a worker process."""

    def __init__(self, tokenizer: Tokenizer, setup: PrepareSetup) -> None:
        self.tokenizer, self.setup = tokenizer, setup

    @classmethod
    def from_setup(cls, setup: PrepareSetup) -> Preparer:
        from tokenizers import Tokenizer as HFTokenizer

        tokenizer = Tokenizer(
            HFTokenizer.from_str(setup.tokenizer_json),
            eos_token_ids=setup.eos_token_ids,
            chat_template=setup.chat_template,
            bos_token_id=setup.bos_token_id,
        )
        return cls(tokenizer, setup)

    def prepare(self, model: type, body: bytes) -> Prepared:
        """``body`` as a request of ``model`` (``CompletionRequest`` or
        ``ChatCompletionRequest``), checked through to its prompts' token ids; ``APIError``
        for anything wrong with it."""
        try:
            req = parse(model, body)
        except ValueError as e:  # json's bound on integer literals (4,300 digits)
            reason = str(e).split(";")[0]
            raise APIError.bad_request(f"the body is not valid JSON here: {reason}") from None
        self.check_model(req.model)
        setup = self.setup
        guard = None
        if isinstance(req, ChatCompletionRequest):
            limit = setup.max_prompt_bytes
            messages = req.chat_messages()
            verdict = None
            config = guard_config(req.agent_loop_guard, setup.agent_loop_guard)
            if config is not None:
                verdict = judge(messages, config)
                guard = None if verdict is None else report(verdict)
            if verdict is not None and verdict.level == "warn":
                messages.append(warning_message(verdict))
            try:
                text = self.tokenizer.apply_chat_template(
                    messages,
                    add_generation_prompt=req.add_generation_prompt,
                    max_chars=DEFAULT_MAX_TEMPLATE_CHARS if limit is None else limit,
                    tools=req.tools,
                )
            except ValueError as e:
                raise APIError.bad_request(e, "messages") from None
            prompts = [self.encode(text, "messages", add_special_tokens=False)]
            max_tokens = req.max_completion_tokens
            if max_tokens is None:
                max_tokens = req.max_tokens
            if max_tokens is None and setup.max_len is not None:
                max_tokens = max(setup.max_len - len(prompts[0]), 0)  # the rest, as vLLM does
            logprobs = req.requested_logprobs()
            param = "messages"
        else:
            prompts = [self.encode(p, "prompt") for p in req.prompts()]
            max_tokens = req.max_tokens if req.max_tokens is not None else DEFAULT_COMPLETION_TOKENS
            logprobs = req.logprobs
            param = "prompt"
        params = req.sampling_params(
            max_tokens, logprobs, setup.loop_policy, setup.loop_detection, setup.sampling_defaults
        )
        for ids in prompts:
            self.check_length(ids, params.max_tokens, param)
        return Prepared(req.model_copy(update={param: []}), params, prompts, guard)

    def check_model(self, model: str | None) -> None:
        if self.setup.adapters is None:
            return
        served = (self.setup.model_name, *self.setup.adapters)
        if model is not None and model not in served:
            raise model_not_found(model, served)

    def encode(self, prompt: str | list[int], param: str, add_special_tokens: bool = True):
        """A prompt's token ids; a text is measured in bytes before it is tokenized."""
        if not isinstance(prompt, str):
            return prompt
        try:
            size = len(prompt.encode())
        except UnicodeEncodeError:
            raise APIError.bad_request(
                f"{param} is not valid Unicode text (it holds a lone surrogate, such as "
                "\\ud800, that no UTF-8 text can)",
                param,
            ) from None
        limit = self.setup.max_prompt_bytes
        if limit is not None and size > limit:
            raise APIError.bad_request(
                f"{param} is {size} bytes of UTF-8 text; this server takes at most {limit} "
                f"(more than {self.setup.max_len} tokens, the model's context, could hold)",
                param,
            )
        return self.tokenizer.encode(prompt, add_special_tokens)

    def check_length(self, prompt_ids: list[int], max_tokens: int, param: str) -> None:
        limit = self.setup.max_len
        if limit is None:
            return
        total = len(prompt_ids) + max_tokens
        if total > limit:
            raise APIError.bad_request(
                f"this model's maximum context length is {limit} tokens, but {total} "
                f"were requested ({len(prompt_ids)} in the prompt, {max_tokens} for the "
                "completion); shorten the prompt or lower max_tokens",
                param,
            )

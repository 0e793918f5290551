"""The HTTP app: OpenAI's completions and chat endpoints, models, health and metrics, on the
engine's async front (``arlm.engine.AsyncEngine``).

A request goes: ready? (503 while loading or draining) -> key (401) -> body size (413) and
time (408) -> JSON and fields (400) -> model name (404) -> prompt bytes, tokens and context
length (400) -> queue room (429) -> the engine. Everything a client can get wrong ends in one of
those, never a 500. A client that disconnects, streaming or not, has its sequences aborted at
the next step.

The event loop runs no work a client's bytes can make long: the steps from JSON to token ids
(``arlm.serve.prepare``) run in a thread for small completion bodies, and in worker processes
with a time limit (``arlm.serve.workers``) for chat requests (the chat template is code) and
bodies of many JSON values (``OFFLOAD_COMMAS``), whose parsing would hold the GIL too long.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from arlm.engine.async_engine import AsyncEngine, EngineDead, QueueFull, RequestStream
from arlm.engine.outputs import Completion, RequestOutput
from arlm.engine.requests import InvalidRequest
from arlm.sampling.params import SamplingParams
from arlm.sampling.structured import StructuredOutputs
from arlm.serve import adapters as lora
from arlm.serve import responses as rs
from arlm.serve import tokenize as tok
from arlm.serve.config import ServeConfig
from arlm.serve.echo import echoed, vllm_prompt_logprobs
from arlm.serve.errors import APIError
from arlm.serve.metrics import ServerMetrics
from arlm.serve.prepare import (
    Prepared,
    Preparer,
    PrepareSetup,
    model_not_found,
    prompt_byte_limit,
)
from arlm.serve.protocol import ChatCompletionRequest, CompletionRequest, parse
from arlm.serve.tools import ToolParser, ToolReader, ToolStream, parser_for
from arlm.serve.workers import WorkerPool

log = logging.getLogger("arlm.serve")

# Parsing holds the GIL for a time that grows with the JSON values in a body, not its bytes (a
# 7 MB string parses in milliseconds, 200,000 small objects take seconds). A completion body
# with up to this many commas (a cheap count, at least its values less one) is prepared in a
# thread; more, and every chat request (the template is code), go to a worker process.
OFFLOAD_COMMAS = 10_000


class Server:
    """What the routes share: the settings, and once loaded the model, its async front and
    the metrics. ``draining`` turns new requests away (503) while running ones finish."""

    def __init__(self, config: ServeConfig, model_name: str) -> None:
        self.config = config
        self.model_name = config.served_model_name or model_name
        self.lm = None
        self.front: AsyncEngine | None = None
        self.metrics: ServerMetrics | None = None
        self.preparer: Preparer | None = None
        self.workers: WorkerPool | None = None
        if config.prepare_workers:
            self.workers = WorkerPool(config.prepare_workers, config.prepare_timeout)
        self.draining = False
        self.created = int(time.time())
        self.tool_parser: ToolParser | None = None

    def attach(self, lm, background: bool = True) -> None:
        """Serve ``lm`` (an ``arlm.LM``) from now on; the engine's step loop runs in a thread
        of its own, or (``background`` False) wherever the caller runs ``front.run()``."""
        if self.config.allow_runtime_lora_updates and lm.adapters is None:
            raise ValueError(
                "allow_runtime_lora_updates adds LoRA adapters beside the model, and this model "
                "has no LoRA slots; start with max_cpu_loras N or max_loras N "
                "(--max-cpu-loras, --max-loras)"
            )
        if self.model_name in self.adapters(lm):
            raise ValueError(
                f"a LoRA adapter is called {self.model_name!r}, the served model's own name; "
                "name it otherwise, or set served_model_name"
            )
        lm.engine.preallocate()
        front = AsyncEngine(lm.engine, self.config.max_queue, background=background)
        self.metrics = ServerMetrics(lambda: front.stats, lambda: front.num_waiting)
        front.on_output = self.metrics.observe
        tokenizer, config = lm.tokenizer, self.config
        max_prompt_bytes = config.max_prompt_bytes
        if max_prompt_bytes is None:
            max_prompt_bytes = prompt_byte_limit(tokenizer, lm.engine.max_len)
        setup = PrepareSetup(
            tokenizer_json=tokenizer.to_json(),
            eos_token_ids=tuple(tokenizer.eos_token_ids),
            bos_token_id=tokenizer.bos_token_id,
            chat_template=tokenizer.chat_template,
            model_name=self.model_name,
            max_len=lm.engine.max_len,
            max_prompt_bytes=max_prompt_bytes,
            loop_policy=config.loop_policy,
            loop_detection=config.loop_detection,
            sampling_defaults=dict(lm.sampling_defaults),
            agent_loop_guard=config.agent_loop_guard,
            # adapters that come and go are checked where requests reach the engine
            adapters=None if config.allow_runtime_lora_updates else self.adapters(lm),
        )
        self.preparer = Preparer(tokenizer, setup)
        self.tool_parser = parser_for(config.tool_call_parser, tokenizer.chat_template)
        if self.workers is not None:
            self.workers.setup = setup
        front.start()
        self.lm, self.front = lm, front
        if lm.sampling_defaults:
            log.info(
                "requests take the model's generation_config.json sampling defaults where they "
                "set none: %s",
                ", ".join(f"{k}={v}" for k, v in lm.sampling_defaults.items()),
            )
        # what is loaded by now (torch, the model, the app) lives as long as the process: out of
        # the cyclic collector's sight, a full collection pauses the event loop for
        # milliseconds instead of a few hundred
        gc.freeze()

    def close(self) -> None:
        """Stop the step loop and the worker processes."""
        if self.front is not None:
            self.front.stop()
        if self.workers is not None:
            self.workers.close()

    @property
    def ready(self) -> bool:
        """Whether ``/health`` says ok: the model serves, and the request workers ``arlm serve``
        started have imported arlm (until then they take CPU from the forward)."""
        loaded = self.front is not None and not self.draining and self.front.error is None
        return loaded and (self.workers is None or not self.workers.starting)

    @property
    def max_len(self) -> int | None:
        """The longest prompt + generation a sequence may reach (None: unbounded, windowed)."""
        return self.lm.engine.max_len

    def check_ready(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": "1"})
        if self.front is None:
            raise APIError(503, "the model is loading", headers={"Retry-After": "1"})
        if self.front.error is not None:
            raise APIError(503, f"the engine stopped: {self.front.error!r}")

    def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest takes as long whatever the first wrong byte: no timing hint
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), key.encode()):
            raise APIError(
                401,
                "missing or wrong API key; send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    async def prepare(self, model: type, body: bytes) -> Prepared:
        """``body`` checked through to token ids, off the event loop (see the module's doc)."""
        if self.workers is not None and (
            model is ChatCompletionRequest or body.count(b",") > OFFLOAD_COMMAS
        ):
            return await self.workers.prepare(model, body)
        return await asyncio.to_thread(self.preparer.prepare, model, body)

    async def check_constraints(self, req, params: SamplingParams) -> None:
        """Compile the answer's constraint and the tools' schemas now, off the event loop (each
        once: the compiler keeps them), so that a bad one is a 400 naming its field."""
        wanted = params.structured_outputs or _tools(req)
        grammars = self.lm.engine.chain.grammars if wanted else None
        if params.structured_outputs is not None:
            field = next(k for k, v in req.constraints().items() if v is not None)
            try:
                await asyncio.to_thread(grammars.compile, params.structured_outputs)
            except ValueError as e:
                raise APIError.bad_request(f"{field}: {e}", field) from None
        for i, tool in enumerate(_tools(req)):
            parameters = tool["function"].get("parameters", {"type": "object"})
            try:
                await asyncio.to_thread(grammars.compile, StructuredOutputs(json=parameters))
            except ValueError as e:
                where = f"tools.{i}.function.parameters"
                raise APIError.bad_request(f"tools[{i}].function.parameters: {e}", where) from None

    @staticmethod
    def adapters(lm) -> tuple[str, ...]:
        """The names of the LoRA adapters ``lm`` serves beside its base model now."""
        return () if lm.adapters is None else lm.adapters.names

    def served(self) -> tuple[str, ...]:
        """The model names requests may give now: the base's, then its LoRA adapters'."""
        return (self.model_name, *self.adapters(self.lm))

    def check_model(self, model: str | None) -> None:
        """404 for a model name this server does not serve now."""
        if model is not None and model not in self.served():
            raise model_not_found(model, self.served())

    def served_name(self, req) -> str:
        """The model a request runs on, as its answer names it: the LoRA adapter its ``model``
        names, else the base model."""
        return req.model if req.model in self.adapters(self.lm) else self.model_name

    def submit(
        self, prompts: list[list[int]], params: SamplingParams, req, prefix: str
    ) -> RequestStream:
        """Queue one request's prompts, on the adapter its model names (or the base)."""
        adapter = None if req.model in (None, self.model_name) else req.model
        try:
            return self.front.add_requests(
                [(ids, params, f"{prefix}-{i}") for i, ids in enumerate(prompts)], adapter
            )
        except QueueFull as e:
            raise APIError(429, str(e), headers={"Retry-After": "1"}) from None
        except EngineDead as e:
            raise APIError(503, str(e)) from None
        except InvalidRequest as e:  # the engine's admission checks name the field at fault
            if e.param == "model":  # an adapter unloaded since the request was prepared
                raise model_not_found(req.model, self.served()) from None
            raise APIError.bad_request(e, e.param) from None
        except ValueError as e:
            raise APIError.bad_request(e, "prompt") from None


def build_app(server: Server, lifespan=None) -> FastAPI:
    app = FastAPI(title="arlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return APIError(500, f"internal error: {e!r}").response()

    @app.get("/health")
    async def health() -> Response:
        if server.ready:
            return JSONResponse({"status": "ok"})
        if server.front is not None and server.front.error is not None:
            # the step loop died: the process is on its way out for a supervisor to restart
            state = {"status": "failed", "error": f"the engine stopped: {server.front.error!r}"}
        else:
            state = {"status": "draining" if server.draining else "loading"}
        return JSONResponse(state, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body = server.metrics.render() if server.metrics is not None else b""
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        server.authorize(request)
        card = {
            "id": server.model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "arlm",
        }
        if server.lm is not None and server.max_len is not None:
            card["max_model_len"] = server.max_len
        # each LoRA adapter is a model of its own to clients, its base named as vLLM does
        adapters = () if server.lm is None else server.adapters(server.lm)
        cards = [card] + [card | {"id": name, "parent": server.model_name} for name in adapters]
        return JSONResponse({"object": "list", "data": cards})

    if server.config.allow_runtime_lora_updates:

        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request) -> Response:
            body = await _checked_body(request, server)
            return await lora.load(server, parse(lora.LoadLoRAAdapterRequest, body))

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: Request) -> Response:
            body = await _checked_body(request, server)
            return await lora.unload(server, parse(lora.UnloadLoRAAdapterRequest, body))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await _checked_body(request, server)
        req = parse(tok.TokenizeRequest, body)
        server.check_model(req.model)
        if req.messages is not None:  # through the chat template, as a chat request renders
            chat = json.dumps(tok.chat_body(req)).encode()
            ids = (await server.prepare(ChatCompletionRequest, chat)).prompts[0]
        elif req.prompt is not None:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await asyncio.to_thread(server.preparer.encode, req.prompt, "prompt", add)
        else:
            raise APIError.bad_request("give prompt (a text) or messages (a chat)", "prompt")
        tokenizer = server.lm.tokenizer
        return JSONResponse(tok.tokenized(tokenizer, ids, server.max_len, req.return_token_strs))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        body = await _checked_body(request, server)
        req = parse(tok.DetokenizeRequest, body)
        server.check_model(req.model)
        vocab = server.lm.config.vocab_size
        text = await asyncio.to_thread(tok.detokenize, server.lm.tokenizer, req.tokens, vocab)
        return JSONResponse(text)

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> JSONResponse:
        server.check_ready()
        server.authorize(request)
        return JSONResponse(tok.tokenizer_info(server.lm.tokenizer, server.max_len))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        prepared = await _start(request, server, CompletionRequest)
        req, params, prompts = prepared.request, prepared.params, prepared.prompts
        await server.check_constraints(req, params)
        if req.best_of is not None and req.best_of != params.n:
            raise APIError.bad_request("best_of is not supported; use n", "best_of")
        if req.stream and params.prompt_logprobs is not None:
            raise APIError.bad_request(
                "prompt log-probabilities (echo with logprobs, prompt_logprobs) come with the "
                "whole answer only; ask without stream",
                "stream",
            )
        echo = [server.lm.tokenizer.decode(ids) if req.echo else "" for ids in prompts]
        stream = server.submit(prompts, params, req, f"cmpl-{uuid.uuid4().hex}")
        reply = _CompletionReply(server, req, params, stream, echo, prompts)
        if req.stream:
            return _event_stream(reply.events(), stream)
        return await _unless_disconnected(request, reply.whole(), stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        prepared = await _start(request, server, ChatCompletionRequest)
        req, params, prompts = prepared.request, prepared.params, prepared.prompts
        await server.check_constraints(req, params)
        guard = prepared.guard
        if guard is not None:
            server.metrics.agent_loop_guard.labels(level=guard["level"]).inc()
            if guard["level"] == "stop":  # answered without generating (arlm.serve.agent_guard)
                return _guard_stop(server, req, params, guard)
        mode = req.tool_mode()[0]
        tools = None if mode == "none" else ToolReader(mode, server.tool_parser, req.tool_choice)
        stream = server.submit(prompts, params, req, f"chatcmpl-{uuid.uuid4().hex}")
        reply = _ChatReply(server, req, params, stream, tools, guard)
        if req.stream:
            return _event_stream(reply.events(), stream)
        return await _unless_disconnected(request, reply.whole(), stream)

    return app


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    declared = request.headers.get("content-length")
    too_big = APIError(
        413,
        f"the request body is larger than this server's limit of {limit} bytes",
        code="request_too_large",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big

    async def read() -> bytes:
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_big
        return bytes(body)

    try:  # a client that trickles its body holds a connection, not the server
        return await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise APIError(
            408,
            f"the request body did not arrive within {timeout:g} s",
            code="request_timeout",
        ) from None


async def _checked_body(request: Request, server: Server) -> bytes:
    """The body of a request to a ready server with the right key, within the limits."""
    server.check_ready()
    server.authorize(request)
    config = server.config
    return await _read_body(request, config.max_request_bytes, config.body_timeout)


async def _start(request: Request, server: Server, model):
    """The checks every generation request passes: (request, params, prompt token ids)."""
    body = await _checked_body(request, server)
    return await server.prepare(model, body)


def _tools(req) -> list[dict]:
    return getattr(req, "tools", None) or []


def _guard_stop(server: Server, req, params: SamplingParams, guard: dict) -> Response:
    """The answer to a chat the agent loop guard stopped: nothing generated, finish_reason
    "loop", the guard's report in ``agent_loop_guard``."""
    created = int(time.time())
    chat_id = f"chatcmpl-{uuid.uuid4().hex}"
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": "loop",
        }
        for i in range(params.n)
    ]
    if req.stream:
        head = rs.envelope(chat_id, "chat.completion.chunk", server.served_name(req), created)

        async def events() -> AsyncIterator[str]:
            for c in choices:
                delta = {
                    "index": c["index"],
                    "delta": c["message"],
                    "logprobs": None,
                    "finish_reason": "loop",
                }
                yield rs.sse({**head, "choices": [delta], "agent_loop_guard": guard})
            yield rs.sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")
    body = rs.envelope(chat_id, "chat.completion", server.served_name(req), created)
    body |= {"choices": choices, "usage": rs.usage(0, 0), "agent_loop_guard": guard}
    return JSONResponse(body)


def _event_stream(events: AsyncIterator[str], stream: RequestStream) -> StreamingResponse:
    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        finally:  # the client left (the response is cancelled) or the stream ended
            stream.close()

    return StreamingResponse(guarded(), media_type="text/event-stream")


async def _unless_disconnected(
    request: Request, work: Awaitable[Response], stream: RequestStream
) -> Response:
    """``work``'s response, unless the client disconnects first: then its requests are
    aborted and nobody reads the answer."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
        stream.close()
    if task.done() and not task.cancelled():
        return task.result()
    # the client left: the work was cancelled, but a task is not done until it has run once
    # more (asking for its result before that was the InvalidStateError of issue 26)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _Reply:
    """One generation request's answer, whole or streamed; subclasses shape the choices."""

    kind = ""
    chunk_kind = ""

    def __init__(self, server: Server, req, params: SamplingParams, stream: RequestStream):
        self.server, self.req, self.params, self.stream = server, req, params, stream
        self.model = server.served_name(req)
        self.id = stream.request_ids[0].rsplit("-", 1)[0]
        self.created = int(time.time())
        self.prompt_of = {rid: i for i, rid in enumerate(stream.request_ids)}
        self.logprobs = rs.LogprobFormatter(server.lm.tokenizer)

    def choice_index(self, out: RequestOutput) -> int:
        return self.prompt_of[out.request_id] * self.params.n + out.index

    async def finished(self) -> list[Completion]:
        done: dict[int, Completion] = {}
        async for out in self.stream:
            if out.finished:
                done[self.choice_index(out)] = out.completion
        return [done[i] for i in sorted(done)]

    def usage(self, completions: list[Completion]) -> dict:
        n = self.params.n
        firsts = completions[::n]  # one per prompt: the samples share it
        return rs.usage(
            sum(c.usage.prompt_tokens for c in firsts),
            sum(c.usage.completion_tokens for c in completions),
            sum(c.usage.cached_prompt_tokens for c in firsts),
        )

    async def whole(self) -> Response:
        try:
            completions = await self.finished()
        except ValueError as e:
            raise APIError.bad_request(e, getattr(e, "param", "prompt")) from None
        except EngineDead as e:
            raise APIError(503, str(e)) from None
        for c in completions:
            if c.finish_reason == "error":
                raise APIError.bad_request(f"generation failed: {c.error}")
        body = rs.envelope(self.id, self.kind, self.model, self.created)
        try:
            body["choices"] = [self.choice(i, c) for i, c in enumerate(completions)]
        except ValueError as e:  # NaN log-probabilities (see responses)
            raise APIError.bad_request(f"generation failed: {e}") from None
        body["usage"] = self.usage(completions)
        return JSONResponse(body | self.extra())

    async def events(self) -> AsyncIterator[str]:
        head = rs.envelope(self.id, self.chunk_kind, self.model, self.created)
        completions: dict[int, Completion] = {}
        for event in self.opening():
            yield rs.sse({**head, "choices": [event]})
        try:
            async for out in self.stream:
                index = self.choice_index(out)
                if out.finished:
                    completions[index] = out.completion
                    if out.completion.finish_reason == "error":
                        error = APIError.bad_request(f"generation failed: {out.completion.error}")
                        yield rs.sse(error.body())
                        break
                for event in self.delta(index, out):
                    yield rs.sse({**head, "choices": [event], **self.extra()})
        except (ValueError, EngineDead) as e:
            status = 400 if isinstance(e, ValueError) else 503
            yield rs.sse(APIError(status, str(e)).body())
        else:
            options = self.req.stream_options
            if options is not None and options.include_usage and completions:
                done = [completions[i] for i in sorted(completions)]
                yield rs.sse({**head, "choices": [], "usage": self.usage(done)})
        yield rs.sse("[DONE]")

    def opening(self) -> list[dict]:
        return []

    def extra(self) -> dict:
        """Top-level fields every body and chunk carries besides OpenAI's."""
        return {}


class _CompletionReply(_Reply):
    kind = chunk_kind = "text_completion"

    def __init__(self, server, req, params, stream, echo: list[str], prompts) -> None:
        super().__init__(server, req, params, stream)
        self.echo, self.prompts = echo, prompts
        self.offsets: dict[int, int] = {}  # choice -> characters streamed so far

    def choice(self, index: int, c: Completion) -> dict:
        echo = self.echo[index // self.params.n]
        logprobs = None
        if c.logprobs is not None:
            logprobs = self.logprobs.completions(c.logprobs, len(echo))
            if self.req.echo:  # the prompt's own, from the prefill (arlm.serve.echo)
                prompt_ids = self.prompts[index // self.params.n]
                logprobs = echoed(self.logprobs, prompt_ids, c.prompt_logprobs, logprobs)
        choice = {
            "index": index,
            "text": echo + c.text,
            "logprobs": logprobs,
            "finish_reason": c.finish_reason,
            **rs.loop_fields(c),
        }
        if self.req.prompt_logprobs is not None:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(self.logprobs, c.prompt_logprobs)
        return choice

    def delta(self, index: int, out: RequestOutput) -> list[dict]:
        text = out.text
        if index not in self.offsets:
            text = self.echo[index // self.params.n] + text
            self.offsets[index] = len(text) - len(out.text)
        token_logprobs = rs.token_logprobs(out.chunks)
        if not text and not rs.has_tokens(out) and not out.finished:
            return []
        event = {"index": index, "text": text, "logprobs": None, "finish_reason": None}
        if self.params.logprobs is not None:
            event["logprobs"] = self.logprobs.completions(token_logprobs, self.offsets[index])
        self.offsets[index] += len(out.text)
        if out.finished:
            event["finish_reason"] = out.completion.finish_reason
            event.update(rs.loop_fields(out.chunks[-1]))
        return [event]


class _ChatReply(_Reply):
    kind, chunk_kind = "chat.completion", "chat.completion.chunk"

    def __init__(self, server, req, params, stream, tools: ToolReader | None, guard) -> None:
        super().__init__(server, req, params, stream)
        self.tools, self.guard = tools, guard
        self.tool_streams: dict[int, ToolStream] = {}

    def extra(self) -> dict:
        return {} if self.guard is None else {"agent_loop_guard": self.guard}

    def choice(self, index: int, c: Completion) -> dict:
        logprobs = self.logprobs.chat(c.logprobs) if c.logprobs is not None else None
        message, finish = {"role": "assistant", "content": c.text}, c.finish_reason
        if self.tools is not None:  # tool calls read out of the text (arlm.serve.tools)
            message, finish = self.tools.message(c.text, c.finish_reason)
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish,
            **rs.loop_fields(c),
        }

    def opening(self) -> list[dict]:
        return [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(self.params.n)
        ]

    def delta(self, index: int, out: RequestOutput) -> list[dict]:
        token_logprobs = rs.token_logprobs(out.chunks)
        text = out.text
        if not text and not rs.has_tokens(out) and not out.finished:
            return []
        finish = out.completion.finish_reason if out.finished else None
        deltas = [{"content": text} if text else {}]
        if self.tools is not None:  # content as far as it surely is, then the calls
            tool_stream = self.tool_streams.setdefault(index, self.tools.stream())
            deltas = tool_stream.push(text)
            if out.finished:
                last, called = tool_stream.finish()
                deltas += last
                finish = "tool_calls" if called and finish == "stop" else finish
            deltas = deltas or [{}]
        events = [
            {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
            for delta in deltas
        ]
        if self.params.logprobs is not None:
            events[0]["logprobs"] = self.logprobs.chat(token_logprobs)
        if out.finished:
            events[-1]["finish_reason"] = finish
            events[-1].update(rs.loop_fields(out.chunks[-1]))
        return events

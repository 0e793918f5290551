"""``arlm serve``'s process: uvicorn answering HTTP in a thread, the model loading and then the
engine's step loop in the main thread (``/health`` answers 503 until the model is ready), and
a graceful drain on SIGTERM.

Connections are bounded in time: ``header_timeout`` for a request's head (uvicorn has no such
limit, so a client sending a header byte a second held a connection forever), ``body_timeout``
for its body (a 408, see the app), ``keep_alive_timeout`` between requests. If the step loop
dies, ``/health`` says so (503, status "failed") and ``serve`` raises, so that the process exits
non-zero and a supervisor restarts it.

The step loop gets the main thread because the model's forward runs faster there on CPU (see
``AsyncEngine.run``); the event loop only moves requests and outputs. The drain: the first
SIGTERM (or Ctrl-C) turns new requests away with 503 while running ones finish; once none is
left, or ``drain_timeout`` seconds have passed (the rest are then aborted, finish_reason
"abort"), uvicorn closes, the step loop stops and the process exits 0. A second signal exits at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from arlm.serve.app import Server, build_app
from arlm.serve.config import ServeConfig

log = logging.getLogger("arlm.serve")


def serve(
    load: Callable[[], object],
    config: ServeConfig,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    access_log: bool = False,
) -> None:
    """Serve the model ``load()`` returns (an ``arlm.LM``) until a signal drains the server.
    Must run in the main thread (it handles SIGTERM and SIGINT)."""
    server = Server(config, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        drain = asyncio.create_task(_drain_when_asked(server, web))
        try:
            yield
        finally:
            drain.cancel()
            server.close()  # the main thread's step loop returns; the workers stop

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    web = uvicorn.Server(
        uvicorn_config(
            build_app(server, lifespan),
            config,
            host=host,
            port=port,
            log_level=log_level,
            access_log=access_log,
        )
    )

    def on_signal(sig: int, frame) -> None:
        if server.draining or server.front is None:  # a second signal, or still loading
            web.should_exit = True
            web.force_exit = server.draining
            return
        log.warning("%s: draining; new requests get 503", signal.Signals(sig).name)
        server.draining = True

    def run_http() -> None:
        with contextlib.suppress(SystemExit):  # how uvicorn ends a failed start; it logged why
            web.run()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    http = threading.Thread(target=run_http, name="arlm-http")
    http.start()
    try:
        while not web.started and http.is_alive():
            time.sleep(0.01)
        if not web.started:  # uvicorn logged why (an address in use, say)
            raise OSError(f"cannot serve on {host}:{port}; see the error above")
        started = time.perf_counter()
        if server.workers is not None:
            server.workers.start()  # they import arlm while the model loads
        lm = load()
        if web.should_exit:
            return  # a signal came while the model loaded
        server.attach(lm, background=False)
        engine = lm.engine
        log.info(
            "serving %r: %d sequences at once, %d positions per step, max length %s; loaded in "
            "%.1f s",
            server.model_name,
            engine.scheduler.max_num_seqs,
            engine.scheduler.max_num_batched_tokens,
            engine.max_len,
            time.perf_counter() - started,
        )
        server.front.run()
        if server.front.error is not None:
            raise RuntimeError("the engine's step loop failed") from server.front.error
    finally:
        web.should_exit = True
        http.join()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def uvicorn_config(app, config: ServeConfig, **kwargs) -> uvicorn.Config:
    """uvicorn's settings for ``app``: the h11 protocol with ``config``'s header deadline,
    its keep-alive timeout, a 5 s graceful shutdown; ``kwargs`` go to ``uvicorn.Config``."""
    return uvicorn.Config(
        app,
        http=_with_header_deadline(config.header_timeout),
        timeout_keep_alive=config.keep_alive_timeout,
        timeout_graceful_shutdown=5,
        **kwargs,
    )


def _with_header_deadline(seconds: float) -> type[H11Protocol]:
    class HeaderDeadline(H11Protocol):
        """uvicorn's h11 protocol, closing a connection whose next request head has not fully
        arrived ``seconds`` after the connection opened or the previous response ended."""

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._deadline = self.loop.call_later(seconds, self._head_overdue)

        def on_response_complete(self) -> None:
            self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, self._head_overdue)
            super().on_response_complete()

        def connection_lost(self, exc) -> None:
            self._deadline.cancel()
            super().connection_lost(exc)

        def _head_overdue(self) -> None:
            # a request being served had its head in time; any other state is a late head
            if self.cycle is not None and not self.cycle.response_complete:
                return
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


async def _drain_when_asked(server: Server, web: uvicorn.Server) -> None:
    while not server.draining:
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + server.config.drain_timeout
    front = server.front
    while front.num_unfinished and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if front.num_unfinished:
        log.warning("drain timeout: aborting %d requests", front.num_unfinished)
        front.abort_all()
        for _ in range(100):  # their final chunks go out, finish_reason "abort"
            if not front.num_unfinished:
                break
            await asyncio.sleep(0.02)
    web.should_exit = True

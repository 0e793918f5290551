"""``arlm serve``'s process: uvicorn answering HTTP in a thread, the model loading and then the
engine's step loop in the main thread (``/health`` answers 503 until the model is ready), and
a graceful drain on SIGTERM.

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
            if server.front is not None:
                server.front.stop()  # the main thread's step loop returns

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    web = uvicorn.Server(
        uvicorn.Config(
            build_app(server, lifespan),
            host=host,
            port=port,
            log_level=log_level,
            access_log=access_log,
            timeout_graceful_shutdown=5,
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

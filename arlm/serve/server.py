"""``arlm serve``'s process: uvicorn on the app, the model loading in the background (``/health``
answers 503 until it is ready), and a graceful drain on SIGTERM.

The drain: the first SIGTERM (or Ctrl-C) turns new requests away with 503 while running ones
finish; once none is left, or ``drain_timeout`` seconds have passed (the rest are then aborted,
finish_reason "abort"), uvicorn closes and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

import uvicorn

from arlm.serve.app import Server, build_app
from arlm.serve.config import ServeConfig

log = logging.getLogger("arlm.serve")


class _DrainingServer(uvicorn.Server):
    """uvicorn, whose first exit signal starts a drain instead of closing the listener."""

    def __init__(self, config: uvicorn.Config, server: Server) -> None:
        super().__init__(config)
        self.server = server

    def handle_exit(self, sig: int, frame) -> None:
        # not uvicorn's handler: it would re-raise the signal after shutdown (exit code 143)
        if self.server.draining or self.server.front is None:
            self.should_exit = True
            self.force_exit = self.force_exit or self.server.draining and sig == signal.SIGINT
            return
        log.warning("%s: draining; new requests get 503", signal.Signals(sig).name)
        self.server.draining = True


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
    Raises what ``load`` raised, after the server has closed."""
    server = Server(config, model_name)
    failure: list[BaseException] = []

    @asynccontextmanager
    async def lifespan(app):
        tasks = [asyncio.create_task(_load(server, load, failure, uv))]
        tasks.append(asyncio.create_task(_drain_when_asked(server, uv)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if server.front is not None:
                server.front.stop()

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    uv = _DrainingServer(
        uvicorn.Config(
            build_app(server, lifespan),
            host=host,
            port=port,
            log_level=log_level,
            access_log=access_log,
            timeout_graceful_shutdown=5,
        ),
        server,
    )
    uv.run()
    if failure:
        raise failure[0]


async def _load(server: Server, load, failure: list, uv: uvicorn.Server) -> None:
    started = time.perf_counter()
    try:
        lm = await asyncio.to_thread(load)
    except Exception as e:  # reported by serve() after uvicorn has closed
        failure.append(e)
        uv.should_exit = True
        return
    server.attach(lm)
    engine = lm.engine
    log.info(
        "serving %r: %d sequences at once, %d positions per step, max length %s; loaded in %.1f s",
        server.model_name,
        engine.scheduler.max_num_seqs,
        engine.scheduler.max_num_batched_tokens,
        engine.max_len,
        time.perf_counter() - started,
    )


async def _drain_when_asked(server: Server, uv: uvicorn.Server) -> None:
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
    uv.should_exit = True

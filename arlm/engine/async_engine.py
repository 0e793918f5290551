"""The asynchronous front: the engine's step loop in a background thread, one async stream per
request, for the server.

The loop thread owns the engine: requests and aborts reach it through a queue and take effect
between steps, and each step's outputs go back to the event loop that asked, one
``asyncio.Queue`` per request. A consumer that stops reading (a client that went away) aborts
its request, so its slot is freed at the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator

from arlm.engine.engine import Engine
from arlm.engine.outputs import RequestOutput
from arlm.sampling.params import SamplingParams


class AsyncEngine:
    """``generate`` streams one request's outputs; ``start`` / ``stop`` run the step loop."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()  # ("add", ...) / ("abort", id) commands
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # what ended the loop, if it failed

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="arlm-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The outputs of one request as its steps produce them, the last with
        ``finished``; with ``n`` > 1, until every sample has finished. Prompt errors raise
        here, before anything is queued."""
        self.start()
        prompt_ids = self.engine.check_prompt(prompt)
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        self._inbox.put(("add", prompt_ids, params, request_id))
        self._wake.set()
        finished = 0
        try:
            while finished < params.n:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished += item.finished
                yield item
        finally:
            if finished < params.n:  # the consumer left early: free the request's slots
                self._inbox.put(("abort", request_id))
                self._wake.set()
            self._streams.pop(request_id, None)

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._drain_inbox()
                if not engine.has_unfinished():
                    self._wake.wait(timeout=0.1)
                    self._wake.clear()
                    continue
                for out in engine.step():
                    self._deliver(out.request_id, out)
        except BaseException as e:  # the loop is dead: every waiting stream must hear it
            self.error = e
            for request_id in list(self._streams):
                self._deliver(request_id, e)

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "abort":
                self.engine.abort(command[1])
                continue
            _, prompt_ids, params, request_id = command
            try:
                self.engine.add_request(prompt_ids, params, request_id)
            except ValueError as e:
                self._deliver(request_id, e)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, outputs = stream
            loop.call_soon_threadsafe(outputs.put_nowait, item)

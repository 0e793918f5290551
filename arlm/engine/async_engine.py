"""The asynchronous front: the engine's step loop in a background thread, async streams of
outputs, for the server.

The loop thread owns the engine: requests, aborts and other changes (``call``) reach it through
a queue and take effect between steps, and each step's outputs go back to the event loop that
asked, one ``asyncio.Queue`` per ``RequestStream`` (one request, or several added together).
Adding is synchronous, so a caller can check room for several requests and queue them with no
other coroutine running in between (the server's admission control). A stream closed before its
requests finished aborts them, so their slots are freed at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from arlm.engine.engine import Engine, InvalidRequest
from arlm.engine.outputs import RequestOutput
from arlm.sampling.params import SamplingParams

log = logging.getLogger("arlm.engine")
T = TypeVar("T")


class QueueFull(Exception):
    """No room in the waiting queue (``max_queue`` sequences); try again later."""

    def __init__(self, waiting: int, max_queue: int) -> None:
        super().__init__(
            f"the server is busy: {waiting} sequences are waiting for a slot and it queues at "
            f"most {max_queue}; retry later"
        )
        self.waiting, self.max_queue = waiting, max_queue


class EngineDead(RuntimeError):
    """The step loop stopped on an error; no request can run any more."""


class RequestStream:
    """The outputs of one or more requests added together, as their steps produce them, until
    every sample of each has finished (``finished`` outputs). ``close()`` before the end aborts
    the requests still running."""

    def __init__(self, front: AsyncEngine, request_ids: list[str], num_seqs: int) -> None:
        self.front, self.request_ids, self.num_seqs = front, request_ids, num_seqs
        self.outputs: asyncio.Queue = asyncio.Queue()
        self.num_finished = 0
        self.closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.num_finished >= self.num_seqs:
            self.close()
            raise StopAsyncIteration
        item = await self.outputs.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        self.num_finished += item.finished
        return item

    def close(self) -> None:
        """Stop listening; requests that have not finished are aborted at the next step."""
        if not self.closed:
            self.closed = True
            self.front.release(self.request_ids, aborted=self.num_finished < self.num_seqs)


class AsyncEngine:
    """``add_request`` queues one request and returns its ``RequestStream``; ``start`` /
    ``stop`` run the step loop.

    ``max_queue``: the most sequences that may wait for a slot; a request that would go past it
    raises ``QueueFull`` (None: no limit; see ``check_room``). ``on_output``: called in the
    loop thread with every output of every step, aborted ones included (for metrics).
    ``stats`` is the engine's ``stats()`` after the latest step, safe to read from any thread.
    ``background``: ``start`` runs the loop in a thread of its own; when False, the owner
    calls ``run`` in a thread of its choosing.
    """

    def __init__(
        self,
        engine: Engine,
        max_queue: int | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
        background: bool = True,
    ) -> None:
        self.engine, self.max_queue, self.on_output = engine, max_queue, on_output
        self.background = background
        self._inbox: queue.Queue = queue.Queue()  # ("add", ...) / ("abort", id) commands
        self._queued = 0  # sequences in the inbox, not yet handed to the engine
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, RequestStream]] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = engine.stats()
        self.error: BaseException | None = None  # what ended the loop, if it failed

    def start(self) -> None:
        """Run the step loop in a background thread, unless it runs (``background`` False) in
        a thread of the owner's through ``run``."""
        if self.background and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="arlm-engine", daemon=True)
            self._thread.start()

    def run(self) -> None:
        """Run the step loop in the calling thread until ``stop``. On CPU the thread matters:
        the model's forward ran 20-25% slower in a thread started later than in the process's
        main thread here (oneDNN and OpenMP under torch 2.13), so ``arlm serve`` steps the
        engine in the main thread and answers HTTP in another."""
        self._run()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def num_unfinished(self) -> int:
        """Requests with a stream still open."""
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Sequences queued and not yet given a slot."""
        return self._queued + len(self.engine.scheduler.waiting)

    def check_room(self, num_seqs: int) -> None:
        """Raise ``QueueFull`` if ``num_seqs`` more sequences would leave more than
        ``max_queue`` waiting once the free slots are taken (``max_queue`` 0: admit only
        what can run at once), and ``InvalidRequest`` if they would even with every slot free
        and nothing waiting: waiting cannot help those."""
        if self.max_queue is None:
            return
        scheduler = self.engine.scheduler
        most = scheduler.max_num_seqs + self.max_queue
        if num_seqs > most:
            raise InvalidRequest(
                f"the request needs {num_seqs} sequences (n times the prompts); this server "
                f"runs {scheduler.max_num_seqs} at once and queues {self.max_queue}, so it "
                f"takes at most {most} in one request",
                "n",
            )
        free = scheduler.max_num_seqs - len(scheduler.running)
        waiting = self.num_waiting
        if waiting + num_seqs - free > self.max_queue:
            raise QueueFull(max(waiting - free, 0), self.max_queue)

    def add_requests(
        self,
        requests: list[tuple[str | list[int], SamplingParams, str]],
        adapter: str | None = None,
    ) -> RequestStream:
        """Queue (prompt, params, request id) triples, all or none, run with the LoRA adapter
        called ``adapter`` (None: the base model); one stream of their outputs. Must be called
        from a running event loop. Raises ``ValueError`` for a prompt, parameters or adapter
        the engine cannot run, an id in use, or more sequences than could ever fit
        (``InvalidRequest``, with the field at fault), ``QueueFull`` when the waiting queue has
        no room for them all now, ``EngineDead`` when the loop has stopped on an error."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error!r}")
        self.engine.check_adapter(adapter)
        checked = []
        for prompt, params, request_id in requests:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            prompt_ids = self.engine.check_prompt(prompt)
            self.engine.check_params(params, len(prompt_ids))
            checked.append((prompt_ids, params, request_id))
        num_seqs = sum(params.n for _, params, _ in requests)
        self.check_room(num_seqs)
        self.start()
        stream = RequestStream(self, [rid for _, _, rid in requests], num_seqs)
        loop = asyncio.get_running_loop()
        with self._lock:
            self._queued += num_seqs
        for prompt_ids, params, request_id in checked:
            self._streams[request_id] = (loop, stream)
            self._inbox.put(("add", prompt_ids, params, request_id, adapter))
        self._wake.set()
        return stream

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> RequestStream:
        """``add_requests`` of one request."""
        return self.add_requests([(prompt, params, request_id)])

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """The outputs of one request (``add_request`` and its stream in one); leaving the loop
        early aborts the request."""
        stream = self.add_request(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def call(self, fn: Callable[[], T]) -> T:
        """``fn()`` run in the loop thread between steps, where the engine's state may change
        (a LoRA adapter loaded into a slot, or unloaded); its result here, or its exception
        raised here."""
        if self.error is not None:
            raise EngineDead(f"the engine stopped: {self.error!r}")
        future = asyncio.get_running_loop().create_future()
        self.start()
        self._inbox.put(("call", fn, future))
        self._wake.set()
        return await future

    def abort_all(self) -> None:
        """Abort every request still streaming (at the next step)."""
        for request_id in list(self._streams):
            self._inbox.put(("abort", request_id))
        self._wake.set()

    def release(self, request_ids: list[str], aborted: bool) -> None:
        """Forget the streams of ``request_ids``, aborting the requests when ``aborted``."""
        for request_id in request_ids:
            self._streams.pop(request_id, None)
            if aborted:  # a finished one has nothing left to abort: the engine skips it
                self._inbox.put(("abort", request_id))
        self._wake.set()

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._drain_inbox()
                if not engine.has_unfinished():
                    self.stats = engine.stats()
                    self._wake.wait(timeout=0.1)
                    self._wake.clear()
                    continue
                outputs = engine.step()
                self.stats = engine.stats()
                if self.on_output is not None:
                    for out in outputs:
                        self.on_output(out)
                self._deliver([(out.request_id, out) for out in outputs])
        except BaseException as e:  # the loop is dead: every waiting stream must hear it
            self.error = e
            dead = EngineDead(f"the engine stopped: {e!r}")
            self._deliver([(request_id, dead) for request_id in list(self._streams)])

    def _drain_inbox(self) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command[0] == "abort":
                self.engine.abort(command[1])
                continue
            if command[0] == "call":
                _, fn, future = command
                try:
                    outcome = (fn(), None)
                except Exception as e:  # the caller's to handle, not the loop's
                    outcome = (None, e)
                future.get_loop().call_soon_threadsafe(_settle, future, *outcome)
                continue
            _, prompt_ids, params, request_id, adapter = command
            try:
                self.engine.add_request(prompt_ids, params, request_id, adapter)
            except ValueError as e:
                self._deliver([(request_id, e)])
            except Exception as e:  # that request fails, not the loop
                log.exception("request %s could not be added", request_id)
                self._deliver([(request_id, ValueError(f"the request failed: {e!r}"))])
            finally:
                with self._lock:
                    self._queued -= params.n

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand each item to its request's stream: one wake-up of each event loop per step,
        not one per sequence, so the loop thread and the event loop contend less."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            entry = self._streams.get(request_id)
            if entry is not None:
                loop, stream = entry
                by_loop.setdefault(loop, []).append((stream.outputs, item))
        for loop, batch in by_loop.items():
            loop.call_soon_threadsafe(_put_all, batch)


def _settle(future: asyncio.Future, result: object, error: Exception | None) -> None:
    if future.cancelled():  # the caller left
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for outputs, item in batch:
        outputs.put_nowait(item)

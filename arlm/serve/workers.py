"""Worker processes that prepare requests (``arlm.serve.prepare``: parse, chat template,
tokenize) away from the server process, each job within a time limit; a worker that runs over
is killed and replaced.

Why processes, not threads: a thread cannot be stopped, and this work holds the GIL in long
stretches with no chance to switch (``json.loads``, pydantic's validation): a 6.8 MB chat body
of 200,000 messages held it for seconds, which stalls the event loop as surely as running on
it. A worker imports arlm once (torch with it, some 250 MB), then takes jobs through a pipe.
Its address space is capped at what it uses once started plus ``MEMORY_HEADROOM``, so a
template that doubles a string in a loop gets a ``MemoryError`` rather than the machine's
memory.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import traceback

from arlm.serve.errors import APIError
from arlm.serve.prepare import Prepared, Preparer, PrepareSetup
from arlm.serve.protocol import ChatCompletionRequest

log = logging.getLogger("arlm.serve")

MEMORY_HEADROOM = 2**30  # bytes of address space a worker may add to what it started with
START_TIMEOUT = 300.0  # seconds a new worker may take to import arlm before its first job


class WorkerFailed(Exception):
    """A worker ran out of time or died; it has been killed."""


class _Worker:
    """One process and the parent's end of its pipe. ``started`` is set once the process has
    imported arlm and says so (or has died trying): a thread waits for that message, so that
    nothing else reads the pipe before it."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")  # fork would copy the model and torch
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_work, args=(child,), name="arlm-prepare", daemon=True
        )
        self.process.start()
        child.close()
        self.configured = False
        self.started = threading.Event()
        threading.Thread(target=self._await_start, name="arlm-prepare-start", daemon=True).start()

    def _await_start(self) -> None:
        try:
            if self.conn.poll(START_TIMEOUT):
                self.conn.recv()
        except (EOFError, OSError):  # died, or killed: ``run`` finds out
            pass
        self.started.set()

    def run(self, setup: PrepareSetup, job: tuple, timeout: float) -> tuple:
        """``job``'s reply; ``WorkerFailed`` when it takes longer than ``timeout`` seconds once
        the worker has it, or the worker dies (the pool then kills and replaces it). The first
        job of a worker sends ``setup`` ahead of it."""
        try:
            self.started.wait()  # set within START_TIMEOUT, whether it imported arlm or not
            if not self.configured:
                self.conn.send(setup)
                self.configured = True
            self.conn.send(job)
            # the worker acknowledges the job first: the time limit starts there, not while a
            # new worker still reads its setup
            if not self.conn.poll(START_TIMEOUT):
                raise WorkerFailed(f"the worker did not start within {START_TIMEOUT:.0f} s")
            self.conn.recv()
            if not self.conn.poll(timeout):
                raise WorkerFailed(f"it took longer than {timeout:g} s")
            return self.conn.recv()
        except (EOFError, OSError) as e:
            raise WorkerFailed(f"the worker died ({e!r})") from None

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class WorkerPool:
    """``size`` worker processes preparing requests, each job within ``timeout`` seconds.
    Workers start on first use, or at ``start`` (``arlm serve`` starts them while the model
    loads, and says it is ready once they have: ``starting``); ``setup`` must be set before the
    first ``prepare``, which waits for an idle one."""

    def __init__(self, size: int, timeout: float) -> None:
        self.size, self.timeout = size, timeout
        self.setup: PrepareSetup | None = None
        self._workers: list[_Worker] = []
        self._first: list[_Worker] = []  # those ``start`` started
        self._idle: asyncio.Queue | None = None  # made in the event loop that uses the pool
        self._closed = False

    def start(self) -> None:
        """Start the workers now (each imports arlm in the background): ``starting`` until
        they have."""
        self._spawn()
        self._first = list(self._workers)

    def _spawn(self) -> None:
        while len(self._workers) < self.size:
            self._workers.append(_Worker())

    @property
    def starting(self) -> bool:
        """Whether a worker ``start`` started is still importing arlm: on a machine of few
        cores that takes seconds of CPU from the model's forward (workers started on first use
        or as replacements do not count)."""
        return not all(w.started.is_set() for w in self._first)

    async def prepare(self, model: type, body: bytes) -> Prepared:
        """``Preparer.prepare(model, body)`` in a worker; ``APIError`` as it raises, or a 400
        when the job ran out of time."""
        if self._idle is None:
            self._spawn()
            self._idle = asyncio.Queue()
            for worker in self._workers:
                self._idle.put_nowait(worker)
        worker = await self._idle.get()
        try:
            reply = await asyncio.to_thread(worker.run, self.setup, (model, body), self.timeout)
        except BaseException as e:
            # out of time, dead, or the caller cancelled while the worker may still be busy:
            # the worker is not reused either way
            self._replace(worker)
            if isinstance(e, WorkerFailed):
                log.warning("a request's preparation was stopped: %s", e)
                raise APIError.bad_request(
                    f"preparing this request (reading it, the chat template, tokenizing) was "
                    f"stopped: {e}",
                    "messages" if model is ChatCompletionRequest else "prompt",
                ) from None
            raise
        self._idle.put_nowait(worker)
        if reply[0] == "error":
            _, status, message, param, code, headers = reply
            raise APIError(status, message, param=param, code=code, headers=headers)
        if reply[0] == "crash":
            raise RuntimeError(f"preparing the request failed in a worker:\n{reply[1]}")
        return reply[1]

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` and put a new one in its place, in a thread: both take a while on a
        busy machine, and the event loop must not wait for them."""
        loop = asyncio.get_running_loop()

        def adopt(new: _Worker) -> None:
            if self._closed:
                new.kill()
                return
            self._workers[self._workers.index(worker)] = new
            self._idle.put_nowait(new)

        def replace() -> None:
            worker.kill()
            loop.call_soon_threadsafe(adopt, _Worker())

        threading.Thread(target=replace, name="arlm-prepare-replace", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        for worker in self._workers:
            worker.kill()
        self._workers.clear()


def _work(conn) -> None:
    """A worker's life: take its setup, cap memory, answer jobs until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
    os.environ["RAYON_NUM_THREADS"] = "1"  # one tokenizer thread: a small, known footprint
    conn.send("imported")  # arlm is imported: this function's module came with it
    try:
        preparer = Preparer.from_setup(conn.recv())
    except EOFError:
        return
    preparer.tokenizer.encode("warm up")
    _cap_memory(MEMORY_HEADROOM)
    while True:
        try:
            model, body = conn.recv()
        except EOFError:
            return
        conn.send("started")
        try:
            reply = ("ok", preparer.prepare(model, body))
        except APIError as e:
            reply = ("error", e.status, e.message, e.param, e.code, e.headers)
        except MemoryError:
            reply = (
                "error",
                400,
                "preparing this request needed more memory than a worker may use "
                f"({MEMORY_HEADROOM // 2**20} MiB more than at its start)",
                None,
                None,
                None,
            )
        except Exception:
            reply = ("crash", traceback.format_exc())
        conn.send(reply)


def _cap_memory(headroom: int) -> None:
    """Cap this process's address space at its current size plus ``headroom`` (Linux)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[0])
    except (ImportError, OSError):
        return
    size = pages * os.sysconf("SC_PAGE_SIZE")
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))

"""A live ``arlm serve`` app on the loopback for tests: uvicorn in a thread, on a socket bound to
a free port."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import httpx
import uvicorn

from arlm.serve.app import Server, build_app
from arlm.serve.config import ServeConfig


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    """Until ``url/health`` answers 200; fails if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, "the server did not start"
        time.sleep(0.05)


class LiveServer:
    """``with LiveServer(lm, ServeConfig(...)) as s:`` serves ``lm`` at ``s.url``."""

    def __init__(self, lm, config: ServeConfig | None = None, name: str = "tiny") -> None:
        self.server = Server(config or ServeConfig(), name)
        if lm is not None:
            self.server.attach(lm)
        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_app(self.server), log_level="warning", lifespan="off")
        self.uv = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)
        if self.server.front is not None:
            self.server.front.stop()
        self.sock.close()

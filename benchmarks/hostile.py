"""A hostile client against ``arlm serve`` (issue 26): the latency of a light request and the
server's memory while each class of hostile request runs, beside a quiet server.

The server: ``python -m arlm serve`` on a tiny random-weight model exported as a Hugging Face
folder whose chat template spins in nested loops or builds a 200M-character string on demand
(the hostile template of ``tests/test_hostile.py``), with 2 preparation workers and a 2 s
time limit, and one OpenMP thread (on a shared 2-core machine the tiny model's steps took
seconds with spinning OpenMP threads, with and without this change). A light client sends one
short greedy completion after another (4 prompt tokens, 4 new ones) for ``--seconds`` per
class while a hostile client sends the class's requests back to back. Printed per class: the
light request's p50 and p99 latency and the server's peak RSS (its own, and its worker
processes'), with ratios to the quiet run, and what the hostile requests got back. A class
that stops the server is reported and the server restarted.

Run: ``python benchmarks/hostile.py`` (about 3 minutes on 2 cores, most of it starting
servers).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from arlm.config import ModelConfig
from arlm.formats.hf import export_hf
from arlm.model import Transformer
from arlm.tokenizer import Tokenizer
from arlm.train.corpus import builtin_documents

# the template of tests/test_hostile.py: "spin" loops 10^10 times, "big" builds 200M characters
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.content == 'spin' %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}{% endif %}"
    "{% if m.content == 'big' %}{{ 'x' * 200000000 }}{% endif %}"
    "{% if m.tool_calls %}{% for call in m.tool_calls %}{{ call.function.name }}{% endfor %}"
    "{% endif %}"
    "{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
LIGHT = {"prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"


def chat(content, **fields) -> dict:
    return {"messages": [{"role": "user", "content": content, **fields}], "max_tokens": 2}


def request_classes() -> dict[str, list[tuple[str, bytes]]]:
    """Class -> the (path, body) requests a hostile thread cycles through."""
    big_chat = json.dumps({"messages": [{"role": "user", "content": "hi"}] * 200_000}).encode()
    as_json = {
        "template spins": [(CHAT, chat("spin"))],
        "template builds 200M chars": [(CHAT, chat("big"))],
        "7 MB text prompt": [(CMPL, {"prompt": "x" * 7_000_000, "max_tokens": 1})],
        "5xx inputs (surrogates, tool_calls, digits)": [
            (CMPL, {"prompt": "a\ud800", "max_tokens": 1}),
            (CHAT, chat("\ud800")),
            (CHAT, {**chat("hi"), "messages": [{"role": "assistant", "tool_calls": 5}]}),
            (CMPL, b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}"),
        ],
        "engine crashers (issue 26 table)": [
            (CMPL, {"prompt": "hi", "max_tokens": 4, "stop_token_ids": [99999], "min_tokens": 1}),
            (
                CMPL,
                {
                    "prompt": [5, 6] * 8,
                    "max_tokens": 4,
                    "dry_multiplier": 1,
                    "dry_base": 1e300,
                    "dry_allowed_length": 1,
                },
            ),
        ],
    }
    out = {
        name: [(path, body if isinstance(body, bytes) else _dumps(body)) for path, body in requests]
        for name, requests in as_json.items()
    }
    out["7 MB chat body, 200k messages"] = [(CHAT, big_chat)]
    return out


def _dumps(body: dict) -> bytes:
    return json.dumps(body).encode("utf-8", "surrogatepass")


def build_model(folder: Path) -> None:
    tokenizer = Tokenizer.train(builtin_documents(), vocab_size=512)
    tokenizer.chat_template = TEMPLATE
    config = ModelConfig.preset("tiny", vocab_size=512)
    export_hf(Transformer(config).eval(), tokenizer, folder)


class Served:
    """``arlm serve`` in a process of its own."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "arlm", "serve", str(folder), "--port", str(self.port)]
        command += ["--log-level", "error", "--prepare-workers", "2", "--prepare-timeout", "2"]
        self.process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("arlm serve did not start")
            time.sleep(0.1)
        # the workers import arlm before their first job: not inside a measured run
        for _ in range(2):
            httpx.post(self.url + CHAT, json=chat("warm"), timeout=300)

    def alive(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def rss_mib(pid: int) -> tuple[float, float]:
    """(the process's RSS, its children's RSS) in MiB."""

    def rss(p: int) -> float:
        try:
            with open(f"/proc/{p}/status") as f:
                line = next(line for line in f if line.startswith("VmRSS"))
            return int(line.split()[1]) / 1024
        except (OSError, StopIteration):
            return 0.0

    children = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == pid:
                children += rss(int(entry))
    return rss(pid), children


def measure(served: Served, seconds: float, hostile: list[tuple[str, bytes]] | None) -> dict:
    stop = threading.Event()
    statuses: collections.Counter = collections.Counter()

    def attack() -> None:
        with httpx.Client(base_url=served.url, timeout=120) as http:
            i = 0
            while not stop.is_set():
                path, body = hostile[i % len(hostile)]
                i += 1
                try:
                    r = http.post(path, content=body, headers={"content-type": "application/json"})
                    statuses[r.status_code] += 1
                except httpx.HTTPError as e:
                    statuses[type(e).__name__] += 1

    def sample_memory(peaks: list[float]) -> None:
        while not stop.is_set():
            main, workers = rss_mib(served.process.pid)
            peaks[0], peaks[1] = max(peaks[0], main), max(peaks[1], workers)
            time.sleep(0.1)

    peaks = [0.0, 0.0]
    threads = [threading.Thread(target=sample_memory, args=(peaks,))]
    if hostile is not None:
        threads.append(threading.Thread(target=attack))
    for t in threads:
        t.start()
    latencies, failed = [], 0
    with httpx.Client(base_url=served.url, timeout=30) as http:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                ok = http.post(CMPL, json=LIGHT).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                failed += 1
                time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join()
    latencies.sort()

    def pct(q: float) -> float:
        if not latencies:
            return 0.0
        return latencies[min(int(q * len(latencies)), len(latencies) - 1)] * 1000

    return {
        "n": len(latencies),
        "failed": failed,
        "p50": pct(0.5),
        "p99": pct(0.99),
        "rss": peaks[0],
        "workers": peaks[1],
        "statuses": dict(statuses),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per class (default: 8)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hostile-tiny"
        build_model(folder)
        served = Served(folder)
        try:
            rows = [("quiet", measure(served, args.seconds, None))]
            for name, requests in request_classes().items():
                result = measure(served, args.seconds, requests)
                if not served.alive():
                    result["died"] = True
                    served.stop()
                    served = Served(folder)
                rows.append((name, result))
        finally:
            served.stop()
    print_table(rows)


def print_table(rows: list[tuple[str, dict]]) -> None:
    quiet = rows[0][1]
    ratio: Callable[[float, float], str] = lambda a, b: f"{a / b:.2f}x" if b else "-"
    print(
        f"{'class':44} {'light req':>9} {'p50 ms':>7} {'p99 ms':>7} {'p99/quiet':>9} "
        f"{'RSS MiB':>8} {'/quiet':>6} {'workers':>8}  hostile requests got"
    )
    for name, r in rows:
        got = ", ".join(f"{k} x{v}" for k, v in sorted(r["statuses"].items(), key=str)) or "-"
        if r.get("died"):
            got += "; THE SERVER STOPPED (restarted)"
        if r["failed"]:
            got += f"; {r['failed']} light requests failed"
        print(
            f"{name:44} {r['n']:9d} {r['p50']:7.1f} {r['p99']:7.1f} "
            f"{ratio(r['p99'], quiet['p99']):>9} {r['rss']:8.0f} "
            f"{ratio(r['rss'], quiet['rss']):>6} {r['workers']:8.0f}  {got}"
        )


if __name__ == "__main__":
    main()

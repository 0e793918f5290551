"""A hostile client against a live ``arlm serve`` app (issue 26).

Each class of request that took the server down or stalled it, plus seeded variants of every
field (numbers at 0, negative, huge, tiny and as the string "NaN"; lists empty and huge; ids
out of range), is sent to a live server on a tiny model. After each: a plain request gets a 200
within a second, ``/metrics`` shows no KV blocks in use and the block manager has every slot
free, and the step loop is alive. ``/health`` answers within 100 ms while a chat template spins
in a worker and while a 6.8 MB chat body is parsed. The counts are printed (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from tokenizers import Tokenizer as HFTokenizer

from arlm.api import LM
from arlm.engine import EngineConfig
from arlm.serve.app import build_app
from arlm.serve.config import ServeConfig
from arlm.serve.protocol import ChatCompletionRequest, CompletionRequest
from arlm.serve.server import uvicorn_config
from arlm.tokenizer import Tokenizer
from tests.conftest import make_model
from tests.serving import LiveServer

VOCAB = 512  # the test tokenizer's and model's
PLAIN = {"prompt": [5, 6], "max_tokens": 1, "temperature": 0}

# A chat template that does what a hostile model folder's could, on demand: spin in nested
# loops ("spin"), build a 200M-character string ("big"), and walk tool_calls as real templates
# do (so a tool_calls of the wrong type meets a loop).
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


class HostileServer(LiveServer):
    """``LiveServer`` with ``arlm serve``'s uvicorn settings (header deadline, keep-alive)."""

    def __init__(self, lm, config: ServeConfig) -> None:
        super().__init__(lm, config)
        app = build_app(self.server)
        self.uv = uvicorn.Server(uvicorn_config(app, config, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> HostileServer:
        super().__enter__()
        self.http = httpx.Client(base_url=self.url, timeout=30)  # one client: a new one per
        return self  # request costs more than most cases (its TLS context)

    def __exit__(self, *exc) -> None:
        self.http.close()
        super().__exit__(*exc)
        self.server.close()


def hostile_lm(tokenizer: Tokenizer, model=None) -> LM:
    chat = Tokenizer(
        HFTokenizer.from_str(tokenizer.to_json()),
        eos_token_ids=tokenizer.eos_token_ids,
        chat_template=TEMPLATE,
    )
    model = model if model is not None else make_model(vocab_size=VOCAB)
    return LM(model, chat, engine_config=EngineConfig(kv_cache_memory_gib=0.05))


CONFIG = dict(
    prepare_workers=1,
    prepare_timeout=3.0,
    header_timeout=0.5,
    body_timeout=0.5,
    max_queue=64,
)


@pytest.fixture(scope="module")
def live(tokenizer):
    with HostileServer(hostile_lm(tokenizer), ServeConfig(**CONFIG)) as s:
        # the worker imports arlm before its first job (seconds): not inside a timed case
        warm = {"messages": [{"role": "user", "content": "warm"}], "max_tokens": 1}
        assert post(s, "/v1/chat/completions", warm, timeout=300).status_code == 200
        yield s


def check_still_serving(live: HostileServer) -> None:
    """A plain request gets a 200 within a second; nothing running, no block in use, every
    slot free; the step loop alive."""
    started = time.perf_counter()
    r = live.http.post("/v1/completions", json=PLAIN, timeout=5)
    elapsed = time.perf_counter() - started
    assert r.status_code == 200, r.text[:300]
    assert elapsed < 1.0, f"a plain request took {elapsed:.2f} s"
    engine = live.server.lm.engine
    deadline = time.monotonic() + 2
    while True:
        metrics = live.http.get("/metrics").text
        gauges = {
            name: float(re.search(rf"^arlm:{name} (\S+)$", metrics, re.M).group(1))
            for name in ("kv_cache_blocks_in_use", "num_requests_running", "num_requests_waiting")
        }
        free = engine.block_manager.num_used_blocks == 0
        if not any(gauges.values()) and free:
            break
        assert time.monotonic() < deadline, f"leaked: {gauges}, all blocks free: {free}"
        time.sleep(0.02)
    assert live.server.front.error is None and live.thread.is_alive()


def post(live, path: str, body: dict | bytes, timeout: float = 30) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")
    return live.http.post(
        path,
        content=content,
        headers={"content-type": "application/json"},
        timeout=timeout,
    )


def health_latencies_while(url: str, action) -> tuple[object, list[float]]:
    """``action()``'s result and the latencies of ``url/health`` polled while it ran."""
    result = {}

    def run():
        result["value"] = action()

    thread = threading.Thread(target=run)
    latencies = []
    with httpx.Client(timeout=10) as http:
        http.get(url + "/health")  # the connection is open before the clock starts
        thread.start()
        while thread.is_alive():
            started = time.perf_counter()
            assert http.get(url + "/health").status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    thread.join()
    return result["value"], sorted(latencies)


def check_responsive(latencies: list[float]) -> None:
    """/health within 100 ms in nine polls of ten, and none over a second. The slowest polls
    are the machine's, not the server's: on 2 shared cores (load 16-18) a poll now and then
    waited up to 0.3 s for a CPU while the server process used 3-5 ms of it. The event loop
    held by the work, as before, shows as polls of seconds."""
    assert len(latencies) > 10
    assert latencies[int(0.9 * len(latencies))] < 0.1, latencies[-10:]
    assert latencies[-1] < 1.0, latencies[-10:]


def test_health_answers_while_a_template_spins_and_a_large_body_is_parsed(live):
    chat = "/v1/chat/completions"
    started = time.perf_counter()
    spin = {"messages": [{"role": "user", "content": "spin"}], "max_tokens": 1}
    r, latencies = health_latencies_while(live.url, lambda: post(live, chat, spin))
    took = time.perf_counter() - started
    assert r.status_code == 400 and "longer than 3 s" in r.json()["error"]["message"]
    assert took < 3.0 + 2.0  # the time limit, then the worker is killed
    check_responsive(latencies)
    spin = latencies

    messages = [{"role": "user", "content": "hi"}] * 200_000
    body = json.dumps({"messages": messages, "max_tokens": 1}).encode()
    assert len(body) > 6_000_000
    r, latencies = health_latencies_while(live.url, lambda: post(live, chat, body))
    # refused: more messages than a chat may have (the limit on chat messages), or without
    # that limit, its rendering writes more than a prompt may hold or, on a busy machine,
    # parsing it runs past the worker's time limit
    assert r.status_code == 400, r.text
    assert re.search("at most 2048|characters|longer than 3 s", r.json()["error"]["message"])
    check_responsive(latencies)
    for what, polls in (
        ("a template spins", spin),
        (f"a {len(body) / 1e6:.1f} MB body", latencies),
    ):
        p90 = polls[int(0.9 * len(polls))]
        print(
            f"\n/health while {what}: {len(polls)} polls, median {polls[len(polls) // 2] * 1e3:.0f}"
            f" ms, p90 {p90 * 1e3:.0f} ms, max {polls[-1] * 1e3:.0f} ms",
            end="",
        )
    print()
    check_still_serving(live)


def test_a_slow_client_is_cut_off(live):
    # a head that never ends: the connection is closed at the header deadline
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        sock.settimeout(5)
        started = time.perf_counter()
        while sock.recv(1024):
            pass
        assert time.perf_counter() - started < 2.0
    # a body that never ends: 408 at the body deadline
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 100\r\n\r\n{"
        )
        sock.settimeout(5)
        assert sock.recv(1024).startswith(b"HTTP/1.1 408")
    check_still_serving(live)


def test_a_non_streaming_client_that_leaves_gets_499(live):
    """The ASGI app itself, driven directly: the disconnect arrives while the request runs;
    the response is a 499 (no InvalidStateError) and its sequence is aborted."""
    app = build_app(live.server)
    body = json.dumps({"prompt": [5, 6], "max_tokens": 100, "ignore_eos": True}).encode()
    sent = []

    async def drive():
        given = asyncio.Event()

        async def receive():
            if not given.is_set():
                given.set()
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(0.02)  # 100 tokens take longer than this, even here alone
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "path": "/v1/completions",
            "raw_path": b"/v1/completions",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", live.port),
            "scheme": "http",
            "root_path": "",
        }
        await app(scope, receive, send)

    asyncio.run(drive())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    check_still_serving(live)


def classes(vocab: int) -> tuple[dict, dict]:
    """The issue's requests by class, (path, body) each: those the server's front answers
    (the event loop, 5xx), and those that reach the engine (crashes, stalls, wrong answers)."""
    cmpl, chat = "/v1/completions", "/v1/chat/completions"
    loop_prompt = [5, 6] * 8

    def msg(**fields) -> dict:
        return {"messages": [{"role": "assistant", "content": "hi", **fields}], "max_tokens": 2}

    engine = {
        "step loop crashers": [
            (cmpl, {"prompt": "hi", "max_tokens": 4, "stop_token_ids": [99999], "min_tokens": 1}),
            (
                cmpl,
                {
                    "prompt": loop_prompt,
                    "max_tokens": 4,
                    "dry_multiplier": 1,
                    "dry_base": 1e300,
                    "dry_allowed_length": 1,
                },
            ),
            (
                cmpl,
                {"prompt": "hi", "repetition_detection": {"max_pattern_size": 4611686018427387904}},
            ),
            (
                cmpl,
                {
                    "prompt": loop_prompt,
                    "max_tokens": 24,
                    "temperature": 0,
                    "loop_policy": "break",
                    "repetition_detection": {"min_count": 2, "min_span": 4},
                    "dry_multiplier": 1e308,
                },
            ),
        ],
        "step loop stalls": [
            (
                cmpl,
                {
                    "prompt": "hi",
                    "max_tokens": 2,
                    "dry_multiplier": 1,
                    "dry_sequence_breakers": [f"b{i}" for i in range(20_000)],
                },
            ),
            (cmpl, {"prompt": "hi", "max_tokens": 2, "stop": ["s" * 1000] * 1000}),
            (cmpl, {"prompt": ["hi"] * 20, "max_tokens": 2, "n": 128}),
        ],
    }
    server = {
        "event loop": [
            (chat, {"messages": [{"role": "user", "content": "big"}], "max_tokens": 1}),
            (cmpl, {"prompt": "x" * 7_000_000, "max_tokens": 1}),
        ],
        "5xx for client input": [
            (cmpl, b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}"),
            (cmpl, b'{"prompt": "hi", "seed": 1' + b"0" * 4400 + b"}"),
            (cmpl, {"prompt": "a\ud800b", "max_tokens": 1}),
            (cmpl, {"prompt": ["ok", "\udfff"], "max_tokens": 1}),
            (chat, {"messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 1}),
            (chat, msg(tool_calls=5)),
            (chat, msg(tool_calls=[{"function": 5}])),
            (chat, msg(tool_calls="abc")),
            (chat, msg(tool_calls=[5])),
            (chat, {"messages": [{"role": "user", "content": "hi", "name": "\ud800"}]}),
            (cmpl, {"prompt": "hi", "model": "\ud800"}),
        ],
        "wrong answers": [
            (cmpl, {"prompt": "hi", "max_tokens": 2, "temperature": 1e-40}),
            (cmpl, {"prompt": "hi", "max_tokens": 2, "n": 100}),
            (cmpl, {"prompt": "hi", "max_tokens": 2, "logit_bias": {str(vocab + 7): 5}}),
        ],
    }
    return server, engine


NUMBERS = {  # field -> int or float
    name: "int" if "int" in str(field.annotation) else "float"
    for model in (CompletionRequest, ChatCompletionRequest)
    for name, field in model.model_fields.items()
    if re.fullmatch(r"(int|float) \| None", str(field.annotation))
}
LISTS = ("stop", "stop_token_ids", "dry_sequence_breakers", "logit_bias", "prompt")


def variants(vocab: int, rng: random.Random) -> dict[str, list[tuple[str, dict]]]:
    """Every numeric field at 0, negative, huge, tiny and "NaN"; every list field empty and
    huge; every id field out of range; then seeded mixes of three of those."""
    cmpl, chat = "/v1/completions", "/v1/chat/completions"
    base = {"prompt": "hi", "max_tokens": 3}
    out: dict[str, list[tuple[str, dict]]] = collections.defaultdict(list)
    for name, kind in sorted(NUMBERS.items()):
        path = (
            chat
            if name
            in ChatCompletionRequest.model_fields.keys() - set(CompletionRequest.model_fields)
            else cmpl
        )
        huge = 10**30 if kind == "int" else 1e308
        tiny = 1 if kind == "int" else 5e-324
        for value in (0, -1, huge, tiny, "NaN"):
            body = (
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
                if path == chat
                else dict(base)
            )
            body[name] = value
            out["numbers"].append((path, body))
    many = 10_000
    lists = {
        "stop": [f"s{i}" for i in range(many)],
        "stop_token_ids": list(range(3, 3 + many)),
        "dry_sequence_breakers": [f"b{i}" for i in range(many)],
        "logit_bias": {str(i % vocab): 1.0 for i in range(many)},
        "prompt": [5] * many,
    }
    for name in LISTS:
        for value in ({} if name == "logit_bias" else [], lists[name]):
            out["lists"].append((cmpl, {**base, name: value}))
    out["lists"].append((chat, {"messages": []}))
    out["lists"].append((chat, {"messages": [{"role": "user", "content": "x"}] * many}))
    ids = [
        {"prompt": [vocab]},
        {"prompt": [-1]},
        {"prompt": [2**63]},
        {"prompt": [[5], [vocab + 1]]},
        {"stop_token_ids": [vocab]},
        {"stop_token_ids": [-1]},
        {"stop_token_ids": [2**63]},
        {"logit_bias": {str(vocab): 1}},
        {"logit_bias": {"-1": 1}},
        {"logit_bias": {"x": 1}},
        {"logit_bias": {str(2**70): 1}},
        {"logprobs": vocab + 1},
        {"logprobs": 10**9},
        {"n": 10**9},
    ]
    for fields in ids:
        out["ids"].append((cmpl, {**base, **fields}))
    out["ids"].append(
        (
            chat,
            {
                "messages": [{"role": "user", "content": "hi"}],
                "logprobs": True,
                "top_logprobs": vocab + 1,
            },
        )
    )
    mutations = [b for _, b in out["numbers"] + out["ids"] if "messages" not in b]
    for _ in range(20):
        body = dict(base)
        for other in rng.sample(mutations, 3):
            body.update(other)
        out["mixed"].append((cmpl, body))
    return out


def run_cases(live, cases: dict[str, list], revive) -> tuple[collections.Counter, list[str]]:
    """Send each case and check the server after it; (counts by class and status, failures).
    A case that kills the step loop is a failure, and ``revive()`` gives the server a new
    engine (as a supervisor would restart the process) so that the rest still run."""
    counts: collections.Counter = collections.Counter()
    failures = []
    for name, group in cases.items():
        for path, body in group:
            shown = (body if isinstance(body, bytes) else json.dumps(body))[:120]
            started = time.perf_counter()
            try:
                r = post(live, path, body, timeout=20)
                assert r.status_code < 500, f"{r.status_code}: {r.text[:200]}"
                if r.status_code != 200:
                    assert r.json()["error"]["message"]
                check_still_serving(live)
            except (AssertionError, httpx.HTTPError) as e:
                failures.append(f"[{name}] {shown!r}: {type(e).__name__} {str(e)[:300]}")
                counts[name, "failed"] += 1
                if live.server.front.error is not None:
                    failures[-1] += " (the step loop died)"
                    revive()
                continue
            counts[name, r.status_code] += 1
            took = time.perf_counter() - started
            if took > 1:
                print(f"slow: {took:.1f} s [{name}] {shown[:70]!r}")
    return counts, failures


def report(counts: collections.Counter) -> str:
    by_class = collections.defaultdict(dict)
    for (name, status), count in sorted(counts.items(), key=str):
        by_class[name][status] = count
    lines = [
        f"  {name:24} {sum(found.values()):4} cases: "
        + ", ".join(f"{status} x{n}" for status, n in found.items())
        for name, found in by_class.items()
    ]
    return "\n".join(lines)


def test_every_class_of_the_issue_and_seeded_variants_leave_the_server_serving(live, tokenizer):
    server, engine = classes(VOCAB)
    cases = {**server, **variants(VOCAB, random.Random(0)), **engine}
    started = time.perf_counter()
    counts, failures = run_cases(live, cases, lambda: live.server.attach(hostile_lm(tokenizer)))
    total = sum(counts.values())
    print(f"\nhostile requests: {total} in {time.perf_counter() - started:.1f} s")
    print(report(counts))
    assert not failures, "\n".join(failures)
    assert total == sum(len(group) for group in cases.values())


def test_nan_weights_fail_their_request_not_the_server(tokenizer):
    model = make_model(vocab_size=VOCAB)
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")  # one logit NaN, so its log-softmax is too
    with HostileServer(hostile_lm(tokenizer, model), ServeConfig(prepare_workers=0)) as live:
        body = {"prompt": [5, 6], "max_tokens": 3, "logprobs": 2}
        r = post(live, "/v1/completions", body)
        assert r.status_code == 400 and "NaN" in r.json()["error"]["message"]
        with httpx.stream(
            "POST", live.url + "/v1/completions", json={**body, "stream": True}
        ) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line[6:]) for line in lines[:-1]]  # strict JSON: no bare NaN
        assert "NaN" in events[-1]["error"]["message"]
        assert post(live, "/v1/completions", PLAIN).status_code == 200
        assert live.server.front.error is None


def test_health_says_failed_once_the_step_loop_dies(tokenizer):
    lm = hostile_lm(tokenizer)

    def broken_step():
        raise RuntimeError("device lost")

    lm.engine.step = broken_step
    with HostileServer(lm, ServeConfig(prepare_workers=0)) as live:
        r = post(live, "/v1/completions", PLAIN)
        assert r.status_code == 503 and "device lost" in r.json()["error"]["message"]
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "device lost" in health.json()["error"]


SERVE_AND_FAIL = """
import sys
from arlm.serve.config import ServeConfig
from arlm.serve.server import serve
from tests.test_hostile import hostile_lm
from arlm.tokenizer import Tokenizer

def load():
    lm = hostile_lm(Tokenizer.from_file(sys.argv[2]))
    def broken_step():
        raise RuntimeError("device lost")
    lm.engine.step = broken_step
    return lm

serve(load, ServeConfig(prepare_workers=0), "tiny", port=int(sys.argv[1]), log_level="warning")
"""


def test_the_process_exits_non_zero_once_the_step_loop_dies(tokenizer, tmp_path):
    from tests.serving import free_socket, wait_healthy

    tokenizer.save(tmp_path / "tokenizer.json")
    with free_socket() as sock:
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_AND_FAIL, str(port), str(tmp_path / "tokenizer.json")],
        cwd=Path(__file__).parents[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process, 120)
        r = httpx.post(url + "/v1/completions", json=PLAIN, timeout=30)
        assert r.status_code == 503
        assert process.wait(60) != 0
        assert b"the engine's step loop failed" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()

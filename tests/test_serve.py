"""``arlm serve`` on the loopback, through the official ``openai`` client and raw HTTP: the
endpoints and their shapes, streaming, errors as the client's own exceptions, concurrency,
disconnects, loop handling, metrics, a fuzz of malformed bodies, and the drain on SIGTERM."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from arlm.api import LM
from arlm.engine import EngineConfig
from arlm.formats.checkpoint import save_model
from arlm.serve.config import ServeConfig
from tests.conftest import make_model
from tests.serving import LiveServer, free_socket, wait_healthy

GREEDY = {"temperature": 0}
LOOP = {"loop_policy": "stop", "repetition_detection": {"min_count": 3, "min_span": 6}}


@pytest.fixture(scope="module")
def model():
    return make_model()


def new_lm(model, tokenizer, **engine):
    engine.setdefault("kv_cache_memory_gib", 0.25)
    return LM(model, tokenizer, engine_config=EngineConfig(**engine))


@pytest.fixture(scope="module")
def live(model, tokenizer):
    with LiveServer(new_lm(model, tokenizer), ServeConfig(max_request_bytes=200_000)) as s:
        yield s


@pytest.fixture(scope="module")
def reference(model, tokenizer):
    """The same model with an engine of its own, to compare the server against."""
    return new_lm(model, tokenizer)


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)


def test_completion_streamed_text_joins_to_the_whole_text(client, reference):
    whole = client.completions.create(model="tiny", prompt="The for", max_tokens=24, **GREEDY)
    expected = reference.generate("The for", max_tokens=24, **GREEDY)
    assert whole.choices[0].text == expected.text
    assert whole.choices[0].finish_reason == expected.finish_reason == "length"
    assert whole.usage.completion_tokens == 24
    assert whole.usage.prompt_tokens == len(reference.tokenizer.encode("The for"))
    pieces = client.completions.create(
        model="tiny", prompt="The for", max_tokens=24, stream=True, **GREEDY
    )
    chunks = list(pieces)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_prompt_as_token_ids_and_lists_of_prompts(client, reference):
    batch = client.completions.create(
        model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=6, n=2, **GREEDY
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    expected = reference.generate([[5, 6, 7], [8, 9]], max_tokens=6, **GREEDY)
    assert [c.text for c in batch.choices] == [expected[0].text] * 2 + [expected[1].text] * 2
    assert batch.usage.prompt_tokens == 5 and batch.usage.completion_tokens == 24
    texts = client.completions.create(model="tiny", prompt=["The", "A"], max_tokens=4, **GREEDY)
    assert len(texts.choices) == 2


def test_chat_streams_role_then_content_then_finish_reason(client, reference, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **GREEDY)
    prompt = tokenizer.apply_chat_template(messages)
    expected = reference.generate(tokenizer.encode(prompt, False), max_tokens=12, **GREEDY)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected.text
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected.text
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_max_tokens_default_to_the_rest_of_the_context(client, tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_completion_tokens=5, **GREEDY
    )
    assert reply.usage.completion_tokens == 5
    rest = client.chat.completions.create(
        model="tiny", messages=messages, extra_body={"ignore_eos": True}, **GREEDY
    )
    prompt_len = len(tokenizer.encode(tokenizer.apply_chat_template(messages), False))
    assert rest.usage.prompt_tokens == prompt_len
    assert rest.usage.completion_tokens == 128 - prompt_len  # the tiny model's context
    assert rest.choices[0].finish_reason == "length"


def test_seed_makes_samples_repeatable_and_n_gives_different_samples(client):
    def sample():
        r = client.completions.create(
            model="tiny", prompt="The", max_tokens=16, n=3, temperature=1.0, seed=11
        )
        return [c.text for c in r.choices]

    first = sample()
    assert sample() == first
    assert len(set(first)) > 1  # sample i draws with seed + i


def test_logprobs_in_both_shapes(client, reference):
    expected = reference.generate("The for", max_tokens=5, logprobs=3, **GREEDY)
    r = client.completions.create(
        model="tiny", prompt="The for", max_tokens=5, logprobs=3, **GREEDY
    )
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([t.logprob for t in expected.logprobs])
    assert len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        **GREEDY,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_stop_string_ends_the_text_before_it(client, reference):
    text = reference.generate("The for", max_tokens=30, **GREEDY).text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    r = client.completions.create(
        model="tiny", prompt="The for", max_tokens=30, stop=[stop], **GREEDY
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]


def test_echo_puts_the_prompt_before_the_text(client, reference):
    r = client.completions.create(model="tiny", prompt="The for", max_tokens=4, echo=True, **GREEDY)
    assert (
        r.choices[0].text == "The for" + reference.generate("The for", max_tokens=4, **GREEDY).text
    )


def test_errors_arrive_as_the_clients_exceptions(client, model, tokenizer):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match=r"maximum context length is 128.*131"):
        client.completions.create(model="tiny", prompt=[1] * 125, max_tokens=6)
    with pytest.raises(openai.BadRequestError, match="unknown field 'temprature'"):
        client.completions.create(model="tiny", prompt="x", extra_body={"temprature": 1})
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "bot", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="'gpt-9'"):
        client.completions.create(model="gpt-9", prompt="x")

    with LiveServer(new_lm(model, tokenizer), ServeConfig(api_key="s3cret")) as locked:
        wrong = openai.OpenAI(base_url=locked.url + "/v1", api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model="tiny", prompt="x")
        right = openai.OpenAI(base_url=locked.url + "/v1", api_key="s3cret", max_retries=0)
        assert right.completions.create(model="tiny", prompt="x", max_tokens=2).choices
        assert httpx.get(locked.url + "/health").status_code == 200  # health needs no key


def test_a_full_queue_answers_429_with_retry_after(model, tokenizer):
    lm = new_lm(model, tokenizer, max_num_seqs=1)
    with LiveServer(lm, ServeConfig(max_queue=0)) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0)
        busy = c.completions.create(
            model="tiny", prompt="x", max_tokens=100, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(busy))  # it holds the only slot now
        started = time.perf_counter()
        with pytest.raises(openai.RateLimitError) as refused:
            c.completions.create(model="tiny", prompt="y", max_tokens=2)
        assert time.perf_counter() - started < 1.0
        assert refused.value.response.headers["retry-after"] == "1"
        busy.close()


def test_sixteen_concurrent_greedy_streams_each_equal_the_request_alone(live, reference):
    prompts = [[random.Random(i).randrange(1, 500) for _ in range(3 + i)] for i in range(16)]
    alone = [reference.generate(p, max_tokens=40, **GREEDY).text for p in prompts]
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)

    def stream(prompt):
        chunks = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=40, stream=True, **GREEDY
        )
        return "".join(c.choices[0].text for c in chunks)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(stream, prompts))
    assert together == alone


def metric(url: str, name: str, labels: str = "") -> float:
    """The sum of ``arlm:name`` over its series (those with ``labels`` when given)."""
    text = httpx.get(url + "/metrics").text
    pattern = rf"^arlm:{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$"
    return sum(float(v) for found, v in re.findall(pattern, text, re.M) if labels in found)


def wait_idle(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if metric(url, "num_requests_running") == 0 and metric(url, "kv_cache_blocks_in_use") == 0:
            return
        time.sleep(0.05)


def test_clients_that_disconnect_free_their_sequences(live):
    aborted = metric(live.url, "request_success_total", 'finished_reason="abort"')

    def leave_mid_stream(i):
        body = {"prompt": [i + 1, 2, 3], "max_tokens": 100, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", live.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    return  # one token, then gone

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        list(pool.map(leave_mid_stream, range(50)))
    # a client that gives up on a whole (not streamed) answer of 16 x 120 tokens
    body = json.dumps({"prompt": [4, 5], "max_tokens": 120, "n": 16, "ignore_eos": True})
    with socket.create_connection(("127.0.0.1", live.port)) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        time.sleep(0.05)
    wait_idle(live.url)
    assert metric(live.url, "num_requests_running") == 0
    assert metric(live.url, "num_requests_waiting") == 0
    assert metric(live.url, "kv_cache_blocks_in_use") == 0
    assert live.server.front.num_unfinished == 0
    now = metric(live.url, "request_success_total", 'finished_reason="abort"')
    assert now == aborted + 50 + 16


def test_loop_policy_and_repetition_detection_through_the_api(live, reference, model, tokenizer):
    body = {"prompt": "The for", "max_tokens": 100, **GREEDY, **LOOP}
    r = httpx.post(live.url + "/v1/completions", json=body).json()
    expected = reference.generate("The for", max_tokens=100, **GREEDY, **LOOP)
    choice = r["choices"][0]
    assert expected.finish_reason == choice["finish_reason"] == "repetition"
    assert choice["text"] == expected.text
    assert choice["loop"]["pattern_size"] == expected.loop.pattern_size
    report = dict(body, loop_policy="report")
    choice = httpx.post(live.url + "/v1/completions", json=report).json()["choices"][0]
    assert choice["finish_reason"] == "length" and "loop" not in choice
    assert choice["loop_reports"][0]["start"] == expected.loop.start
    broken = dict(body, loop_policy="break")
    choice = httpx.post(live.url + "/v1/completions", json=broken).json()["choices"][0]
    assert choice["loops_broken"] >= 1
    # the operator's default stops every client's loops
    defaults = ServeConfig(
        loop_policy="stop", repetition_detection='{"min_count": 3, "min_span": 6}'
    )
    with LiveServer(new_lm(model, tokenizer), defaults) as s:
        r = httpx.post(
            s.url + "/v1/completions", json={"prompt": "The for", "max_tokens": 100, **GREEDY}
        ).json()
        assert r["choices"][0]["finish_reason"] == "repetition"
        assert metric(s.url, "loops_detected_total") == 1
    with pytest.raises(ValueError, match="repetition-detection"):
        ServeConfig(repetition_detection='{"min_count": 1}')


def test_near_loops_and_the_break_hold_through_the_api(live, reference):
    near = {"window": 24, "ngram": 3, "min_overlap": 0.5}
    body = {"prompt": "The for", "max_tokens": 100, **GREEDY, "loop_policy": "stop"}
    body["near_repetition_detection"] = near
    choice = httpx.post(live.url + "/v1/completions", json=body).json()["choices"][0]
    kw = dict(max_tokens=100, **GREEDY, near_repetition_detection=near)
    expected = reference.generate("The for", loop_policy="stop", **kw)
    assert expected.finish_reason == choice["finish_reason"] == "repetition"
    assert choice["text"] == expected.text
    held = dict(body, loop_policy="break", loop_break_hold=5, max_loop_breaks=2)
    choice = httpx.post(live.url + "/v1/completions", json=held).json()["choices"][0]
    expected = reference.generate(
        "The for", loop_policy="break", loop_break_hold=5, max_loop_breaks=2, **kw
    )
    assert choice["text"] == expected.text
    assert choice["loops_broken"] == expected.loops_broken >= 1
    for bad, field in (
        (dict(body, near_repetition_detection={"window": 3, "ngram": 3}), "window=3"),
        (dict(body, near_repetition_detection={"overlap": 0.5}), "overlap"),
        (dict(body, loop_break_hold=-1), "loop_break_hold=-1"),
    ):
        r = httpx.post(live.url + "/v1/completions", json=bad)
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


def test_health_and_requests_are_503_until_the_model_is_loaded():
    with LiveServer(None) as s:
        assert httpx.get(s.url + "/health").status_code == 503
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]


def test_health_is_ok_once_the_request_workers_serve_started_have_imported_arlm(model, tokenizer):
    """``arlm serve`` starts its request workers while the model loads; each imports arlm (and
    torch), seconds of CPU that a small machine's forward would otherwise share with them, so
    /health says ok only once they have. Requests are served meanwhile."""
    with LiveServer(None, ServeConfig(prepare_workers=1)) as s:
        s.server.workers.start()
        assert s.server.workers.starting  # a fresh interpreter importing torch: not this soon
        s.server.attach(new_lm(model, tokenizer))
        assert httpx.get(s.url + "/health").status_code == 503
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 120
        while httpx.get(s.url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the worker did not start within 120 s"
            time.sleep(0.05)
        assert not s.server.workers.starting
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(s.url + "/v1/chat/completions", json=chat, timeout=60).status_code == 200
        s.server.workers.close()


def test_metrics_use_vllms_names_under_arlm(live, client):
    client.completions.create(model="tiny", prompt="x", max_tokens=3)
    text = httpx.get(live.url + "/metrics").text
    for name in (
        "time_to_first_token_seconds_bucket",
        "time_per_output_token_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "request_queue_time_seconds_bucket",
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
        'request_success_total{finished_reason="length"}',
        "num_preemptions_total",
        "prefix_cache_hits_total",
        "prefix_cache_queries_total",
        "loops_detected_total",
        "loops_broken_total",
    ):
        assert "arlm:" + name in text, name
    assert metric(live.url, "generation_tokens_total") >= 3


JUNK = [
    None,
    True,
    -1,
    0,
    3,
    10**30,
    -(10**30),
    1e308,
    0.5,
    "",
    "x" * 50_000,
    "\ud800",
    [],
    {},
    [[[[]]]],
    {"a": {"b": [1, {"c": None}]}},
    [1, "a"],
    ["x"] * 3,
    [-5],
    [10**9],
    "NaN",
]
FIELDS = [
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "echo",
    "stream",
    "stream_options",
    "logit_bias",
    "model",
    "presence_penalty",
    "min_p",
    "repetition_detection",
    "near_repetition_detection",
    "loop_policy",
    "loop_break_hold",
    "dry_sequence_breakers",
    "stop_token_ids",
    "min_tokens",
    "user",
    "max_completion_tokens",
    "ignore_eos",
]


def malformed_bodies(count: int) -> list[tuple[str, bytes]]:
    rng = random.Random(0)
    bases = {
        "/v1/completions": {"prompt": "The", "max_tokens": 2},
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    }
    raw = [
        b"",
        b"{",
        b"null",
        b"[]",
        b'"x"',
        b"12",
        b"[" * 5000 + b"]" * 5000,
        b"\xff\xfe",
        b'{"prompt": "x", "temperature": NaN}',
        b'{"prompt": "x", "max_tokens": Infinity}',
        b'{"messages": [{"role": "assistant"}]}',
        b'{"messages": []}',
        b'{"prompt": "' + b"x" * 300_000 + b'"}',  # over the server's 200 kB limit
    ]
    bodies = [(path, r) for r in raw for path in bases]
    while len(bodies) < count:
        path = rng.choice(list(bases))
        body = dict(bases[path])
        for name in rng.sample(FIELDS, rng.randint(1, 3)):
            body[name] = rng.choice(JUNK)
        if rng.random() < 0.2 and path.endswith("chat/completions"):
            body["messages"] = [
                {"role": rng.choice(["user", "bot", 7]), "content": rng.choice(JUNK)}
            ]
        bodies.append((path, json.dumps(body).encode("utf-8", "surrogatepass")))
    return bodies


def test_malformed_bodies_never_get_a_5xx(live):
    statuses = []
    with httpx.Client(base_url=live.url, timeout=60) as http:
        for path, body in malformed_bodies(300):
            r = http.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code < 500, (body[:200], r.text[:300])
            if r.status_code != 200:
                error = r.json()["error"]
                assert error["message"] and error["type"]
            statuses.append(r.status_code)
        assert http.get("/health").status_code == 200
        assert (
            http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
        )
    assert statuses.count(400) > 200 and 413 in statuses


def test_bench_serve_reports_throughput_and_latency(live, tmp_path, capsys):
    from arlm.cli import main

    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "serve",
            live.url,
            "--num-prompts",
            "6",
            "--max-concurrency",
            "3",
            "--input-len",
            "8",
            "--output-len",
            "5",
            "--token-range",
            "10:500",
            "--result-file",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Output token throughput (tok/s)" in printed and "Median TTFT (ms)" in printed
    summary = json.loads(out.read_text())
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 30 and summary["total_input_tokens"] == 48
    assert summary["median_ttft_ms"] > 0 and summary["p99_itl_ms"] >= summary["median_itl_ms"]


def test_sigterm_drains_running_requests_then_exits_zero(tokenizer, tmp_path):
    # a long context, so the request in flight outlasts the signal by seconds
    save_model(tmp_path / "ckpt", make_model(block_size=2048), tokenizer)
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "arlm",
            "serve",
            str(tmp_path / "ckpt"),
            "--port",
            str(port),
            "--log-level",
            "warning",
            # the drain waits for the request, however slowly a loaded machine decodes its
            # 1,500 tokens (30 s by default, which a busy 2-core machine overran)
            "--drain-timeout",
            "110",
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_healthy(url, process, 120)
        finished = {}

        def long_request():
            body = {
                "prompt": "x",
                "max_tokens": 1500,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    started.set()
                    if event["choices"]:
                        finished["reason"] = event["choices"][0]["finish_reason"]
                    else:
                        finished["tokens"] = event["usage"]["completion_tokens"]

        started = threading.Event()
        worker = threading.Thread(target=long_request)
        worker.start()
        assert started.wait(60)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert late.status_code == 503
        assert httpx.get(url + "/health").status_code == 503
        worker.join(120)
        assert finished["reason"] == "length" and finished["tokens"] == 1500
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_an_address_in_use_is_a_clear_error(model, tokenizer, tmp_path, capsys):
    from arlm.cli import main

    save_model(tmp_path / "ckpt", model, tokenizer)
    with free_socket() as taken:
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", str(tmp_path / "ckpt"), "--port", port]) == 1
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nothing")]) == 1
    assert "no model at" in capsys.readouterr().err

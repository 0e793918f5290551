"""deploy/nginx.conf in front of two replicas on the loopback: requests spread over both, and a
replica that goes down has its requests served by the other. Needs nginx (.ci/run installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from arlm.api import LM
from arlm.engine import EngineConfig
from tests.conftest import make_model
from tests.serving import LiveServer, free_socket, wait_healthy

NGINX = shutil.which("nginx") or next(
    (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
)
CONF = Path(__file__).parent.parent / "deploy" / "nginx.conf"

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (apt-get install nginx-core)"
)


def served(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("arlm:generation_tokens_total"))
    return float(line.split()[-1])


def test_nginx_spreads_requests_and_routes_around_a_dead_replica(tokenizer, tmp_path):
    model = make_model()
    replicas = [
        LiveServer(LM(model, tokenizer, engine_config=EngineConfig(kv_cache_memory_gib=0.1)))
        for _ in range(2)
    ]
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    conf = CONF.read_text()
    conf = conf.replace("127.0.0.1:8001", f"127.0.0.1:{replicas[0].port}")
    conf = conf.replace("127.0.0.1:8002", f"127.0.0.1:{replicas[1].port}")
    conf = conf.replace("listen 127.0.0.1:8000", f"listen 127.0.0.1:{port}")
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(conf)
    url = f"http://127.0.0.1:{port}"
    with replicas[0], replicas[1]:
        nginx = subprocess.Popen(
            [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"],
        )
        try:
            wait_healthy(url, nginx, 20)
            body = {"prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0}
            texts = set()
            for _ in range(10):
                r = httpx.post(url + "/v1/completions", json=body, timeout=30)
                assert r.status_code == 200
                texts.add(r.json()["choices"][0]["text"])
            assert len(texts) == 1  # the same model answers alike wherever it runs
            assert served(replicas[0].url) >= 8 and served(replicas[1].url) >= 8
            # a streamed answer comes through unbuffered, as server-sent events
            stream = dict(body, stream=True)
            with httpx.stream("POST", url + "/v1/completions", json=stream, timeout=30) as r:
                events = [line for line in r.iter_lines() if line.startswith("data:")]
            assert events[-1] == "data: [DONE]" and len(events) >= 5

            replicas[0].__exit__(None, None, None)  # replica 0 goes down
            before = served(replicas[1].url)
            for _ in range(6):
                r = httpx.post(url + "/v1/completions", json=body, timeout=30)
                assert r.status_code == 200 and r.json()["choices"][0]["text"] in texts
            assert served(replicas[1].url) == before + 6 * 4
        finally:
            nginx.terminate()
            nginx.wait(10)

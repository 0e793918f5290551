"""``arlm bench serve URL``: load any OpenAI-compatible server as ``vllm bench serve`` does and
report what its users feel.

Requests arrive all at once or as a Poisson process (``request_rate``), with at most
``max_concurrency`` in flight; each streams. Prompts are random token ids (exact lengths on any
server, for /v1/completions), random words (for chat), or a file. Per request: time to first
token (TTFT: to the first event with a token, text or not), time per output token after the
first (TPOT), the gaps between token events (ITL) and end-to-end latency (E2EL). The summary
uses vLLM's JSON field names (``output_throughput``, ``median_ttft_ms``, ``p99_itl_ms``, ...),
plus
``status_counts`` and the latency of refused requests (``p50_rejected_ms``): how fast an
overloaded server says no.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field

from arlm.config import option
from arlm.formats.prompts import read_prompts
from arlm.validate import check_float, check_int

PERCENTILES = (50, 90, 99)
WORDS = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
)


@dataclass
class ServeBenchConfig:
    """What to send and how fast."""

    endpoint: str = option(
        "/v1/completions", help="the API path: /v1/completions or /v1/chat/completions"
    )
    model: str | None = option(
        None, help="the model name to send (default: the first of the server's /v1/models)"
    )
    num_prompts: int = option(64, help="requests to send")
    request_rate: float = option(
        math.inf, help="requests per second, Poisson arrivals (default: all at once)"
    )
    max_concurrency: int | None = option(
        None, help="requests in flight at most (default: no limit)"
    )
    input_len: int = option(64, help="tokens per random prompt (words, for chat)")
    output_len: int = option(128, help="max_tokens of each request")
    ignore_eos: bool = option(
        True, help="ask for all output_len tokens of every request (ignore_eos)"
    )
    prompts_file: str | None = option(
        None,
        help='prompts instead of random ones: JSON lines with a "prompt" field (text or token '
        "ids), or one a line; used in turn",
    )
    token_range: str = option(
        "100:1000", help="random prompt token ids are drawn from LOW:HIGH", metavar="LOW:HIGH"
    )
    temperature: float = option(0.0, help="sampling temperature sent (default: greedy)")
    seed: int = option(0, help="seed of the prompts and arrival times")
    api_key: str | None = option(None, help="sent as 'Authorization: Bearer KEY'")
    timeout: float = option(600.0, help="seconds a request may take")
    extra_body: str | None = option(
        None,
        help='a JSON object merged into every request body, e.g. \'{"structured_outputs": '
        '{"regex": "[a-z ]+"}}\'',
    )

    def __post_init__(self) -> None:
        if self.endpoint not in ("/v1/completions", "/v1/chat/completions"):
            raise ValueError(
                f"endpoint={self.endpoint!r} is not allowed; use /v1/completions or "
                "/v1/chat/completions"
            )
        check_int("num_prompts", self.num_prompts, 1)
        if self.request_rate != math.inf:
            check_float("request_rate", self.request_rate, lambda v: v > 0, "> 0, or inf")
        if self.max_concurrency is not None:
            check_int("max_concurrency", self.max_concurrency, 1)
        check_int("input_len", self.input_len, 1)
        check_int("output_len", self.output_len, 1)
        check_float("timeout", self.timeout, lambda v: v > 0, "> 0 seconds")
        low, _, high = self.token_range.partition(":")
        if not (low.isdigit() and high.isdigit() and int(low) < int(high)):
            raise ValueError(
                f"token_range={self.token_range!r} is not allowed; give LOW:HIGH, e.g. 100:1000"
            )
        self.token_ids = range(int(low), int(high))
        self.extra = {}
        if self.extra_body is not None:
            try:
                self.extra = json.loads(self.extra_body)
            except json.JSONDecodeError as e:
                raise ValueError(f"extra_body is not JSON: {e}") from None
            if not isinstance(self.extra, dict):
                raise ValueError("extra_body must be a JSON object")


@dataclass
class RequestResult:
    success: bool = False
    status: int = 0
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def make_prompts(config: ServeBenchConfig) -> list[str | list[int]]:
    if config.prompts_file is not None:
        prompts = read_prompts(config.prompts_file)
        return [prompts[i % len(prompts)] for i in range(config.num_prompts)]
    rng = random.Random(config.seed)
    if config.endpoint == "/v1/chat/completions":
        return [" ".join(rng.choices(WORDS, k=config.input_len)) for _ in range(config.num_prompts)]
    ids = config.token_ids
    return [[rng.choice(ids) for _ in range(config.input_len)] for _ in range(config.num_prompts)]


def _body(config: ServeBenchConfig, model: str, prompt: str | list[int]) -> dict:
    body = {
        "model": model,
        "max_tokens": config.output_len,
        "temperature": config.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.endpoint == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body | config.extra


async def _one(client, config: ServeBenchConfig, model: str, prompt) -> RequestResult:
    result = RequestResult(prompt_len=len(prompt) if isinstance(prompt, list) else 0)
    chunks = 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", config.endpoint, json=_body(config, model, prompt)) as r:
            result.status = r.status_code
            if r.status_code != 200:
                result.error = (await r.aread()).decode(errors="replace")[:300]
                result.latency = time.perf_counter() - start
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = json.dumps(event["error"])[:300]
                    return result
                if event.get("usage"):
                    result.output_tokens = event["usage"].get("completion_tokens", 0)
                    result.prompt_len = event["usage"].get("prompt_tokens") or result.prompt_len
                if not _is_token(event):
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - start
                else:
                    result.itl.append(now - last)
                chunks, last = chunks + 1, now
    except Exception as e:  # any transport failure counts as a failed request
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.success = chunks > 0
    return result


def _is_token(event: dict) -> bool:
    """Whether a streamed event carries generated tokens: any with choices, as vLLM's client
    counts them, except a chat stream's opening ``role`` event."""
    choices = event.get("choices") or []
    return bool(choices) and "role" not in (choices[0].get("delta") or {})


async def run(base_url: str, config: ServeBenchConfig) -> dict:
    """Run the benchmark against ``base_url``; the summary (see ``summarize``)."""
    import httpx

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.max_concurrency or config.num_prompts)
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/"), headers=headers, timeout=config.timeout, limits=limits
    ) as client:
        model = config.model or await _first_model(client)
        prompts = make_prompts(config)
        rng = random.Random(config.seed + 1)
        gate = asyncio.Semaphore(config.max_concurrency or config.num_prompts)

        async def limited(prompt):
            async with gate:
                return await _one(client, config, model, prompt)

        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if math.isfinite(config.request_rate):
                await asyncio.sleep(rng.expovariate(config.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(results, duration, config, model)


async def _first_model(client) -> str:
    r = await client.get("/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def summarize(
    results: list[RequestResult], duration: float, config: ServeBenchConfig, model: str
) -> dict:
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [gap for r in ok for gap in r.itl]
    e2els = [r.latency for r in ok]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_len for r in ok)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    summary = {
        "model_id": model,
        "endpoint": config.endpoint,
        "num_prompts": config.num_prompts,
        "request_rate": config.request_rate if math.isfinite(config.request_rate) else "inf",
        "max_concurrency": config.max_concurrency,
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "status_counts": statuses,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        summary.update(_stats(name, values))
    summary.update(_stats("rejected", [r.latency for r in results if r.status == 429]))
    summary["errors"] = sorted({r.error for r in results if r.error})[:10]
    return summary


def _stats(name: str, seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    if not ms:
        return {}
    out = {
        f"mean_{name}_ms": statistics.fmean(ms),
        f"median_{name}_ms": statistics.median(ms),
        f"std_{name}_ms": statistics.pstdev(ms),
    }
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = _percentile(ms, p)
    return out


def _percentile(ordered: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def report(summary: dict) -> str:
    """The summary as ``vllm bench serve`` prints it."""
    rows = [
        ("Successful requests", summary["completed"]),
        ("Failed requests", summary["failed"]),
        ("Status codes", " ".join(f"{k}:{v}" for k, v in sorted(summary["status_counts"].items()))),
        ("Maximum request concurrency", summary["max_concurrency"] or "unlimited"),
        ("Request rate (req/s)", summary["request_rate"]),
        ("Benchmark duration (s)", f"{summary['duration']:.2f}"),
        ("Total input tokens", summary["total_input_tokens"]),
        ("Total generated tokens", summary["total_output_tokens"]),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    lines = [f"{' Serving Benchmark Result ':=^50}"]
    lines += [f"{label + ':':<40}{value:<10}" for label, value in rows]
    titles = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2el": "End-to-end Latency",
        "rejected": "Refused requests (429)",
    }
    for name, title in titles.items():
        if f"mean_{name}_ms" not in summary:
            continue
        lines.append(f"{title:-^50}")
        for stat in ("mean", "median", *(f"p{p}" for p in PERCENTILES)):
            label = f"{stat.capitalize() if stat[0] != 'p' else stat.upper()} {name.upper()} (ms):"
            lines.append(f"{label:<40}{summary[f'{stat}_{name}_ms']:<10.2f}")
    lines.append("=" * 50)
    if summary["errors"]:
        lines.append("errors: " + "; ".join(summary["errors"][:3]))
    return "\n".join(lines)

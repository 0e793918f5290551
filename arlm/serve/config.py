"""``ServeConfig``: the server's own settings (the model, cache and engine have theirs)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from arlm.config import option
from arlm.loops.detector import LoopDetectorConfig
from arlm.loops.step_guard import PRESETS
from arlm.sampling.params import LOOP_POLICIES, SamplingParams
from arlm.serve.tools import TOOL_CALL_PARSERS
from arlm.validate import check_float, check_int

# Sequences that may wait for a slot by default: 20 prompts x n 128 in one request would queue
# 2,560 and hold every later request behind them for minutes.
DEFAULT_MAX_QUEUE = 256


@dataclass
class ServeConfig:
    """The server's own settings (the model, cache and engine have theirs)."""

    served_model_name: str | None = option(
        None, help="the model name clients send (default: the model folder's name)"
    )
    max_queue: int = option(
        DEFAULT_MAX_QUEUE,
        help="sequences that may wait for a slot; beyond it 429, and a request larger than "
        "this plus the running slots 400",
    )
    api_key: str | None = option(None, help="require 'Authorization: Bearer KEY' on /v1/*")
    drain_timeout: float = option(
        30.0, help="after SIGTERM, seconds running requests get to finish"
    )
    max_request_bytes: int = option(8 * 2**20, help="larger request bodies get 413")
    max_prompt_bytes: int | None = option(
        None,
        help="a text prompt or rendered chat longer than this in UTF-8 bytes gets 400 before it "
        "is tokenized (default: the most the model's context could hold)",
    )
    prepare_workers: int = option(
        2,
        help="processes that parse chat and large requests, render chat templates and tokenize, "
        "away from the event loop (0: threads of the server, with no time limit)",
    )
    prepare_timeout: float = option(
        10.0, help="seconds a worker may spend on one request; beyond it 400, worker replaced"
    )
    header_timeout: float = option(
        10.0, help="seconds a connection may take to send a request's headers; then closed"
    )
    body_timeout: float = option(
        30.0, help="seconds a client may take to send a request's body; beyond it 408"
    )
    keep_alive_timeout: float = option(
        5.0, help="seconds an idle keep-alive connection stays open (uvicorn's)"
    )
    loop_policy: str | None = option(
        None,
        help="loop policy for requests that set none (default: no detection)",
        choices=LOOP_POLICIES,
    )
    repetition_detection: str | None = option(
        None, help='loop detector thresholds for requests that set none, JSON: {"min_count": 4}'
    )
    tool_call_parser: str | None = option(
        None,
        help="how the model writes tool calls (default: the format its chat template writes, "
        "else hermes)",
        choices=TOOL_CALL_PARSERS,
    )
    agent_loop_guard: str | None = option(
        None,
        help="run the agent step guard with this preset over chats that set none (default: off)",
        choices=sorted(PRESETS),
    )
    allow_runtime_lora_updates: bool = option(
        False,
        help="serve /v1/load_lora_adapter and /v1/unload_lora_adapter, which add LoRA "
        "adapters from paths clients give (up to --max-cpu-loras) and remove them while the "
        "server runs",
    )

    def __post_init__(self) -> None:
        check_int("max_queue", self.max_queue, 0)
        check_float("drain_timeout", self.drain_timeout, lambda v: v >= 0, ">= 0 seconds")
        check_int("max_request_bytes", self.max_request_bytes, 1)
        if self.max_prompt_bytes is not None:
            check_int("max_prompt_bytes", self.max_prompt_bytes, 1)
        check_int("prepare_workers", self.prepare_workers, 0)
        for name in ("prepare_timeout", "header_timeout", "body_timeout", "keep_alive_timeout"):
            check_float(name, getattr(self, name), lambda v: v > 0, "> 0 seconds")
        self.loop_detection = _loop_defaults(self.loop_policy, self.repetition_detection)
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"tool_call_parser={self.tool_call_parser!r} is not allowed; it must be one of "
                f"{', '.join(TOOL_CALL_PARSERS)}"
            )
        if self.agent_loop_guard is not None and self.agent_loop_guard not in PRESETS:
            raise ValueError(
                f"agent_loop_guard={self.agent_loop_guard!r} is not allowed; it must be one of "
                f"{', '.join(sorted(PRESETS))}"
            )


def _loop_defaults(loop_policy: str | None, repetition_detection: str | None) -> dict | None:
    """The server's ``--repetition-detection`` JSON as a dict, checked now so that a bad value
    stops the server at start, not every request later."""
    if repetition_detection is None:
        return None
    try:
        fields = json.loads(repetition_detection)
        if not isinstance(fields, dict):
            raise ValueError("it must be a JSON object")
        LoopDetectorConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"--repetition-detection {repetition_detection!r} is not allowed: {e}; give a JSON "
            "object of min_pattern_size, max_pattern_size, min_count, min_span, e.g. "
            "'{\"min_count\": 4}'"
        ) from None
    SamplingParams(loop_policy=loop_policy, repetition_detection=fields)
    return fields

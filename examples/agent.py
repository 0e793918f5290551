"""A small tool-using agent against any OpenAI-compatible server, with arlm's step guard around it.

    python examples/agent.py "What does the README say about loops?" --workdir . \\
        --base-url http://localhost:8000/v1 --model NAME

The model gets three read-only tools over the files of ``--workdir`` (list_files, read_file,
search) and answers when it stops calling them. Every message goes through
``arlm.loops.StepGuard``: on a ``warn`` verdict the guard's message is put in the conversation
as a user message before the next model call; on ``stop`` the run ends. The server is any that
speaks ``POST /chat/completions`` with ``tools`` (vLLM, llama.cpp's server, OpenAI, ...); the
request goes out over plain HTTP (urllib), so the example needs nothing beyond arlm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from arlm.loops import StepGuard, Verdict
from arlm.loops.step_guard import PRESETS

SYSTEM = (
    "You are a careful assistant with read-only access to a folder of files. Use the tools to "
    "find what the task needs, then answer in a few sentences without calling a tool."
)


def _function(name: str, description: str, **params: str) -> dict:
    properties = {p: {"type": "string", "description": d} for p, d in params.items()}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(params)},
        },
    }


TOOLS = [
    _function("list_files", "List the files in the folder, one relative path per line."),
    _function("read_file", "Read a text file of the folder.", path="relative path of the file"),
    _function("search", "Lines of the folder's files containing the text.", text="text to find"),
]


class Folder:
    """The tools: read-only access to the files under ``root``. Failures come back as text
    starting with ``Error:``, which is how the model (and the guard) learns of them."""

    MAX_CHARS = 4000  # a tool result stays a small part of the context

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()

    def _files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file() and ".git" not in p.parts)

    def run(self, name: str, arguments: str) -> str:
        try:
            args = json.loads(arguments or "{}")
        except json.JSONDecodeError as e:
            return f"Error: the arguments are not JSON ({e.msg})"
        if not isinstance(args, dict):
            return "Error: the arguments must be a JSON object"
        if name == "list_files":
            return "\n".join(str(p.relative_to(self.root)) for p in self._files()) or "(empty)"
        if name == "read_file":
            path = (self.root / str(args.get("path", ""))).resolve()
            if not path.is_relative_to(self.root) or not path.is_file():
                return f"Error: no such file {args.get('path')!r}"
            return path.read_text(encoding="utf-8", errors="replace")[: self.MAX_CHARS]
        if name == "search":
            text = str(args.get("text", ""))
            if not text:
                return "Error: search needs a non-empty text"
            hits = []
            for p in self._files():
                lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
                for number, line in enumerate(lines, start=1):
                    if text in line:
                        hits.append(f"{p.relative_to(self.root)}:{number}: {line.strip()}")
            return "\n".join(hits)[: self.MAX_CHARS] or f"no line contains {text!r}"
        return f"Error: there is no tool {name!r}; the tools are list_files, read_file, search"


def chat_completion(
    base_url: str, model: str, api_key: str | None = None, timeout: float = 120.0
) -> Callable[[list[dict], list[dict]], dict]:
    """A function sending (messages, tools) to ``{base_url}/chat/completions`` and returning the
    assistant message of the first choice."""

    def call(messages: list[dict], tools: list[dict]) -> dict:
        body = json.dumps({"model": model, "messages": messages, "tools": tools, "temperature": 0})
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        request = urllib.request.Request(
            base_url.rstrip("/") + "/chat/completions", body.encode(), headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:500]
            raise RuntimeError(f"{request.full_url} answered {e.code}: {detail}") from e
        except urllib.error.URLError as e:
            raise RuntimeError(f"cannot reach {request.full_url}: {e.reason}") from e
        try:
            return reply["choices"][0]["message"]
        except (KeyError, IndexError, TypeError) as e:
            raise RuntimeError(
                f"{request.full_url} sent no choices[0].message: {reply!r:.300}"
            ) from e

    return call


@dataclass
class AgentRun:
    """finish: ``answer`` (the model answered), ``loop`` (the guard stopped it) or
    ``max_steps``. messages: the whole conversation; verdicts: (message index, verdict)."""

    finish: str
    answer: str | None
    messages: list[dict]
    verdicts: list[tuple[int, Verdict]] = field(default_factory=list)


def _describe(message: dict) -> str:
    if message["role"] == "tool":
        text = " ".join(str(message["content"]).split())
        return f"tool: {text[:100]}"
    if message.get("tool_calls"):
        calls = [
            f"{c['function']['name']}({c['function']['arguments']})" for c in message["tool_calls"]
        ]
        return "assistant calls " + "; ".join(calls)
    return f"{message['role']}: {' '.join(str(message.get('content') or '').split())[:100]}"


def run_agent(
    task: str,
    model: Callable[[list[dict], list[dict]], dict],
    folder: Folder,
    guard: StepGuard,
    max_steps: int = 30,
    log: Callable[[str], None] = print,
) -> AgentRun:
    """Ask ``model`` (messages, tools -> assistant message) until it answers, the guard stops
    it, or ``max_steps`` model calls are spent. Every message is pushed to ``guard``, so its
    step numbers are the messages' indices."""
    run = AgentRun("max_steps", None, [])

    def add(message: dict) -> Verdict | None:
        run.messages.append(message)
        log(f"[{len(run.messages) - 1}] {_describe(message)}")
        verdict = guard.push(message)
        if verdict is not None:
            run.verdicts.append((len(run.messages) - 1, verdict))
            log(f"    guard {verdict.level} ({verdict.rule}): {verdict.message}")
        return verdict

    add({"role": "system", "content": SYSTEM})
    add({"role": "user", "content": task})
    for _ in range(max_steps):
        reply = model(run.messages, TOOLS)
        message = {"role": "assistant", "content": reply.get("content")}
        if reply.get("tool_calls"):
            message["tool_calls"] = reply["tool_calls"]
        warning = add(message)
        if warning is not None and warning.level == "stop":
            run.finish = "loop"  # the repeated calls are not run again
            return run
        if not message.get("tool_calls"):
            run.finish, run.answer = "answer", message.get("content") or ""
            return run
        for call in message["tool_calls"]:
            function = call["function"]
            content = folder.run(function["name"], function.get("arguments", "{}"))
            verdict = add({"role": "tool", "tool_call_id": call.get("id"), "content": content})
            if verdict is not None:
                if verdict.level == "stop":
                    run.finish = "loop"
                    return run
                warning = verdict  # the latest warning of the turn is the one passed on
        if warning is not None:
            add({"role": "user", "content": warning.message})
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", help="what the agent should find out")
    p.add_argument("--workdir", default=".", help="the folder the tools read (default: .)")
    p.add_argument(
        "--base-url",
        default=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
        help="the server's API root (default: $OPENAI_BASE_URL or http://localhost:8000/v1)",
    )
    p.add_argument("--model", default="default", help="the model name the server expects")
    p.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY"
    )
    p.add_argument("--preset", default="strict", choices=sorted(PRESETS), help="guard rules")
    p.add_argument("--near-duplicates", choices=["numbers"], help="guard: digits masked")
    p.add_argument("--max-steps", type=int, default=30, help="model calls at most (default: 30)")
    args = p.parse_args(argv)
    guard = StepGuard(args.preset, near_duplicates=args.near_duplicates)
    model = chat_completion(args.base_url, args.model, args.api_key)
    try:
        run = run_agent(args.task, model, Folder(args.workdir), guard, args.max_steps)
    except RuntimeError as e:
        print(f"agent: error: {e}", file=sys.stderr)
        return 1
    if run.finish == "answer":
        print(f"answer: {run.answer}")
    elif run.finish == "loop":
        print(f"stopped by the guard at message {run.verdicts[-1][0]}")
    else:
        print(f"no answer after {args.max_steps} model calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())

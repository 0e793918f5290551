"""Runs the documentation's runnable blocks (the convention is in docs/README.md).

``tests/test_docs.py`` starts this module once per test session as a worker process:

    python -m tests.docs_runner SCRATCH RESULTS.json PAGE.md ...

It builds the tiny stand-ins the pages name (``runs/small``, ``models/smollm2``, ``notes.txt``,
``chats.jsonl``, ``pairs.jsonl``, ...) once, copies them into a scratch folder per page, runs
each page's marked blocks there in order, and writes what happened to RESULTS.json. ``arlm``
lines run through ``arlm.cli.main`` in this process, so PyTorch and arlm are imported once for
all of them instead of once a line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "<!-- runnable -->"
OUTPUT_MARKER = "<!-- output -->"  # before a plain block: what the runnable block above prints
LANGUAGES = ("bash", "python")
FENCE = re.compile(r"^```(\S*)\s*$")
SHELL_SYNTAX = set("|&;<>()$`")  # a line with any of these goes to bash, not arlm.cli.main
OUTPUT_TAIL = 4000  # characters of a failing command's output kept in the report


@dataclass(frozen=True)
class Block:
    page: str  # the page's path relative to the repository root
    line: int  # the 1-based line of the opening fence
    language: str
    code: str
    expected: str | None = None  # the exact output the page shows for it, when it shows one


def closing_fence(lines: list[str], opening: int, page: str) -> int:
    end = next((j for j in range(opening + 1, len(lines)) if lines[j].startswith("```")), None)
    if end is None:
        raise ValueError(f"{page}:{opening + 1}: the fenced block is never closed")
    return end


def runnable_blocks(text: str, page: str) -> list[Block]:
    """The fenced blocks of ``text`` marked runnable, in order, each with the output block that
    follows it under an output marker, if any. A marker that is not directly followed by a
    fence of the right kind is an error, so a typo cannot hide a block."""
    lines = text.split("\n")
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == OUTPUT_MARKER:
            raise ValueError(f"{page}:{i + 1}: {OUTPUT_MARKER} must follow a runnable block")
        if lines[i].strip() == MARKER:
            fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if fence is None or fence.group(1) not in LANGUAGES:
                raise ValueError(
                    f"{page}:{i + 1}: {MARKER} must be directly followed by a ```bash or "
                    f"```python fence, not {lines[i + 1] if i + 1 < len(lines) else 'the end'!r}"
                )
            end = closing_fence(lines, i + 1, page)
            code = "\n".join(lines[i + 2 : end])
            expected = None
            # the output block: a blank line, the output marker, a plain fence
            if lines[end + 1 : end + 3] == ["", OUTPUT_MARKER]:
                if end + 3 >= len(lines) or lines[end + 3] != "```":
                    raise ValueError(
                        f"{page}:{end + 3}: {OUTPUT_MARKER} must be directly followed by ```"
                    )
                out_end = closing_fence(lines, end + 3, page)
                expected = "\n".join(lines[end + 4 : out_end]) + "\n"
                end = out_end
            blocks.append(Block(page, i + 2, fence.group(1), code, expected))
            i = end
        i += 1
    return blocks


def shell_lines(code: str) -> list[str]:
    """A bash block's commands: ``\\``-continued lines joined, blank and comment lines dropped."""
    out, pending = [], ""
    for line in code.split("\n"):
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line)
    return out


def shortened_training(argv: list[str]) -> list[str]:
    """``arlm train`` as the docs test runs it: a few short steps of the same model. Steps are
    divided by 100 (at least 2; 2 where none are given) and two sequences make a batch and two
    batches an evaluation; the model, corpus and folders stay as written."""
    argv = list(argv)
    if "--steps" in argv:
        i = argv.index("--steps") + 1
        argv[i] = str(max(2, int(argv[i]) // 100))
    else:
        argv += ["--steps", "2"]
    return argv + ["--batch-size", "2", "--eval-iters", "2"]  # the last of a repeated option wins


@contextlib.contextmanager
def captured():
    """Collects what is printed: ``out`` and ``err`` are filled in when the block exits."""
    out, err, texts = io.StringIO(), io.StringIO(), {}
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield texts
    texts.update(out=out.getvalue(), err=err.getvalue())


def run_arlm(argv: list[str]) -> tuple[int, str, str]:
    """``arlm ARGV`` through the console script's own entry point: (status, stdout, stderr)."""
    from arlm.cli import main

    if argv[:1] == ["train"]:
        argv = shortened_training(argv)
    with captured() as printed:
        try:
            status = main(argv)
        except SystemExit as e:  # argparse's own exit on a bad option
            status = e.code if isinstance(e.code, int) else 1
        except Exception:
            traceback.print_exc()
            status = 1
    return status, printed["out"], printed["err"]


def run_bash(line: str, cwd: Path, env: dict[str, str]) -> tuple[int, str, str]:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", line],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout, done.stderr


def run_python(code: str, name: str, namespace: dict) -> tuple[int, str, str]:
    with captured() as printed:
        try:
            exec(compile(code, name, "exec"), namespace)
            status = 0
        except Exception:
            traceback.print_exc()
            status = 1
    return status, printed["out"], printed["err"]


def run_block(block: Block, cwd: Path, env: dict[str, str], namespace: dict) -> dict:
    """One block in ``cwd``; a bash block stops at its first failing line. ``stdout`` is what
    the block's python code or last command printed, to compare with the page's output."""
    if block.language == "python":
        status, stdout, stderr = run_python(block.code, f"{block.page}:{block.line}", namespace)
        return {"status": status, "failed": block.code if status else None,
                "stdout": stdout, "log": stdout + stderr}  # fmt: skip
    log = stdout = ""
    for line in shell_lines(block.code):
        tokens = shlex.split(line, comments=True)
        if tokens[:1] == ["arlm"] and not SHELL_SYNTAX & set(line.split("#")[0]):
            status, stdout, stderr = run_arlm(tokens[1:])
        else:
            status, stdout, stderr = run_bash(line, cwd, env)
        log += f"$ {line}\n{stdout}{stderr}"
        if status != 0:
            return {"status": status, "failed": line, "stdout": stdout, "log": log}
    return {"status": 0, "failed": None, "stdout": stdout, "log": log}


def run_page(blocks: list[Block], cwd: Path, env: dict[str, str]) -> list[dict]:
    """Every block of one page in ``cwd``, in order; python blocks share one namespace."""
    namespace: dict = {"__name__": "__docs__"}
    results = []
    for block in blocks:
        start = time.monotonic()
        os.chdir(cwd)
        ran = run_block(block, cwd, env, namespace)
        ok = ran["status"] == 0 and block.expected in (None, ran["stdout"])
        seconds = round(time.monotonic() - start, 2)
        print(
            f"{block.page}:{block.line}: {'ok' if ok else 'failed'}, {seconds} s", file=sys.stderr
        )
        results.append(
            {
                **asdict(block),
                "ok": ok,
                "failed": ran["failed"],
                "stdout": ran["stdout"],
                "log": ran["log"][-OUTPUT_TAIL:],
                "seconds": seconds,
            }
        )
    return results


def build_stand_ins(folder: Path) -> None:
    """The files and models the pages name, tiny: random weights, a small BPE vocabulary."""
    import torch

    from arlm.config import ModelConfig
    from arlm.formats.checkpoint import save_model
    from arlm.formats.hf import export_hf
    from arlm.model import Transformer
    from arlm.tokenizer import Tokenizer
    from arlm.train.corpus import builtin_documents

    documents = builtin_documents()
    tokenizer = Tokenizer.train(documents[:20], vocab_size=512)
    for name, preset in [("runs/small", "small"), ("runs/llama", "llama-small")]:
        torch.manual_seed(0)
        model = Transformer(ModelConfig.preset(preset, vocab_size=tokenizer.vocab_size)).eval()
        save_model(folder / name, model, tokenizer)
    shutil.copytree(folder / "runs/small", folder / "runs/demo")
    torch.manual_seed(0)
    llama = Transformer(ModelConfig.preset("llama-tiny", vocab_size=tokenizer.vocab_size)).eval()
    export_hf(llama, tokenizer, folder / "models/smollm2")

    (folder / "notes.txt").write_text(documents[0][:1500])
    for sub, suffix in [("notes", ".md"), ("books/one", ".txt"), ("books/two", ".txt")]:
        (folder / sub).mkdir(parents=True)
        for i, text in enumerate(documents[1:25:4] if sub == "notes" else documents[25:31:2]):
            (folder / sub / f"{i}{suffix}").write_text(text)
    (folder / "data").mkdir()
    with open(folder / "data" / "docs.jsonl", "w") as f:
        for text in documents[31:61]:
            f.write(json.dumps({"text": text}) + "\n")
    with open(folder / "chats.jsonl", "w") as f:  # conversations, for fine-tuning
        for i in range(40):
            text = documents[(7 * i) % len(documents)]
            question = {"role": "user", "content": f"What does section {i} say?"}
            answer = {"role": "assistant", "content": text[:200]}
            f.write(json.dumps({"messages": [question, answer]}) + "\n")
    with open(folder / "pairs.jsonl", "w") as f:  # preferences, for DPO
        for i in range(40):
            text = documents[(11 * i + 3) % len(documents)]
            question = [{"role": "user", "content": f"Quote section {i}."}]
            pair = {"prompt": question, "chosen": text[:120], "rejected": text[:120] * 3}
            f.write(json.dumps(pair) + "\n")

    write_trace(
        folder / "traces/ok.jsonl",
        "What is in the folder?",
        [("list_files", {"path": "."}, "notes.md")],
    )
    pages = [("list_issues", {"state": "open", "page": i}, "[]") for i in range(1, 8)]
    write_trace(folder / "traces/pages.jsonl", "List the open issues.", pages)
    retries = [("read_file", {"path": "notes.txt"}, "Error: no such file 'notes.txt'")] * 6
    write_trace(folder / "traces/retry.jsonl", "What do the notes say?", retries)
    shutil.copy(folder / "traces/retry.jsonl", folder / "agent.jsonl")


def write_trace(path: Path, task: str, calls: list[tuple[str, dict, str]]) -> None:
    """An agent's conversation as OpenAI chat messages, one a line: the task, then each call
    and its result."""
    messages = [{"role": "user", "content": task}]
    for i, (name, arguments, result) in enumerate(calls):
        function = {"name": name, "arguments": json.dumps(arguments)}
        messages += [
            {
                "role": "assistant",
                "tool_calls": [{"id": f"c{i}", "type": "function", "function": function}],
            },
            {"role": "tool", "tool_call_id": f"c{i}", "content": result},
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(m) + "\n" for m in messages))


def main(scratch: str, results_path: str, pages: list[str]) -> None:
    import torch

    # one thread: the tiny models gain nothing from more, and the test shares the machine's cores
    torch.set_num_threads(1)
    scratch_dir = Path(scratch)
    os.environ["XDG_CACHE_HOME"] = str(scratch_dir / "cache")  # prepared corpora, per session
    os.environ["HF_HUB_OFFLINE"] = "1"
    shim = scratch_dir / "bin"
    shim.mkdir(parents=True)
    (shim / "arlm").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m arlm "$@"\n')
    (shim / "arlm").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    stand_ins = scratch_dir / "stand-ins"
    build_stand_ins(stand_ins)
    results = {}
    for page in pages:
        blocks = runnable_blocks((ROOT / page).read_text(), page)
        cwd = scratch_dir / "pages" / page.replace("/", "_")
        shutil.copytree(stand_ins, cwd)
        results[page] = run_page(blocks, cwd, env)
    Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])

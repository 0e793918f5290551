"""The documentation runs: every block marked runnable in README.md and docs/*.md succeeds on
tiny stand-ins (tests/docs_runner.py; the convention is in docs/README.md), and every relative
link points to a file, and every anchor to a heading, that exists."""

from __future__ import annotations

import difflib
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_runner import (
    MARKER,
    OUTPUT_MARKER,
    ROOT,
    runnable_blocks,
    shell_lines,
    shortened_training,
)

PAGES = [
    p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
]
PAGES = sorted(PAGES, key=lambda p: (p != "README.md", p))
RUNNABLE = [p for p in PAGES if runnable_blocks((ROOT / p).read_text(), p)]
LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE = re.compile(r"^```.*?^```", re.S | re.M)


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to '-'."""
    headings = re.findall(r"^#+ (.*)$", CODE.sub("", text), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def broken_links(path: Path) -> list[str]:
    """The relative links of a markdown page whose file or heading does not exist."""
    broken = []
    for target in LINK.findall(CODE.sub("", path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.is_file():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{target}: no such heading in {linked.name}")
    return broken


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_to_files_and_headings_that_exist(page):
    assert not broken_links(ROOT / page), f"{page}: " + "; ".join(broken_links(ROOT / page))


def test_a_broken_link_or_anchor_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Serving: `arlm serve`\n")
    page = tmp_path / "page.md"
    page.write_text(
        "## What `make demo` trains\n[a](other.md#serving-arlm-serve) [b](#what-make-demo-trains)"
        " [c](https://example.org/x) [d](gone.md) [e](other.md#serving)\n"
        "```\n[f](not-a-link-in-code.md)\n```\n"
    )
    assert broken_links(page) == [
        "gone.md: no such file",
        "other.md#serving: no such heading in other.md",
    ]


def test_markers_are_found_and_misplaced_ones_refused():
    text = f"intro\n{MARKER}\n```bash\narlm score runs/small notes.txt \\\n    --per-token\n```\n"
    (block,) = runnable_blocks(text, "page.md")
    assert (block.language, block.line) == ("bash", 3)
    assert shell_lines(block.code) == ["arlm score runs/small notes.txt      --per-token"]
    for bad in (f"{MARKER}\n\n```bash\nls\n```\n", f"{MARKER}\n```text\nls\n```\n", f"{MARKER}\n"):
        with pytest.raises(ValueError, match="must be directly followed"):
            runnable_blocks(bad, "page.md")
    shown = f"{MARKER}\n```python\nprint(1)\n```\n\n{OUTPUT_MARKER}\n```\n1\n```\n"
    assert runnable_blocks(shown, "page.md")[0].expected == "1\n"
    for bad in (
        f"```\nls\n```\n\n{OUTPUT_MARKER}\n```\n1\n```\n",
        shown.replace("```\n1", "```text\n1"),
    ):
        with pytest.raises(ValueError, match=re.escape(OUTPUT_MARKER)):
            runnable_blocks(bad, "page.md")
    with pytest.raises(ValueError, match="never closed"):
        runnable_blocks(f"{MARKER}\n```bash\nls\n", "page.md")
    # the README and the subsystem pages do mark blocks: the run below is not empty
    assert "README.md" in RUNNABLE and len(RUNNABLE) >= 5


def test_training_is_shortened_and_the_model_left_as_written():
    short = ["--batch-size", "2", "--eval-iters", "2"]
    assert shortened_training(["train"]) == ["train", "--steps", "2", *short]
    resume = ["train", "--out", "runs/web", "--resume", "--steps", "2000"]
    assert shortened_training(resume) == [*resume[:-1], "20", *short]
    named = ["train", "--preset", "tiny", "--steps", "150", "--batch-size", "32"]
    assert shortened_training(named) == [*named[:4], "2", "--batch-size", "32", *short]


def shown_arlm_commands(text: str) -> list[list[str]]:
    """The arguments of every ``arlm`` command in a page's bash blocks, marked or not (also
    ``python -m arlm`` and ``torchrun ... -m arlm``), and on ``$ arlm`` lines of output."""
    commands = []
    for language, code in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        if language == "bash":
            lines = shell_lines(code)
        else:
            lines = [line[2:] for line in code.split("\n") if line.startswith("$ arlm ")]
        for line in lines:
            tokens = shlex.split(line, comments=True)
            starts = [
                i
                for i, t in enumerate(tokens)
                if t == "arlm"
                and (tokens[i - 1 : i] == ["-m"] or all("=" in v for v in tokens[:i]))  # VAR=x arlm
            ]
            if starts:
                argv = tokens[starts[0] + 1 :]
                ends = [i for i, t in enumerate(argv) if t in {"&", "&&", "|", ";", ">"}]
                commands.append(argv[: ends[0]] if ends else argv)
    return commands


@pytest.mark.parametrize("page", PAGES)
def test_every_arlm_command_shown_parses(page, capsys):
    """Commands that cannot run in a test (a server, torchrun, the network) still take only
    options that exist."""
    from arlm.cli import bench, build_parser

    refused = []
    for argv in shown_arlm_commands((ROOT / page).read_text()):
        try:
            build_parser().parse_args(bench.expand(argv))
        except SystemExit:
            refused.append(f"arlm {shlex.join(argv)}: {capsys.readouterr().err.strip()}")
    assert not refused, f"{page}: " + "\n".join(refused)


def test_shown_commands_are_found_in_every_form():
    page = (
        "```bash\narlm score runs/small notes.txt  # a comment\n"
        "torchrun --nproc-per-node 2 -m arlm train --out runs/ddp\n"
        "python -m arlm generate runs/small hi > out.txt\n"
        "HF_HUB_OFFLINE=1 arlm score org/name notes.txt\n```\n"
        "```\n$ arlm loops guard traces\nsome output\n```\n"
    )
    assert shown_arlm_commands(page) == [
        ["score", "runs/small", "notes.txt"],
        ["train", "--out", "runs/ddp"],
        ["generate", "runs/small", "hi"],
        ["score", "org/name", "notes.txt"],
        ["loops", "guard", "traces"],
    ]


@pytest.fixture(scope="session")
def docs_results(tmp_path_factory) -> dict[str, list[dict]]:
    """Every runnable page run once, in one worker process (see tests/docs_runner.py)."""
    scratch = tmp_path_factory.mktemp("docs")
    results = scratch / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "tests.docs_runner", str(scratch / "run"), str(results), *RUNNABLE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"the docs runner failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(Path(results).read_text())


@pytest.mark.parametrize("page", RUNNABLE)
def test_runnable_blocks_run(page, docs_results):
    ran = docs_results[page]
    assert len(ran) == len(runnable_blocks((ROOT / page).read_text(), page))
    failed = [b for b in ran if not b["ok"]]
    assert not failed, "\n\n".join(map(describe_failure, failed))


def describe_failure(block: dict) -> str:
    where = f"{block['page']}:{block['line']} ({block['language']})"
    if block["failed"] is None:
        diff = difflib.unified_diff(
            block["expected"].splitlines(keepends=True),
            block["stdout"].splitlines(keepends=True),
            "the page shows",
            "it printed",
        )
        return f"{where} printed other output than the page shows:\n{''.join(diff)}"
    return f"{where} failed at:\n{block['failed']}\n--- output ---\n{block['log']}"

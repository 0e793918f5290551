"""The documentation runs: every block marked runnable in README.md and docs/*.md succeeds on
tiny stand-ins (tests/docs_runner.py; the convention is in docs/README.md), and every relative
link points to a file, and every anchor to a heading, that exists."""

from __future__ import annotations

import difflib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_runner import MARKER, ROOT, runnable_blocks, shell_lines, shortened_training

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


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_point_to_files_and_headings_that_exist(page):
    path = ROOT / page
    broken = []
    for target in LINK.findall(CODE.sub("", path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(ROOT)}")
        elif anchor and anchor not in heading_anchors(linked.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{page}: " + "; ".join(broken)


def test_markers_are_found_and_misplaced_ones_refused():
    text = f"intro\n{MARKER}\n```bash\narlm score runs/small notes.txt \\\n    --per-token\n```\n"
    (block,) = runnable_blocks(text, "page.md")
    assert (block.language, block.line) == ("bash", 3)
    assert shell_lines(block.code) == ["arlm score runs/small notes.txt      --per-token"]
    for bad in (f"{MARKER}\n\n```bash\nls\n```\n", f"{MARKER}\n```text\nls\n```\n", f"{MARKER}\n"):
        with pytest.raises(ValueError, match="must be directly followed"):
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

"""The loop detector over files: lines, words, tokens and JSON-lines agent steps."""

from __future__ import annotations

import json

import pytest

from arlm.cli import main
from arlm.loops.scan import default_config, default_unit, scan_file


def test_lines_loop_is_found_with_its_line_numbers(tmp_path):
    lines = ["intro", "", "retry the call", "still failing", "", "retry the call", "still failing"]
    lines += ["retry the call", "still failing", "done"]
    path = tmp_path / "log.txt"
    path.write_text("\n".join(lines) + "\n")
    (hit,) = scan_file(path)  # no tokenizer: lines, with min_span 0
    assert (hit.report.start, hit.report.pattern_size, hit.report.count) == (1, 2, 3)
    assert (hit.first_line, hit.last_line) == (3, 9)  # blank lines are skipped, not counted
    assert hit.preview == "retry the call\nstill failing\n"
    assert scan_file(path, min_count=4) == []


def test_words_and_tokens(tmp_path, tokenizer):
    path = tmp_path / "gen.txt"
    path.write_text("It began well.\n" + "the loop goes on and " * 12 + "\nend\n")
    (hit,) = scan_file(path, "words")
    assert hit.report.pattern_size == 5 and hit.report.start == 3 and hit.first_line == 2
    (hit,) = scan_file(path, tokenizer=tokenizer)  # tokens, by default with a tokenizer
    assert hit.first_line == 2 and "loop" in hit.preview
    assert scan_file(path, "words", min_span=100) == []


def test_agent_steps_compared_whole_or_by_a_field(tmp_path):
    steps = [{"tool": "search", "args": {"q": f"item {i}"}, "id": i} for i in range(3)]
    steps += [{"tool": "open", "args": {"url": "a"}, "id": 3 + i} for i in range(4)]
    path = tmp_path / "agent.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in steps) + "\n")
    assert default_unit(path, None) == "steps"
    assert scan_file(path) == []  # every step differs in its id
    (hit,) = scan_file(path, key="args")  # the same call four times
    assert (hit.report.start, hit.report.count, hit.first_line, hit.last_line) == (3, 4, 4, 7)
    assert hit.preview == '{"url": "a"}\n'
    assert len(scan_file(path, key="tool")) == 2  # by tool alone, "search" x3 loops too
    assert default_config("steps").min_span == 0 and default_config("tokens").min_span == 32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"unit": "chars"}, "unit='chars' is not allowed"),
        ({"unit": "tokens"}, "needs a tokenizer"),
        ({"unit": "lines", "key": "tool"}, "does not apply to lines"),
    ],
)
def test_bad_requests_are_named(tmp_path, kwargs, message):
    path = tmp_path / "a.txt"
    path.write_text("x\n")
    with pytest.raises(ValueError, match=message):
        scan_file(path, **kwargs)


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not a JSON value"):
        scan_file(path)


def test_cli_scan(tmp_path, capsys):
    path = tmp_path / "log.txt"
    path.write_text("a\nb\n" * 3 + "c\n")
    assert main(["loops", "scan", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}:1-6: a block of 2 repeated 3 times" in out and "1 loop found" in out
    assert main(["loops", "scan", str(path), "--loop-min-count", "4"]) == 0
    assert "0 loops found" in capsys.readouterr().out
    assert main(["loops", "scan", str(tmp_path / "missing.txt")]) == 1

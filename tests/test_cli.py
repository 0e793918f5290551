"""The arlm command: each bad input gets one clear line and a non-zero exit."""

import pytest

from arlm.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["train", "generate", "score", "export"])
def test_every_command_has_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: arlm " + command in capsys.readouterr().out


def test_missing_corpus(capsys, tmp_path):
    code, _, err = run(
        capsys, "train", "--corpus", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "r")
    )
    assert code == 1
    assert err.strip().count("\n") == 0 and "not found" in err


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    code, _, err = run(
        capsys, "train", "--corpus", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "r")
    )
    assert code == 1 and "is empty" in err


def test_unknown_preset(capsys, tmp_path):
    code, _, err = run(capsys, "train", "--preset", "huge", "--out", str(tmp_path / "r"))
    assert code == 1 and "unknown preset 'huge'" in err and "tiny" in err


def test_negative_max_tokens(capsys, trained_run):
    _, result = trained_run
    code, _, err = run(capsys, "generate", str(result.out), "x", "--max-tokens", "-3")
    assert code == 1 and "max_tokens=-3" in err and "integer >= 0" in err


def test_prompt_longer_than_the_context(capsys, trained_run):
    _, result = trained_run
    code, _, err = run(capsys, "generate", str(result.out), "word " * 400)
    assert code == 1 and "longer than the model's context of 128 tokens" in err


def test_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "generate", str(tmp_path / "none"), "x")
    assert code == 1 and "no model at" in err


def test_generate_streams_text_and_prints_stats(capsys, trained_run):
    _, result = trained_run
    code, out, err = run(
        capsys,
        "generate",
        str(result.out),
        "The",
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
        "--stats",
    )
    assert code == 0 and out.strip()
    assert "12 generated" in err and "decode" in err and "tok/s" in err


def test_score_prints_perplexity(capsys, trained_run, tmp_path):
    _, result = trained_run
    (tmp_path / "t.txt").write_text("The for statement is used to iterate over a sequence.")
    code, out, _ = run(capsys, "score", str(result.out), str(tmp_path / "t.txt"))
    assert code == 0 and "perplexity:" in out


def test_score_of_a_missing_file(capsys, trained_run, tmp_path):
    _, result = trained_run
    code, _, err = run(capsys, "score", str(result.out), str(tmp_path / "no.txt"))
    assert code == 1 and "cannot read" in err


def test_train_then_resume_from_the_command_line(capsys, tmp_path, cache_dir):
    common = [
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "r"),
        "--cache-dir",
        str(cache_dir),
        "--batch-size",
        "2",
        "--block-size",
        "16",
        "--vocab-size",
        "512",
        "--eval-interval",
        "2",
        "--sample",
        "",
    ]
    code, out, _ = run(capsys, "train", "--steps", "2", *common)
    assert code == 0 and "trained to step 2" in out
    code, _, err = run(capsys, "train", "--steps", "2", *common)
    assert code == 1 and "--resume" in err
    code, out, _ = run(capsys, "train", "--resume", "--steps", "4", "--out", str(tmp_path / "r"))
    assert code == 0 and "trained to step 4" in out


def test_export_then_reload(capsys, trained_run, tmp_path):
    _, result = trained_run
    code, out, _ = run(capsys, "export", str(result.out), str(tmp_path / "hf"))
    assert code == 0 and (tmp_path / "hf" / "config.json").is_file()
    code, _, err = run(capsys, "export", str(result.out), str(tmp_path / "hf"))
    assert code == 1 and "not an empty folder" in err

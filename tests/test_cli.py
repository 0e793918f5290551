"""The arlm command: each bad input gets one clear line and a non-zero exit."""

import pytest

from arlm.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", ["train", "generate", "score", "export", "serve", "bench"])
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


def test_prompts_file_runs_as_one_batch_and_writes_json_lines(capsys, trained_run, tmp_path):
    import json

    import arlm

    _, result = trained_run
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The for statement"}\n{"prompt": [5, 6, 7]}\n{"prompt": "x"}\n')
    out_file = tmp_path / "out.jsonl"
    argv = ["generate", str(result.out), "--prompts-file", str(prompts), "--max-tokens", "9"]
    code, _, err = run(capsys, *argv, "--temperature", "0", "--output", str(out_file))
    assert code == 0 and "3 prompts" in err
    lines = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["index"] for r in lines] == [0, 1, 2]
    lm = arlm.load(result.out)
    for record, prompt in zip(lines, ["The for statement", [5, 6, 7], "x"], strict=True):
        alone = lm.generate(prompt, max_tokens=9, temperature=0)
        assert record["token_ids"] == alone.token_ids and record["text"] == alone.text
        assert record["finish_reason"] == alone.finish_reason
    # plain text lines, to stdout, n samples each
    (tmp_path / "p.txt").write_text("The\nA class\n")
    code, out, _ = run(
        capsys,
        "generate",
        str(result.out),
        "--prompts-file",
        str(tmp_path / "p.txt"),
        "--max-tokens",
        "4",
        "--n",
        "2",
        "--seed",
        "1",
    )
    assert code == 0 and [json.loads(x)["index"] for x in out.splitlines()] == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "content, args, message",
    [
        ('{"prompt": "a"}\n{"text": "b"}\n', [], 'prompts.jsonl:2: needs a "prompt" field'),
        ('{"prompt": "a"}\n{oops\n', [], "prompts.jsonl:2: not a JSON object"),
        ("", [], "has no prompts"),
        ("a\n", ["also a prompt"], "either a PROMPT or --prompts-file"),
    ],
)
def test_prompts_file_errors_name_the_line(capsys, trained_run, tmp_path, content, args, message):
    _, result = trained_run
    (tmp_path / "prompts.jsonl").write_text(content)
    argv = ["generate", str(result.out), *args, "--prompts-file", str(tmp_path / "prompts.jsonl")]
    code, _, err = run(capsys, *argv)
    assert code == 1 and message in err


def test_engine_and_cache_options_reach_the_engine(capsys, trained_run, monkeypatch):
    import arlm

    _, result = trained_run
    seen = {}
    real = arlm.load

    def spy(path, **kwargs):
        seen.update(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(arlm, "load", spy)
    argv = ["generate", str(result.out), "x", "--max-tokens", "2", "--max-num-seqs", "3"]
    argv += ["--max-num-batched-tokens", "64", "--no-prefix-caching", "--kv-cache-dtype", "int8"]
    argv += ["--gpu-memory-utilization", "0.5"]
    code, _, _ = run(capsys, *argv)
    assert code == 0
    assert seen["max_num_seqs"] == 3 and seen["max_num_batched_tokens"] == 64
    assert seen["gpu_memory_utilization"] == 0.5
    assert seen["device"] == "auto" and seen["dtype"] == "auto"  # a GPU's when there is one
    assert seen["enable_prefix_caching"] is False and seen["kv_cache_dtype"] == "int8"
    assert "max_model_len" not in seen  # options not given keep the library's defaults

"""Checkpoints: no pickle, clear errors for damaged files, saves that are all-or-nothing."""

import json

import pytest
import torch

import arlm
from arlm.formats.checkpoint import CheckpointError, load_model, recover, save_model, write_files
from tests.conftest import make_model


@pytest.fixture
def saved(tmp_path, tokenizer):
    model = make_model("llama", vocab_size=tokenizer.vocab_size)
    save_model(tmp_path / "ckpt", model, tokenizer)
    return tmp_path / "ckpt", model


def test_round_trip_gives_the_same_logits(saved):
    path, model = saved
    loaded, _ = load_model(path)
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_loading_never_unpickles(saved, monkeypatch):
    path, _ = saved

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", refuse)
    arlm.load(path)
    for file in path.iterdir():
        head = file.read_bytes()[:16]
        assert not head.startswith(b"\x80"), f"{file.name} looks like a pickle"
        assert file.suffix in (".json", ".safetensors")


def test_truncated_weights_give_a_clear_error(saved):
    path, _ = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        arlm.load(path)


def test_missing_file_is_named(saved):
    path, _ = saved
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="has no tokenizer.json"):
        arlm.load(path)


def test_tampered_config_names_the_tensor_and_both_shapes(saved):
    path, _ = saved
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 64
    (path / "config.json").write_text(json.dumps(config))
    expected = r"tensor h\.\d\.mlp\.c_\w+\.weight has shape \(\d+, \d+\), the model config expects"
    with pytest.raises(CheckpointError, match=expected):
        arlm.load(path)


def test_truncated_config_is_reported(saved):
    path, _ = saved
    (path / "config.json").write_text('{"family": "lla')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        arlm.load(path)


def test_missing_directory_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        arlm.load(tmp_path / "nothing")


def test_a_save_interrupted_before_completion_leaves_the_old_files(tmp_path):
    write_files(tmp_path, {"a.json": b"old", "b.json": b"old"})
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "a.json").write_bytes(b"new")  # crashed here: b.json and the mark never written
    recover(tmp_path)
    assert (tmp_path / "a.json").read_bytes() == b"old"
    assert not staging.exists()


def test_a_save_interrupted_after_completion_is_finished(tmp_path):
    write_files(tmp_path, {"a.json": b"old", "b.json": b"old"})
    staging = tmp_path / ".staging"
    staging.mkdir()
    (staging / "b.json").write_bytes(b"new")  # a.json was already moved into place
    (staging / "COMPLETE").write_text('["a.json", "b.json"]')
    (tmp_path / "a.json").write_bytes(b"new")
    recover(tmp_path)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes() == b"new"
    assert not staging.exists()

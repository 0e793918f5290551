"""Hostile model files and prompt files: refused fast, by name, before memory is committed."""

from __future__ import annotations

import json
import math
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import arlm
from arlm.cli import main
from arlm.config import SIZE_LIMITS, ModelConfig
from arlm.formats.checkpoint import CheckpointError, load_model, save_model
from arlm.formats.hf import export_hf
from arlm.formats.prompts import read_prompts
from arlm.model import Transformer
from arlm.tokenizer import Tokenizer
from arlm.train.corpus import CorpusError, resolve

SMALL = dict(vocab_size=300, n_layer=2, n_head=2, n_embd=64, block_size=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny arlm checkpoint (gpt2 family) and a tiny Hugging Face folder (llama layout)."""
    root = tmp_path_factory.mktemp("model_files")
    tokenizer = Tokenizer.train(["the cat sat on the mat and the dog ran " * 20], vocab_size=300)
    torch.manual_seed(0)
    save_model(root / "arlm", Transformer(ModelConfig(**SMALL)), tokenizer)
    export_hf(
        Transformer(ModelConfig(family="llama", n_kv_head=1, **SMALL)), tokenizer, root / "hf"
    )
    return root / "arlm", root / "hf"


def _copy(src: Path, dst: Path, file: str = "config.json", **changes) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / file).read_text())
    (dst / file).write_text(json.dumps({**data, **changes}))
    return dst


def _rss_peak_kib() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def _refused_fast(path: Path, *messages: str) -> None:
    """Loading ``path`` is a CheckpointError holding every message, in under a second, with
    under 100 MB more memory (Python's, by tracemalloc; everything, by the peak RSS)."""
    linux = Path("/proc/self/clear_refs").exists()
    if linux:  # reset the peak RSS to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    before = _rss_peak_kib() if linux else 0
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(CheckpointError) as error:
            arlm.load(path)
        seconds = time.perf_counter() - started
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for message in messages:
        assert message in str(error.value)
    assert seconds < 1.0, f"took {seconds:.2f} s to refuse"
    assert python_peak < 100 * 2**20
    if linux:
        assert (_rss_peak_kib() - before) * 1024 < 100 * 2**20


@pytest.mark.parametrize(
    "changes, messages",
    [
        # the weights say 300 ids; 4M * 64 float32 would be 1 GB
        (
            {"vocab_size": 4_000_000},
            ["config.json: vocab_size=4,000,000", "wte.weight has 300 rows"],
        ),
        (
            {"n_layer": 500},
            ["config.json: n_layer=500", "model.safetensors are 2 (numbered 0 to 1)"],
        ),
        (
            {"block_size": 1_000_000},
            ["config.json: block_size=1,000,000", "wpe.weight has 64 rows"],
        ),
        (
            {"intermediate_size": 500_000},
            ["model.safetensors: tensor h.0.mlp.c_fc.weight has shape (256, 64)"],
        ),
        # past the sizes any model has: refused before the weights are opened
        ({"n_layer": 10_000}, ["config.json: n_layer=10,000 is not allowed", "from 1 to 1,024"]),
        ({"vocab_size": 2_000_000_000}, ["config.json: vocab_size=2,000,000,000 is not allowed"]),
        ({"vocab_size": 2e9}, ["config.json: vocab_size=2000000000.0 is not allowed"]),
    ],
)
def test_an_arlm_config_is_checked_against_the_weights_before_allocating(
    files, tmp_path, changes, messages
):
    _refused_fast(_copy(files[0], tmp_path / "ckpt", **changes), *messages)


@pytest.mark.parametrize(
    "changes, messages",
    [
        ({"num_hidden_layers": 1000}, ["num_hidden_layers=1,000", "are 2 (numbered 0 to 1)"]),
        ({"num_hidden_layers": 100_000}, ["num_hidden_layers=100,000 is not allowed"]),
        ({"vocab_size": 4_000_000}, ["vocab_size=4,000,000", "embed_tokens.weight has 300 rows"]),
        ({"hidden_size": 4096}, ["hidden_size=4,096", "embed_tokens.weight has 64 columns"]),
        ({"intermediate_size": 500_000}, ["layers.0.mlp.gate_proj.weight has shape (192, 64)"]),
    ],
)
def test_a_hf_config_is_checked_against_the_weights_before_allocating(
    files, tmp_path, changes, messages
):
    _refused_fast(_copy(files[1], tmp_path / "hf", **changes), *messages)


def test_size_limits_bound_a_config_whatever_its_weights():
    for name, limit in SIZE_LIMITS.items():
        fields = dict(family="llama", **SMALL)
        if name == "head_dim":
            fields["head_dim"] = 2 * limit  # even, as rotary heads must be
        else:
            fields[name] = limit + 1
        with pytest.raises(ValueError, match=f"{name}={fields[name]:,} is not allowed"):
            ModelConfig(**fields)


def _poison(path: Path, name: str, value: float, at: int = 3) -> None:
    tensors = load_file(path)
    tensors[name].view(-1)[at] = value
    save_file(tensors, path, {"format": "pt"})


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(files, tmp_path, value):
    arlm_copy = shutil.copytree(files[0], tmp_path / "ckpt")
    _poison(arlm_copy / "model.safetensors", "h.1.attn.c_proj.weight", value)
    with pytest.raises(CheckpointError, match=r"tensor h\.1\.attn\.c_proj\.weight holds"):
        load_model(arlm_copy)
    hf_copy = shutil.copytree(files[1], tmp_path / "hf")
    _poison(hf_copy / "model.safetensors", "model.layers.0.mlp.up_proj.weight", value)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight"):
        arlm.load(hf_copy)


def test_huge_finite_weights_load(files, tmp_path):
    """Weights whose float32 sum overflows are finite: looked at one by one, and kept."""
    path = shutil.copytree(files[0], tmp_path / "ckpt")
    _poison(path / "model.safetensors", "h.0.mlp.c_fc.weight", 3e38)
    _poison(path / "model.safetensors", "h.0.mlp.c_fc.weight", 3e38, at=5)
    model, _ = load_model(path)
    assert model.h[0].mlp.c_fc.weight.view(-1)[5] == torch.tensor(3e38)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_a_loaded_model_owns_its_memory(files, tmp_path):
    """Rewriting the file in place (not by rename) leaves a loaded model as it was."""
    path = shutil.copytree(files[0], tmp_path / "ckpt")
    model, _ = load_model(path)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    size = (path / "model.safetensors").stat().st_size
    with open(path / "model.safetensors", "r+b") as f:
        f.seek(size // 2)
        f.write(bytes(size - size // 2))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_a_stored_dtype_the_model_cannot_hold_is_refused(files, tmp_path):
    path = shutil.copytree(files[0], tmp_path / "ckpt")
    tensors = load_file(path / "model.safetensors")
    tensors["ln_f.weight"] = tensors["ln_f.weight"].to(torch.int64)
    save_file(tensors, path / "model.safetensors", {"format": "pt"})
    with pytest.raises(CheckpointError, match="ln_f.weight is stored as I64; .* F32"):
        load_model(path)


@pytest.mark.parametrize(
    "file, changes, message",
    [
        ("generation_config.json", {"eos_token_id": 999_999}, "eos_token_id=999999 is outside"),
        ("generation_config.json", {"eos_token_id": [0, 300]}, "eos_token_id=[0, 300] holds 300"),
        ("config.json", {"bos_token_id": -1}, "config.json: bos_token_id=-1 is outside"),
        ("config.json", {"eos_token_id": True}, "eos_token_id=True is not a token id"),
    ],
)
def test_special_ids_are_checked_against_the_vocabulary(files, tmp_path, file, changes, message):
    path = _copy(files[1], tmp_path / "hf", file, **changes)
    with pytest.raises(CheckpointError, match=f"{file}: .*ids run from 0 to 299") as error:
        arlm.load(path)
    assert message in str(error.value)


def test_a_pad_id_outside_the_vocabulary_only_warns(files, tmp_path):
    path = _copy(files[1], tmp_path / "hf", pad_token_id=999_999)
    with pytest.warns(UserWarning, match="pad_token_id=999999 is outside .* ignored"):
        lm = arlm.load(path)
    assert len(lm.generate("the cat", max_tokens=2, min_tokens=2).token_ids) == 2


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"prompt": "ok"}\n\n{"prompt": "a\\ud800b"}\n',
            "p.jsonl:3: the prompt holds a lone surrogate",
        ),
        ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n", "p.jsonl:1: nested too deeply"),
        ('{"prompt": [true, false]}\n', "p.jsonl:1: prompt[0] is true, not a token id"),
        ('{"prompt": [5, -1]}\n', "p.jsonl:1: prompt[1] is -1, not a token id"),
        ('{"prompt": [' + "9" * 5000 + "]}\n", "p.jsonl:1: a number has more than"),
    ],
)
def test_prompts_file_faults_name_the_line_and_what_is_allowed(tmp_path, content, message):
    (tmp_path / "p.jsonl").write_text(content)
    with pytest.raises(ValueError) as error:
        read_prompts(str(tmp_path / "p.jsonl"))
    assert message in str(error.value)
    assert "must" in str(error.value) or "needs" in str(error.value)


def test_prompts_file_that_is_not_utf8_names_the_line(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"first\nsecond \xff\n")
    with pytest.raises(ValueError, match=r"p\.txt:2: byte 0xff is not UTF-8"):
        read_prompts(str(tmp_path / "p.txt"))


def test_prompts_keep_a_line_separator_inside_json_text(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a\u2028b"}\n{"prompt": [1, 2]}\n')
    assert read_prompts(str(tmp_path / "p.jsonl")) == ["a\u2028b", [1, 2]]


def test_generate_cli_reports_a_bad_prompts_file_without_a_traceback(files, tmp_path, capsys):
    (tmp_path / "p.jsonl").write_text('{"prompt": [true, false]}\n')
    code = main(["generate", str(files[0]), "--prompts-file", str(tmp_path / "p.jsonl")])
    err = capsys.readouterr().err
    assert code == 1 and "p.jsonl:1: prompt[0] is true" in err and "Traceback" not in err


def test_an_empty_corpus_spec_is_refused_not_read_as_this_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("text that must not be trained on\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CorpusError, match="corpus '' is empty"):
        resolve("")
    code = main(["train", "--corpus", "", "--out", str(tmp_path / "run"), "--preset", "tiny"])
    assert code == 1 and "corpus '' is empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()

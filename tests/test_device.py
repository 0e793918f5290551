"""``device="auto"`` and ``dtype="auto"``: where a model runs and in which dtype, and what a
checkpoint stores, read before its weights load. (The CUDA side is in test_cuda.py.)"""

from __future__ import annotations

import pytest
import torch
import transformers

import arlm
from arlm import placement
from arlm.devices import int64_tensor
from arlm.formats.checkpoint import save_model
from arlm.formats.stored import stored_weights
from tests.conftest import make_model


def test_auto_device_is_cuda_only_where_there_is_a_gpu():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert placement.resolve_device("auto").type == want
    assert placement.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="not a device; use auto, cpu"):
        placement.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            placement.resolve_device("cuda")


@pytest.fixture
def fresh_choice():
    placement.cpu_prefers.cache_clear()  # measured once per process; each case measures anew
    yield
    placement.cpu_prefers.cache_clear()


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("half_faster", [False, True])
def test_a_cpu_runs_a_half_checkpoint_in_half_only_when_native_and_measured_faster(
    monkeypatch, fresh_choice, native, half_faster
):
    monkeypatch.setattr(placement, "cpu_has_native", lambda dtype: native)
    # the measurement, as a CPU with native bfloat16 might report it (seconds per matmul)
    seconds = {torch.float32: 2.0, torch.bfloat16: 1.0 if half_faster else 1.95}
    monkeypatch.setattr(placement, "cpu_matmul_seconds", lambda dtype: seconds[dtype])
    want = torch.bfloat16 if native and half_faster else torch.float32
    assert placement.auto_dtype(torch.bfloat16, torch.device("cpu")) == want
    assert placement.auto_dtype(torch.float32, torch.device("cpu")) == torch.float32


def test_the_cpu_matmul_probe_runs_in_each_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        assert 0 < placement.cpu_matmul_seconds(dtype, repeats=1) < 60


def test_stored_weights_of_an_arlm_checkpoint(tmp_path, tokenizer):
    model = make_model("llama").to(torch.bfloat16)
    save_model(tmp_path, model, tokenizer)
    stored = stored_weights(tmp_path)
    n = sum(p.numel() for p in model.parameters())  # a tied head is stored once
    assert stored.dtype == torch.bfloat16 and stored.float_elements == n
    assert stored.nbytes(torch.float32) == 4 * n and stored.nbytes(torch.bfloat16) == 2 * n


def test_stored_weights_count_quantized_integers_apart(tmp_path, tokenizer):
    from arlm.model.quantize import quantize

    model = quantize(make_model("llama"), "int8", 32)
    save_model(tmp_path, model, tokenizer)
    stored = stored_weights(tmp_path)
    state = model.state_dict()
    floats = sum(t.numel() for t in state.values() if t.is_floating_point())
    ints = sum(t.numel() * t.element_size() for t in state.values() if not t.is_floating_point())
    assert ints > 0 and stored.other_bytes == ints and stored.float_elements == floats


def test_auto_dtype_follows_a_bfloat16_hugging_face_checkpoint(tmp_path, tokenizer, fresh_choice):
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    tokenizer.save(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    assert stored_weights(tmp_path).dtype == torch.bfloat16
    lm = arlm.load(tmp_path)  # auto device, auto dtype
    want = placement.auto_dtype(torch.bfloat16, placement.resolve_device("auto"))
    assert lm.model.wte.weight.dtype == want
    if not torch.cuda.is_available() and not placement.cpu_has_native(torch.bfloat16):
        assert want == torch.float32  # today's CPU rule where bfloat16 is emulated
    assert arlm.load(tmp_path, device="cpu", dtype=None).model.wte.weight.dtype == torch.float32


def test_int64_tensor_holds_the_values_given():
    values = [0, -1, 2**40, 7, 2**63 - 1]
    out = int64_tensor(values)
    assert out.dtype == torch.long and out.tolist() == values
    assert int64_tensor([]).shape == (0,) and int64_tensor(range(3)).tolist() == [0, 1, 2]

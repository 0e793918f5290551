"""Weight-only quantization and the packed CPU kernels: the same model, smaller or faster.

Tolerances are stated on the logits of a whole teacher-forced sequence, as the relative error
||logits - reference|| / ||reference||: float kernels agree to rounding, int8 to about 1%, int4
(16 levels per group) to about 10%.
"""

import copy

import pytest
import torch
from safetensors import safe_open

import arlm
from arlm.api import LM
from arlm.cli import main
from arlm.config import ModelConfig
from arlm.formats.checkpoint import load_model, save_model
from arlm.formats.gguf import export_gguf
from arlm.formats.hf import export_hf
from arlm.model.packing import (
    PackedInt4Linear,
    PackedInt8Linear,
    PackedLinear,
    pack,
    weight_bytes,
)
from arlm.model.quantize import Int4Linear, Int8Linear, quantize
from arlm.model.transformer import Transformer
from tests.conftest import make_model
from tests.numerics import assert_clear_choices, assert_close, choice_logits

FAMILIES = ["gpt2", "llama"]
bf16_kernels = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bfloat16 kernel on this CPU"
)


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits.float() - reference.float()).norm() / reference.float().norm()).item()


@torch.inference_mode()
def logits_of(model, idx):
    return model(idx)[0]


def tokens(vocab_size: int, T: int = 48) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, T), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_float_kernels_compute_the_same_model(family):
    model = make_model(family)
    packed = pack(copy.deepcopy(model))
    assert all(not isinstance(m, torch.nn.Linear) for m in packed.modules())
    idx = tokens(512)
    assert_close(logits_of(packed, idx), logits_of(model, idx))  # oneDNN's order of summing


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_model_generates_the_same_greedy_tokens(family, tokenizer):
    model = make_model(family, vocab_size=tokenizer.vocab_size)
    plain = LM(model, tokenizer).generate("The for", max_tokens=32, temperature=0)
    fast = LM(pack(copy.deepcopy(model)), tokenizer).generate(
        "The for", max_tokens=32, temperature=0
    )
    # the packed kernels round otherwise: this prompt holds no near-tie that could flip a token
    assert_clear_choices(choice_logits(model, tokenizer.encode("The for"), plain.token_ids))
    assert fast.token_ids == plain.token_ids


@bf16_kernels
def test_packed_bfloat16_kernels_match_plain_bfloat16():
    model = make_model("llama").to(torch.bfloat16)
    packed = pack(copy.deepcopy(model))
    assert (
        isinstance(packed.lm_head, PackedLinear) and packed.lm_head.packed.dtype == torch.bfloat16
    )
    idx = tokens(512)
    assert relative_error(logits_of(packed, idx), logits_of(model, idx)) < 0.02


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "method, tolerance, packed_tolerance", [("int8", 0.03, 0.05), ("int4", 0.25, 0.25)]
)
def test_quantized_logits_stay_close_to_float(family, method, tolerance, packed_tolerance):
    model = make_model(family)
    idx = tokens(512)
    reference = logits_of(model, idx)
    quantized = quantize(copy.deepcopy(model), method)
    layer = Int8Linear if method == "int8" else Int4Linear
    assert isinstance(quantized.lm_head, layer) and isinstance(quantized.h[0].mlp.c_fc, layer)
    error = relative_error(logits_of(quantized, idx), reference)
    assert error < tolerance
    # the fast kernels compute the same quantized model; int8's also rounds the activations
    packed = pack(copy.deepcopy(quantized))
    kind = PackedInt8Linear if method == "int8" else PackedInt4Linear
    assert isinstance(packed.h[0].attn.c_attn, kind)
    assert relative_error(logits_of(packed, idx), reference) < packed_tolerance


def test_int4_codes_are_the_nearest_levels_of_each_group():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 3)
    q = Int4Linear.from_linear(linear, group_size=32)
    w = linear.weight.detach()
    error = (q.dequantize(torch.float32) - w).abs().reshape(3, 2, 32)
    step = q.weight_scale.float()  # one level apart, per group
    assert (error <= step[..., None] / 2 + 1e-3 * step[..., None]).all()
    codes = q.codes()
    assert codes.min() == 0 and codes.max() == 15  # each group's min and max are levels


def test_int8_scale_maps_each_rows_largest_weight_to_127():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 4)
    q = Int8Linear.from_linear(linear)
    assert (q.weight.abs().amax(dim=1) == 127).all()
    assert torch.allclose(
        q.dequantize(torch.float32), linear.weight, atol=q.weight_scale.max().item()
    )


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_checkpoint_loads_without_requantizing(tmp_path, tokenizer, method):
    model = quantize(make_model("llama", vocab_size=tokenizer.vocab_size), method)
    save_model(tmp_path / "q", model, tokenizer)
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        stored = f.get_tensor("h.0.mlp.c_fc.weight")
    assert stored.dtype == (torch.int8 if method == "int8" else torch.uint8)
    loaded, _ = load_model(tmp_path / "q")
    assert loaded.config.quantization == method
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # through arlm.load the layers are packed, and the checkpoint is the same when saved again
    lm = arlm.load(tmp_path / "q")
    save_model(tmp_path / "again", lm.model, tokenizer)
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        tmp_path / "q" / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_bytes_and_parameter_count(family):
    model = make_model(family)
    n = model.num_params()
    float_bytes = weight_bytes(model)
    int8 = quantize(copy.deepcopy(model), "int8")
    int4 = quantize(copy.deepcopy(model), "int4")
    assert int8.num_params() == n == pack(int4).num_params()
    assert 0.25 < weight_bytes(int8) / float_bytes < 0.26
    assert 0.15 < weight_bytes(int4) / float_bytes < 0.16  # half a byte + 4 per 32 weights
    assert weight_bytes(pack(copy.deepcopy(model))) == float_bytes


def test_a_decode_step_of_a_mixture_of_experts_reads_its_chosen_experts():
    """weight_bytes counts the router and top_k of n_experts experts, float or quantized: what
    one token's step reads."""
    config = ModelConfig.preset("llama-tiny", n_experts=8, n_experts_per_tok=2)
    model = Transformer(config)
    experts = sum(
        m.weight.numel() * 4
        for n, m in model.named_modules()
        if ".experts." in n and hasattr(m, "weight")
    )
    dense = sum(
        m.weight.numel() * 4
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".experts." not in n
    )
    assert weight_bytes(model) == dense + experts * 2 // 8  # dense: routers, attention, head
    int8 = quantize(copy.deepcopy(model), "int8")
    assert 0.25 < weight_bytes(int8) / weight_bytes(model) < 0.27  # the routers stay float
    assert all(b.mlp.router.weight.dtype == torch.float32 for b in int8.h)


def test_quantize_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="choose one of"):
        quantize(make_model("gpt2"), "int3")
    with pytest.raises(ValueError, match="quant_group_size=48"):
        quantize(make_model("gpt2"), "int4", group_size=48)
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="do not divide the 128 inputs"):
        quantize(model, "int4", group_size=256)
    assert model.config.quantization is None and isinstance(model.h[0].attn.c_attn, torch.nn.Linear)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(quantize(make_model("gpt2"), "int8"), "int8")
    with pytest.raises(ValueError, match="no float nn.Linear layers"):
        quantize(pack(make_model("gpt2")), "int8")


def test_export_of_a_quantized_model_asks_for_float_weights(tmp_path, tokenizer):
    model = quantize(make_model("llama", vocab_size=tokenizer.vocab_size), "int8")
    with pytest.raises(ValueError, match="needs float weights"):
        export_hf(model, tokenizer, tmp_path / "hf")
    with pytest.raises(ValueError, match="needs float weights"):
        export_gguf(model, tokenizer, tmp_path / "m.gguf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "m.gguf").exists()


def test_quantize_from_the_command_line(tmp_path, capsys, trained_run):
    _, result = trained_run
    out = tmp_path / "int8"
    assert (
        main(["export", str(result.out), str(out), "--format", "arlm", "--quantize", "int8"]) == 0
    )
    lm = arlm.load(out)
    assert lm.config.quantization == "int8"
    float_lm = arlm.load(result.out)
    text = "The for statement"
    # a trained model's logits are peaked enough that int8 keeps its greedy choices
    assert (
        lm.generate(text, max_tokens=24, temperature=0).token_ids
        == float_lm.generate(text, max_tokens=24, temperature=0).token_ids
    )
    assert abs(lm.score(text).perplexity / float_lm.score(text).perplexity - 1) < 0.02
    capsys.readouterr()
    assert (
        main(["generate", str(result.out), "The", "--quantize", "int4", "--max-tokens", "4"]) == 0
    )
    assert main(["export", str(result.out), str(tmp_path / "x"), "--format", "arlm"]) == 0
    assert main(["export", str(result.out), str(out), "--format", "arlm"]) == 1
    assert "not an empty folder" in capsys.readouterr().err
    code = main(["generate", str(result.out), "The", "--quantize", "int4", "--group-size", "48"])
    assert code == 1 and "quant_group_size=48" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_model_cast_to_bfloat16_keeps_its_scales_and_runs(family, method, tokenizer):
    model = quantize(make_model(family, vocab_size=tokenizer.vocab_size), method)
    layer = model.h[0].attn.c_attn
    scale = layer.weight_scale.clone()
    model.to(torch.bfloat16)
    assert model.wte.weight.dtype == torch.bfloat16
    assert layer.weight_scale.dtype == scale.dtype and torch.equal(layer.weight_scale, scale)
    packed = pack(copy.deepcopy(model))
    state, packed_state = model.state_dict(), packed.state_dict()
    assert list(packed_state) == list(state)
    assert all(
        packed_state[k].dtype == t.dtype and torch.equal(packed_state[k], t)
        for k, t in state.items()
    )
    for lm in (LM(model, tokenizer), LM(packed, tokenizer)):
        out = lm.generate("The", max_tokens=8, temperature=0, ignore_eos=True)
        assert len(out.token_ids) == 8

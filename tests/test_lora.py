"""LoRA adapters: the module's arithmetic, and PEFT parity both ways (arlm writes and PEFT
loads; PEFT writes and arlm applies) on tiny random models built locally with transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from arlm.config import ModelConfig
from arlm.formats.checkpoint import CheckpointError
from arlm.formats.hf import hf_model_type, load_hf
from arlm.formats.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Adapter,
    adapter_files,
    apply_adapter,
    is_adapter_dir,
    load_adapter_weights,
    lora_targets,
    read_adapter,
)
from arlm.model import Transformer
from arlm.model.lora import LoRAConfig, LoRALinear, add_lora, lora_modules, merge_lora
from arlm.tokenizer import EOT, Tokenizer
from tests.numerics import assert_close, tolerance

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 512
COMMON = dict(
    vocab_size=VOCAB,
    max_position_embeddings=128,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
)
# grouped-query Llama (separate q, k, v, gate, up); GPT-2 (one Conv1D c_attn, stored
# transposed); Phi-3 (fused qkv_proj and gate_up_proj, in arlm's row order)
CASES = {
    "llama": ("LlamaConfig", COMMON),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4)),
    "phi3": ("Phi3Config", dict(COMMON, partial_rotary_factor=0.5, pad_token_id=0)),
}
LLAMA_NAMES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


def _randomize(model: nn.Module, seed: int) -> None:
    """Weights large enough that the logits spread (transformers initialises tiny ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            norm = "norm" in name or "ln_" in name
            p.copy_(1 + 0.1 * noise if norm and name.endswith("weight") else 0.15 * noise)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory, tokenizer: Tokenizer) -> dict[str, Path]:
    """kind -> a Hugging Face folder of a tiny random model, with a tokenizer arlm reads."""
    eot = tokenizer.token_to_id(EOT)
    folders = {}
    for seed, (kind, (config_name, kwargs)) in enumerate(CASES.items()):
        config = getattr(transformers, config_name)(**kwargs, bos_token_id=eot, eos_token_id=eot)
        model = transformers.AutoModelForCausalLM.from_config(config)
        _randomize(model, seed)
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        tokenizer.save(folder / "tokenizer.json")
        folders[kind] = folder
    return folders


IDS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def _randomize_b(model: nn.Module) -> None:
    """Non-zero updates (a new adapter's B is zero, and would pass any parity test)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for wrapper in lora_modules(model).values():
            for b in wrapper.lora_B:
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def _write(files: dict[str, bytes], folder: Path) -> Path:
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _adapted(folder: Path, targets, lora: LoRAConfig) -> Transformer:
    """The model of ``folder`` with random non-zero adapters on ``targets``."""
    model, _ = load_hf(folder)
    add_lora(model, lora, lora_targets(model, targets))
    _randomize_b(model)
    return model


def _assert_moved(adapted: torch.Tensor, base: torch.Tensor) -> None:
    """The adapter changes the logits by far more than a parity test's tolerance."""
    assert (adapted - base).abs().max() > 1000 * tolerance(base.abs().max().item())


# ---------------------------------------------------------------------------------------------
# the module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_new_adapter_leaves_the_output_unchanged(dtype):
    base = nn.Linear(32, 48).to(dtype)
    wrapper = LoRALinear(base, LoRAConfig(rank=4, alpha=8), ((16, True), (16, False), (16, True)))
    x = torch.randn(3, 5, 32, dtype=dtype)
    assert torch.equal(wrapper(x), base(x))
    assert all(p.dtype == torch.float32 for p in [*wrapper.lora_A, *wrapper.lora_B])
    assert [tuple(a.shape) for a in wrapper.lora_A] == [(4, 32), (4, 32)]
    assert [tuple(b.shape) for b in wrapper.lora_B] == [(16, 4), (16, 4)]
    assert not any(p.requires_grad for p in base.parameters())


def test_merged_weight_computes_what_the_adapter_does():
    torch.manual_seed(0)
    base = nn.Linear(32, 48)
    wrapper = LoRALinear(base, LoRAConfig(rank=4, alpha=8), ((16, True), (16, False), (16, True)))
    _randomize_b(nn.ModuleDict({"w": wrapper}))
    x = torch.randn(3, 5, 32)
    out = wrapper(x)
    _assert_moved(out, base(x))
    assert torch.equal(out[..., 16:32], base(x)[..., 16:32])  # the unadapted slice
    merged = F.linear(x, wrapper.merged_weight(), base.bias)
    assert_close(merged, out)


def test_scaling():
    assert LoRAConfig(rank=16, alpha=8).scaling == 0.5
    assert LoRAConfig(rank=16, alpha=8, use_rslora=True).scaling == 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0, alpha=8), "rank=0 .* integer >= 1"),
        (dict(rank=2.0, alpha=8), "rank=2.0"),
        (dict(rank=4, alpha=0), r"alpha=0 .* > 0"),
        (dict(rank=4, alpha=math.nan), "alpha=nan"),
        (dict(rank=4, alpha=8, dropout=1.0), r"dropout=1.0 .* in \[0, 1\)"),
        (dict(rank=4, alpha=8, use_rslora="yes"), "use_rslora='yes'"),
    ],
)
def test_bad_config_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_only_the_adapters_train_and_a_seed_draws_the_same_adapter():
    config = ModelConfig.preset("llama-tiny", vocab_size=64, n_layer=2)
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        model = Transformer(config)
        torch.manual_seed(1)
        add_lora(model, LoRAConfig(rank=2, alpha=4), lora_targets(model, "all-linear"))
        models.append(model)
    a, b = (dict(m.named_parameters()) for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained = {k for k, p in a.items() if p.requires_grad}
    assert trained and all(".lora_A." in k or ".lora_B." in k for k in trained)
    _, loss = models[0](IDS % 64, IDS % 64)
    loss.backward()
    assert all(a[k].grad is None for k in a if k not in trained)
    assert all(a[k].grad.abs().sum() > 0 for k in trained if ".lora_B." in k)


def test_add_lora_refuses_what_it_cannot_wrap():
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=64, n_layer=1))
    lora = LoRAConfig(rank=2, alpha=4)
    with pytest.raises(ValueError, match="no module 'h.5.attn.c_attn'"):
        add_lora(model, lora, {"h.5.attn.c_attn": ((384, True),)})
    with pytest.raises(ValueError, match="cover 100 output rows; the linear layer has 256"):
        add_lora(model, lora, {"h.0.attn.c_attn": ((100, True),)})
    add_lora(model, lora, {"h.0.attn.c_attn": ((256, True),)})
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model, lora, {"h.0.attn.c_attn": ((256, True),)})


# ---------------------------------------------------------------------------------------------
# targets


def test_targets_follow_peft_matching():
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=64, n_layer=2))
    assert hf_model_type(model.config) == "llama"
    q, kv = 128, 64  # rows of q, and of k and of v (2 of 4 heads)
    assert lora_targets(model, ["q_proj", "v_proj"]) == {
        f"h.{i}.attn.c_attn": ((q, True), (kv, False), (kv, True)) for i in range(2)
    }
    # a list entry matches a name's last components; a string must match the whole name
    hidden = model.config.intermediate_size
    assert lora_targets(model, ["layers.1.mlp.up_proj"]) == {
        "h.1.mlp.c_fc": ((hidden, False), (hidden, True))
    }
    assert list(lora_targets(model, r".*\.0\.self_attn\.o_proj")) == ["h.0.attn.c_proj"]
    assert len(lora_targets(model, "all-linear")) == 2 * 4
    with pytest.raises(ValueError, match=f"'q_porj' matches no module .* {LLAMA_NAMES}"):
        lora_targets(model, ["q_proj", "q_porj"])
    with pytest.raises(ValueError, match="names lm_head, .* not to embeddings"):
        lora_targets(model, ["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="names model.embed_tokens"):
        lora_targets(model, ["embed_tokens"])


def test_targets_of_a_mixture_of_experts_are_its_attention():
    config = ModelConfig.preset("llama-tiny", vocab_size=64, n_layer=1, n_experts=4)
    model = Transformer(config)
    assert hf_model_type(config) == "mixtral"
    assert list(lora_targets(model, "all-linear")) == ["h.0.attn.c_attn", "h.0.attn.c_proj"]
    with pytest.raises(ValueError, match="experts.0.w1, .* router and experts"):
        lora_targets(model, ["q_proj", "w1"])
    with pytest.raises(ValueError, match="block_sparse_moe.gate, .* router and experts"):
        lora_targets(model, ["gate"])


# ---------------------------------------------------------------------------------------------
# PEFT parity


@pytest.mark.parametrize(
    "kind, targets",
    [
        ("llama", "all-linear"),
        ("llama", ("q_proj", "v_proj")),
        ("gpt2", "all-linear"),
        ("phi3", "all-linear"),
    ],
)
def test_peft_loads_what_arlm_writes(kind, targets, hf_folders, tmp_path):
    folder = hf_folders[kind]
    lora = LoRAConfig(rank=4, alpha=8)
    model = _adapted(folder, targets, lora)
    adapter = _write(adapter_files(model, Adapter(lora, targets, str(folder))), tmp_path / "a")
    assert is_adapter_dir(adapter) and not is_adapter_dir(folder)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    assert config["fan_in_fan_out"] == (kind == "gpt2")
    if targets == "all-linear":  # written as the names it selected
        assert (
            config["target_modules"]
            == {
                "llama": LLAMA_NAMES.split(", "),
                "gpt2": ["c_attn", "c_proj", "c_fc"],
                "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
            }[kind]
        )
    ours = _logits(model)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    base = _logits(hf)
    _assert_moved(ours, base)
    want = _logits(peft.PeftModel.from_pretrained(hf, adapter).eval())
    assert_close(ours, want)
    merge_lora(model)
    assert not lora_modules(model)
    assert_close(_logits(model), want)


@pytest.mark.parametrize(
    "kind, targets, rslora",
    [
        ("llama", "all-linear", False),
        ("llama", ["q_proj", "v_proj"], True),
        ("gpt2", ["c_attn", "mlp.c_proj"], False),
        ("phi3", ["qkv_proj", "down_proj"], False),
    ],
)
def test_arlm_applies_what_peft_writes(kind, targets, rslora, hf_folders, tmp_path):
    folder = hf_folders[kind]
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    base = _logits(hf)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        use_rslora=rslora,
        init_lora_weights=False,
        fan_in_fan_out=kind == "gpt2",  # GPT-2's Conv1D
    )
    adapted = peft.get_peft_model(hf, config).eval()
    adapted.save_pretrained(tmp_path)
    want = _logits(adapted)
    _assert_moved(want, base)
    model, _ = load_hf(folder)
    apply_adapter(model, tmp_path)
    assert not lora_modules(model)
    assert_close(_logits(model), want)


def test_resume_loads_the_adapter_it_saved(hf_folders, tmp_path):
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.1)
    saved = _adapted(hf_folders["llama"], ("q_proj", "down_proj"), lora)
    adapter = Adapter(lora, ("q_proj", "down_proj"), None)
    _write(adapter_files(saved, adapter), tmp_path / "a")
    assert read_adapter(tmp_path / "a") == adapter
    resumed, _ = load_hf(hf_folders["llama"])
    add_lora(resumed, lora, lora_targets(resumed, adapter.target_modules))
    load_adapter_weights(resumed, tmp_path / "a")
    want = {k: p for k, p in saved.named_parameters() if p.requires_grad}
    got = {k: p for k, p in resumed.named_parameters() if p.requires_grad}
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter_dir(hf_folders, tmp_path_factory) -> Path:
    """A valid adapter of the llama folder, on q_proj and v_proj."""
    lora = LoRAConfig(rank=4, alpha=8)
    model = _adapted(hf_folders["llama"], ("q_proj", "v_proj"), lora)
    files = adapter_files(model, Adapter(lora, ("q_proj", "v_proj"), None))
    return _write(files, tmp_path_factory.mktemp("adapter") / "a")


def _copy(adapter_dir: Path, tmp_path: Path, config=None, tensors=None) -> Path:
    """``adapter_dir`` copied, with its config and tensors changed by the given functions."""
    out = tmp_path / "changed"
    out.mkdir()
    c = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    (out / ADAPTER_CONFIG).write_text(json.dumps(config(c) if config else c))
    t = load_file(adapter_dir / ADAPTER_WEIGHTS)
    save_file(tensors(t) if tensors else t, out / ADAPTER_WEIGHTS)
    return out


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(use_dora=True), "use_dora=True .*DoRA"),
        (dict(bias="all"), "bias='all' .* supported: 'none'"),
        (dict(modules_to_save=["lm_head"]), "modules_to_save=\\['lm_head'\\]"),
        (dict(rank_pattern={"q_proj": 8}), "rank_pattern="),
        (dict(layers_to_transform=[0]), "layers_to_transform=\\[0\\]"),
        (dict(peft_type="IA3"), "peft_type='IA3' .* 'LORA'"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' changes the base"),
        (dict(r=0), "rank=0 is not allowed.*read from r"),
        (dict(target_modules=None), "target_modules=None"),
    ],
)
def test_settings_arlm_does_not_compute_are_refused(adapter_dir, tmp_path, change, match):
    folder = _copy(adapter_dir, tmp_path, config=lambda c: {**c, **change})
    with pytest.raises(CheckpointError, match=match):
        read_adapter(folder)


def test_an_unknown_target_lists_the_valid_ones(adapter_dir, hf_folders, tmp_path):
    folder = _copy(adapter_dir, tmp_path, config=lambda c: {**c, "target_modules": ["query"]})
    model, _ = load_hf(hf_folders["llama"])
    with pytest.raises(ValueError, match=f"'query' matches no module .* {LLAMA_NAMES}"):
        apply_adapter(model, folder)


Q_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    "tensors, match",
    [
        (lambda t: {k: v for k, v in t.items() if k != Q_A}, f"{Q_A} is missing"),
        (
            lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)},
            "unexpected tensors \\['base_model.model.lm_head.lora_A.weight'\\]",
        ),
        (lambda t: {**t, Q_A: torch.zeros(8, 64)}, f"{Q_A} is torch.float32 of shape \\(8, 64\\)"),
        (lambda t: {**t, Q_A: torch.full((4, 64), math.inf)}, f"{Q_A}.*inf"),
    ],
)
def test_bad_tensors_are_refused_and_the_model_is_left_as_it_was(
    adapter_dir, hf_folders, tmp_path, tensors, match
):
    folder = _copy(adapter_dir, tmp_path, tensors=tensors)
    model, _ = load_hf(hf_folders["llama"])
    before = _logits(model)
    with pytest.raises(CheckpointError, match=match):
        apply_adapter(model, folder)
    assert not lora_modules(model)
    assert torch.equal(_logits(model), before)


def test_missing_files_are_refused(adapter_dir, tmp_path):
    (tmp_path / ADAPTER_CONFIG).write_bytes((adapter_dir / ADAPTER_CONFIG).read_bytes())
    with pytest.raises(CheckpointError, match=f"has no {ADAPTER_WEIGHTS}"):
        read_adapter(tmp_path)
    with pytest.raises(CheckpointError, match=f"has no {ADAPTER_CONFIG}"):
        read_adapter(tmp_path / "nowhere")

"""Hugging Face import/export parity: tiny random-weight models built locally with transformers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tokenizers
import torch
from safetensors.torch import load_file, save_file

import arlm
from arlm.config import ModelConfig
from arlm.formats.checkpoint import CheckpointError
from arlm.formats.hf import config_from_hf, export_hf, is_hf_dir, load_hf, resolve_dtype
from arlm.model import Transformer, rope_frequencies
from arlm.tokenizer import EOT, Tokenizer
from tests.numerics import assert_close, assert_decode_matches, hf_greedy

transformers = pytest.importorskip("transformers")

VOCAB = 512
# bf16 logits (|logit| up to ~6) against transformers in bf16: llama-family models agree bit for
# bit; GPT-2 differs by up to 0.047 because transformers' gelu_new rounds each step to bf16
BF16_ATOL = 0.1

COMMON = dict(
    vocab_size=VOCAB,
    max_position_embeddings=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=96,
)
CASES = {
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4)),
    "llama-mha-untied": ("LlamaConfig", dict(COMMON, num_key_value_heads=4)),
    "llama-gqa-tied-theta": (
        "LlamaConfig",
        dict(
            COMMON,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
    ),
    "llama-mqa-llama3-bias": (
        "LlamaConfig",
        dict(
            COMMON,
            num_key_value_heads=1,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mistral": ("MistralConfig", dict(COMMON, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(COMMON, num_key_value_heads=2, tie_word_embeddings=True)),
}

TEXTS = [
    "Hello, world!",
    "  leading, trailing and   inner   runs \t\t of whitespace\n\n\n  ",
    "emoji 🙂🚀👩‍👩‍👧, CJK 你好世界 日本語, combining é vs e\u0301, Ω≈ç√",
    f"special {EOT}tokens{EOT} inside {EOT}",
    "",
]


# Qwen2's pre-tokenizer: transformers 5 imposes it on every qwen2 folder, whatever its
# tokenizer.json says, so a qwen2 test folder needs a tokenizer built this way
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _corpus() -> str:
    from pydoc_data.topics import topics

    return "\n".join(topics.values())[:100_000]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([_corpus()], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def qwen2_tokenizer() -> Tokenizer:
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator([_corpus()], trainer=trainer)
    return Tokenizer(tk)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    # large enough weights that the next-token margins are wide (bf16 rounding cannot flip greedy
    # picks), and non-zero biases, which transformers initialises to zero
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name or "ln_" in name:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def _write_tokenizer(tokenizer: Tokenizer, folder: Path) -> None:
    tokenizer.save(folder / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOT,
        "bos_token": EOT,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _save_hf(kind: str, folder: Path, tokenizer: Tokenizer, **save_kwargs):
    config_name, kwargs = CASES[kind]
    eot = tokenizer.token_to_id(EOT)
    config = getattr(transformers, config_name)(**kwargs, bos_token_id=eot, eos_token_id=eot)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomize(model, seed=len(kind))
    model.save_pretrained(folder, **save_kwargs)
    _write_tokenizer(tokenizer, folder)
    return model.eval()


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory, tokenizer, qwen2_tokenizer):
    folder = tmp_path_factory.mktemp(request.param)
    tok = qwen2_tokenizer if request.param == "qwen2" else tokenizer
    return folder, _save_hf(request.param, folder, tok)


def _ids(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids).logits[0].float()


def _arlm_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0][0].float()


def _lm_greedy(lm, ids: torch.Tensor, n: int = 32) -> list[int]:
    return lm.generate(ids[0].tolist(), max_tokens=n, temperature=0, ignore_eos=True).token_ids


# ---------------------------------------------------------------------------------------------
# import parity


def test_is_hf_dir(llama_copy, tmp_path_factory):
    assert is_hf_dir(llama_copy[0])
    arlm_dir = tmp_path_factory.mktemp("arlm")
    (arlm_dir / "config.json").write_text(json.dumps(ModelConfig().to_dict()))
    assert not is_hf_dir(arlm_dir)
    assert not is_hf_dir(arlm_dir / "missing")


def test_logits_and_greedy_fp32(hf_case):
    folder, hf = hf_case
    lm = arlm.load(folder, device="cpu", dtype=None)
    model = lm.model
    assert model.wte.weight.dtype == torch.float32
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if model.config.positions == "rope":  # computed, not loaded: the meta-device build keeps it
        assert torch.equal(model.inv_freq["full"], rope_frequencies(model.config).repeat(2))
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.wte.weight
    ids = _ids()
    assert_close(lm.logits(ids[0].tolist()), _hf_logits(hf, ids))
    prompt = _ids(8, seed=1)
    assert _lm_greedy(lm, prompt) == hf_greedy(hf, prompt)


def test_logits_and_greedy_bf16(hf_case):
    folder, hf = hf_case
    lm = arlm.load(folder, device="cpu", dtype="bfloat16")
    assert lm.model.wte.weight.dtype == torch.bfloat16
    # from_pretrained, not hf.to(bf16): that would round the rotary frequencies, which neither
    # transformers' loader nor arlm does
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ids = _ids()
    diff = (lm.logits(ids[0].tolist()) - _hf_logits(hf16, ids)).abs().max().item()
    assert diff < BF16_ATOL, diff
    if hf.config.model_type == "gpt2":
        # gelu_new rounds each of its elementwise steps to bf16; gelu_pytorch_tanh is the same
        # function in one kernel, as arlm computes it, and makes the two runs bit-identical
        hf16 = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, activation_function="gelu_pytorch_tanh"
        )
    assert_decode_matches(lm, hf16.eval(), _ids(8, seed=1), BF16_ATOL)


def test_tokenizer_matches_autotokenizer(hf_case):
    folder, _ = hf_case
    _, tok = load_hf(folder)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids)
    assert tok.eos_token_ids == [tok.token_to_id(EOT)]


def test_sharded_weights(tmp_path, tokenizer):
    hf = _save_hf("llama-gqa-tied-theta", tmp_path, tokenizer, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model, _ = load_hf(tmp_path)
    ids = _ids()
    assert_close(_arlm_logits(model, ids), _hf_logits(hf, ids))


def test_gpt2_names_without_prefix(tmp_path, tokenizer):
    # the Hub's original GPT-2 files name tensors without `transformer.` and carry mask buffers
    hf = _save_hf("gpt2", tmp_path, tokenizer)
    state = load_file(tmp_path / "model.safetensors")
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, 128, 128)
    save_file(state, tmp_path / "model.safetensors", {"format": "pt"})
    model, _ = load_hf(tmp_path)
    ids = _ids()
    assert_close(_arlm_logits(model, ids), _hf_logits(hf, ids))


def test_generation_config_and_chat_template(llama_copy):
    tmp_path, _ = llama_copy
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 7]}))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "T"},
        {"name": "default", "template": "D"},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    _, tok = load_hf(tmp_path)
    assert tok.eos_token_ids == [3, 7]
    assert tok.chat_template == "D"


# ---------------------------------------------------------------------------------------------
# export parity


def _arlm_model(name: str, **overrides) -> Transformer:
    model = Transformer(ModelConfig.preset(name, vocab_size=VOCAB, **overrides))
    _randomize(model, seed=1)
    return model.eval()


LINEAR = {"rope_type": "linear", "factor": 2.0}
EXPORTS = {
    "gpt2": ("tiny", {}, "gpt2"),
    "gpt2-untied": ("tiny", {"tie_embeddings": False}, "gpt2"),
    "llama": ("llama-tiny", {}, "llama"),
    "llama-bias-llama3": (
        "llama-tiny",
        {
            "bias": True,
            "tie_embeddings": False,
            "rope_theta": 5e5,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
        "llama",
    ),
    "qwen2": ("llama-tiny", {"qkv_bias": True}, "qwen2"),
    # the gemma family: windows of 8 on layers 1 and 3 with their own rope theta, the others'
    # stretched 2x; an attention scale and a logit cap of its own; head_dim 48 of n_embd 128
    "gemma3": (
        "llama-tiny",
        {
            "family": "gemma",
            "qk_norm": True,
            "head_dim": 48,
            "sliding_window": 8,
            "layer_types": ["full_attention", "sliding_attention"] * 2,
            "rope_local_theta": 100.0,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "attn_scale": 0.125,
            "logit_softcap": 4.0,
            "tie_embeddings": False,
        },
        "gemma3_text",
    ),
    # half of each head rotating: only phi3 holds it (with a window on every layer)
    "phi3-partial": ("llama-tiny", {"rotary_dim": 16, "sliding_window": 8}, "phi3"),
    "phi3-longrope": (
        "llama-tiny",
        {
            "rope_scaling": {
                "rope_type": "longrope",
                "short_factor": [1.0 + 0.1 * i for i in range(16)],
                "long_factor": [1.0 + 2.0 * i for i in range(16)],
                "original_max_position_embeddings": 16,
            },
        },
        "phi3",
    ),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_loads_in_transformers(case, tmp_path, tokenizer, qwen2_tokenizer):
    preset, overrides, model_type = EXPORTS[case]
    if model_type == "qwen2":
        tokenizer = qwen2_tokenizer
    model = _arlm_model(preset, **overrides)
    out = tmp_path / "hf"
    export_hf(model, tokenizer, out)
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = _ids()
    expected = _arlm_logits(model, ids)
    assert_close(_hf_logits(hf, ids), expected)
    again, tok = load_hf(out)  # and back
    assert_close(_arlm_logits(again, ids), expected)
    ref = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text) == tokenizer.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    assert ref.eos_token == EOT


def test_export_writes_tied_weights_once(tmp_path, tokenizer):
    export_hf(_arlm_model("llama-tiny"), tokenizer, tmp_path / "hf")
    names = load_file(tmp_path / "hf" / "model.safetensors")
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names


def test_export_refuses_non_empty_dir(tmp_path, tokenizer):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_hf(_arlm_model("tiny"), tokenizer, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()  # an empty folder is fine, and nothing is left beside it
    export_hf(_arlm_model("tiny"), tokenizer, tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "keep.txt"]
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_export_refuses_layouts_hf_lacks(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="gpt2-family"):
        export_hf(_arlm_model("tiny", bias=False), tokenizer, tmp_path / "a")
    with pytest.raises(ValueError, match="no Hugging Face layout"):
        export_hf(_arlm_model("llama-tiny", bias=True, qkv_bias=False), tokenizer, tmp_path / "b")
    with pytest.raises(ValueError, match="gemma-family model with bias=True"):
        export_hf(_arlm_model("llama-tiny", family="gemma", bias=True), tokenizer, tmp_path / "c")
    local = dict(family="gemma", sliding_window=8, rope_local_theta=10.0)
    with pytest.raises(ValueError, match="rope_local_theta=10.0 without q/k norms"):
        export_hf(_arlm_model("llama-tiny", **local), tokenizer, tmp_path / "f")
    with pytest.raises(ValueError, match="attn_softcap=30.0 has a Hugging Face layout in gemma2"):
        export_hf(_arlm_model("llama-tiny", attn_softcap=30.0), tokenizer, tmp_path / "g")
    with pytest.raises(ValueError, match="rotary_dim=16 .* partial rotary in phi3"):
        export_hf(_arlm_model("llama-tiny", rotary_dim=16, qk_norm=True), tokenizer, tmp_path / "d")
    scaled = dict(family="gemma", qk_norm=True, sliding_window=8, rope_scaling=LINEAR)
    with pytest.raises(ValueError, match="rope_scaling=.* on the sliding-window layers"):
        export_hf(_arlm_model("llama-tiny", **scaled), tokenizer, tmp_path / "e")
    with pytest.raises(ValueError, match="layout in the llama family only .* gpt2-family"):
        export_hf(_arlm_model("tiny", n_experts=4), tokenizer, tmp_path / "h")
    unnormalized = dict(n_experts=4, norm_topk_prob=False)
    with pytest.raises(ValueError, match="norm_topk_prob=False without q/k norms"):
        export_hf(_arlm_model("llama-tiny", **unnormalized), tokenizer, tmp_path / "i")
    shared_normed = dict(n_experts=4, shared_expert_size=64, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm=True, shared_expert_size=64"):
        export_hf(_arlm_model("llama-tiny", **shared_normed), tokenizer, tmp_path / "k")
    biased = dict(n_experts=4, bias=True)
    with pytest.raises(ValueError, match="a mixture of experts with bias=True"):
        export_hf(_arlm_model("llama-tiny", **biased), tokenizer, tmp_path / "j")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# config and errors


def test_config_from_legacy_rope_keys():
    base = dict(
        model_type="llama",
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=4096,
    )
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = config_from_hf(dict(base, rope_theta=500000.0, rope_scaling=scaling))
    assert config.rope_theta == 500000.0 and config.rope_scaling == scaling
    assert config.extra == {"hf_model_type": "llama"} and not config.tie_embeddings
    assert config_from_hf(dict(base, rope_scaling=None)).rope_scaling is None


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "bert"}, r"model_type='bert' is not supported; supported: \['gpt2'"),
        ({"head_dim": 33}, "head_dim=33 must be even"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "mlp_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
        ({"intermediate_size": None}, "intermediate_size"),
    ],
)
def test_config_errors(change, match):
    base = dict(
        model_type="llama",
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=4096,
    )
    with pytest.raises(ValueError, match=match):
        config_from_hf({**base, **change})


def test_resolve_dtype():
    assert resolve_dtype(None) is torch.float32
    assert resolve_dtype("bf16") is resolve_dtype(torch.bfloat16) is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="int8"):
        resolve_dtype("int8")


@pytest.fixture
def llama_copy(tmp_path, tokenizer):
    # one family is enough for the error paths
    return tmp_path, _save_hf("llama-mha-untied", tmp_path, tokenizer)


def test_mismatched_and_missing_tensor(llama_copy):
    folder, _ = llama_copy
    path = folder / "model.safetensors"
    state = load_file(path)
    name = "model.layers.1.self_attn.k_proj.weight"
    good = tuple(state[name].shape)
    state[name] = state[name][:-1]
    save_file(state, path)
    bad = (good[0] - 1, good[1])
    message = re.escape(f"{name} has shape {bad}, but config.json implies {good}")
    with pytest.raises(CheckpointError, match=message):
        load_hf(folder)
    del state[name]
    save_file(state, path)
    with pytest.raises(CheckpointError, match=f"{name} is missing"):
        load_hf(folder)


def test_no_weights_and_no_tokenizer(llama_copy):
    folder, _ = llama_copy
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights; looked for model.safetensors"):
        load_hf(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load_hf(folder)


def test_pickle_refused_unless_allowed(llama_copy):
    folder, hf = llama_copy
    path = folder / "model.safetensors"
    torch.save(load_file(path), folder / "pytorch_model.bin")
    path.unlink()
    with pytest.raises(CheckpointError, match="(?s)pickle can run arbitrary code.*save_pretrained"):
        load_hf(folder)
    model, _ = load_hf(folder, allow_pickle=True)
    ids = _ids()
    assert_close(_arlm_logits(model, ids), _hf_logits(hf, ids))

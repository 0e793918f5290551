"""GGUF export: names, shapes, types, metadata and tokenizer read back with gguf's own reader."""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import tokenizers
import torch

from arlm.cli import main
from arlm.config import ModelConfig
from arlm.formats.checkpoint import save_model
from arlm.formats.gguf import export_gguf, gguf_tensors
from arlm.model import Transformer, apply_rope, rope_frequencies
from arlm.tokenizer import Tokenizer
from tests.conftest import make_model
from tests.numerics import assert_close

Q = gguf.GGMLQuantizationType
# Q8_0 stores each block of 32 values as int8 times one f16 scale: the error is at most half a
# step, max|block| / 127 / 2, plus the scale's f16 rounding; 1% of the largest weight bounds it
Q8_REL_TOL = 0.01
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
LINEAR = {"rope_type": "linear", "factor": 2.0}


def read(path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def dequantized(t) -> np.ndarray:
    # the reader gives shapes in ggml's order (fastest dimension first); numpy's is reversed
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))


def layer_names(family: str, tied: bool = True) -> set[str]:
    if family == "gpt2":
        per_layer = ["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"]
        names = {f"{n}.{kind}" for n in per_layer for kind in ("weight", "bias")}
        top = {
            "token_embd.weight",
            "position_embd.weight",
            "output_norm.weight",
            "output_norm.bias",
        }
    else:
        per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"]
        names = {f"{n}.weight" for n in per_layer + ["ffn_gate", "ffn_up", "ffn_down"]}
        top = {"token_embd.weight", "output_norm.weight"}
    if not tied:
        top.add("output.weight")
    return top | {f"blk.{i}.{n}" for i in range(4) for n in names}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_f32_tensors_and_metadata(family, tokenizer, tmp_path):
    model = make_model(family, vocab_size=tokenizer.vocab_size)
    config = model.config
    path = tmp_path / "m.gguf"
    export_gguf(model, tokenizer, path)
    fields, tensors = read(path)

    assert set(tensors) == layer_names(family)
    assert all(t.tensor_type == Q.F32 for t in tensors.values())
    assert fields["general.architecture"] == family
    assert fields["general.name"] == "m"
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    expected = {
        "context_length": config.block_size,
        "embedding_length": config.n_embd,
        "block_count": config.n_layer,
        "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.n_head,
        "attention.head_count_kv": config.n_kv_head,
        "vocab_size": config.vocab_size,
    }
    if family == "gpt2":
        expected["attention.layer_norm_epsilon"] = pytest.approx(config.norm_eps)
    else:
        expected["attention.layer_norm_rms_epsilon"] = pytest.approx(config.norm_eps)
        expected["rope.freq_base"] = config.rope_theta
        expected["rope.dimension_count"] = config.head_dim
    assert {k: fields[f"{family}.{k}"] for k in expected} == expected

    # the data is the model's, at the names and in the layout llama.cpp reads
    state = model.state_dict()
    np.testing.assert_array_equal(tensors["token_embd.weight"].data, state["wte.weight"].numpy())
    np.testing.assert_array_equal(
        tensors["blk.1.attn_output.weight"].data, state["h.1.attn.c_proj.weight"].numpy()
    )
    np.testing.assert_array_equal(
        tensors["blk.3.ffn_down.weight"].data, state["h.3.mlp.c_proj.weight"].numpy()
    )
    assert tuple(tensors["blk.0.ffn_up.weight"].shape) == (config.n_embd, config.intermediate_size)
    for name, tensor in gguf_tensors(model).items():
        np.testing.assert_array_equal(tensors[name].data, tensor.numpy(), err_msg=name)
    if family == "gpt2":
        np.testing.assert_array_equal(
            tensors["blk.2.attn_qkv.weight"].data, state["h.2.attn.c_attn.weight"].numpy()
        )
        np.testing.assert_array_equal(
            tensors["position_embd.weight"].data, state["wpe.weight"].numpy()
        )
    else:
        hidden = config.intermediate_size
        fc = state["h.2.mlp.c_fc.weight"].numpy()
        np.testing.assert_array_equal(tensors["blk.2.ffn_gate.weight"].data, fc[:hidden])
        np.testing.assert_array_equal(tensors["blk.2.ffn_up.weight"].data, fc[hidden:])
        v = state["h.2.attn.c_attn.weight"].numpy()[
            config.n_embd + config.n_kv_head * config.head_dim :
        ]
        np.testing.assert_array_equal(tensors["blk.2.attn_v.weight"].data, v)


def test_tokenizer_arrays(tokenizer, tmp_path):
    # a vocabulary padded past the tokenizer's: the extra rows get placeholder tokens
    model = make_model("gpt2", vocab_size=tokenizer.vocab_size + 3)
    path = tmp_path / "m.gguf"
    export_gguf(model, tokenizer, path)
    fields, _ = read(path)
    data = json.loads(tokenizer.to_json())
    vocab = data["model"]["vocab"]
    n = tokenizer.vocab_size

    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == n + 3
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, n + 3)]
    types = fields["tokenizer.ggml.token_type"]
    eot = tokenizer.token_to_id("<|endoftext|>")
    assert types[eot] == gguf.TokenType.CONTROL
    assert types[n:] == [gguf.TokenType.UNUSED] * 3
    assert sum(t == gguf.TokenType.NORMAL for t in types) == n - 1
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in data["model"]["merges"]]
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id == eot
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_ids[0] == eot
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.add_eos_token"] is False


def rope_interleaved(x: torch.Tensor, pos: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """llama.cpp's RoPE for the llama architecture: neighbours (2i, 2i+1) rotate by pos*f_i."""
    cos, sin = torch.cos(pos * inv_freq), torch.sin(pos * inv_freq)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_llama_rope_layout(scaling, tokenizer, tmp_path):
    """Attention scores from the exported q/k under llama.cpp's RoPE equal arlm's, per head."""
    model = make_model(
        "llama", vocab_size=tokenizer.vocab_size, qkv_bias=True, rope_scaling=scaling
    )
    with torch.no_grad():  # a non-zero bias, so its reordering is tested too
        model.h[0].attn.c_attn.bias.normal_()
    config = model.config
    path = tmp_path / "m.gguf"
    export_gguf(model, tokenizer, path)
    _, tensors = read(path)
    hd, n_head, n_kv = config.head_dim, config.n_head, config.n_kv_head

    inv_freq = rope_frequencies(config)
    if scaling is None:
        assert "rope_freqs.weight" not in tensors
    else:  # llama.cpp divides the unscaled frequencies by these factors
        factors = torch.from_numpy(tensors["rope_freqs.weight"].data.copy())
        base = 1.0 / config.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
        torch.testing.assert_close(base / factors, inv_freq)
        assert factors[0] == 1.0 and factors[-1] == 8.0  # shortest kept, longest slowed 8x

    torch.manual_seed(0)
    x = torch.randn(config.n_embd)
    q_pos, k_pos = 7, 3
    # arlm: rotate-half RoPE on its own q and k
    q, k, _ = model.h[0].attn.c_attn(x).detach().split([n_head * hd, n_kv * hd, n_kv * hd])
    emb_q, emb_k = torch.cat([q_pos * inv_freq] * 2), torch.cat([k_pos * inv_freq] * 2)
    q = apply_rope(q.view(n_head, hd), emb_q.cos(), emb_q.sin())
    k = apply_rope(k.view(n_kv, hd), emb_k.cos(), emb_k.sin())
    want = (q * k.repeat_interleave(n_head // n_kv, 0)).sum(-1)
    # llama.cpp: the exported matrices and biases, with interleaved RoPE
    w = {n: torch.from_numpy(tensors[f"blk.0.attn_{n}.weight"].data.copy()) for n in "qk"}
    b = {n: torch.from_numpy(tensors[f"blk.0.attn_{n}.bias"].data.copy()) for n in "qk"}
    gq = rope_interleaved((w["q"] @ x + b["q"]).view(n_head, hd), q_pos, inv_freq)
    gk = rope_interleaved((w["k"] @ x + b["k"]).view(n_kv, hd), k_pos, inv_freq)
    got = (gq * gk.repeat_interleave(n_head // n_kv, 0)).sum(-1)
    # dot products of terms that cancel: they round at the size of the terms, not their own
    terms = (q.abs() * k.abs().repeat_interleave(n_head // n_kv, 0)).sum(-1)
    assert_close(got, want, scale=terms.max().item())


def test_untied_output(tokenizer, tmp_path):
    model = make_model("llama", vocab_size=tokenizer.vocab_size, tie_embeddings=False)
    path = tmp_path / "m.gguf"
    export_gguf(model, tokenizer, path)
    _, tensors = read(path)
    assert set(tensors) == layer_names("llama", tied=False)
    np.testing.assert_array_equal(
        tensors["output.weight"].data, model.lm_head.weight.detach().numpy()
    )


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("type", ["f16", "q8_0"])
def test_reduced_types(family, type, tokenizer, tmp_path):
    model = make_model(family, vocab_size=tokenizer.vocab_size)
    path = tmp_path / "m.gguf"
    export_gguf(model, tokenizer, path, type=type)
    fields, tensors = read(path)
    matrix_type = Q.F16 if type == "f16" else Q.Q8_0
    assert fields["general.file_type"] == (
        gguf.LlamaFileType.MOSTLY_F16 if type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    )
    for name, want in gguf_tensors(model).items():
        t = tensors[name]
        keep_f32 = want.dim() == 1 or name == "position_embd.weight"
        assert t.tensor_type == (Q.F32 if keep_f32 else matrix_type), name
        assert tuple(reversed(t.shape.tolist())) == tuple(want.shape), name
        got = dequantized(t)
        if keep_f32:
            np.testing.assert_array_equal(got, want.numpy())
        elif type == "f16":
            np.testing.assert_array_equal(got, want.numpy().astype(np.float16))
        else:
            err = np.abs(got - want.numpy()).max()
            assert err <= Q8_REL_TOL * want.abs().max().item(), (name, err)


def test_q8_0_falls_back_to_f16_for_odd_rows(tokenizer, tmp_path):
    # rows of 48 values do not fill 32-value blocks; those matrices are stored as f16
    model = make_model("llama", vocab_size=tokenizer.vocab_size, n_embd=48, intermediate_size=64)
    path = tmp_path / "m.gguf"
    export_gguf(model, tokenizer, path, type="q8_0")
    _, tensors = read(path)
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.F16  # rows of n_embd = 48
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.Q8_0  # rows of 64


def test_refusals(tokenizer, tmp_path):
    model = make_model("gpt2", vocab_size=tokenizer.vocab_size)
    path = tmp_path / "m.gguf"
    with pytest.raises(ValueError, match=r"type='q4_0'.*\['f32', 'f16', 'q8_0'\]"):
        export_gguf(model, tokenizer, path, type="q4_0")
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="exists"):
        export_gguf(model, tokenizer, path)
    assert path.read_bytes() == b"keep"
    no_bias = make_model("gpt2", vocab_size=tokenizer.vocab_size, bias=False)
    with pytest.raises(ValueError, match="needs biases.*bias=False"):
        export_gguf(no_bias, tokenizer, tmp_path / "no_bias.gguf")
    with pytest.raises(ValueError, match="token id .* vocab_size is 300"):
        export_gguf(make_model("gpt2", vocab_size=300), tokenizer, tmp_path / "small.gguf")
    tk = tokenizers.Tokenizer.from_str(tokenizer.to_json())
    tk.normalizer = tokenizers.normalizers.NFC()
    with pytest.raises(ValueError, match="normalizer 'NFC'"):
        export_gguf(model, Tokenizer(tk), tmp_path / "nfc.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary files left


def test_cli_export(tokenizer, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    save_model(ckpt, make_model("llama", vocab_size=tokenizer.vocab_size), tokenizer)
    out = tmp_path / "out.gguf"
    argv = ["export", str(ckpt), str(out), "--format", "gguf", "--type", "q8_0"]
    assert main(argv) == 0
    fields, tensors = read(out)
    assert fields["general.architecture"] == "llama"
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q.Q8_0
    assert main(argv) == 1  # the file exists now
    assert "exists" in capsys.readouterr().err
    assert main(["export", str(ckpt), str(tmp_path / "hf"), "--type", "f16"]) == 1
    assert "--type applies to --format gguf" in capsys.readouterr().err


def gemma(tokenizer, **overrides):
    """A gemma-family model as llama.cpp's gemma3 runs it (its attention scale, q/k norms)."""
    settings = dict(family="gemma", qk_norm=True, sliding_window=8, rope_local_theta=100.0)
    config = ModelConfig.preset("llama-tiny", vocab_size=tokenizer.vocab_size, **settings)
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(config, **overrides)).eval()
    with torch.no_grad():  # norm weights other than their initial zeros
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.1)
    return model


def test_gemma3_metadata(tokenizer, tmp_path):
    layers = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]
    model = gemma(tokenizer, layer_types=layers, logit_softcap=30.0, rope_scaling=LINEAR)
    export_gguf(model, tokenizer, tmp_path / "g.gguf")
    fields, tensors = read(tmp_path / "g.gguf")
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False, True, True]
    assert fields["gemma3.final_logit_softcapping"] == 30.0
    assert fields["gemma3.rope.scaling.type"] == "linear"
    assert fields["gemma3.rope.scaling.factor"] == 2.0
    assert fields["gemma3.rope.freq_base_swa"] == 100.0
    per_layer = [
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm", "attn_output",
        "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm",
    ]  # fmt: skip
    top = {"token_embd.weight", "output_norm.weight"}
    assert set(tensors) == top | {f"blk.{i}.{n}.weight" for i in range(4) for n in per_layer}
    # Gemma's norms multiply by 1 + weight, llama.cpp's by the weight: written plus one
    norm = model.h[2].post_mlp_norm.weight.detach()
    assert tensors["blk.2.post_ffw_norm.weight"].data.tolist() == (norm + 1).tolist()


def test_phi3_layout(tokenizer, tmp_path):
    model = make_model("llama", vocab_size=tokenizer.vocab_size, n_kv_head=4, rotary_dim=16)
    export_gguf(model, tokenizer, tmp_path / "p.gguf")
    fields, tensors = read(tmp_path / "p.gguf")
    assert fields["general.architecture"] == "phi3"  # only phi3 rotates part of each head
    assert fields["phi3.rope.dimension_count"] == 16
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= set(tensors)
    assert "blk.0.ffn_gate.weight" not in tensors and "rope_factors_long.weight" not in tensors
    assert tuple(tensors["blk.0.ffn_up.weight"].shape) == (128, 2 * model.config.intermediate_size)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(attn_scale=0.1), r"attn_scale=0.1: llama.cpp's gemma3 does not read"),
        (dict(bias=True), "gemma3 architecture has no biases; this model has bias=True"),
        (
            dict(attn_softcap=50.0),
            "attn_softcap=50.0: llama.cpp caps attention scores in its gemma2",
        ),
        (dict(rope_scaling=LLAMA3), "rope_scaling type 'llama3': llama.cpp's gemma3 scales"),
        (dict(rope_local_theta=None, rope_scaling=LINEAR), "on the sliding-window layers"),
    ],
)
def test_gemma3_refusals(overrides, match, tokenizer, tmp_path):
    with pytest.raises(ValueError, match=match):
        export_gguf(gemma(tokenizer, **overrides), tokenizer, tmp_path / "g.gguf")
    assert not list(tmp_path.iterdir())


def test_gemma2_metadata(tokenizer, tmp_path):
    """Without q/k norms the gemma family is llama.cpp's gemma2: its caps on the attention scores
    and the logits, and the sliding pattern and window written even for a model whose layers do
    not slide (llama.cpp's default slides every other layer)."""
    caps = dict(attn_softcap=50.0, logit_softcap=30.0)
    model = gemma(tokenizer, qk_norm=False, rope_local_theta=None, **caps)
    export_gguf(model, tokenizer, tmp_path / "g.gguf")
    fields, tensors = read(tmp_path / "g.gguf")
    assert fields["general.architecture"] == "gemma2"
    assert fields["gemma2.attn_logit_softcapping"] == 50.0
    assert fields["gemma2.final_logit_softcapping"] == 30.0
    assert fields["gemma2.attention.sliding_window"] == 8
    assert fields["gemma2.attention.sliding_window_pattern"] == [True] * 4
    assert fields["gemma2.rope.freq_base_swa"] == fields["gemma2.rope.freq_base"]
    assert not any("attn_q_norm" in name for name in tensors)
    norm = model.h[1].post_attn_norm.weight.detach()
    assert tensors["blk.1.post_attention_norm.weight"].data.tolist() == (norm + 1).tolist()
    plain = gemma(tokenizer, qk_norm=False, rope_local_theta=None, sliding_window=None)
    export_gguf(plain, tokenizer, tmp_path / "p.gguf")
    fields, _ = read(tmp_path / "p.gguf")
    assert fields["gemma2.attention.sliding_window_pattern"] == [False] * 4
    assert fields["gemma2.attention.sliding_window"] == plain.config.block_size
    assert "gemma2.attn_logit_softcapping" not in fields


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(attn_scale=0.1), r"attn_scale=0.1: llama.cpp's gemma2 does not read"),
        (dict(tie_embeddings=False), "llama.cpp's gemma2 reads the token embeddings"),
        (dict(rope_scaling=LINEAR), "rope_scaling type 'linear': llama.cpp's gemma2 turns"),
    ],
)
def test_gemma2_refusals(overrides, match, tokenizer, tmp_path):
    model = gemma(tokenizer, qk_norm=False, rope_local_theta=None, **overrides)
    with pytest.raises(ValueError, match=match):
        export_gguf(model, tokenizer, tmp_path / "g.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(rotary_dim=8, head_dim=16), r"n_head \* head_dim == n_embd"),
        (dict(rotary_dim=16, sliding_window=8), "sliding_window=8: llama.cpp's phi3"),
        (dict(rotary_dim=16, rope_scaling=LLAMA3), "llama.cpp's phi3 reads only LongRoPE"),
        (dict(rotary_dim=16, qk_norm=True), "rotary_dim=16 of head_dim=32 .* qwen3"),
    ],
)
def test_phi3_refusals(overrides, match, tokenizer, tmp_path):
    model = make_model("llama", vocab_size=tokenizer.vocab_size, **overrides)
    with pytest.raises(ValueError, match=match):
        export_gguf(model, tokenizer, tmp_path / "p.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("family", "overrides", "match"),
    [
        ("gpt2", {}, "a gpt2-family mixture of experts: llama.cpp runs experts in its llama"),
        ("llama", dict(bias=True), "bias=True: llama.cpp's llama experts have no biases"),
        ("llama", dict(norm_topk_prob=False), "norm_topk_prob=False: llama.cpp rescales"),
        ("llama", dict(qk_norm=True, sliding_window=8), "sliding_window=8: llama.cpp's qwen3moe"),
        (
            "llama",
            dict(shared_expert_size=64),
            "norm_topk_prob=True: llama.cpp does not rescale .* qwen2moe",
        ),
        (
            "llama",
            dict(shared_expert_size=64, norm_topk_prob=False, qk_norm=True),
            "llama.cpp's qwen2moe has no q/k norms",
        ),
    ],
)
def test_experts_refusals(family, overrides, match, tokenizer, tmp_path):
    model = make_model(family, vocab_size=tokenizer.vocab_size, n_experts=4, **overrides)
    with pytest.raises(ValueError, match=match):
        export_gguf(model, tokenizer, tmp_path / "e.gguf")
    assert not list(tmp_path.iterdir())

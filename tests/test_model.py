"""The transformer: causal masking, teacher forcing, and cached decoding equal to a full pass."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from arlm.config import ModelConfig
from arlm.kv_cache import KVCache
from arlm.kv_cache.base import causal_mask, sdpa
from arlm.model.transformer import Transformer
from tests.conftest import make_model
from tests.numerics import assert_clear_choices, assert_close

FAMILIES = ["gpt2", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_changing_later_tokens_leaves_earlier_logits_unchanged(family):
    model = make_model(family)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 512, (2, 40), generator=g)
    y = x.clone()
    t = 17
    y[:, t + 1 :] = torch.randint(0, 512, (2, 40 - t - 1), generator=g)
    with torch.no_grad():
        lx, _ = model(x)
        ly, _ = model(y)
    assert_close(lx[:, : t + 1], ly[:, : t + 1])
    assert not torch.allclose(lx[:, t + 1 :], ly[:, t + 1 :], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_decoding_matches_full_forward_at_every_step(family, batch):
    model = make_model(family)
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(0, 512, (batch, 48), generator=g)
    prompt = 16
    cache = KVCache.for_model(model.config, batch, 48)
    with torch.no_grad():
        full, _ = model(seq)
        logits, _ = model(seq[:, :prompt], kv_cache=cache)
        assert_close(logits, full[:, :prompt])
        for pos in range(prompt, 48):
            step, _ = model(seq[:, pos : pos + 1], kv_cache=cache, start_pos=pos)
            assert_close(step[:, 0], full[:, pos])


@pytest.mark.parametrize("family", FAMILIES)
def test_chunk_appended_after_cached_positions_sees_the_right_mask(family):
    model = make_model(family)
    seq = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(3))
    cache = KVCache.for_model(model.config, 2, 30)
    with torch.no_grad():
        full, _ = model(seq)
        model(seq[:, :10], kv_cache=cache)
        chunk, _ = model(seq[:, 10:25], kv_cache=cache, start_pos=10)
        rest, _ = model(seq[:, 25:], kv_cache=cache, start_pos=25)
    assert_close(chunk, full[:, 10:25])
    assert_close(rest, full[:, 25:])


@pytest.mark.parametrize(("start", "T"), [(10, 15), (1, 2), (7, 7)])
def test_a_chunk_over_cached_positions_on_cuda_gets_a_causal_bias_equal_to_the_dense_mask(start, T):
    """On CUDA a chunk's queries over their cached positions get a lower-right causal bias
    (FlashAttention applies it with no mask tensor; ``causal_mask`` only names the device, so
    this runs on a CPU); it lets each query see the keys the dense mask of a CPU does."""
    bias = causal_mask(start, T, torch.device("cuda"))
    assert isinstance(bias, CausalBias)
    dense = causal_mask(start, T, torch.device("cpu"))
    assert dense.shape == (T, start + T)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 4, T, 8, generator=g)  # 4 query heads over 2 key heads, as GQA reads
    k, v = (torch.randn(2, 2, start + T, 8, generator=g) for _ in range(2))
    assert_close(sdpa(q, k, v, bias), sdpa(q, k, v, dense))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_with_cache_equal_greedy_tokens_by_recomputation(family):
    model = make_model(family)
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(4))
    cache = KVCache.for_model(model.config, 2, 40)
    with torch.no_grad():
        seq, choices = prompt, []
        for _ in range(30):  # no cache: rerun the whole sequence each step
            logits, _ = model(seq)
            choices.append(logits[:, -1])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        # the cached path rounds otherwise: this prompt has no near-tie that could flip a token
        choices = torch.stack(choices)
        assert_clear_choices(choices)
        logits, _ = model(prompt, kv_cache=cache, last_only=True)
        cached = [logits[:, -1].argmax(-1)]
        for pos in range(5, 34):
            logits, _ = model(cached[-1][:, None], kv_cache=cache, start_pos=pos)
            cached.append(logits[:, -1].argmax(-1))
    assert torch.equal(torch.stack(cached, 1), seq[:, 5:])


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forcing_loss_is_mean_next_token_nll(family):
    model = make_model(family)
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(5))
    x, y = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        _, loss = model(x, y)
        nll = []
        for b in range(2):
            for t in range(32):  # each prediction from its own prefix, one forward per position
                logits, _ = model(x[b : b + 1, : t + 1])
                nll.append(-F.log_softmax(logits[0, -1], -1)[y[b, t]])
    assert_close(loss, torch.stack(nll).mean())  # a mean of log-probabilities of size ~log(vocab)


def test_learned_positions_refuse_positions_past_the_context():
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="context length 128"):
        model(torch.zeros(1, 129, dtype=torch.long))


def test_cache_refuses_writes_past_its_capacity():
    model = make_model("llama")
    cache = KVCache.for_model(model.config, 1, 8)
    with pytest.raises(ValueError, match="holds 8 positions"):
        model(torch.zeros(1, 9, dtype=torch.long), kv_cache=cache)


def test_cache_reports_the_bytes_it_allocated():
    config = ModelConfig.preset("llama-tiny")
    cache = KVCache.for_model(config, 2, 64, dtype=torch.bfloat16)
    expected = 2 * config.n_layer * 2 * config.n_kv_head * 64 * config.head_dim * 2
    assert cache.nbytes == expected
    assert cache.bytes_per_token == 2 * config.n_layer * config.n_kv_head * config.head_dim * 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"family": "mamba"}, "family='mamba'"),
        ({"n_embd": 130}, "divisible by n_head"),
        ({"n_kv_head": 3}, "divisor of n_head"),
        ({"n_layer": 0}, "n_layer=0"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_config_rejects_bad_values_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.preset("tiny", **overrides)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="choose one of"):
        ModelConfig.preset("huge")


def test_presets_have_the_documented_sizes():
    from arlm.model import Transformer

    assert 0.8e6 < Transformer(ModelConfig.preset("tiny")).num_params() < 1.3e6
    with torch.device("meta"):
        assert round(Transformer(ModelConfig.preset("gpt2")).num_params() / 1e6) == 124


def test_sliding_window_sees_only_the_last_window_positions():
    # one layer: the logits at t are those of a forward over just tokens t-W+1..t at their
    # positions, whatever came before
    window = 5
    model = make_model("llama", n_layer=1, sliding_window=window)
    seq = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full, _ = model(seq)
        for t in range(window, 24):
            alone, _ = model(seq[:, t - window + 1 : t + 1], start_pos=t - window + 1)
            assert_close(full[0, t], alone[0, -1])
        plain, _ = make_model("llama", n_layer=1)(seq)
    assert not torch.allclose(full[:, window:], plain[:, window:], atol=1e-3)


def test_head_dim_qk_norm_and_windows_survive_a_checkpoint(tmp_path, tokenizer):
    from arlm.formats.checkpoint import load_model, save_model

    types = ["sliding_attention", "full_attention"] * 2
    model = make_model("llama", head_dim=48, qk_norm=True, sliding_window=5, layer_types=types)
    save_model(tmp_path / "ck", model, tokenizer)
    again, _ = load_model(tmp_path / "ck")
    assert again.config == model.config and again.config.layer_windows == [5, None, 5, None]
    seq = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(again(seq)[0], model(seq)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("round_weights", [False, True])
def test_a_lone_token_sums_its_experts_as_the_grouped_path_does(dtype, round_weights):
    """A single token (a lone row's decode step) skips the grouping by expert; its output is
    the grouped path's bit for bit (the training mode always groups)."""
    config = ModelConfig.preset(
        "llama-tiny", n_experts=6, n_experts_per_tok=3, round_router_weights=round_weights
    )
    moe = Transformer(config).to(dtype).h[0].mlp
    x = torch.randn(40, 1, config.n_embd, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        lone = torch.cat([moe.eval()(row[None]) for row in x])
        grouped = torch.cat([moe.train()(row[None]) for row in x])
    assert torch.equal(lone, grouped)

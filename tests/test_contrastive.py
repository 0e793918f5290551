"""Contrastive search: token for token against a direct implementation of Su et al.'s rule on
transformers' own random-weight GPT-2 and Llama (transformers 5 ships contrastive search only as
a Hub download), greedy at alpha 0, and the settings it refuses."""

from __future__ import annotations

import json

import pytest
import torch

import arlm
from arlm.api import LM
from arlm.engine.engine import InvalidRequest
from arlm.sampling import SamplingParams
from arlm.sampling.contrastive import contrastive_scores, normalize
from arlm.tokenizer import EOT
from tests.conftest import make_model

transformers = pytest.importorskip("transformers")

HF_CASES = {
    "gpt2": ("GPT2Config", dict(n_positions=128, n_embd=64, n_layer=2, n_head=4)),
    "llama": (
        "LlamaConfig",
        dict(
            max_position_embeddings=128,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
        ),
    ),
}
# float32 scores in [-1, 1] from two implementations agree to ~1e-6; a step whose two best
# scores are closer than this could be flipped by rounding, and the comparison would mean nothing
CLEAR_MARGIN = 1e-4


def reference_contrastive(hf, prompt: list[int], steps: int, alpha: float, k: int) -> list[int]:
    """Su et al.'s contrastive search written out directly: full forwards without a cache, each
    candidate run on its own; the hidden states are transformers' last ``hidden_states``."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            out = hf(torch.tensor([ids]), output_hidden_states=True)
            context = out.hidden_states[-1][0].float()  # (S, D)
            probs = out.logits[0, -1].float().softmax(-1)
            top = torch.topk(probs, k)
            scores = []
            for p, v in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                h = hf(torch.tensor([ids + [v]]), output_hidden_states=True).hidden_states[-1]
                h = h[0, -1].float()
                cos = torch.nn.functional.cosine_similarity(context, h[None], dim=-1)
                scores.append((1 - alpha) * p - alpha * cos.max().item())
            ranked = sorted(scores, reverse=True)
            assert ranked[0] - ranked[1] > CLEAR_MARGIN, "a near-tie: pick another seed"
            ids.append(top.indices[scores.index(ranked[0])].item())
    return ids[len(prompt) :]


def _hf_pair(kind: str, folder, tokenizer):
    config_name, kwargs = HF_CASES[kind]
    eot = tokenizer.token_to_id(EOT)
    config = getattr(transformers, config_name)(
        vocab_size=tokenizer.vocab_size, bos_token_id=eot, eos_token_id=eot, **kwargs
    )
    torch.manual_seed(3)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # wide margins: weights larger than transformers' init
        for name, p in hf.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else p)
            else:
                p.copy_(0.15 * torch.randn_like(p))
    hf.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOT}))
    return hf, arlm.load(folder, dtype="float32")


@pytest.mark.parametrize("kind", list(HF_CASES))
@pytest.mark.parametrize("alpha, k", [(0.6, 4), (0.3, 6)])
def test_equals_a_direct_implementation_on_transformers_models(kind, alpha, k, tokenizer, tmp_path):
    hf, lm = _hf_pair(kind, tmp_path, tokenizer)
    prompt = torch.randint(
        1, tokenizer.vocab_size, (12,), generator=torch.Generator().manual_seed(0)
    )
    prompt = prompt.tolist()
    expected = reference_contrastive(hf, prompt, 24, alpha, k)
    out = lm.generate(
        prompt, max_tokens=24, temperature=0, top_k=k, penalty_alpha=alpha, ignore_eos=True
    )
    assert out.token_ids == expected
    assert out.finish_reason == "length" and out.usage.completion_tokens == 24


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_alpha_zero_is_greedy(family, tokenizer):
    lm = LM(make_model(family, vocab_size=tokenizer.vocab_size, seed=4), tokenizer)
    greedy = lm.generate("The for", max_tokens=30, temperature=0, ignore_eos=True)
    search = lm.generate(
        "The for", max_tokens=30, temperature=0, top_k=4, penalty_alpha=0.0 + 1e-9, ignore_eos=True
    )
    # alpha 1e-9: the contrastive path, whose probability term decides any pick it can
    assert search.token_ids == greedy.token_ids


def test_scores_worked_by_hand():
    probs = torch.tensor([[0.7, 0.2]])
    context = normalize(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]))  # (1, 2, 2)
    candidates = normalize(torch.tensor([[[3.0, 0.0], [1.0, -1.0]]]))  # (1, 2, 2)
    scores = contrastive_scores(probs, candidates, context, 0.5)
    # candidate 0 repeats context position 0 (cos 1); candidate 1 is at 45 degrees (cos 0.707)
    expected = torch.tensor([[0.5 * 0.7 - 0.5 * 1.0, 0.5 * 0.2 - 0.5 * 2**-0.5]])
    torch.testing.assert_close(scores, expected)


def test_end_of_text_ends_it_and_processors_apply(tokenizer):
    lm = LM(make_model("gpt2", vocab_size=tokenizer.vocab_size, seed=5), tokenizer)
    eot = tokenizer.token_to_id(EOT)
    plain = lm.generate("x", max_tokens=12, temperature=0, top_k=3, penalty_alpha=0.5)
    banned = plain.token_ids[0]
    out = lm.generate(
        "x",
        max_tokens=12,
        temperature=0,
        top_k=3,
        penalty_alpha=0.5,
        logit_bias={banned: -100},
        stop_token_ids=[eot],
    )
    assert out.token_ids[:1] != [banned]  # the bias reached the candidates


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(penalty_alpha=0.5), "top_k"),
        (dict(penalty_alpha=0.5, top_k=4, temperature=0.7), "temperature"),
        (dict(penalty_alpha=1.5, top_k=4, temperature=0), r"penalty_alpha=1\.5"),
        (dict(penalty_alpha=0.5, top_k=100, temperature=0), "1 to 64"),
    ],
)
def test_bad_settings_are_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**settings)


def test_what_it_cannot_combine_with_is_named(tokenizer):
    lm = LM(make_model("gpt2", vocab_size=tokenizer.vocab_size), tokenizer)
    kw = dict(temperature=0, top_k=4, penalty_alpha=0.5)
    with pytest.raises(ValueError, match="loop_policy"):
        lm.generate("x", loop_policy="stop", **kw)
    with pytest.raises(InvalidRequest, match="one prompt at a time"):
        lm.engine.add_request("x", SamplingParams(**kw))


def test_stream_and_a_list_of_prompts_run_it_too(tokenizer):
    lm = LM(make_model("gpt2", vocab_size=tokenizer.vocab_size, seed=6), tokenizer)
    kw = dict(max_tokens=10, temperature=0, top_k=3, penalty_alpha=0.5, ignore_eos=True)
    one = lm.generate("a b", **kw)
    chunks = list(lm.stream("a b", **kw))
    assert "".join(chunks) == one.text and chunks[-1].finish_reason == "length"
    both = lm.generate(["a b", "c"], **kw)
    assert both[0].token_ids == one.token_ids and len(both[1].token_ids) == 10

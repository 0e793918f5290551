"""Sequential inference through the API: greedy, sampling, stops, streaming, scoring."""

import math

import pytest
import torch
import torch.nn.functional as F

from arlm.api import LM
from arlm.sampling import SamplingParams, min_p_filter, top_k_filter, top_p_filter
from tests.conftest import make_model
from tests.numerics import assert_clear_choices, assert_close


@pytest.fixture(params=["gpt2", "llama"])
def lm(request, tokenizer):
    return LM(make_model(request.param, vocab_size=tokenizer.vocab_size), tokenizer)


def test_greedy_generation_equals_argmax_of_full_recomputation(lm):
    prompt = lm.tokenizer.encode("The expression")
    out = lm.generate(prompt, max_tokens=25, temperature=0, ignore_eos=True)
    seq, choices = list(prompt), []
    for _ in range(25):
        choices.append(lm.logits(seq)[-1])
        seq.append(int(choices[-1].argmax()))
    # the cached path rounds otherwise: this prompt holds no near-tie that could flip a token
    assert_clear_choices(torch.stack(choices))
    assert out.token_ids == seq[len(prompt) :]
    assert out.finish_reason == "length"
    assert out.text == lm.tokenizer.decode(out.token_ids)


def test_same_seed_same_sample_and_different_seeds_differ(lm):
    a = lm.generate("The", max_tokens=30, temperature=1.0, seed=7, ignore_eos=True)
    b = lm.generate("The", max_tokens=30, temperature=1.0, seed=7, ignore_eos=True)
    c = lm.generate("The", max_tokens=30, temperature=1.0, seed=8, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_one_is_greedy(lm):
    greedy = lm.generate("if x", max_tokens=20, temperature=0, ignore_eos=True)
    top1 = lm.generate("if x", max_tokens=20, temperature=1.5, top_k=1, seed=3, ignore_eos=True)
    assert top1.token_ids == greedy.token_ids


def test_stream_pieces_join_to_the_generated_text(lm):
    chunks = list(lm.stream("class", max_tokens=40, temperature=0.9, seed=1, ignore_eos=True))
    full = lm.generate("class", max_tokens=40, temperature=0.9, seed=1, ignore_eos=True)
    assert "".join(chunks) == full.text
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage.completion_tokens == 40
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stop_string_ends_generation_and_is_not_returned(lm):
    free = lm.generate("The", max_tokens=60, temperature=0, ignore_eos=True)
    stop = free.text[10:13]  # a string the model is known to produce
    out = lm.generate("The", max_tokens=60, temperature=0, ignore_eos=True, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == free.text[: free.text.index(stop)]
    streamed = "".join(lm.stream("The", max_tokens=60, temperature=0, ignore_eos=True, stop=stop))
    assert streamed == out.text


def test_end_of_text_token_stops_generation(lm):
    free = lm.generate("The", max_tokens=30, temperature=0, ignore_eos=True)
    marker = free.token_ids[5]
    out = lm.generate("The", max_tokens=30, temperature=0, stop_token_ids=[marker])
    assert out.finish_reason == "stop"
    assert out.token_ids == free.token_ids[: free.token_ids.index(marker)]


def test_generation_stops_when_the_context_is_full(lm):
    context = lm.config.block_size
    prompt = [5] * (context - 3)
    out = lm.generate(prompt, max_tokens=50, temperature=0, ignore_eos=True)
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 4  # the last one is sampled but never fed back


def test_prompt_longer_than_the_context_is_refused(lm):
    with pytest.raises(ValueError, match="longer than the model's context of 128"):
        lm.generate([1] * 129, max_tokens=1)


def test_empty_prompt_starts_from_the_start_token(lm):
    out = lm.generate("", max_tokens=5, temperature=0, ignore_eos=True)
    assert len(out.token_ids) == 5


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": -1}, "max_tokens=-1"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
    ],
)
def test_bad_sampling_values_are_named(lm, kwargs, message):
    with pytest.raises(ValueError, match=message):
        lm.generate("x", **kwargs)


def test_unknown_sampling_keyword_is_named(lm):
    with pytest.raises(TypeError, match="top_q"):
        lm.generate("x", top_q=0.5)


def test_params_object_and_keywords_agree(lm):
    p = SamplingParams(max_tokens=12, temperature=0.7, seed=5, ignore_eos=True)
    assert lm.generate("a", params=p).token_ids == lm.generate("a", **vars(p)).token_ids


def test_filters_keep_what_they_promise():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[True, True, False, False, False]]
    assert torch.equal(top_k_filter(logits, 99), logits)
    probs = logits.softmax(-1)[0]  # 0.636, 0.234, 0.086, ...
    kept = torch.isfinite(top_p_filter(logits, 0.8)).tolist()[0]
    assert kept == [True, True, False, False, False] and probs[0] < 0.8 < probs[:2].sum()
    assert torch.isfinite(top_p_filter(logits, 0.1)).sum() == 1  # the top token always stays
    kept = torch.isfinite(min_p_filter(logits, 0.3)).tolist()[0]
    assert kept == [True, True, False, False, False]  # 0.234/0.636 > 0.3 > 0.086/0.636


def test_score_total_is_the_sum_of_separately_computed_conditionals(lm):
    text = "The for statement is used to iterate"
    score = lm.score(text)
    ids = [lm.tokenizer.bos_token_id, *lm.tokenizer.encode(text)]
    expected = [
        float(F.log_softmax(lm.logits(ids[:t]).double()[-1], -1)[ids[t]])
        for t in range(1, len(ids))
    ]
    assert score.token_ids == ids[1:]
    # a float32 path against float64 conditionals: each log-probability rounds at its own size,
    # their sum at the size of its terms, and the perplexity exp(-mean) by the mean's rounding
    # relative to itself
    assert_close(score.token_logprobs, expected)
    assert_close(score.total_logprob, sum(expected), scale=sum(abs(x) for x in expected))
    perplexity = math.exp(-sum(expected) / len(expected))
    assert_close(score.perplexity, perplexity, scale=perplexity * max(abs(x) for x in expected))


def test_score_of_a_text_longer_than_the_context(lm):
    ids = torch.randint(1, 512, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    score = lm.score(ids)
    assert len(score.token_logprobs) == 300
    # the first window is scored exactly as a single forward would
    first = F.log_softmax(lm.logits([lm.tokenizer.bos_token_id, *ids[:127]]), -1)
    expected = first[:-1].gather(-1, torch.tensor(ids[:127])[:, None])[:, 0]
    assert_close(score.token_logprobs[:127], expected)

"""The sampling chain: each processor against a reference on the same logits, DRY on worked
examples, validation, seeds, logprobs, and greedy generation against transformers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.generation import logits_process as hf

from arlm.api import LM
from arlm.sampling import SamplingParams, SequenceSampler, sample
from arlm.sampling.dry import Dry, dry_penalties, dry_sequence_breakers
from arlm.sampling.processors import (
    History,
    LogitBias,
    MinTokens,
    NoRepeatNGram,
    OpenAIPenalty,
    RepetitionPenalty,
    min_p_filter,
    top_k_filter,
    top_p_filter,
    typical_filter,
)
from tests.conftest import make_model
from tests.numerics import assert_clear_choices, assert_close

V = 50
CPU = torch.device("cpu")


def _case(batch: int = 3, length: int = 20, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, V, generator=g) * 3
    ids = torch.randint(0, 12, (batch, length), generator=g)  # a small range, so ids repeat
    return logits, ids


def _history(ids: torch.Tensor, prompt_len: int = 0) -> History:
    return History([row.tolist() for row in ids], [prompt_len] * len(ids))


def _grown(proc, ids: torch.Tensor, prompt_len: int) -> History:
    """The processor's state built one append at a time, as generation builds it."""
    history = _history(ids[:, :prompt_len], prompt_len)
    proc.reset(history)
    for t in range(prompt_len, ids.size(1)):
        for row, token in zip(history.rows, ids[:, t].tolist(), strict=True):
            row.append(token)
        proc.append(history)
    return history


# -- each processor against transformers' --------------------------------------------------


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    logits, ids = _case()
    proc = RepetitionPenalty(penalty, V, last_n=0, device=CPU)
    history = _grown(proc, ids, prompt_len=5)
    expected = hf.RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    torch.testing.assert_close(proc(logits, history), expected)


def test_penalty_window_counts_only_the_last_n_tokens():
    logits, ids = _case(length=30)
    proc = RepetitionPenalty(1.5, V, last_n=7, device=CPU)
    history = _grown(proc, ids, prompt_len=3)  # ids leave the window one by one
    expected = hf.RepetitionPenaltyLogitsProcessor(1.5)(ids[:, -7:], logits.clone())
    torch.testing.assert_close(proc(logits, history), expected)


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
def test_top_k_matches_transformers(k):
    logits, ids = _case()
    expected = hf.TopKLogitsWarper(min(k, V))(ids, logits.clone())
    torch.testing.assert_close(top_k_filter(logits, k), expected)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.99])
def test_top_p_matches_transformers(p):
    logits, ids = _case(batch=8)
    expected = hf.TopPLogitsWarper(p)(ids, logits.clone())
    torch.testing.assert_close(top_p_filter(logits, p), expected)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
def test_min_p_matches_transformers(p):
    logits, ids = _case(batch=8)
    expected = hf.MinPLogitsWarper(p)(ids, logits.clone())
    torch.testing.assert_close(min_p_filter(logits, p), expected)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9, 0.999])
def test_typical_p_matches_transformers(p):
    logits, ids = _case(batch=8)
    logits[0, :10] = float("-inf")  # masked tokens (surprise inf) must not break the entropy
    expected = hf.TypicalLogitsWarper(p)(ids, logits.clone())
    torch.testing.assert_close(typical_filter(logits, p), expected)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_transformers(n):
    logits, ids = _case(length=25)
    proc = NoRepeatNGram(n)
    history = _grown(proc, ids, prompt_len=4)
    expected = hf.NoRepeatNGramLogitsProcessor(n)(ids, logits.clone())
    torch.testing.assert_close(proc(logits, history), expected)
    proc.reset(history)  # rebuilt at once, as after a rollback: the same bans
    torch.testing.assert_close(proc(logits, history), expected)


def test_min_tokens_matches_transformers():
    logits, ids = _case()
    prompt_len = 15  # 5 generated of 20
    proc = MinTokens(8, end_ids=[3, 7])
    out = proc(logits, _history(ids, prompt_len))
    expected = hf.MinNewTokensLengthLogitsProcessor(prompt_len, 8, [3, 7])(ids, logits.clone())
    torch.testing.assert_close(out, expected)
    assert torch.equal(MinTokens(5, [3, 7])(logits, _history(ids, prompt_len)), logits)


def test_logit_bias_matches_transformers_sequence_bias():
    logits, ids = _case()
    bias = {4: 2.5, 9: -100.0}
    out = LogitBias(bias, V, CPU)(logits, _history(ids))
    expected = hf.SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()})(
        ids, logits.clone()
    )
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match=r"token ids \[60\].*0\.\.49"):
        LogitBias({60: 1.0}, V, CPU)


def test_presence_and_frequency_follow_the_openai_formula():
    logits, ids = _case(length=24)
    prompt_len, last_n = 6, 10
    for window in (0, last_n):
        proc = OpenAIPenalty(0.7, 0.3, V, last_n=window, device=CPU)
        history = _grown(proc, ids, prompt_len)
        expected = logits.clone()
        for b, row in enumerate(ids.tolist()):
            # OpenAI: mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, where
            # c[j] counts the sampled tokens (not the prompt), here within the window
            start = max(prompt_len, len(row) - window) if window else prompt_len
            for j in range(V):
                c = row[start:].count(j)
                expected[b, j] -= c * 0.3 + (c > 0) * 0.7
        torch.testing.assert_close(proc(logits, history), expected)


# -- DRY ------------------------------------------------------------------------------------

A, B, C, Y, NL, X, U, W = range(1, 9)
NO_BREAKERS: dict = {}


def test_dry_worked_example_from_llama_cpp():
    # llama.cpp's comment: last tokens "a b c c b c y a b c" have repeat counts
    # 0 0 3 1 0 2 0 0 0 0, so c (after the first "a b c") would make a repeat of 3 -> 4, and y
    # (after "b c") one of 2 -> 3; "c" alone (a repeat of 1) is under the allowed length 2.
    ids = [A, B, C, C, B, C, Y, A, B, C]
    got = dry_penalties(ids, multiplier=0.8, base=1.75, allowed_length=2, breakers=NO_BREAKERS)
    assert got == pytest.approx({C: 0.8 * 1.75 ** (3 - 2), Y: 0.8 * 1.75**0})


def test_dry_repeat_stops_at_a_sequence_breaker():
    breakers = {NL: [()]}
    # "u w nl x y" then "u w nl x y": the whole block repeats, but the repeat that counts starts
    # after the last breaker, so it is "x y" (length 2), not 5: u loses 0.8 * 1.75 ** 0
    ids = [U, W, NL, X, Y, U, W, NL, X, Y]
    got = dry_penalties(ids, 0.8, 1.75, 2, breakers)
    assert got == pytest.approx({U: 0.8})
    assert dry_penalties(ids, 0.8, 1.75, 2, NO_BREAKERS) == pytest.approx({U: 0.8 * 1.75**3})
    # a breaker as the last token: nothing after it can repeat yet
    assert dry_penalties([X, Y, NL, X, Y, NL], 0.8, 1.75, 2, breakers) == {}


def test_dry_never_penalizes_a_breaker_token():
    # "x y nl" then "x y": nl would extend a repeat of 2, but it is a breaker
    ids = [X, Y, NL, A, X, Y]
    assert dry_penalties(ids, 1.0, 2.0, 2, {NL: [()]}) == {}
    assert dry_penalties(ids, 1.0, 2.0, 2, NO_BREAKERS) == {NL: 1.0}


def test_dry_multi_token_breaker_is_a_head_and_a_tail():
    texts = ["<eot>", "a", "b", "ab", "c", "xa"]
    encode = {"b": [2], "ab": [3]}.__getitem__
    table = dry_sequence_breakers(texts, encode, ["ab"])
    # "ab" itself contains it; "a" and "xa" end with its start and need "b" after them
    assert table == {3: [()], 1: [(2,)], 5: [(2,)]}
    # "a b c c <eot> a b c c": the repeat "a b c c" (4) is cut at the breaker "a b" to "c c"
    ids = [1, 2, 4, 4, 0, 1, 2, 4, 4]
    assert dry_penalties(ids, 1.0, 2.0, 2, table) == {0: 1.0}
    assert dry_penalties(ids, 1.0, 2.0, 2, {}) == {0: 2.0 ** (4 - 2)}
    # "a" without its tail "b" breaks nothing: "a c c" repeats whole
    assert dry_penalties([1, 4, 4, 0, 1, 4, 4], 1.0, 2.0, 2, table) == {0: 2.0}


def test_dry_exponent_is_clamped_like_llama_cpp():
    ids = [A] * 500
    got = dry_penalties(ids, 1.0, 1.75, 2, NO_BREAKERS)
    assert math.isfinite(got[A])
    assert got[A] == pytest.approx(1.75 ** int(88.7228391 / math.log(1.75)))


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(st.integers(0, 3), min_size=0, max_size=40),
    allowed=st.integers(1, 4),
    with_breaker=st.booleans(),
)
def test_dry_equals_the_definition(ids, allowed, with_breaker):
    breakers = {0: [()]} if with_breaker else {}
    n = len(ids)
    # repeats may not reach back past the latest breaker
    last_breaker = max((i for i, t in enumerate(ids) if t in breakers), default=-1)
    limit = n - 1 - last_breaker
    expected: dict[int, float] = {}
    for j in range(n - 1):  # an earlier end; the token after it would extend the repeat
        length = 0
        while length <= j and ids[j - length] == ids[n - 1 - length]:
            length += 1
        length = min(length, limit)
        token = ids[j + 1]
        if length >= allowed and token not in breakers and n > allowed:
            expected[token] = max(expected.get(token, 0.0), 0.5 * 1.5 ** (length - allowed))
    assert dry_penalties(ids, 0.5, 1.5, allowed, breakers) == pytest.approx(expected)


def test_dry_processor_applies_the_penalties_per_row_in_its_window():
    logits = torch.zeros(2, V)
    history = History([[A, B, C, A, B], [X, Y, X, Y, X, Y]], [0, 0])
    out = Dry(1.0, 2.0, 2, last_n=0, breakers={})(logits, history)
    assert out[0, C] == -1.0 and out[0].count_nonzero() == 1
    # row 1: "x y" repeats; x extends a repeat of 4 ("x y x y" before it... 2 ** (4 - 2))
    assert out[1, X] == -4.0 and out[1].count_nonzero() == 1
    windowed = Dry(1.0, 2.0, 2, last_n=4, breakers={})(logits, history)
    assert windowed[1, X] == -1.0  # the window holds "x y x y": a repeat of 2


# -- the sampler and its parameters ---------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"typical_p": 0.0}, r"typical_p=0\.0 .* \(0, 1\]"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty=0\.0 .* \[0\.01, 100\.0\]"),
        ({"repetition_penalty": 1e-300}, r"repetition_penalty=1e-300 .* \[0\.01, 100\.0\]"),
        ({"presence_penalty": 2.5}, r"presence_penalty=2\.5 .* \[-2, 2\]"),
        ({"frequency_penalty": -3}, r"frequency_penalty=-3 .* \[-2, 2\]"),
        ({"penalty_last_n": -1}, r"penalty_last_n=-1 .* >= 0"),
        ({"no_repeat_ngram_size": 1.5}, r"no_repeat_ngram_size=1\.5 .* integer"),
        ({"dry_multiplier": -1.0}, r"dry_multiplier=-1\.0"),
        ({"dry_multiplier": 1e308}, r"dry_multiplier=1e\+308 .* \[0, 100\]"),
        ({"dry_base": 0.5}, r"dry_base=0\.5 .* \[1, 100\]"),
        ({"dry_base": 1e300}, r"dry_base=1e\+300 .* \[1, 100\]"),
        ({"dry_allowed_length": 0}, r"dry_allowed_length=0 .* >= 1"),
        ({"dry_penalty_last_n": -1}, r"dry_penalty_last_n=-1 .* whole history"),
        ({"dry_sequence_breakers": [""]}, r"dry_sequence_breakers entry '' .* non-empty"),
        ({"dry_sequence_breakers": ["x" * 41]}, r"dry_sequence_breakers .* at most 40 char"),
        ({"dry_sequence_breakers": [str(i) for i in range(17)]}, r"17 strings; at most 16"),
        ({"stop": ["x" * 257]}, r"stop entry 'xxx.* at most 256 characters"),
        ({"stop": [str(i) for i in range(33)]}, r"stop has 33 strings; at most 32"),
        ({"stop_token_ids": [1] * 1025}, r"stop_token_ids has 1025 ids; at most 1024"),
        ({"logit_bias": {i: 1 for i in range(1025)}}, r"logit_bias names 1025 .* at most 1024"),
        ({"n": 129}, r"n=129 .* \[1, 128\]"),
        ({"logit_bias": {5: 101}}, r"logit_bias\[5\]=101 .* \[-100, 100\]"),
        ({"logit_bias": {-1: 1}}, r"logit_bias token id=-1"),
        ({"min_tokens": 10, "max_tokens": 5}, r"min_tokens=10 .* <= max_tokens \(5\)"),
        ({"logprobs": 21}, r"logprobs=21 .* \[0, 20\]"),
        ({"loop_policy": "retry"}, r"loop_policy='retry' .* stop, break, report"),
        ({"repetition_detection": {"min_cuont": 2}}, r"unknown fields \['min_cuont'\]"),
        ({"repetition_detection": {"min_count": 1}}, r"min_count=1"),
        ({"max_loop_breaks": -1}, r"max_loop_breaks=-1"),
        ({"max_loop_breaks": 65}, r"max_loop_breaks=65 .* \[0, 64\]"),
        ({"repetition_detection": {"max_pattern_size": 2**62}}, r"max_pattern_size=.* 65536"),
        ({"temperature": float("nan")}, r"temperature=nan"),
        ({"seed": -5}, r"seed=-5"),
    ],
)
def test_bad_values_are_named_with_the_allowed_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_json_style_values_are_accepted():
    p = SamplingParams(logit_bias={"7": -100}, repetition_detection={"min_count": 2})
    assert p.logit_bias == {7: -100.0}
    assert p.repetition_detection.min_count == 2 and p.loop_policy == "stop"


def test_greedy_still_applies_penalties_and_bias():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    params = SamplingParams(temperature=0, logit_bias={3: 10.0})
    assert SequenceSampler(params, 4, [0], 1)(logits) == 3
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert SequenceSampler(params, 4, [0], 1)(logits) == 1  # 5/2 < 4
    params = SamplingParams(temperature=0, no_repeat_ngram_size=1)
    ids = [0, 1, 2]
    sampler = SequenceSampler(params, 4, ids, 3)
    assert sampler(logits) == 3
    ids.append(3)
    sampler.appended()
    with pytest.raises(ValueError, match="every token is banned"):
        sampler(logits)


def test_each_row_draws_from_its_own_generator():
    logits = torch.zeros(2, 1000)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=50)]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    both = sample(logits, params, gens).tolist()
    alone = [
        int(sample(logits[:1], [p], [torch.Generator().manual_seed(s)])[0])
        for p, s in zip(params, (1, 2), strict=True)
    ]
    assert both == alone


def test_rows_with_different_filters_match_each_alone():
    torch.manual_seed(0)
    logits = torch.randn(4, 300)
    params = [
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.5),
        SamplingParams(temperature=1.0, min_p=0.2, typical_p=0.9),
        SamplingParams(temperature=0),
    ]
    for seed in range(5):
        gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(4)]
        together = sample(logits, params, gens).tolist()
        alone = [
            int(sample(logits[i : i + 1], [p], [torch.Generator().manual_seed(seed * 10 + i)])[0])
            for i, p in enumerate(params)
        ]
        assert together == alone
    # each row's filter really applied: top_k=5 only ever draws from its 5 best
    top5 = set(logits[0].topk(5).indices.tolist())
    gens = [torch.Generator().manual_seed(s) for s in range(200)]
    draws = [int(sample(logits[:1], params[:1], [g])[0]) for g in gens]
    assert set(draws) <= top5 and len(set(draws)) > 1
    assert int(sample(logits[3:], params[3:], [None])[0]) == int(logits[3].argmax())


class _Draws(TorchDispatchMode):
    """Counts the ops that draw random numbers (a launch each on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.startswith(("rand", "uniform"))
        return func(*args, **(kwargs or {}))


def test_unseeded_rows_share_one_draw_that_manual_seed_repeats():
    # eight rows without a generator over the same logits, and a seeded one
    logits = (torch.randn(1, 500, generator=torch.Generator().manual_seed(0)) * 0.5).expand(9, -1)
    params = [SamplingParams(temperature=1.0)] * 9

    def draw() -> list[int]:
        return sample(logits, params, [None] * 8 + [torch.Generator().manual_seed(7)]).tolist()

    torch.manual_seed(1)
    with _Draws() as draws:
        first = draw()
    assert draws.count == 2  # one for the eight unseeded rows, one for the seeded row
    assert len(set(first[:8])) > 1  # each unseeded row its own number of the one draw
    torch.manual_seed(1)
    assert draw() == first
    assert first[8:] == sample(logits[:1], params[:1], [torch.Generator().manual_seed(7)]).tolist()


# -- through generation ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tokenizer):
    return LM(make_model("gpt2", vocab_size=tokenizer.vocab_size, seed=3), tokenizer)


def test_same_seed_same_sample_whatever_else_runs(lm):
    kw = dict(max_tokens=25, temperature=0.9, top_p=0.95, presence_penalty=0.5, ignore_eos=True)
    alone = lm.generate("The", seed=11, **kw).token_ids
    assert lm.generate("The", seed=11, **kw).token_ids == alone
    assert lm.generate("The", seed=12, **kw).token_ids != alone
    # two requests interleaved, step by step: each still follows its own seed
    a, b = lm.stream("The", seed=11, **kw), lm.stream("The", seed=12, **kw)
    ids_a, ids_b = [], []
    for ca, cb in zip(a, b, strict=True):
        ids_a += [ca.token_id] if ca.token_id is not None else []
        ids_b += [cb.token_id] if cb.token_id is not None else []
    assert ids_a == alone
    assert ids_b == lm.generate("The", seed=12, **kw).token_ids
    # unseeded requests draw from torch's default generator, which manual_seed sets
    torch.manual_seed(5)
    unseeded = lm.generate("The", **kw).token_ids
    torch.manual_seed(5)
    assert lm.generate("The", **kw).token_ids == unseeded


def test_logprobs_are_the_models_raw_distribution(lm):
    out = lm.generate("if x", max_tokens=12, temperature=0.8, seed=0, logprobs=3, ignore_eos=True)
    prompt = lm.tokenizer.encode("if x")
    assert len(out.logprobs) == len(out.token_ids)
    for i, lp in enumerate(out.logprobs):
        ref = F.log_softmax(lm.logits(prompt + out.token_ids[:i])[-1], dim=-1)
        assert lp.token_id == out.token_ids[i]
        assert_close(lp.logprob, ref[lp.token_id], scale=ref.abs().max().item())
        # the engine's cached forward rounds otherwise: no near-tie in the order of the top 3
        assert_clear_choices(ref, ranks=3)
        values, ids = ref.topk(3)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert_close([v for _, v in lp.top], values, scale=ref.abs().max().item())
    assert lm.generate("if x", max_tokens=3).logprobs is None
    chunks = [c for c in lm.stream("if x", max_tokens=3, logprobs=0) if c.token_id is not None]
    assert all(c.logprob.top == () for c in chunks)


def test_min_tokens_holds_back_the_stop_token(lm):
    free = lm.generate("The", max_tokens=30, temperature=0, ignore_eos=True)
    marker = free.token_ids[2]
    early = lm.generate("The", max_tokens=30, temperature=0, stop_token_ids=[marker])
    assert len(early.token_ids) == free.token_ids.index(marker)
    late = lm.generate("The", max_tokens=30, temperature=0, stop_token_ids=[marker], min_tokens=8)
    assert len(late.token_ids) >= 8 and marker not in late.token_ids[:8]


def test_logit_bias_steers_generation(lm):
    out = lm.generate("The", max_tokens=5, temperature=0, logit_bias={42: 100}, ignore_eos=True)
    assert out.token_ids == [42] * 5
    with pytest.raises(ValueError, match="token ids"):
        lm.generate("The", max_tokens=5, logit_bias={lm.tokenizer.vocab_size: 1})


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory, tokenizer):
    """The same random weights as an arlm LM and a transformers model."""
    import transformers

    from arlm.formats.hf import export_hf

    model = make_model("gpt2", vocab_size=tokenizer.vocab_size, seed=5)
    with torch.no_grad():  # spread the logits, so greedy choices are never near-ties
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0)
    out = tmp_path_factory.mktemp("hf") / "model"
    export_hf(model, tokenizer, out)
    return LM(model, tokenizer), transformers.AutoModelForCausalLM.from_pretrained(out).eval()


@pytest.mark.parametrize(
    "arlm_kw, hf_kw",
    [
        ({"repetition_penalty": 1.3}, {"repetition_penalty": 1.3}),
        ({"repetition_penalty": 0.8}, {"repetition_penalty": 0.8}),
        ({"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 2}),
        ({"no_repeat_ngram_size": 3}, {"no_repeat_ngram_size": 3}),
    ],
)
def test_greedy_with_penalties_equals_transformers_generate(hf_pair, arlm_kw, hf_kw):
    lm, hf_model = hf_pair
    prompt = lm.tokenizer.encode("The for statement")
    ours = lm.generate(prompt, max_tokens=90, temperature=0, ignore_eos=True, **arlm_kw)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        theirs = hf_model.generate(
            ids,
            do_sample=False,
            max_new_tokens=90,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
            **hf_kw,
        )
    # arlm rounds otherwise: no near-tie among the scores transformers chose from (its logits
    # after the penalty), which the spread weights make wide
    assert_clear_choices(torch.cat(theirs.scores))
    assert ours.token_ids == theirs.sequences[0, len(prompt) :].tolist()
    plain = lm.generate(prompt, max_tokens=90, temperature=0, ignore_eos=True)
    assert plain.token_ids != ours.token_ids  # the setting changed the output

"""Speculative decoding: the same tokens as without it (greedy, and seeded sampling), the
target's distribution when sampling, the KV cache rolled back, loops met at the same token,
its metrics, and its settings checked."""

from __future__ import annotations

import math
import random
import re

import httpx
import pytest
import torch

import arlm
from arlm.api import LM
from arlm.cli import main
from arlm.engine import Engine, EngineConfig
from arlm.engine.speculation import POSITION_COST, PROBE_BUDGET, PROBE_EVERY, check
from arlm.formats.checkpoint import save_model
from arlm.kv_cache import CacheConfig
from arlm.sampling import SamplingParams
from arlm.speculative import SpeculativeConfig
from arlm.speculative.ngram import lookup
from arlm.speculative.proposer import Guess
from arlm.speculative.rejection import accept_or_resample
from arlm.tokenizer import Tokenizer
from arlm.train.corpus import builtin_documents
from tests.conftest import make_model
from tests.numerics import assert_clear_choices, assert_close, choice_logits
from tests.serving import LiveServer

GREEDY = dict(temperature=0, ignore_eos=True)
# speculating at any batch size, so that mixed batches verify, and k fixed: the adaptive k
# follows measured times (test_k_follows_acceptance_and_cost checks it alone)
NGRAM = SpeculativeConfig(prompt_lookup_min=1, disable_by_batch_size=64, adaptive=False)
DRAFT = SpeculativeConfig(
    method="draft",
    draft_model="(in memory)",
    num_speculative_tokens=3,
    disable_by_batch_size=64,
    adaptive=False,
)


@pytest.fixture(scope="module")
def target(tokenizer):
    # untied: a random model whose output projection is its embedding repeats one token
    return make_model("llama", vocab_size=tokenizer.vocab_size, seed=5, tie_embeddings=False)


@pytest.fixture(scope="module")
def other(tokenizer):
    """A draft that shares the vocabulary and little else: low acceptance."""
    return make_model("gpt2", vocab_size=tokenizer.vocab_size, seed=11, tie_embeddings=False)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):  # some repeat a phrase, so prompt lookup finds something in them
        head = [rng.randrange(1, 500) for _ in range(rng.randrange(2, 12))]
        out.append(head * rng.randrange(1, 4) + [rng.randrange(1, 500)])
    return out


def _engine(model, tokenizer, spec=None, draft=None, **config) -> Engine:
    config.setdefault("max_num_seqs", 8)
    config.setdefault("kv_cache_memory_gib", 0.02)  # the padded path gives the pool its memory
    return Engine(model, tokenizer, config=EngineConfig(**config), speculative=spec, draft=draft)


def _run_joining(engine: Engine, prompts, params, join_at: int = 2) -> list:
    """Half the requests first, the rest ``join_at`` steps later; completions in order."""
    half = len(prompts) // 2
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts[:half], params[:half], strict=True)]
    got, steps = {}, 0
    while engine.has_unfinished():
        if steps == join_at:
            ids += [
                engine.add_request(p, sp)
                for p, sp in zip(prompts[half:], params[half:], strict=True)
            ]
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.completion
        steps += 1
    return [got[i] for i in ids]


def _mixed(n: int) -> list[SamplingParams]:
    """Greedy rows with and without processors, stop strings and logprobs, of many lengths."""
    out = []
    for i in range(n):
        kw = dict(max_tokens=6 + (i * 7) % 25, **GREEDY)
        if i % 4 == 1:
            kw.update(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2)
        elif i % 4 == 2:
            kw.update(logit_bias={17: 3.0, 40: -2.0}, logprobs=2)
        elif i % 4 == 3:
            kw.update(dry_multiplier=0.8, dry_allowed_length=2)
        out.append(SamplingParams(**kw))
    return out


def _assert_same(got, want) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids
        assert g.finish_reason == w.finish_reason and g.text == w.text
        if w.logprobs is not None:  # of the accepted tokens, as without speculation
            assert [lp.token_id for lp in g.logprobs] == [lp.token_id for lp in w.logprobs]
            assert_close([lp.logprob for lp in g.logprobs], [lp.logprob for lp in w.logprobs])


@pytest.fixture(scope="module")
def mixed(target, tokenizer):
    """Mixed requests and their completions without speculation, rows joining late."""
    prompts, params = _prompts(8), _mixed(8)
    plain = _run_joining(_engine(target, tokenizer), prompts, params)
    for p, sp, c in zip(prompts, params, plain, strict=True):
        if not _processed(sp):
            assert_clear_choices(choice_logits(target, p, c.token_ids))
    return prompts, params, plain


def _processed(sp: SamplingParams) -> bool:
    return bool(sp.repetition_penalty != 1 or sp.logit_bias or sp.dry_multiplier)


def _count_graph_steps(graphs, verify: bool) -> list[int]:
    """Wrap ``graphs.run`` to count the steps it runs with verify rows (more logits than
    sequences: every position of a verify row samples), or (``verify`` False) with a sequence
    fed more than one position (a draft's catch-up)."""
    run, seen = graphs.run, [0]

    def counted(spans, tokens, select, *rest):
        if verify:
            seen[0] += len(select) > len(spans)
        else:
            seen[0] += any(span.length > 1 for span in spans)
        return run(spans, tokens, select, *rest)

    graphs.run = counted
    return seen


@pytest.mark.parametrize(
    "method,graphs",
    [
        ("ngram", False),
        ("ngram", True),
        ("draft-self", False),
        ("draft-self", True),
        ("draft-other", True),
    ],
    ids=["ngram", "ngram-padded", "draft-self", "draft-self-padded", "draft-other-padded"],
)
def test_greedy_tokens_are_those_without_speculation_in_mixed_batches(
    method, graphs, mixed, target, other, tokenizer
):
    """``padded``: steps run through the padded path (CUDA graphs' on a GPU), each verify row
    as one row per position, and so do a draft model's steps (its catch-up of accepted
    guesses, a row per position too)."""
    prompts, params, plain = mixed
    spec, draft = NGRAM, None
    if method != "ngram":
        spec, draft = DRAFT, target if method == "draft-self" else other
    engine = _engine(target, tokenizer, spec, draft)
    if graphs:
        engine.use_decode_graphs(capture=False)
        verify_steps = _count_graph_steps(engine.runner.decode_graphs, verify=True)
        if draft is not None:  # a catch-up of accepted guesses rides through the graphs too
            proposer_graphs = engine.speculator.proposer.runner.decode_graphs
            catch_ups = _count_graph_steps(proposer_graphs, verify=False)
    got = _run_joining(engine, prompts, params)
    _assert_same(got, plain)
    if graphs:
        assert verify_steps[0] > 0
    if graphs and draft is not None:
        assert engine.speculator.proposer.runner.decode_graphs.steps > 0
        assert catch_ups[0] > 0 or method == "draft-other"  # it may accept too few to show
    stats = engine.stats()
    assert stats["spec_decode_num_draft_tokens"] > 0
    accepted = stats["spec_decode_num_accepted_tokens"]
    assert accepted == sum(c.usage.spec_accepted_tokens for c in got)
    by_pos = [
        stats[f"spec_decode_num_accepted_tokens_pos_{i}"]
        for i in range(spec.num_speculative_tokens)
    ]
    assert sum(by_pos) == accepted and by_pos == sorted(by_pos, reverse=True)
    if method == "draft-self":  # the target guessing for itself is right where nothing
        for sp, c in zip(params, got, strict=True):  # reshapes its logits
            if not _processed(sp):
                assert c.usage.spec_accepted_tokens == c.usage.spec_draft_tokens
    # fewer forwards than tokens: every accepted guess saved one
    assert engine.steps < sum(len(c.token_ids) for c in got)


def test_stop_strings_and_stop_ids_end_where_they_would(target, tokenizer):
    prompt = _prompts(3, seed=4)[2]
    free = LM(target, tokenizer).generate(prompt, max_tokens=30, **GREEDY)
    ids = free.token_ids
    # a stop string of two tokens' text half-way (a verify row's guesses likely run past it)
    stop = next(
        piece
        for i in range(12, 28)
        if (piece := tokenizer.decode(ids[i : i + 2])).isascii() and piece.strip()
    )
    cases = [
        SamplingParams(max_tokens=30, stop=[stop], **GREEDY),
        SamplingParams(max_tokens=30, stop_token_ids=[ids[13]], temperature=0),
        SamplingParams(max_tokens=30, min_tokens=20, stop_token_ids=[ids[13]], temperature=0),
        SamplingParams(max_tokens=11, **GREEDY),
    ]
    plain = LM(target, tokenizer).generate([prompt] * 4, cases)
    got = LM(target, tokenizer, speculative=NGRAM).generate([prompt] * 4, cases)
    _assert_same(got, plain)
    assert got[0].finish_reason == "stop" and stop not in got[0].text
    assert len(got[3].token_ids) == 11


def test_seeded_sampling_gives_the_same_tokens_alone_or_batched(target, tokenizer):
    """Prompt lookup's guesses are point masses: each token is the sequence's next draw from
    the target's distribution, kept if it is the guess, so the tokens are those without
    speculation. A sampling draft's guesses go through the rejection rule, with the sequence's
    own generator and the draft's own one seeded from the request: the same tokens alone or
    batched."""
    prompts = _prompts(6, seed=2)
    params = [
        SamplingParams(max_tokens=24, temperature=0.8, seed=i, ignore_eos=True) for i in range(6)
    ]
    plain = LM(target, tokenizer).generate(prompts, params)
    for spec, draft in ((NGRAM, None), (DRAFT, target)):
        batched = LM(target, tokenizer, speculative=spec, draft=draft).generate(prompts, params)
        alone = [
            LM(target, tokenizer, speculative=spec, draft=draft).generate(p, sp)
            for p, sp in zip(prompts[:2], params[:2], strict=True)
        ]
        assert [c.token_ids for c in alone] == [c.token_ids for c in batched[:2]]
        assert sum(c.usage.spec_draft_tokens for c in batched) > 0
        if draft is None:
            assert [c.token_ids for c in batched] == [c.token_ids for c in plain]
        else:  # the target as its own sampling draft: p = q (up to rounding), all are kept
            drafted = sum(c.usage.spec_draft_tokens for c in batched)
            assert sum(c.usage.spec_accepted_tokens for c in batched) > 0.9 * drafted


class _Always:
    """A proposer that guesses the same ids whatever the sequence."""

    def __init__(self, guess: list[int]) -> None:
        self.guess = guess

    def propose(self, seqs, ks):
        return [Guess(self.guess[:k]) for k in ks]

    def release(self, seq) -> None:
        pass


class _Drawn:
    """A proposer that draws each guess from a fixed distribution ``q`` (a sampling draft)."""

    def __init__(self, q: torch.Tensor, seed: int) -> None:
        self.q, self.generator = q, torch.Generator().manual_seed(seed)

    def propose(self, seqs, ks):
        out = []
        for k in ks:
            tokens = torch.multinomial(self.q, k, replacement=True, generator=self.generator)
            out.append(Guess(tokens.tolist(), self.q.expand(k, -1)))
        return out

    def release(self, seq) -> None:
        pass


# a proposer's distribution that is far from the model's: many rejections and resamples
Q = torch.tensor([0.05, 0.05, 0.5, 0.1, 0.2, 0.1])


def test_the_rejection_rule_gives_the_targets_distribution():
    """Leviathan's rule on known p and q: the kept-or-resampled token's frequencies over
    8,000 draws match p (chi-square), and the guess is kept as often as sum(min(p, q))."""
    p = torch.tensor([0.3, 0.25, 0.05, 0.2, 0.0, 0.2])
    generator = torch.Generator().manual_seed(0)
    counts, kept = torch.zeros(6), 0
    n = 8_000
    guesses = torch.multinomial(Q, n, replacement=True, generator=generator).tolist()
    for guess in guesses:
        token, accepted = accept_or_resample(p, Q, guess, generator)
        counts[token] += 1
        kept += accepted
    support = p > 0
    expected = p[support] * n
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    assert counts[~support].sum() == 0
    assert chi2 < 20.5, chi2  # 4 degrees of freedom: exceeded by 0.04% of true samples
    rate = torch.minimum(p, Q).sum().item()  # 0.55
    assert abs(kept / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5


@pytest.mark.parametrize("proposer", ["point mass", "sampling draft"])
def test_verified_tokens_follow_the_targets_distribution(proposer, tokenizer):
    """Chi-square over 2,048 draws of the two tokens after a prompt, the second verified
    against a guess (a fixed one, or one drawn from ``Q``): their joint frequencies match
    p(t1) p(t2 | t1) from the model."""
    model = make_model("gpt2", vocab_size=6, seed=3)  # ids 0..5 of the tokenizer
    prompt, temperature = [1, 2, 3], 0.9
    spec = SpeculativeConfig(num_speculative_tokens=2, disable_by_batch_size=256, adaptive=False)
    engine = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=256), speculative=spec)
    engine.speculator.proposer = _Always([2, 4]) if proposer == "point mass" else _Drawn(Q, 1)
    counts = torch.zeros(6, 6)
    for batch in range(8):
        params = [
            SamplingParams(
                max_tokens=3, temperature=temperature, seed=batch * 256 + i, ignore_eos=True
            )
            for i in range(256)
        ]
        for c in engine.generate([prompt] * 256, params, progress=False):
            counts[c.token_ids[0], c.token_ids[1]] += 1
    assert engine.stats()["spec_decode_num_accepted_tokens"] > 0
    with torch.no_grad():
        first = (model(torch.tensor([prompt]))[0][0, -1] / temperature).softmax(-1)
        seconds = torch.stack(
            [
                (model(torch.tensor([prompt + [t]]))[0][0, -1] / temperature).softmax(-1)
                for t in range(6)
            ]
        )
    expected = (first[:, None] * seconds).double() * counts.sum()
    chi2 = ((counts.double() - expected) ** 2 / expected).sum().item()
    # 35 degrees of freedom: 0.1% of draws from the true distribution exceed 66.6
    assert chi2 < 66.6, chi2


def test_rejected_guesses_leave_the_cache_as_if_never_seen(target, tokenizer):
    """Wrong guesses every step: each verify row's first logits (its pending token over the
    cache the rejected positions were rolled out of) equal a full recomputation, and the
    cached keys and values equal those of an engine that never guessed."""
    spec = SpeculativeConfig(num_speculative_tokens=3, adaptive=False)
    engine = _engine(target, tokenizer, spec, kv_block_size=4)
    engine.speculator.proposer = _Always([7, 7, 7])
    seen, verify = [], engine.speculator.verify

    def spy(logits, rows):
        seq = rows[0][0]
        seen.append((list(seq.token_ids), logits[0].clone()))
        return verify(logits, rows)

    engine.speculator.verify = spy
    prompt = _prompts(1, seed=9)[0]
    engine.add_request(prompt, SamplingParams(max_tokens=40, **GREEDY))
    plain = _engine(target, tokenizer, kv_block_size=4)
    plain.add_request(prompt, SamplingParams(max_tokens=40, **GREEDY))
    (seq,), (ref,) = engine.requests["0"], plain.requests["0"]
    for _ in range(12):
        engine.step()
        plain.step()
    assert seq.token_ids == ref.token_ids and seq.spec_draft_tokens > seq.spec_accepted_tokens
    for ids, logits in seen[1:]:
        with torch.no_grad():
            full = target(torch.tensor([ids]))[0][0, -1]
        assert_close(logits, full)
    n = seq.num_cached
    assert n == ref.num_cached and len(seq.block_table) == -(-len(seq.token_ids) // 4)
    for planes, plain_planes in zip(
        engine.runner.cache.read_blocks(seq.block_table),
        plain.runner.cache.read_blocks(ref.block_table),
        strict=True,
    ):  # (blocks, heads, 4, width) -> positions first
        a = planes.transpose(1, 2).flatten(0, 1)[:n]
        b = plain_planes.transpose(1, 2).flatten(0, 1)[:n]
        assert_close(a, b)


@pytest.mark.parametrize("policy", ["stop", "break"])
def test_a_loop_is_met_at_the_same_token_with_prompt_lookup(policy, tokenizer):
    model = make_model("gpt2", vocab_size=tokenizer.vocab_size, seed=0)
    prompts = ["The", "if x", "class"]
    params = SamplingParams(max_tokens=60, loop_policy=policy, **GREEDY)
    plain = LM(model, tokenizer).generate(prompts, params)
    for prompt, p in zip(prompts, plain, strict=True):
        assert_clear_choices(choice_logits(model, tokenizer.encode(prompt), p.token_ids[:20]))
    lm = LM(model, tokenizer, speculative=NGRAM)
    got = lm.generate(prompts, params)
    for g, w in zip(got, plain, strict=True):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
        assert g.loops_broken == w.loops_broken and (g.loop is None) == (w.loop is None)
    stats = lm.engine.stats()
    if policy == "stop":
        assert any(c.finish_reason == "repetition" for c in got)
        # prompt lookup guesses a loop's continuation: most of its guesses are kept
        drafted = stats["spec_decode_num_draft_tokens"]
        assert stats["spec_decode_num_accepted_tokens"] > drafted / 2
    else:  # a break leaves the loop, and the guesses that continued it fail
        assert any(c.loops_broken for c in got)
        assert stats["spec_decode_num_accepted_tokens"] > 0


def test_prompt_lookup_finds_the_latest_longest_match():
    assert lookup([1, 2, 3, 9, 1, 2, 4, 8, 1, 2], 2, 1, 3) == [4, 8]  # the latest "1 2"
    assert lookup([5, 1, 2, 3, 6, 2, 3, 7, 1, 2, 3], 1, 1, 3) == [6]  # "1 2 3" beats "2 3"
    assert lookup([1, 2, 3, 4], 3, 1, 3) == []
    assert lookup([4, 5, 4, 5], 5, 2, 2) == [4, 5, 4, 5, 4]  # a loop goes on looping
    assert lookup([256, 1, 0, 1], 2, 1, 1) == [0, 1]  # 256's bytes hold a 1 that is no id


def test_speculation_switches_off_for_large_batches(target, tokenizer):
    spec = SpeculativeConfig(method="ngram", prompt_lookup_min=1, disable_by_batch_size=2)
    prompts = _prompts(4, seed=1)
    lm = LM(target, tokenizer, speculative=spec)
    lm.generate(prompts, max_tokens=12, **GREEDY)
    stats = lm.engine.stats()
    assert stats["spec_decode_num_drafts"] == 0  # four decode rows each step, above 2
    lm.generate(prompts[:2], max_tokens=12, **GREEDY)
    assert lm.engine.stats()["spec_decode_num_drafts"] > 0


def test_bad_settings_are_refused_at_load(target, tokenizer):
    with pytest.raises(ValueError, match="num_speculative_tokens=0 is not allowed"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="method='eagle' is not allowed"):
        SpeculativeConfig(method="eagle")
    with pytest.raises(ValueError, match="needs draft_model"):
        SpeculativeConfig(method="draft")
    with pytest.raises(ValueError, match="prompt_lookup_max=1 is not allowed"):
        SpeculativeConfig(prompt_lookup_min=2, prompt_lookup_max=1)
    with pytest.raises(ValueError, match=r"unknown speculative config keys \['k'\]"):
        SpeculativeConfig.from_json('{"k": 3}')
    spec = SpeculativeConfig.from_json('{"method": "draft", "model": "/m", "quantization": "int4"}')
    assert spec.draft_model == "/m" and spec.quantization == "int4"
    small_vocab = make_model("gpt2", vocab_size=300)
    with pytest.raises(ValueError, match="vocabulary has 300 ids, the target's 512"):
        LM(target, tokenizer, speculative=DRAFT, draft=small_vocab)
    short = make_model("gpt2", vocab_size=tokenizer.vocab_size, block_size=64)
    with pytest.raises(ValueError, match="context of 64 tokens is shorter than .* 128"):
        LM(target, tokenizer, speculative=DRAFT, draft=short)
    LM(
        target,
        tokenizer,
        engine_config=EngineConfig(max_model_len=64),
        speculative=DRAFT,
        draft=short,
    )
    with pytest.raises(ValueError, match="num_speculative_tokens=200 guesses as many"):
        LM(target, tokenizer, speculative=SpeculativeConfig(num_speculative_tokens=200))
    with pytest.raises(ValueError, match="windowed cache"):
        LM(target, tokenizer, CacheConfig(window=32), speculative=NGRAM)
    with pytest.raises(ValueError, match="tensor parallelism"):
        check(NGRAM, target.config, 128, windowed=False, tensor_parallel=True, draft=None)
    with pytest.raises(ValueError, match="needs a draft model"):
        LM(target, tokenizer, speculative=DRAFT)


@pytest.fixture(scope="module")
def saved(target, other, tokenizer, tmp_path_factory):
    """The target and the other draft as checkpoint folders, and one with another tokenizer."""
    root = tmp_path_factory.mktemp("spec")
    save_model(root / "target", target, tokenizer)
    save_model(root / "draft", other, tokenizer)
    foreign = Tokenizer.train(builtin_documents()[:5], vocab_size=tokenizer.vocab_size)
    save_model(root / "foreign", other, foreign)
    return root


def test_generate_command_speculates_and_prints_its_acceptance(saved, capsys):
    spec = '{"method": "draft", "model": "%s", "num_speculative_tokens": 3}' % (saved / "draft")
    argv = ["generate", str(saved / "target"), "if x", "--max-tokens", "24", "--temperature", "0"]
    assert main([*argv, "--ignore-eos"]) == 0
    plain = capsys.readouterr().out
    assert main([*argv, "--ignore-eos", "--speculative-config", spec, "--stats"]) == 0
    out, err = capsys.readouterr()
    assert out == plain
    assert re.search(r"speculation: \d+ of \d+ guesses accepted .* by position", err)
    assert main([*argv, "--speculative-config", "{method: ngram}"]) != 0
    assert "the speculative config is not valid JSON" in capsys.readouterr().err


def test_a_draft_must_share_the_tokenizer_and_an_int4_self_draft_loads(saved):
    bad = {"method": "draft", "model": str(saved / "foreign")}
    with pytest.raises(ValueError, match="another tokenizer"):
        arlm.load(saved / "target", device="cpu", speculative=bad)
    self_draft = {"method": "draft", "model": str(saved / "target"), "quantization": "int4"}
    lm = arlm.load(saved / "target", device="cpu", speculative=self_draft)
    plain = arlm.load(saved / "target", device="cpu")
    prompt = _prompts(1, seed=3)[0]
    got = lm.generate(prompt, max_tokens=20, **GREEDY)
    assert got.token_ids == plain.generate(prompt, max_tokens=20, **GREEDY).token_ids
    assert got.usage.spec_accepted_tokens > 0


def test_metrics_carry_vllms_spec_decode_names(target, tokenizer):
    lm = LM(target, tokenizer, speculative=NGRAM)
    with LiveServer(lm) as s:
        httpx.post(
            s.url + "/v1/completions",
            json={"prompt": _prompts(1)[0], "max_tokens": 16, "temperature": 0},
        ).raise_for_status()
        text = httpx.get(s.url + "/metrics").text
    for name in (
        "spec_decode_num_drafts_total",
        "spec_decode_num_draft_tokens_total",
        "spec_decode_num_accepted_tokens_total",
        'spec_decode_num_accepted_tokens_per_pos_total{position="0"}',
    ):
        assert "arlm:" + name in text, name


def test_k_follows_acceptance_and_cost(target, tokenizer):
    """k makes the most tokens per unit of work: all k while guesses are kept and cheap, fewer
    as acceptance falls, none when guessing costs more than it saves (then one guess every
    ``PROBE_EVERY`` steps, so a recovering acceptance is seen)."""
    engine = _engine(target, tokenizer, SpeculativeConfig(num_speculative_tokens=6))
    spec = engine.speculator
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=100))
    (seq,) = engine.requests["0"]
    track = spec._track(seq)
    assert spec._k(seq) == 6  # no acceptance seen yet: guess fully
    track.rate = 0.5
    assert spec._k(seq) == 4  # 1.94 tokens for 1 + 4 * 0.025 of work; 3 or 5 make fewer
    spec._step_seconds, spec._guess_seconds = 0.1, 0.005  # a cheap proposer: probes each 16
    track.rate = 0.01
    assert [spec._k(seq) for _ in range(2 * PROBE_EVERY)].count(1) == 2
    spec._guess_seconds = 0.05  # a draft half as costly as a step: probes take 2% of the work
    track.rate, track.idle = 0.5, 0
    every = math.ceil((POSITION_COST + 0.5) / PROBE_BUDGET)
    assert [spec._k(seq) for _ in range(every)] == [0] * (every - 1) + [1]
    track.rate = 0.95  # a draft that good pays even at that cost
    assert spec._k(seq) == 5
    spec._guess_seconds = 0.0
    assert spec._k(seq) == 6
    spec._rate = 0.2  # a new sequence starts from the engine's acceptance
    engine.add_request([4, 5, 6], SamplingParams(max_tokens=100))
    assert spec._track(engine.requests["1"][0]).rate == 0.2

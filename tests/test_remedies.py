"""Training-time loop remedies: unlikelihood (token and sequence level) and DITTO equal a direct
computation of the papers' formulas on a toy batch, gradients too; the trainer's step with them
equals the sum of its terms; a run with them resumes exactly and runs under torchrun."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from arlm.train import TrainConfig, Trainer
from arlm.train.ditto import ditto_loss, repetition_batch, sentence_end_ids
from arlm.train.unlikelihood import (
    greedy_continuations,
    repeated_ngram_mask,
    sequence_unlikelihood,
    token_unlikelihood,
)
from tests.conftest import make_model
from tests.test_distributed import assert_same_run, ok, train
from tests.test_distributed import cache as cache  # noqa: F401 (fixtures)
from tests.test_distributed import corpus as corpus  # noqa: F401
from tests.test_train import _config

V = 11


def _toy(seed: int = 0, B: int = 2, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(B, T, V, generator=g)).requires_grad_()
    targets = torch.randint(0, 5, (B, T), generator=g)  # a small alphabet: many repeats
    return logits, targets


def _tol(value: torch.Tensor) -> dict:
    # float32 sums of O(B * T * V) terms: relative error a few eps times the term count
    eps = torch.finfo(torch.float32).eps
    return dict(rtol=50 * eps * value.numel(), atol=50 * eps)


def _grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss, x)[0]


def direct_token_ul(logits, targets):
    """Welleck et al.'s token-level term, position by position."""
    total = 0.0
    probs = logits.float().softmax(-1)
    for b in range(targets.size(0)):
        for t in range(targets.size(1)):
            if targets[b, t] == -100:
                continue
            candidates = {int(c) for c in targets[b, :t] if c != -100} - {int(targets[b, t])}
            for c in candidates:
                total = total - torch.log((1 - probs[b, t, c]).clamp(min=1e-5))
    return total


def test_token_unlikelihood_equals_the_direct_sum_and_its_gradient():
    logits, targets = _toy()
    targets[1, 3] = -100  # ignored: neither a candidate nor a position
    ours, ref = token_unlikelihood(logits, targets), direct_token_ul(logits, targets)
    torch.testing.assert_close(ours, ref, **_tol(logits))
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits), **_tol(logits))
    assert ours > 0


def test_repeated_ngrams_are_marked_after_the_prefix():
    tokens = torch.tensor([[1, 2, 3, 9, 1, 2, 3, 4, 1, 2, 3, 4]])
    mask = repeated_ngram_mask(tokens, 3, first=2)
    # 1 2 3 repeats at 4..6 and 8..10; 2 3 4 at 9..11
    assert mask[0].nonzero().flatten().tolist() == [4, 5, 6, 8, 9, 10, 11]
    assert not repeated_ngram_mask(tokens, 3, first=9)[0, :9].any()


def test_sequence_unlikelihood_equals_the_direct_sum_and_its_gradient():
    logits, targets = _toy(1)
    mask = torch.rand(targets.shape, generator=torch.Generator().manual_seed(2)) < 0.5
    ours = sequence_unlikelihood(logits, targets, mask)
    probs = logits.softmax(-1)
    ref = sum(
        -torch.log((1 - probs[b, t, targets[b, t]]).clamp(min=1e-5))
        for b, t in mask.nonzero().tolist()
    )
    torch.testing.assert_close(ours, ref, **_tol(logits))
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits), **_tol(logits))


def test_ditto_equals_the_papers_formula_and_its_gradient():
    logits, _ = _toy(3, B=2, T=9)
    sentence = [[4, 1, 3], [2, 2, 0, 1]]
    targets = torch.tensor([(s * 4)[1:10] for s in sentence])  # windows shifted by one
    lengths = torch.tensor([3, 4])
    lam = 0.5
    ours = ditto_loss(logits, targets, lengths, lam)
    probs = logits.softmax(-1)
    ref = 0.0
    for b, length in enumerate(lengths.tolist()):
        for t in range(length, 9):  # the second copy on
            p = probs[b, t, targets[b, t]]
            previous = probs[b, t - length, targets[b, t - length]].detach()
            assert targets[b, t] == targets[b, t - length]
            ref = ref - torch.log((1 - (p - lam * previous).abs()).clamp(min=1e-5))
    torch.testing.assert_close(ours, ref, **_tol(logits))
    torch.testing.assert_close(_grad(ours, logits), _grad(ref, logits), **_tol(logits))


def test_repetition_batch_repeats_one_sentence_per_row(tmp_path, cache_dir):
    trainer = Trainer(_config(tmp_path, cache_dir, ditto=True), progress=False)
    ends = sentence_end_ids(trainer.tokenizer)
    g = torch.Generator().manual_seed(0)
    windows, lengths = repetition_batch(trainer.shards.train, ends, 3, 32, g)
    assert windows.shape == (3, 33)
    for row, length in zip(windows.tolist(), lengths.tolist(), strict=True):
        assert 4 <= length <= 48
        assert row[length:] == row[: 33 - length]  # periodic with the sentence's length
        assert row[length - 1] in ends  # a sentence ends each copy


def test_the_step_loss_is_the_sum_of_its_terms(tmp_path, cache_dir):
    cfg = _config(tmp_path, cache_dir, unlikelihood="both", ditto=True, ditto_rows=2)
    trainer = Trainer(cfg, progress=False)
    model = trainer.model.eval()  # no dropout: the two computations see one function
    batch = trainer.shards.train.windows([0, 100], 32)
    x, y = batch[:, :-1], batch[:, 1:]
    loss = trainer.remedies.loss(model, x, y, step=0, micro=0)
    # the same rows built again, and every term written out
    g = trainer.remedies._generator(0, 0)
    windows, lengths = repetition_batch(trainer.shards.train, trainer.remedies.ends, 2, 32, g)
    rows = greedy_continuations(model, x[:, :8], 25)
    logits = model(torch.cat([x, windows[:, :-1], rows[:, :-1]]))[0]
    ce = F.cross_entropy(logits[:2].reshape(-1, logits.size(-1)), y.reshape(-1))
    expected = (
        ce
        + token_unlikelihood(logits[:2], y) / 64
        + ditto_loss(logits[2:4], windows[:, 1:], lengths, 0.5) / 64
        + sequence_unlikelihood(logits[4:], rows[:, 1:], repeated_ngram_mask(rows, 4, 8)[:, 1:])
        / 64
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # off the sequence-level steps there are no continuation rows
    assert math.isfinite(trainer.remedies.loss(model, x, y, step=1, micro=0).item())


def test_greedy_continuations_follow_the_model(tokenizer):
    model = make_model("gpt2", vocab_size=tokenizer.vocab_size)
    prefix = torch.tensor([[5, 6, 7], [8, 9, 10]])
    out = greedy_continuations(model, prefix, 5)
    for row in out.tolist():
        for t in range(3, 8):
            logits = model(torch.tensor([row[:t]]))[0][0, -1]
            assert row[t] == int(logits.argmax())
    assert model.training is False  # made by make_model in eval mode, and left so


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(unlikelihood="tokens"), "unlikelihood='tokens'"),
        (dict(ditto_lambda=0.0), "ditto_lambda"),
        (dict(unlikelihood_every=0), "unlikelihood_every"),
        (dict(ditto_rows=0), "ditto_rows"),
    ],
)
def test_bad_remedy_options_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(out=str(tmp_path), **overrides)


def test_resume_with_remedies_reaches_the_same_weights(tmp_path, cache_dir):
    opts = dict(unlikelihood="both", unlikelihood_every=3, ditto=True, ditto_rows=2, steps=8)
    straight = Trainer(_config(tmp_path / "a", cache_dir, **opts), progress=False)
    straight.fit()

    def stop_at_4(trainer):
        if trainer.step == 4:
            trainer.request_stop()

    first = Trainer(_config(tmp_path / "b", cache_dir, **opts), progress=False)
    assert first.fit(on_step=stop_at_4).step == 4
    resumed = Trainer(_config(tmp_path / "b", cache_dir, **opts), resume=True, progress=False)
    assert resumed.cfg.unlikelihood == "both" and resumed.remedies is not None
    assert resumed.fit().step == 8
    for (name, a), (_, b) in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_two_ranks_with_remedies_follow_one_process(tmp_path, corpus, cache):  # noqa: F811
    args = ["--steps", "4", "--unlikelihood", "both", "--unlikelihood-every", "2", "--ditto"]
    one = ok(train(tmp_path / "one", corpus, cache, *args, "--batch-size", "4",
                   "--ditto-rows", "2"))  # fmt: skip
    two = train(tmp_path / "two", corpus, cache, *args, "--batch-size", "2", "--ditto-rows", "1",
                nproc=2)  # fmt: skip
    ok(two)
    assert "trained to step 4" in one.stdout
    assert_same_run(tmp_path / "one", tmp_path / "two")

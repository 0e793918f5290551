"""Teacher-forced training: it learns, it resumes exactly, it stops cleanly on a bad loss."""

import json
import math
from collections import Counter

import pytest
import torch

import arlm
from arlm.train import TrainConfig, Trainer, TrainingError


def test_training_brings_val_loss_well_below_the_unigram_entropy(trained_run):
    trainer, result = trained_run
    counts = Counter(trainer.shards.train.tolist())
    total = sum(counts.values())
    unigram_entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    assert result.step == 300
    assert result.val_loss < unigram_entropy - 1.0, (result.val_loss, unigram_entropy)


def test_run_folder_holds_checkpoint_metrics_and_plot(trained_run):
    trainer, result = trained_run
    names = {p.name for p in result.out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_state.json",
        "train_state.safetensors",
        "metrics.jsonl",
        "loss.png",
    } <= names
    records = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [100, 200, 300]
    assert evals[-1]["val_loss"] == pytest.approx(result.val_loss)
    assert evals[-1]["val_ppl"] == pytest.approx(math.exp(result.val_loss))


def _config(tmp_path, cache_dir, **overrides):
    base = dict(
        preset="tiny",
        steps=12,
        batch_size=4,
        block_size=32,
        warmup_steps=3,
        eval_interval=4,
        eval_iters=2,
        ckpt_interval=100,
        log_interval=2,
        vocab_size=512,
        out=str(tmp_path / "run"),
        cache_dir=str(cache_dir),
        dropout=0.1,
    )
    return TrainConfig(**{**base, **overrides})


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, cache_dir):
    straight = Trainer(_config(tmp_path / "a", cache_dir), progress=False)
    straight.fit()

    def stop_at_6(trainer):
        if trainer.step == 6:
            trainer.request_stop()

    first = Trainer(_config(tmp_path / "b", cache_dir), progress=False)
    assert first.fit(on_step=stop_at_6).step == 6
    resumed = Trainer(_config(tmp_path / "b", cache_dir), resume=True, progress=False)
    assert resumed.step == 6
    result = resumed.fit()
    assert result.step == 12
    for (name, a), (_, b) in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=False
    ):
        assert torch.equal(a, b), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/run/metrics.jsonl").open()]
    assert steps == [json.loads(x)["step"] for x in (tmp_path / "a/run/metrics.jsonl").open()]


def test_a_new_run_refuses_to_overwrite_an_old_one(tmp_path, cache_dir):
    Trainer(_config(tmp_path, cache_dir, steps=2), progress=False).fit()
    with pytest.raises(ValueError, match="--resume"):
        Trainer(_config(tmp_path, cache_dir, steps=2), progress=False)


def test_resume_without_a_run_says_so(tmp_path, cache_dir):
    with pytest.raises(ValueError, match="nothing to resume"):
        Trainer(_config(tmp_path, cache_dir), resume=True, progress=False)


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    trainer = Trainer(_config(tmp_path, cache_dir, ckpt_interval=4), progress=False)

    def poison(t):
        if t.step == 5:
            with torch.no_grad():
                t.model.ln_f.weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"step 6.*step 4"):
        trainer.fit(on_step=poison)
    state = json.loads((tmp_path / "run/train_state.json").read_text())
    assert state["step"] == 4
    resumed = Trainer(_config(tmp_path, cache_dir, ckpt_interval=4), resume=True, progress=False)
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3)
    assert cfg.lr_at(0) == pytest.approx(1e-4)
    assert cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(55) < cfg.lr_at(20)
    assert cfg.lr_at(100) == pytest.approx(1e-4)


def test_a_mixture_of_experts_trains_resumes_and_loads(tmp_path, cache_dir):
    """--n-experts turns each block's MLP into experts: the loss falls, a resumed run reaches the
    uninterrupted run's weights, and the checkpoint loads and generates through the engine."""
    moe = dict(preset="llama-tiny", n_experts=4, n_experts_per_tok=2, dropout=0.0)
    straight = Trainer(_config(tmp_path / "a", cache_dir, **moe), progress=False)
    result = straight.fit()
    assert straight.model.config.n_experts == 4
    assert len(straight.model.h[0].mlp.experts) == 4
    rows = [json.loads(x) for x in (tmp_path / "a/run/metrics.jsonl").open()]
    losses = [row["val_loss"] for row in rows if "val_loss" in row]
    assert losses[-1] < losses[0]

    def stop_at_6(trainer):
        if trainer.step == 6:
            trainer.request_stop()

    Trainer(_config(tmp_path / "b", cache_dir, **moe), progress=False).fit(on_step=stop_at_6)
    resumed = Trainer(_config(tmp_path / "b", cache_dir, **moe), resume=True, progress=False)
    resumed.fit()
    for (name, a), (_, b) in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    lm = arlm.load(tmp_path / "a/run")
    assert lm.config.n_experts == 4 and result.step == 12
    assert len(lm.generate("the", max_tokens=5, temperature=0, ignore_eos=True).token_ids) == 5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"preset": "huge"}, "unknown preset"),
        ({"steps": 0}, "steps=0"),
        ({"lr": -1.0}, "lr="),
        ({"n_experts_per_tok": 2}, "n_experts is not set"),
        ({"n_experts": 2, "n_experts_per_tok": 3}, "n_experts_per_tok=3 is not allowed"),
    ],
)
def test_bad_training_options_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**overrides)

"""Preference training by DPO: the pairs' encoding, the loss against its formula, and a model that
learns to prefer the chosen answers (with LoRA, its own frozen weights the reference)."""

import json
import math

import pytest
import torch

import arlm
from arlm.config import ModelConfig
from arlm.model.transformer import Transformer
from arlm.tokenizer import EOT, Tokenizer
from arlm.train import TrainConfig, Trainer
from arlm.train.chat import IGNORE, CorpusError, corpus_kind
from arlm.train.corpus import builtin_documents
from arlm.train.preference import (
    PreferenceCorpus,
    PreferenceLoss,
    PreferenceSplit,
    dpo_loss,
    encode_pair,
    sequence_logps,
)
from tests.conftest import fine_tune_config
from tests.numerics import assert_close


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(builtin_documents()[:40], vocab_size=400)


def _text(tokenizer, example, trained):
    ids, flags = example.ids.tolist(), example.trained.tolist()
    return tokenizer.decode([i for i, t in zip(ids, flags, strict=True) if t is trained])


def test_a_pair_shares_its_prompt_and_trains_only_the_answers(tokenizer):
    row = {"prompt": "Q: sky?", "chosen": " blue", "rejected": " green"}
    chosen, rejected = encode_pair(tokenizer, row, "x")
    assert _text(tokenizer, chosen, True) == f" blue{EOT}"
    assert _text(tokenizer, rejected, True) == f" green{EOT}"
    assert _text(tokenizer, chosen, False) == _text(tokenizer, rejected, False) == "Q: sky?"


def test_a_conversational_pair_trains_only_the_answer_after_the_prompt(tokenizer):
    prompt = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello."},  # part of the prompt: no target
        {"role": "user", "content": "Sky?"},
    ]
    row = {
        "prompt": prompt,
        "chosen": "Blue.",
        "rejected": [{"role": "assistant", "content": "No"}],
    }
    chosen, rejected = encode_pair(tokenizer, row, "x")
    assert _text(tokenizer, chosen, True) == f" Blue.\n{EOT}"
    assert _text(tokenizer, rejected, True) == f" No\n{EOT}"
    assert "Hello." in _text(tokenizer, chosen, False)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "a", "chosen": "b"}, 'each line must be one JSON object {"prompt"'),
        ({"prompt": "a", "chosen": ["b"], "rejected": "c"}, "'chosen' does not fit the prompt"),
        ({"prompt": [{"role": "user", "content": "a"}], "chosen": "", "rejected": "c"}, "chosen"),
    ],
)
def test_bad_pairs_are_refused(tokenizer, row, message):
    with pytest.raises(CorpusError, match=message):
        encode_pair(tokenizer, row, "x")


def test_a_batch_is_the_chosen_rows_then_the_rejected(tokenizer):
    rows = [
        {"prompt": "Q1", "chosen": " a", "rejected": " bb cc"},
        {"prompt": "Q22", "chosen": " d", "rejected": " e"},
    ]
    split = PreferenceSplit([e for i, r in enumerate(rows) for e in encode_pair(tokenizer, r, i)])
    assert len(split) == 2
    x, y = split.batch([1, 0], window=64, pad_id=0)
    pairs = [encode_pair(tokenizer, r, "x") for r in rows]
    order = [pairs[1][0], pairs[0][0], pairs[1][1], pairs[0][1]]
    for row, example in zip(x, order, strict=True):
        assert row[: len(example.ids) - 1].tolist() == example.ids[:-1].tolist()


def test_sequence_logps_sums_the_targets_log_probabilities():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=64, n_layer=1)).eval()
    x = torch.randint(0, 64, (2, 6))
    y = torch.tensor([[5, IGNORE, 7, 8, IGNORE, IGNORE], [IGNORE] * 5 + [3]])
    with torch.no_grad():
        got = sequence_logps(model, x, y)
        logp = torch.log_softmax(model(x)[0].double(), dim=-1)
    expected = [logp[0, 0, 5] + logp[0, 2, 7] + logp[0, 3, 8], logp[1, 5, 3]]
    assert_close(got, torch.stack(expected), scale=float(logp.abs().max()) * 3)


def test_dpo_loss_is_the_papers_formula():
    policy = torch.tensor([-3.0, -5.0, -4.0, -2.0])  # chosen 0, 1 then rejected 0, 1
    reference = torch.tensor([-3.5, -5.0, -3.0, -2.5])
    beta = 0.1
    margins = [(-3.0 + 3.5) - (-4.0 + 3.0), (-5.0 + 5.0) - (-2.0 + 2.5)]
    expected = sum(-math.log(1 / (1 + math.exp(-beta * m))) for m in margins) / 2
    assert dpo_loss(policy, reference, beta).item() == pytest.approx(expected, rel=1e-6)
    assert dpo_loss(reference, reference, beta).item() == pytest.approx(math.log(2), rel=1e-6)


def test_the_other_losses_are_their_papers_formulas():
    policy = torch.tensor([-3.0, -5.0, -4.0, -2.0])  # chosen 0, 1 then rejected 0, 1
    reference = torch.tensor([-3.5, -5.0, -3.0, -2.5])
    beta, eps = 0.1, 0.2
    margins = [(-3.0 + 3.5) - (-4.0 + 3.0), (-5.0 + 5.0) - (-2.0 + 2.5)]

    def log_sigmoid(z):
        return -math.log(1 + math.exp(-z))

    cases = {
        ("sigmoid", eps): [
            -(1 - eps) * log_sigmoid(beta * m) - eps * log_sigmoid(-beta * m) for m in margins
        ],
        ("hinge", 0.0): [max(0.0, 1 - beta * m) for m in margins],
        ("ipo", 0.0): [(m - 1 / (2 * beta)) ** 2 for m in margins],
    }
    for (kind, smoothing), losses in cases.items():
        got = dpo_loss(policy, reference, beta, kind, smoothing).item()
        assert got == pytest.approx(sum(losses) / 2, rel=1e-6), kind


def test_ipo_takes_each_answers_mean_log_probability(tmp_path):
    """IPO's margins are of log-probabilities averaged over each answer's tokens (TRL's), the
    others' of their sums; the rewards are beta times the policy's over the reference's."""
    torch.manual_seed(0)
    config = ModelConfig.preset("llama-tiny", vocab_size=64, n_layer=1)
    model, reference = Transformer(config).eval(), Transformer(config).eval()
    x = torch.randint(0, 64, (2, 6))
    y = torch.tensor([[5, IGNORE, 7, 8, IGNORE, IGNORE], [IGNORE] * 5 + [3]])
    with torch.no_grad():
        sums = sequence_logps(model, x, y), sequence_logps(reference, x, y)
        means = sequence_logps(model, x, y, mean=True), sequence_logps(reference, x, y, mean=True)
        assert_close(means[0], sums[0] / torch.tensor([3.0, 1.0]), scale=float(sums[0].abs().max()))
        for kind, (policy, ref) in [("ipo", means), ("sigmoid", sums), ("hinge", sums)]:
            got = PreferenceLoss(0.1, model, reference, kind).rewards(model, x, y)
            want = dpo_loss(policy, ref, 0.1, kind)
            assert got.loss.item() == pytest.approx(want.item(), rel=1e-5), kind
            assert_close(got.chosen, 0.1 * (policy[:1] - ref[:1]), scale=1.0)
            assert_close(got.rejected, 0.1 * (policy[1:] - ref[1:]), scale=1.0)
    for kind, start in [("sigmoid", math.log(2)), ("hinge", 1.0), ("ipo", 25.0)]:
        assert PreferenceLoss(0.1, model, reference, kind).start == pytest.approx(start)


# --- training ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Every question's chosen answer says yes, its rejected one no."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Is {i} a number?"}],
            "chosen": "Yes.",
            "rejected": "No.",
        }
        for i in range(60)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _dpo(tmp_path, base, pairs, cache_dir, **overrides):
    settings = dict(steps=20, batch_size=4, lr=1e-2, eval_interval=10)
    return fine_tune_config(base, pairs, tmp_path / "dpo", cache_dir, **settings | overrides)


@pytest.mark.parametrize(
    "options",
    [{"lora_rank": 8}, {"lora_rank": 8, "quantize": "int4"}, {"lr": 1e-3}],
    ids=["lora", "qlora", "full"],
)
def test_dpo_learns_to_prefer_the_chosen_answers(tmp_path, base, pairs, cache_dir, options):
    trainer = Trainer(_dpo(tmp_path, base, pairs, cache_dir, **options), progress=False)
    assert corpus_kind(str(pairs)) == "preference"
    assert isinstance(trainer.shards, PreferenceCorpus)
    # the model is its own reference at first: every pair's loss is log 2
    assert trainer.evaluate() == pytest.approx(math.log(2), abs=1e-5)
    result = trainer.fit()
    assert result.val_loss < 0.3, result.val_loss  # from log 2 = 0.69
    # the rewards: every validation pair's chosen answer wins, by a margin the log shows
    rewards = trainer.val_rewards
    assert rewards["val_reward_accuracy"] == 1.0 and rewards["val_reward_margin"] > 0.5
    logged = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["val_reward_accuracy"] == 1.0
    lm = arlm.load(result.out)
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Is 99 a number?"}])
    chosen, rejected = (lm.score(prompt + answer).total_logprob for answer in (" Yes.", " No."))
    assert chosen > rejected


def test_dpo_resumes_exactly_and_needs_a_model(tmp_path, base, pairs, cache_dir):
    options = dict(lora_rank=4, steps=6, eval_interval=3)
    straight = Trainer(_dpo(tmp_path / "a", base, pairs, cache_dir, **options), progress=False)
    straight.fit()

    def stop_at_3(trainer):
        if trainer.step == 3:
            trainer.request_stop()

    cfg = _dpo(tmp_path / "b", base, pairs, cache_dir, **options)
    Trainer(cfg, progress=False).fit(on_step=stop_at_3)
    resumed = Trainer(cfg, resume=True, progress=False)
    resumed.fit()
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with pytest.raises(ValueError, match="preference pairs, which fine-tune a model"):
        Trainer(TrainConfig(corpus=str(pairs), out=str(tmp_path / "c")), progress=False)
    with pytest.raises(ValueError, match="dpo_beta=0"):
        TrainConfig(dpo_beta=0.0)
    text = tmp_path / "text.txt"
    text.write_text("plain text, no pairs. " * 200)
    with pytest.raises(ValueError, match="dpo_beta=0.5 applies to preference pairs"):
        Trainer(_dpo(tmp_path / "d", base, text, cache_dir, dpo_beta=0.5), progress=False)
    with pytest.raises(ValueError, match="dpo_loss=ipo applies to preference pairs"):
        Trainer(_dpo(tmp_path / "e", base, text, cache_dir, dpo_loss="ipo"), progress=False)
    with pytest.raises(ValueError, match="dpo_loss='kto' is not allowed"):
        TrainConfig(dpo_loss="kto")
    with pytest.raises(ValueError, match=r"dpo_label_smoothing=0.5 is not allowed; .* \[0, 0.5\)"):
        TrainConfig(dpo_label_smoothing=0.5)
    with pytest.raises(ValueError, match="smooths the sigmoid loss, and dpo_loss is 'hinge'"):
        TrainConfig(dpo_loss="hinge", dpo_label_smoothing=0.1)


@pytest.mark.parametrize("kind", ["hinge", "ipo"])
def test_the_other_losses_learn_the_preference(tmp_path, base, pairs, cache_dir, kind):
    options = dict(lora_rank=8, dpo_loss=kind, steps=12, eval_interval=12)
    trainer = Trainer(_dpo(tmp_path, base, pairs, cache_dir, **options), progress=False)
    start = trainer.evaluate()
    assert start == pytest.approx(trainer.preference.start, rel=1e-4)
    assert trainer.val_rewards["val_reward_accuracy"] == 0.0  # every margin 0: no pair won
    result = trainer.fit()
    assert result.val_loss < 0.8 * start
    assert trainer.val_rewards["val_reward_accuracy"] > 0.9

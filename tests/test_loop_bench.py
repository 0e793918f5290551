"""The loop bench on a tiny model and corpus: rows, metrics, the orderings, the table, the plot."""

from __future__ import annotations

import math

import pytest

from arlm.api import LM
from arlm.cli import main
from arlm.formats.checkpoint import save_model
from arlm.loops import LoopDetectorConfig, metrics
from arlm.measure.loop_bench import (
    HUMAN,
    MODEL_SETUPS,
    SETUPS,
    BenchConfig,
    BenchRow,
    compare_models,
    format_table,
    loop_bench,
    measure,
    ordering,
    plot,
    recall,
    targets,
    validation_loss,
)
from tests.conftest import make_model
from tests.numerics import assert_close
from tests.test_probe import write_corpus

SMALL = BenchConfig(prompts=2, prompt_tokens=6, max_tokens=40)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


@pytest.fixture(scope="module")
def lm(tokenizer):
    return LM(make_model("gpt2", vocab_size=tokenizer.vocab_size, seed=2), tokenizer)


def test_measure_on_outputs_worked_by_hand(lm):
    looped = [7, 8] * 20  # 40 tokens of one 2-token block
    varied = list(range(100, 140))
    row = measure(lm, "x", [[5], [5]], [looped, varied], SMALL)
    # seq-rep-4: the loop has 37 4-grams, 2 unique; the varied text none repeated
    assert row.seq_rep_4 == pytest.approx((1 - 2 / 37) / 2)
    assert row.holtzman == 0.5  # only the loop ends in a repeated phrase
    assert row.fired == 0.5 and row.tokens_to_fire == 32  # the detector's min_span
    score = (
        lm.score([5, *looped]).token_logprobs[-40:] + lm.score([5, *varied]).token_logprobs[-40:]
    )
    # exp(-mean log-probability) carries the mean's rounding relative to itself
    perplexity = math.exp(-sum(score) / 80)
    assert_close(row.perplexity, perplexity, scale=perplexity * max(abs(x) for x in score))


def test_bench_rows_for_each_setup(lm, corpus, tmp_path):
    config = BenchConfig(
        prompts=2, prompt_tokens=6, max_tokens=40, corpus=corpus, detector=LoopDetectorConfig()
    )
    setups = {
        "greedy": {"temperature": 0.0},
        "greedy + break": {"temperature": 0.0, "loop_policy": "break"},
    }
    rows = loop_bench(lm, config, setups, cache_dir=tmp_path, progress=False)
    assert [r.setup for r in rows] == [HUMAN, "greedy", "greedy + break"]
    human, greedy, broken = rows
    assert human.fired == 0 and human.loops_broken is None
    assert greedy.fired > 0 and greedy.holtzman == 1.0  # random tiny models repeat at once
    assert broken.loops_broken > 0 and broken.fired == 0.0
    table = format_table(rows)
    assert table.splitlines()[0].startswith("| setup | seq-rep-4") and "greedy + break" in table
    plot(rows, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").stat().st_size > 0


def _row(name: str, holtzman: float, seq_rep_4: float) -> BenchRow:
    return BenchRow(name, seq_rep_4, 0, 0, 0, 0, holtzman, 0, None, 1.0)


def test_ordering_says_whether_the_published_one_holds():
    rows = [_row(HUMAN, 0.0, 0.01), _row("greedy", 0.7, 0.4), _row("top-p 0.95", 0.0, 0.02)]
    text = ordering(rows)
    assert text.count("holds") == 2 and "does not" not in text
    rows[2] = _row("top-p 0.95", 0.9, 0.02)
    assert "does not hold" in ordering(rows).splitlines()[0]


def test_cli_bench(lm, corpus, tmp_path, capsys):
    model_dir = tmp_path / "model"
    save_model(model_dir, lm.model, lm.tokenizer)
    png = tmp_path / "b.png"
    argv = ["loops", "bench", str(model_dir), "--corpus", corpus, "--cache-dir", str(tmp_path)]
    argv += ["--prompts", "1", "--prompt-tokens", "4", "--max-tokens", "8", "--plot", str(png)]
    other = tmp_path / "other"
    save_model(other, make_model("gpt2", vocab_size=lm.tokenizer.vocab_size, seed=9), lm.tokenizer)
    assert main([*argv, "--loop-min-span", "4", "--models", str(other)]) == 0
    out = capsys.readouterr().out
    assert "| model | setup |" in out and "| model | greedy + break (old) |" in out
    assert "| other | contrastive search 0.6, k=4 |" in out
    assert "| other | greedy + DRY 0.8 |" not in out  # the other models run MODEL_SETUPS
    assert "Holtzman et al. 2020" in out and "other greedy: seq-rep-4" in out and png.exists()


def test_compare_models_targets_and_recall(lm, corpus, tmp_path):
    config = BenchConfig(prompts=2, prompt_tokens=6, max_tokens=40, corpus=corpus)
    other = LM(make_model("gpt2", vocab_size=lm.tokenizer.vocab_size, seed=7), lm.tokenizer)
    rows = compare_models({"a": lm, "b": other}, config, cache_dir=tmp_path, progress=False)
    assert [(r.model, r.setup) for r in rows[: len(SETUPS) + 1]] == [("a", HUMAN)] + [
        ("a", name) for name in SETUPS
    ]
    assert [(r.model, r.setup) for r in rows[len(SETUPS) + 1 :]] == [
        ("b", name) for name in MODEL_SETUPS
    ]
    # each row carries its model's loss on the held-out split, the same for all its rows
    assert len({r.val_loss for r in rows if r.model == "a"}) == 1
    assert rows[0].val_loss != rows[-1].val_loss and math.isfinite(rows[-1].val_loss)
    text = targets(rows, config)
    assert "contrastive search 0.6, k=4: Holtzman" in text and "b greedy: seq-rep-4" in text
    n, near, exact = recall(rows, config)
    repetitive = [o for r in rows for o in r.outputs if metrics.holtzman_repetition(o)]
    assert n == len(repetitive) > 0 and 0 <= near <= 1 and 0 <= exact <= 1
    plot(rows, tmp_path / "compare.png")
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_validation_loss_is_the_mean_negative_logprob(lm):
    ids = list(range(3, 60))
    logprobs = lm.score(ids).token_logprobs
    assert validation_loss(lm, ids) == pytest.approx(-sum(logprobs) / len(logprobs))

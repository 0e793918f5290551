"""The self-reinforcement probe and the held-out text it reads, on a tiny model and corpus."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arlm.api import LM
from arlm.cli import main
from arlm.formats.checkpoint import save_model
from arlm.measure.heldout import held_out_ids, held_out_sentences, held_out_windows
from arlm.measure.probe import (
    ProbeConfig,
    format_table,
    plot,
    probe_sentences,
    self_reinforcement_probe,
    table_rows,
    teacher_forced,
)
from tests.conftest import make_model
from tests.numerics import assert_close


def write_corpus(folder) -> str:
    """30 small documents of distinct sentences: the last tenth of their tokens is held out."""
    words = (
        ["cat", "dog", "horse", "fox", "owl", "bear"],
        ["watches", "follows", "avoids", "finds", "carries"],
        ["ball", "lantern", "basket", "ribbon", "stone"],
        ["river", "barn", "garden", "bridge"],
    )
    sentences = [f"The {a} {v} the {t} near the {p}." for a, v, t, p in itertools.product(*words)]
    random.Random(0).shuffle(sentences)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(30):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(sentences[i * 12 : (i + 1) * 12]))
    return str(folder)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "docs")


@pytest.fixture(scope="module")
def lm(tokenizer):
    return LM(make_model("gpt2", vocab_size=tokenizer.vocab_size, seed=1), tokenizer)


def test_held_out_text_is_the_trainers_validation_split(tokenizer, corpus, tmp_path):
    ids = held_out_ids(tokenizer, corpus, tmp_path)
    all_ids = []
    for path in sorted(Path(corpus).glob("*.txt")):
        all_ids += tokenizer.encode(path.read_text(), add_special_tokens=False)
        all_ids += tokenizer.eos_token_ids[:1]
    assert ids == all_ids[-int(len(all_ids) * 0.1) :]
    sentences = held_out_sentences(tokenizer, ids)
    assert sentences and all(s.startswith("The ") and s.endswith(".") for s in sentences)
    assert len(set(sentences)) == len(sentences)
    pairs = held_out_windows(ids, set(tokenizer.eos_token_ids), 5, 7, count=3)
    assert len(pairs) == 3 and all(len(p) == 5 and len(c) == 7 for p, c in pairs)
    assert all(0 not in p + c for p, c in pairs)  # no window crosses a document's end


def test_teacher_forced_matches_a_full_forward_and_windows_past_the_context(lm):
    ids = torch.randint(1, 500, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    probs, hits = teacher_forced(lm, ids)
    assert probs.shape == hits.shape == (299,)
    full = F.softmax(lm.logits(ids[:128]), dim=-1)
    expected = full[:-1].gather(-1, torch.tensor(ids[1:128])[:, None])[:, 0]
    torch.testing.assert_close(probs[:127], expected)
    assert torch.equal(hits[:127], full[:-1].argmax(-1) == torch.tensor(ids[1:128]))
    # past the context, windows of 128 advance by 64: ids[251] is scored in ids[128:256],
    # seeing ids[128:251], at least half a context
    # (a forward over 128 tokens against one over 123: other kernels, so compared as
    # log-probabilities, which round at their own size)
    seen = F.log_softmax(lm.logits(ids[128:251]), dim=-1)[-1]
    assert_close(probs[250].log(), seen[ids[251]])


def test_probe_curves_by_hand(lm):
    prefix, sentence = [5, 6, 7], [20, 21, 22, 23]
    curve = probe_sentences(lm, [prefix], [sentence], repeats=3, kind="x")
    ids = prefix + sentence * 3
    p = F.softmax(lm.logits(ids), dim=-1)
    probs = [p[t - 1, ids[t]].item() for t in range(3, len(ids))]
    top = [p[t - 1].argmax().item() == ids[t] for t in range(3, len(ids))]
    copies = [probs[i * 4 : (i + 1) * 4] for i in range(3)]
    assert curve.tp == pytest.approx([sum(c) / 4 for c in copies], abs=1e-6)
    assert curve.ip == pytest.approx(
        [sum(a > b for a, b in zip(c, copies[0], strict=True)) / 4 for c in copies]
    )
    assert curve.wr == pytest.approx([sum(top[i * 4 : (i + 1) * 4]) / 4 for i in range(3)])
    assert curve.ip[0] == 0.0


def test_probe_over_held_out_and_random_sentences(lm, corpus, tmp_path):
    config = ProbeConfig(repeats=6, sentences=3, corpus=corpus)
    curves = self_reinforcement_probe(lm, config, cache_dir=tmp_path)
    assert [c.kind for c in curves] == ["held-out sentences", "random tokens"]
    for c in curves:
        assert c.sentences == 3 and len(c.tp) == len(c.ip) == len(c.wr) == 6
        assert all(0 <= v <= 1 for v in c.tp + c.ip + c.wr)
    table = format_table(curves)
    assert table.count("\n") == 2 + len(table_rows(6)) - 1
    assert table_rows(50) == [1, 2, 3, 5, 10, 20, 30, 40, 50]
    plot(curves, tmp_path / "probe.png")
    assert (tmp_path / "probe.png").stat().st_size > 0


def test_probe_config_names_bad_values():
    with pytest.raises(ValueError, match="repeats=1 .* >= 2"):
        ProbeConfig(repeats=1)


def test_cli_probe(lm, corpus, tmp_path, capsys):
    model_dir = tmp_path / "model"
    save_model(model_dir, lm.model, lm.tokenizer)
    png = tmp_path / "p.png"
    argv = ["loops", "probe", str(model_dir), "--corpus", corpus, "--cache-dir", str(tmp_path)]
    assert main([*argv, "--repeats", "3", "--sentences", "2", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| n | TP held-out sentences" in out and png.exists()

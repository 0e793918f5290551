"""The compounding-error probe on a tiny model: nothing when the wrong token is the right one,
divergence right after a wrong one, none once it is outside the window; the kinds of wrong
token; the generation view; the CLI. Also the CLI of ``arlm loops guard``."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from arlm.api import LM
from arlm.cli import main
from arlm.formats.checkpoint import save_model
from arlm.measure.compound import (
    KINDS,
    CompoundConfig,
    compounding_probe,
    divergence,
    format_table,
    held_out_passages,
    wrong_tokens,
)
from tests.conftest import make_model
from tests.numerics import assert_clear_choices, assert_close

BLOCK = 64


@pytest.fixture(scope="module")
def lm(tokenizer):
    return LM(
        make_model("gpt2", vocab_size=tokenizer.vocab_size, seed=3, block_size=BLOCK), tokenizer
    )


@pytest.fixture(scope="module")
def passages():
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, 500, (4, BLOCK + 40), generator=g).tolist()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Ten documents of about 250 tokens each: the held-out tenth holds whole passages."""
    words = ["the", "river", "carries", "stone", "light", "past", "every", "quiet", "garden"]
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("corpus") / "docs"
    folder.mkdir()
    for i in range(10):
        sentences = [
            " ".join(rng.choice(words) for _ in range(9)).capitalize() + "." for _ in range(30)
        ]
        (folder / f"doc{i}.txt").write_text(" ".join(sentences))
    return str(folder)


def test_no_divergence_when_the_wrong_token_is_the_right_one(lm, passages):
    at = 10
    same = {"same": [p[at] for p in passages]}
    (curve,) = divergence(lm, passages, at, same, list(range(1, 30)))
    assert max(abs(x) for x in curve.kl) < 1e-6
    assert curve.agreement == [1.0] * 29
    assert max(abs(x) for x in curve.delta_logprob) < 1e-5


def test_divergence_after_a_wrong_token_matches_a_direct_computation(lm, passages):
    at, distances = 10, [1, 2, 3]
    wrong = [(p[at] + 7) % 500 + 1 for p in passages]
    (curve,) = divergence(lm, passages, at, {"shifted": wrong}, distances)
    assert curve.kl[0] > 1e-3 and curve.agreement[0] <= 1.0
    # divergence() runs the passages batched, this runs each alone: other kernels. A KL and a
    # change of log-probability are differences of log-probabilities, of size log(vocab) for the
    # near-uniform predictions of a random model, so their rounding is float32's at that size,
    # however small the difference itself (the KL at distance 3 is ~1e-4): absolute tolerances
    scale = math.log(lm.config.vocab_size)
    for i, d in enumerate(distances):
        kls, agree, delta = [], [], []
        for p, w in zip(passages, wrong, strict=True):
            bad = p[: at + d]
            bad[at] = w
            ref_logits, bad_logits = lm.logits(p[: at + d])[-1], lm.logits(bad)[-1]
            # top-1 agreement compares two argmaxes: none of them may be a near-tie
            for logits in (ref_logits, bad_logits):
                assert_clear_choices(logits)
            ref, lp = F.log_softmax(ref_logits, -1), F.log_softmax(bad_logits, -1)
            kls.append((ref.exp() * (ref - lp)).sum().item())
            agree.append(float(ref.argmax() == lp.argmax()))
            delta.append((lp[p[at + d]] - ref[p[at + d]]).item())
        assert_close(curve.kl[i], sum(kls) / len(kls), scale=scale)
        assert curve.agreement[i] == sum(agree) / len(agree)
        assert_close(curve.delta_logprob[i], sum(delta) / len(delta), scale=scale)


def test_control_shows_none_beyond_the_window(lm, passages):
    at = 10
    wrong = {"shifted": [(p[at] + 7) % 500 + 1 for p in passages]}
    inside = divergence(lm, passages, at, wrong, list(range(BLOCK - at - 4, BLOCK - at)))[0]
    assert min(inside.kl) > 0  # still inside the context: the wrong token is seen
    beyond = divergence(lm, passages, at, wrong, list(range(BLOCK + 1, BLOCK + 21)))[0]
    assert beyond.kl == [0.0] * 20 and beyond.agreement == [1.0] * 20
    assert beyond.delta_logprob == [0.0] * 20


def test_divergence_needs_long_enough_passages(lm, passages):
    with pytest.raises(ValueError, match="every passage needs"):
        divergence(lm, passages, 10, {"x": [1] * 4}, [200])


def test_wrong_tokens_of_each_kind(lm, passages):
    at = 12
    wrong = wrong_tokens(lm, passages, at, random.Random(0))
    assert list(wrong) == list(KINDS)
    special = set(lm.tokenizer.eos_token_ids) | {lm.tokenizer.bos_token_id}
    for kind in KINDS:
        assert all(
            w != p[at] and w not in special for w, p in zip(wrong[kind], passages, strict=True)
        )
    for p, w, c in zip(passages, wrong["second choice"], wrong["copied"], strict=True):
        top1, top2 = lm.logits(p[:at])[-1].topk(2).indices.tolist()
        assert w == (top2 if top2 != p[at] else top1)
        assert c in p[:at] + p[at + 1 :]


def test_held_out_passages_avoid_document_ends():
    ids = [5] * 30 + [0] + [6] * 12 + [0] + [7] * 25
    found = held_out_passages(ids, {0}, 10, 4)
    assert len(found) == 4 and all(0 not in p and len(p) == 10 for p in found)
    assert found[0] == [5] * 10 and found[-1] == [7] * 10  # spread from first to last
    assert held_out_passages(ids, {0}, 40, 4) == []


def test_probe_end_to_end_and_its_table(lm, corpus, tmp_path):
    config = CompoundConfig(
        passages=3, prefix_tokens=8, max_distance=500, continuation_tokens=12, corpus=corpus
    )
    result = compounding_probe(lm, config, cache_dir=tmp_path, progress=False)
    assert [c.kind for c in result.curves] == list(KINDS)
    for c in result.curves:
        assert c.passages == 3 and c.distances == list(range(1, BLOCK - 8))  # capped by the context
        assert c.kl[0] > 0 and all(x >= -1e-6 for x in c.kl)
    for c in result.controls:
        assert c.distances[0] == BLOCK + 1 and c.kl == [0.0] * len(c.distances)
    for g in result.generations:
        assert g.passages == 3 and 0 <= g.parted <= 1
        assert 0 <= g.loops_clean <= 1 and 0 <= g.loops_corrupted <= 1
        assert math.isnan(g.tokens_until_parted) or 0 <= g.tokens_until_parted < 12
    table = format_table(result)
    rows = table.splitlines()
    assert rows[0].startswith("| distance | KL random | top-1 | Δ log p | KL second choice")
    firsts = [r.split(" |")[0] for r in rows[2:15]]
    assert firsts[:11] == [f"| {d}" for d in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)]
    assert firsts[11:] == [f"| {BLOCK - 9}", f"| control {BLOCK + 1}-{BLOCK + 16}"]
    assert "| random |" in table and "| copied |" in table


def test_generation_parts_where_the_tokens_differ(lm, passages):
    from arlm.measure.compound import generation_view

    at = 10
    same = {"same": [p[at] for p in passages[:3]]}
    (row,) = generation_view(
        lm, passages[:3], at, same, CompoundConfig(continuation_tokens=10), progress=False
    )
    assert row.parted == 0.0 and math.isnan(row.tokens_until_parted)
    assert row.loops_clean == row.loops_corrupted


def test_probe_config_names_bad_values(lm):
    with pytest.raises(ValueError, match="passages=0"):
        CompoundConfig(passages=0)
    with pytest.raises(ValueError, match="leaves no distance"):
        compounding_probe(lm, CompoundConfig(prefix_tokens=BLOCK))
    with pytest.raises(ValueError, match="exceeds the context"):
        compounding_probe(lm, CompoundConfig(prefix_tokens=8, continuation_tokens=BLOCK))


def test_cli_compound(lm, corpus, tmp_path, capsys):
    model_dir = tmp_path / "model"
    save_model(model_dir, lm.model, lm.tokenizer)
    png = tmp_path / "compound.png"
    argv = ["loops", "compound", str(model_dir), "--corpus", corpus, "--cache-dir", str(tmp_path)]
    argv += ["--passages", "2", "--prefix-tokens", "8", "--continuation-tokens", "8"]
    assert main([*argv, "--no-control", "--max-distance", "4", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| distance | KL random | top-1 | Δ log p | KL second choice" in out
    assert "| 4 |" in out and "| control" not in out and "| copied |" in out
    assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in out
    assert main([*argv, "--prefix-tokens", "64"]) == 1
    assert "leaves no distance to measure" in capsys.readouterr().err


def test_cli_guard_over_a_folder(tmp_path, capsys):
    def call(i, path):
        return {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": f"c{i}",
                    "function": {"name": "read", "arguments": json.dumps({"path": path})},
                }
            ],
        }

    looping = [{"role": "user", "content": "summarize x"}]
    for i in range(6):
        looping += [
            call(i, "x"),
            {"role": "tool", "tool_call_id": f"c{i}", "content": "Error: missing"},
        ]
    fine = [{"action": "read", "arguments": {"path": p}, "observation": "ok"} for p in "abc"]
    (tmp_path / "traces" / "sub").mkdir(parents=True)
    for name, steps in (("traces/a.jsonl", looping), ("traces/sub/b.jsonl", fine)):
        (tmp_path / name).write_text("\n".join(json.dumps(s) for s in steps) + "\n")
    assert main(["loops", "guard", str(tmp_path / "traces")]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'traces/a.jsonl'}: 13 steps, stopped at line 8, 5 steps after it" in out
    assert '  line 6: Loop warning: the same call read({"path":"x"}) came 3 times' in out
    assert f"{tmp_path / 'traces/sub/b.jsonl'}: 3 steps, no verdict" in out
    assert "2 traces: 1 stopped, 0 warned only, 1 clean; 5 steps after the stops" in out
    assert "| repeated_action | 1 | 1 |" in out
    # a preset and an override from the command line
    assert (
        main(
            [
                "loops",
                "guard",
                str(tmp_path / "traces/a.jsonl"),
                "--preset",
                "openhands",
                "--repeated-error",
                "5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "stopped at line 9" in out and "rule repeated_action_observation" in out
    # errors name what is wrong
    (tmp_path / "bad.jsonl").write_text('{"role": "tool", "content": "x"}\n[1, 2]\n')
    assert main(["loops", "guard", str(tmp_path / "bad.jsonl")]) == 1
    assert "bad.jsonl:2: a step is a JSON object" in capsys.readouterr().err
    assert main(["loops", "guard", str(tmp_path / "nowhere")]) == 1
    assert "no trace file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["loops", "guard", str(tmp_path / "empty")]) == 1
    assert "has no .jsonl traces" in capsys.readouterr().err

"""The self-reinforcement probe of Xu et al. 2022, "Learning to Break the Loop".

A prefix sentence, then one sentence repeated N times, read by the model with teacher forcing
(no sampling). For each repetition n, over the sentence's tokens:

- TP(n): the mean probability the model gives them;
- IP(n): the fraction more probable than at the sentence's first occurrence (IP(1) = 0);
- WR(n): the fraction that are the model's most probable next token (its argmax).

Xu et al. find all three rising with n, for real sentences and for sentences of random tokens
alike: the more often a sentence has been repeated, the likelier the model repeats it again.
That is the loop trap's engine. Here the sentences come from held-out text, and the control
uses random tokens of the same lengths.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from arlm.api import LM
from arlm.config import option
from arlm.measure.heldout import held_out_ids, held_out_sentences
from arlm.validate import check_int


@dataclass
class ProbeConfig:
    """repeats: N, copies of the sentence after the prefix. sentences: how many held-out
    sentences (and as many random ones) to average over. max_sentence_tokens: longer sentences
    are skipped. corpus: where the held-out text comes from. seed: the random sentences'."""

    repeats: int = option(50, help="N, copies of each sentence")
    sentences: int = option(100, help="held-out sentences, and as many random ones")
    max_sentence_tokens: int = option(32, help="longer sentences are skipped")
    corpus: str = option("builtin", help="the held-out text's corpus")
    seed: int = option(0, help="seed of the random sentences")

    def __post_init__(self) -> None:
        for name, low in (("repeats", 2), ("sentences", 1), ("max_sentence_tokens", 1)):
            check_int(name, getattr(self, name), low)


@dataclass
class ProbeCurve:
    """TP, IP and WR for repetitions n = 1..N (index n - 1), averaged over ``sentences``."""

    kind: str
    sentences: int
    tp: list[float]
    ip: list[float]
    wr: list[float]


@torch.inference_mode()
def teacher_forced(lm: LM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each token after the first: its probability given everything before it, and whether
    it is the argmax. Both (len(ids) - 1,). Past the context, windows overlap by half a
    context, so every token sees at least half a context before it."""
    block = lm.config.block_size
    stride = max(block // 2, 1)
    probs, hits = [], []
    scored = 1
    while scored < len(ids):
        end = min(len(ids), block if scored == 1 else scored + stride)
        window = torch.tensor([ids[max(0, end - block) : end]], device=lm.device)
        logits = lm.model(window)[0][0, :-1].float()  # (T - 1, vocab)
        targets = window[0, 1:]
        new = end - scored
        p = F.softmax(logits[-new:], dim=-1)
        probs.append(p.gather(-1, targets[-new:, None])[:, 0])
        hits.append(p.argmax(dim=-1) == targets[-new:])
        scored = end
    return torch.cat(probs).cpu(), torch.cat(hits).cpu()


def probe_sentences(
    lm: LM, prefixes: list[list[int]], sentences: list[list[int]], repeats: int, kind: str
) -> ProbeCurve:
    """TP, IP and WR of each sentence repeated ``repeats`` times after its prefix."""
    tp = torch.zeros(repeats)
    ip = torch.zeros(repeats)
    wr = torch.zeros(repeats)
    for prefix, sentence in zip(prefixes, sentences, strict=True):
        probs, hits = teacher_forced(lm, prefix + sentence * repeats)
        # target t is ids[t + 1]: the sentence's copies start at target len(prefix) - 1
        copies = probs[len(prefix) - 1 :].view(repeats, len(sentence))
        argmax = hits[len(prefix) - 1 :].view(repeats, len(sentence)).float()
        tp += copies.mean(dim=1)
        ip += (copies > copies[0]).float().mean(dim=1)
        wr += argmax.mean(dim=1)
    n = len(sentences)
    return ProbeCurve(kind, n, (tp / n).tolist(), (ip / n).tolist(), (wr / n).tolist())


def self_reinforcement_probe(
    lm: LM, config: ProbeConfig | None = None, cache_dir: str | os.PathLike | None = None
) -> list[ProbeCurve]:
    """The probe over held-out sentences and over random-token sentences of the same lengths."""
    config = config or ProbeConfig()
    tok = lm.tokenizer
    text = held_out_sentences(tok, held_out_ids(tok, config.corpus, cache_dir))
    encoded = [tok.encode(" " + s, add_special_tokens=False) for s in text]
    # a leading space makes every copy tokenize alike; each prefix is the sentence before
    pairs = [
        (tok.encode(text[i - 1], add_special_tokens=False), encoded[i])
        for i in range(1, len(text))
        if 1 <= len(encoded[i]) <= config.max_sentence_tokens
    ][: config.sentences]
    if not pairs:
        raise ValueError(
            f"corpus {config.corpus!r} has no held-out prose sentences of at most "
            f"{config.max_sentence_tokens} tokens to probe with"
        )
    prefixes = [p for p, _ in pairs]
    real = [s for _, s in pairs]
    rng = random.Random(config.seed)
    special = set(tok.eos_token_ids) | {tok.bos_token_id}
    vocab = [i for i in range(lm.config.vocab_size) if i not in special]
    control = [[rng.choice(vocab) for _ in s] for s in real]
    return [
        probe_sentences(lm, prefixes, real, config.repeats, "held-out sentences"),
        probe_sentences(lm, prefixes, control, config.repeats, "random tokens"),
    ]


def table_rows(repeats: int) -> list[int]:
    """The repetitions a table shows: 1, 2, 3, 5, 10, 20, 30, 50, ... up to ``repeats``."""
    marks = [1, 2, 3, 5, 10, 20, 30, 40, 50, 75, 100, 150, 200]
    return [n for n in marks if n < repeats] + [repeats]


def format_table(curves: list[ProbeCurve]) -> str:
    """A markdown table of TP, IP and WR per repetition, one column group per curve."""
    head = "| n | " + " | ".join(f"TP {c.kind} | IP | WR" for c in curves) + " |"
    rule = "|---:|" + "---:|---:|---:|" * len(curves)
    lines = [head, rule]
    for n in table_rows(len(curves[0].tp)):
        cells = [f"{c.tp[n - 1]:.4f} | {c.ip[n - 1]:.3f} | {c.wr[n - 1]:.3f}" for c in curves]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(curves: list[ProbeCurve], path: str | os.PathLike, title: str = "") -> None:
    """TP, IP and WR against n, one panel each, one line per curve, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, name in zip(axes, ("tp", "ip", "wr"), strict=True):
        for c in curves:
            values = getattr(c, name)
            ax.plot(range(1, len(values) + 1), values, label=f"{c.kind} ({c.sentences})")
        ax.set_title(name.upper())
        ax.set_xlabel("repetition n")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

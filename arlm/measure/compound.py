"""The compounding-error probe: how far one wrong token carries through a model's predictions.

An autoregressive model takes its context as given: "an initial error becomes part of the
definitive context; the model builds on that flawed premise". Here the error is one token. On
held-out passages the token after ``prefix_tokens`` clean ones, at position ``c``, is replaced by
a wrong one of three kinds:

- ``random``: a token drawn uniformly from the vocabulary (special tokens left out);
- ``second choice``: the token the model itself ranks second there (its first, when its second
  is the true token): an error the model finds plausible, as a sampler would make it;
- ``copied``: a token the passage itself uses elsewhere, drawn from its other positions.

Teacher-forced view: the text after the wrong token is the true text in both contexts, and for
each distance d the model predicts token ``c + d`` from the clean and from the corrupted context:

- KL(clean || corrupted) of the two next-token distributions, in nats;
- top-1 agreement: the share of passages where both argmaxes are the same token;
- the change in log-probability of the true token, corrupted minus clean (below 0: it hurts).

Distances run from 1 to ``max_distance``, capped so that a passage fits the context (one forward
reads it). The control reads the same passages and wrong tokens at distances beyond the context,
through windows of at most a context as ``lm.score`` reads a long text: no window holds both the
wrong token and what is predicted, so its divergence must be nil; anything else would be a leak.

Generation view: greedy continuations, through ``lm.generate`` (the engine), of the clean
context (the passage up to and including position ``c``) and of the corrupted one: how many
tokens until they part, and how often each falls into a loop (the loop detector over the
continuation).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from arlm.api import LM
from arlm.atomic import atomic_path
from arlm.config import option
from arlm.loops import LoopDetector, LoopDetectorConfig
from arlm.measure.heldout import held_out_ids
from arlm.sampling import SamplingParams
from arlm.validate import check_int

KINDS = ("random", "second choice", "copied")
# Control distances: the first this many past the context. Once the wrong token is outside
# every window, farther adds nothing but cost.
CONTROL_DISTANCES = 16
# The distances a table shows (those within the measured range, then the last).
TABLE_DISTANCES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768)
# Logit elements per forward: rows are batched up to this (128 MiB of float32).
_MAX_LOGITS = 2**25


@dataclass
class CompoundConfig:
    """passages: held-out passages, each corrupted once per kind. prefix_tokens: clean tokens
    before the wrong one. max_distance: the farthest distance measured (capped by the context).
    continuation_tokens: greedy tokens generated from each context. control: also measure past
    the context (needs passages longer than the context). detector: the loop detector's
    thresholds for the continuations."""

    passages: int = option(64, help="held-out passages, each corrupted once per kind")
    prefix_tokens: int = option(32, help="clean tokens before the wrong one")
    max_distance: int = option(256, help="the farthest distance measured, capped by the context")
    continuation_tokens: int = option(64, help="greedy tokens generated from each context")
    control: bool = option(True, help="measure the control past the context")
    corpus: str = option("builtin", help="the held-out text's corpus")
    seed: int = option(0, help="seed of the random and copied tokens")
    detector: LoopDetectorConfig = field(default_factory=LoopDetectorConfig)

    def __post_init__(self) -> None:
        for name in ("passages", "prefix_tokens", "max_distance", "continuation_tokens"):
            check_int(name, getattr(self, name), 1)


@dataclass
class Curve:
    """Means over ``passages`` at each distance (``distances[i]`` for index i)."""

    kind: str
    passages: int
    distances: list[int]
    kl: list[float]
    agreement: list[float]
    delta_logprob: list[float]


@dataclass
class GenerationRow:
    """Greedy continuations of the clean and the corrupted contexts, for one kind; shares are
    fractions in [0, 1]."""

    kind: str
    passages: int
    tokens_until_parted: float  # mean, over the pairs that part
    parted: float  # share of pairs whose continuations differ somewhere
    loops_clean: float  # share of clean continuations in which the detector fires
    loops_corrupted: float


@dataclass
class CompoundResult:
    context: int  # the model's context, in tokens
    prefix_tokens: int
    curves: list[Curve]
    controls: list[Curve]  # empty when the control is off
    generations: list[GenerationRow]


def _windows(length: int, block: int):
    """(begin, end, first) for reading ``length`` tokens as ``lm.score`` does: windows of at most
    ``block`` tokens; window [begin, end) gives the predictions after positions first..end-1,
    each with at least half a context before it once the text is longer than the context."""
    stride = max(block // 2, 1)
    first = 0
    while first < length:
        end = min(length, block if first == 0 else first + stride)
        yield max(0, end - block), end, first
        first = end


@torch.inference_mode()
def divergence(
    lm: LM,
    passages: list[list[int]],
    at: int,
    wrong: dict[str, list[int]],
    distances: list[int],
) -> list[Curve]:
    """Put ``wrong[kind][k]`` at position ``at`` of passage ``k`` and compare, at each distance
    d, the model's prediction of token ``at + d`` against the clean passage's: one curve per
    kind. Passages longer than the context are read in windows as ``lm.score`` reads them."""
    length = at + max(distances)  # positions read: the last predicts token at + max(distances)
    if any(len(p) < length + 1 for p in passages):
        raise ValueError(
            f"every passage needs {length + 1} tokens for distances up to {max(distances)} "
            f"after position {at}"
        )
    clean = torch.tensor([p[: length + 1] for p in passages], device=lm.device)
    variants = {}
    for kind, tokens in wrong.items():
        v = clean.clone()
        v[:, at] = torch.tensor(tokens, device=lm.device)
        variants[kind] = v
    wanted = torch.tensor([at + d - 1 for d in distances])  # positions whose next token counts
    sums = {k: torch.zeros(3, len(distances), dtype=torch.float64) for k in wrong}
    block = lm.config.block_size
    for begin, end, first in _windows(length, block):
        inside = (wanted >= first) & (wanted < end)
        if not inside.any():
            continue
        cols = (wanted[inside] - begin).to(lm.device)  # positions within the window
        # rows in batches that keep each forward's logits under _MAX_LOGITS elements
        rows = max(1, _MAX_LOGITS // ((end - begin) * lm.config.vocab_size))
        for r in range(0, len(passages), rows):
            ref = _logprobs(lm, clean[r : r + rows, begin:end], cols)
            targets = clean[r : r + rows, wanted[inside] + 1, None]  # (b, n, 1) true next tokens
            ref_true = ref.gather(-1, targets)[..., 0]
            for kind, v in variants.items():
                lp = _logprobs(lm, v[r : r + rows, begin:end], cols)
                kl = (ref.exp() * (ref - lp)).sum(-1)  # (b, n)
                agree = ref.argmax(-1) == lp.argmax(-1)
                delta = lp.gather(-1, targets)[..., 0] - ref_true
                stats = torch.stack([kl, agree.float(), delta]).double().sum(1)  # (3, n)
                sums[kind][:, inside] += stats.cpu()
    n = len(passages)
    return [
        Curve(kind, n, list(distances), *(row.tolist() for row in s / n))
        for kind, s in sums.items()
    ]


def _logprobs(lm: LM, ids: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B, len(cols), vocab): log-softmax of the model's logits at positions ``cols``."""
    logits = lm.model(ids)[0][:, cols].float()
    return F.log_softmax(logits, dim=-1)


@torch.inference_mode()
def wrong_tokens(
    lm: LM, passages: list[list[int]], at: int, rng: random.Random
) -> dict[str, list[int]]:
    """For each kind, the wrong token to put at position ``at`` of each passage (never the true
    one, never a special token)."""
    tok = lm.tokenizer
    special = {i for i in (*tok.eos_token_ids, tok.bos_token_id) if i is not None}
    vocab = [i for i in range(lm.config.vocab_size) if i not in special]
    prefix = torch.tensor([p[:at] for p in passages], device=lm.device)
    last = _logprobs(lm, prefix, torch.tensor([at - 1], device=lm.device))[:, 0]
    last[:, sorted(special)] = -math.inf
    ranked = last.topk(2, dim=-1).indices.tolist()  # (B, 2)
    out: dict[str, list[int]] = {kind: [] for kind in KINDS}
    for p, (top1, top2) in zip(passages, ranked, strict=True):
        true = p[at]
        out["random"].append(rng.choice([i for i in vocab if i != true]))
        out["second choice"].append(top2 if top2 != true else top1)
        elsewhere = [t for i, t in enumerate(p) if i != at and t != true and t not in special]
        # a passage made of one token repeated has nothing to copy: then any other token
        out["copied"].append(rng.choice(elsewhere or [i for i in vocab if i != true]))
    return out


def held_out_passages(
    ids: list[int], end_ids: set[int], length: int, count: int
) -> list[list[int]]:
    """Up to ``count`` passages of ``length`` tokens holding no end-of-text id, their starts
    spread evenly over every such window (they overlap where the text is short, so that each
    still puts its wrong token at another place)."""
    ends = [0]
    for t in ids:
        ends.append(ends[-1] + (t in end_ids))
    starts = [s for s in range(len(ids) - length + 1) if ends[s + length] == ends[s]]
    if not starts:
        return []
    if len(starts) > count:
        step = (len(starts) - 1) / max(count - 1, 1)
        starts = sorted({starts[round(i * step)] for i in range(count)})
    return [ids[s : s + length] for s in starts]


def _parting(a: list[int], b: list[int]) -> int | None:
    """The index where two continuations first differ, or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _loops(tokens: list[int], config: LoopDetectorConfig) -> bool:
    detector = LoopDetector.from_config(config)
    return any(detector.push(t) is not None for t in tokens)


def generation_view(
    lm: LM,
    passages: list[list[int]],
    at: int,
    wrong: dict[str, list[int]],
    config: CompoundConfig,
    progress: bool = True,
) -> list[GenerationRow]:
    """Greedy continuations of each clean and corrupted context, through the engine."""
    params = SamplingParams(temperature=0.0, max_tokens=config.continuation_tokens, ignore_eos=True)
    clean_prompts = [p[: at + 1] for p in passages]
    prompts = clean_prompts + [
        p[:at] + [w] for kind in wrong for p, w in zip(passages, wrong[kind], strict=True)
    ]
    outs = [c.token_ids for c in lm.generate(prompts, params=params, progress=progress)]
    n = len(passages)
    clean, rows = outs[:n], []
    loops_clean = sum(_loops(c, config.detector) for c in clean) / n
    for k, kind in enumerate(wrong):
        corrupted = outs[n * (k + 1) : n * (k + 2)]
        parts = [_parting(a, b) for a, b in zip(clean, corrupted, strict=True)]
        parted = [i for i in parts if i is not None]
        rows.append(
            GenerationRow(
                kind,
                n,
                sum(parted) / len(parted) if parted else float("nan"),
                len(parted) / n,
                loops_clean,
                sum(_loops(c, config.detector) for c in corrupted) / n,
            )
        )
    return rows


def compounding_probe(
    lm: LM,
    config: CompoundConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> CompoundResult:
    """The probe on held-out passages of ``config.corpus``: curves per kind, the control, and
    the generation view."""
    config = config or CompoundConfig()
    block = lm.config.block_size
    at = config.prefix_tokens
    if at + 2 > block:
        raise ValueError(
            f"prefix_tokens={at} leaves no distance to measure in a context of {block} tokens"
        )
    reach = min(config.max_distance, block - at - 1)  # the passage up to at + reach fits one read
    if at + 1 + config.continuation_tokens > block:
        raise ValueError(
            f"prefix_tokens + 1 + continuation_tokens = {at + 1 + config.continuation_tokens} "
            f"exceeds the context of {block} tokens"
        )
    far = block + CONTROL_DISTANCES if config.control else reach
    tok = lm.tokenizer
    ids = held_out_ids(tok, config.corpus, cache_dir)
    passages = held_out_passages(ids, set(tok.eos_token_ids), at + far + 1, config.passages)
    if not passages:
        hint = "; try --no-control" if config.control else ""
        raise ValueError(
            f"corpus {config.corpus!r} has no held-out passage of {at + far + 1} tokens without "
            f"a document break{hint}"
        )
    wrong = wrong_tokens(lm, passages, at, random.Random(config.seed))
    curves = divergence(lm, passages, at, wrong, list(range(1, reach + 1)))
    controls = []
    if config.control:
        beyond = list(range(block + 1, block + CONTROL_DISTANCES + 1))
        controls = divergence(lm, passages, at, wrong, beyond)
    generations = generation_view(lm, passages, at, wrong, config, progress)
    return CompoundResult(block, at, curves, controls, generations)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _or_dash(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1f}"


def format_table(result: CompoundResult) -> str:
    """Markdown: KL, top-1 agreement and change in log p per distance and kind, the control's
    means, then the generation view."""
    curves = result.curves
    reach = curves[0].distances[-1]
    head = "| distance | " + " | ".join(f"KL {c.kind} | top-1 | Δ log p" for c in curves) + " |"
    lines = [head, "|---:|" + "---:|---:|---:|" * len(curves)]
    shown = [d for d in TABLE_DISTANCES if d < reach] + [reach]
    for d in shown:
        cells = [
            f"{c.kl[d - 1]:.4f} | {c.agreement[d - 1]:.3f} | {c.delta_logprob[d - 1]:+.4f}"
            for c in curves
        ]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    if result.controls:
        lo, hi = result.controls[0].distances[0], result.controls[0].distances[-1]
        cells = [
            f"{_mean(c.kl):.4f} | {_mean(c.agreement):.3f} | {_mean(c.delta_logprob):+.4f}"
            for c in result.controls
        ]
        lines.append(f"| control {lo}-{hi} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| wrong token | tokens until the continuations part | pairs that part | loops, clean "
        "| loops, corrupted |",
        "|---|---:|---:|---:|---:|",
    ]
    for g in result.generations:
        lines.append(
            f"| {g.kind} | {_or_dash(g.tokens_until_parted)} | {100 * g.parted:.0f}% | "
            f"{100 * g.loops_clean:.0f}% | {100 * g.loops_corrupted:.0f}% |"
        )
    return "\n".join(lines)


def plot(result: CompoundResult, path: str | os.PathLike, title: str = "") -> None:
    """KL, top-1 agreement and change in log p against distance (log scale), one line per
    kind, the control as points past the context; written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    # KL falls by orders of magnitude and the control sits at 0: a scale linear near 0
    panels = (
        ("kl", "KL(clean || corrupted), nats", 1e-4),
        ("agreement", "top-1 agreement", None),
        ("delta_logprob", "Δ log p(true token)", 1e-2),
    )
    for ax, (name, label, linear_below) in zip(axes, panels, strict=True):
        if linear_below is not None:
            ax.set_yscale("symlog", linthresh=linear_below)
        for c, color in zip(result.curves, ("C0", "C1", "C2"), strict=False):
            ax.plot(c.distances, getattr(c, name), color=color, label=f"{c.kind} ({c.passages})")
        for k, (c, color) in enumerate(zip(result.controls, ("C0", "C1", "C2"), strict=False)):
            label = "control, past the context" if k == 0 else None
            ax.plot(c.distances, getattr(c, name), "x", color=color, markersize=3, label=label)
        if result.controls:
            ax.axvline(result.context, color="gray", linestyle=":", label="the context")
        ax.set_xscale("log")
        ax.set_xlabel("distance from the wrong token")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)

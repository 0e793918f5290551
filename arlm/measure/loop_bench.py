"""How often each decoding setup falls into a loop, on held-out prompts, next to human text.

Every setup continues the same held-out prompts for the same number of tokens (end-of-text
ignored, so the lengths match); the "human" row is the prompts' true continuations. Per setup:
seq-rep-4, rep-2/3/4 and diversity (``arlm.loops.metrics``), the share of generations that end
in a repetition by Holtzman et al.'s rule, the share in which the loop detector fires (run
over the output afterwards) with the mean tokens until it fires, and the perplexity of the
output under the model, so fluency sits next to repetition.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from tqdm import tqdm

from arlm.api import LM
from arlm.config import option
from arlm.loops import LoopDetector, LoopDetectorConfig, metrics
from arlm.loops.near import NearLoopConfig, NearLoopDetector
from arlm.measure.heldout import held_out_ids, held_out_windows
from arlm.sampling import SamplingParams
from arlm.validate import check_int

HUMAN = "human (held-out continuation)"

# Contrastive search as Su et al. evaluate it on GPT-2 (alpha 0.6, k 4 in transformers' docs).
CONTRASTIVE = {"temperature": 0.0, "penalty_alpha": 0.6, "top_k": 4}

# The setups of the issue, by name (plain temperature sampling, which earlier versions ran too,
# is left out: top-p stands for sampling, and every setup costs minutes on a CPU). Repetition
# penalty, DRY and the break policies are applied to greedy decoding, so their rows differ from
# the greedy row by that one thing. The old break
# is the policy as it was before the held bans; the new one holds (bans the broken cycle's
# 3-grams for good) and also acts on near-duplicate loops.
SETUPS: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "top-p 0.95": {"temperature": 1.0, "top_p": 0.95},
    "greedy + repetition penalty 1.2": {"temperature": 0.0, "repetition_penalty": 1.2},
    "greedy + DRY 0.8": {"temperature": 0.0, "dry_multiplier": 0.8},
    "greedy + break (old)": {"temperature": 0.0, "loop_policy": "break", "loop_break_hold": 0},
    "greedy + break (holds, near)": {
        "temperature": 0.0,
        "loop_policy": "break",
        "near_repetition_detection": {},
    },
    "contrastive search 0.6, k=4": CONTRASTIVE,
}
# What the bench runs on every model after the first, which runs all of SETUPS: the decodings
# the training remedies are compared under.
MODEL_SETUPS = ("greedy", "greedy + break (holds, near)", "contrastive search 0.6, k=4")

# Published anchors, printed beside the results. Each paper measured large models on
# Wikitext-103 or WebText; the bench's model is tiny and its corpus the Python reference, so
# compare orderings and ratios, not values.
ANCHORS = (
    "Holtzman et al. 2020, Table 1 (GPT-2 Large): generations ending in repetition, greedy "
    "73.66%, nucleus p=0.95 0.36%, human text 0.28%.\n"
    "Welleck et al. 2020: seq-rep-4 of greedy decoding, MLE 0.442; token- and sequence-level "
    "unlikelihood about 0.01; human text 0.006.\n"
    "Xu et al. 2022 (DITTO): training on constructed repetitive sentences cuts greedy "
    "decoding's sentence-level repetition far below MLE's, at about the same perplexity.\n"
    "Su et al. 2022 (contrastive search, alpha 0.6, k 4 on GPT-2): repetition close to human "
    "text's, deterministically."
)
# The anchors' numbers, drawn as reference lines on the plot: (label, fraction).
ANCHOR_LINES = (
    ("Holtzman: greedy ends in repetition", 0.7366),
    ("Welleck: greedy seq-rep-4, MLE", 0.442),
    ("Welleck: greedy seq-rep-4, unlikelihood", 0.01),
)


@dataclass
class BenchConfig:
    """prompts: how many held-out prompts; prompt_tokens, max_tokens: their length and the
    continuation's. detector, near: the exact and near-duplicate rules' thresholds, run over
    every output afterwards (their defaults unless given)."""

    prompts: int = option(50, help="held-out prompts")
    prompt_tokens: int = option(32, help="tokens per prompt")
    max_tokens: int = option(128, help="tokens per continuation")
    corpus: str = option("builtin", help="the held-out text's corpus")
    seed: int = option(0, help="seed of the sampled setups")
    detector: LoopDetectorConfig = field(default_factory=LoopDetectorConfig)
    near: NearLoopConfig = field(default_factory=NearLoopConfig)

    def __post_init__(self) -> None:
        for name in ("prompts", "prompt_tokens", "max_tokens"):
            check_int(name, getattr(self, name), 1)


@dataclass
class BenchRow:
    """One setup's numbers; rates are fractions in [0, 1]."""

    setup: str
    seq_rep_4: float
    rep_2: float
    rep_3: float
    rep_4: float
    diversity: float
    holtzman: float  # share of generations ending in a repetition
    fired: float  # share in which the detector fires
    tokens_to_fire: float | None  # mean tokens until it fires, over those
    perplexity: float  # of the output under the model
    loops_broken: float | None = None  # mean per generation, for a setup with a loop policy
    near_fired: float = 0.0  # share in which the near-duplicate rule fires
    model: str = ""  # which model, when the bench compares several
    val_loss: float | None = None  # the model's loss on the held-out split (nats per token)
    outputs: list[list[int]] = field(default_factory=list, repr=False)  # the generations


def _detector_stats(
    outputs: list[list[int]], config: LoopDetectorConfig
) -> tuple[float, float | None]:
    first_reports = []
    for tokens in outputs:
        detector = LoopDetector.from_config(config)
        for i, token in enumerate(tokens):
            if detector.push(token) is not None:
                first_reports.append(i + 1)
                break
    fired = len(first_reports) / len(outputs)
    return fired, (sum(first_reports) / len(first_reports) if first_reports else None)


def near_fires(tokens: list[int], config: NearLoopConfig) -> bool:
    """Whether the near-duplicate rule fires anywhere in ``tokens``."""
    detector = NearLoopDetector(config)
    return any(detector.push(t) is not None for t in tokens)


def validation_loss(lm: LM, ids: list[int]) -> float:
    """Mean cross-entropy (nats per token) of the held-out ``ids`` under the model, scored in
    overlapping context windows (``LM.score``)."""
    logprobs = lm.score(ids).token_logprobs
    return -sum(logprobs) / len(logprobs)


def _perplexity(lm: LM, prompts: list[list[int]], outputs: list[list[int]]) -> float:
    total, count = 0.0, 0
    for prompt, output in zip(prompts, outputs, strict=True):
        if output:
            score = lm.score(prompt + output)
            total += sum(score.token_logprobs[-len(output) :])
            count += len(output)
    return math.exp(-total / count) if count else float("nan")


def measure(
    lm: LM,
    name: str,
    prompts: list[list[int]],
    outputs: list[list[int]],
    config: BenchConfig,
    loops_broken: float | None = None,
) -> BenchRow:
    """The row of metrics for ``outputs``, the continuations of ``prompts``."""
    fired, to_fire = _detector_stats(outputs, config.detector)
    near = sum(near_fires(o, config.near) for o in outputs) / len(outputs)
    return BenchRow(
        setup=name,
        seq_rep_4=metrics.seq_rep_n(outputs, 4),
        rep_2=metrics.rep_n(outputs, 2),
        rep_3=metrics.rep_n(outputs, 3),
        rep_4=metrics.rep_n(outputs, 4),
        diversity=metrics.diversity(outputs),
        holtzman=sum(metrics.holtzman_repetition(o) for o in outputs) / len(outputs),
        fired=fired,
        tokens_to_fire=to_fire,
        perplexity=_perplexity(lm, prompts, outputs),
        loops_broken=loops_broken,
        near_fired=near,
        outputs=outputs,
    )


def loop_bench(
    lm: LM,
    config: BenchConfig | None = None,
    setups: dict[str, dict] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    model: str = "",
    human: bool = True,
) -> list[BenchRow]:
    """The human row (unless ``human`` is False), then one row per setup (``SETUPS`` by
    default); every row carries ``model`` and the model's held-out ``val_loss``."""
    config = config or BenchConfig()
    setups = SETUPS if setups is None else setups
    tok = lm.tokenizer
    ids = held_out_ids(tok, config.corpus, cache_dir)
    pairs = held_out_windows(
        ids, set(tok.eos_token_ids), config.prompt_tokens, config.max_tokens, config.prompts
    )
    if not pairs:
        raise ValueError(
            f"corpus {config.corpus!r} has no held-out window of "
            f"{config.prompt_tokens + config.max_tokens} tokens without a document break"
        )
    val_loss = validation_loss(lm, ids)
    prompts = [p for p, _ in pairs]
    rows = [measure(lm, HUMAN, prompts, [c for _, c in pairs], config)] if human else []
    for name, settings in setups.items():
        outputs, broken = [], 0
        bar = tqdm(prompts, desc=name, disable=not progress, leave=False)
        for i, prompt in enumerate(bar):
            params = SamplingParams(
                max_tokens=config.max_tokens,
                ignore_eos=True,
                seed=config.seed + i,
                repetition_detection=config.detector if "loop_policy" in settings else None,
                **settings,
            )
            completion = lm.generate(prompt, params=params)
            outputs.append(completion.token_ids)
            broken += completion.loops_broken
        has_policy = "loop_policy" in settings
        rows.append(
            measure(
                lm, name, prompts, outputs, config, broken / len(prompts) if has_policy else None
            )
        )
    for row in rows:
        row.model, row.val_loss = model, val_loss
    return rows


def compare_models(
    models: dict[str, LM],
    config: BenchConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[BenchRow]:
    """Every remedy side by side: the first model under every setup of ``SETUPS`` with the
    human row, each other model (trained otherwise, same corpus) under ``MODEL_SETUPS``."""
    rows: list[BenchRow] = []
    for i, (name, lm) in enumerate(models.items()):
        setups = SETUPS if i == 0 else {s: SETUPS[s] for s in MODEL_SETUPS}
        rows += loop_bench(lm, config, setups, cache_dir, progress, model=name, human=i == 0)
    return rows


def recall(rows: list[BenchRow], config: BenchConfig) -> tuple[int, float, float]:
    """Over every generation of ``rows`` (the human row's too) that Holtzman's rule calls
    repetitive: how many there are, and the share the near-duplicate rule and the exact rule
    each find (run over the output afterwards)."""
    repetitive = [o for r in rows for o in r.outputs if metrics.holtzman_repetition(o)]
    if not repetitive:
        return 0, float("nan"), float("nan")
    near = sum(near_fires(o, config.near) for o in repetitive)
    exact = sum(bool(_detector_stats([o], config.detector)[0]) for o in repetitive)
    return len(repetitive), near / len(repetitive), exact / len(repetitive)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_table(rows: list[BenchRow]) -> str:
    """A markdown table of the rows (a model column when they name their models)."""
    named = any(r.model for r in rows)
    head = "| model " if named else ""
    lines = [
        f"{head}| setup | seq-rep-4 | rep-2 | rep-3 | rep-4 | diversity | Holtzman rep. | "
        "detector fires | near fires | tokens to fire | perplexity | loops broken | val loss |",
        ("|---" if named else "")
        + "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        to_fire = f"{r.tokens_to_fire:.1f}" if r.tokens_to_fire is not None else "-"
        broken = f"{r.loops_broken:.2f}" if r.loops_broken is not None else "-"
        val = f"{r.val_loss:.4f}" if r.val_loss is not None else "-"
        lead = f"| {r.model} " if named else ""
        lines.append(
            f"{lead}| {r.setup} | {r.seq_rep_4:.3f} | {r.rep_2:.3f} | {r.rep_3:.3f} | "
            f"{r.rep_4:.3f} | {r.diversity:.3f} | {_pct(r.holtzman)} | {_pct(r.fired)} | "
            f"{_pct(r.near_fired)} | {to_fire} | {r.perplexity:.2f} | {broken} | {val} |"
        )
    return "\n".join(lines)


def ordering(rows: list[BenchRow]) -> str:
    """Whether the published orderings hold here: greedy repeats more than nucleus sampling,
    which repeats no less than human text (Holtzman), and greedy's seq-rep-4 is above human
    text's (Welleck)."""
    by = {r.setup: r for r in rows if r.model == rows[0].model}  # the first model's
    if not {"greedy", "top-p 0.95", HUMAN} <= set(by):
        return ""
    g, p, h = by["greedy"], by["top-p 0.95"], by[HUMAN]
    holtzman = g.holtzman > p.holtzman >= h.holtzman
    welleck = g.seq_rep_4 > h.seq_rep_4
    return (
        f"Ends in repetition: greedy {_pct(g.holtzman)} > top-p 0.95 {_pct(p.holtzman)} >= "
        f"human {_pct(h.holtzman)}: {'holds' if holtzman else 'does not hold'}.\n"
        f"seq-rep-4: greedy {g.seq_rep_4:.3f} > human {h.seq_rep_4:.3f}: "
        f"{'holds' if welleck else 'does not hold'}."
    )


def targets(rows: list[BenchRow], config: BenchConfig) -> str:
    """The issue's targets, each measured on these rows and said to be hit or missed."""
    first = rows[0].model
    by = {(r.model, r.setup): r for r in rows}
    human, greedy = by.get((first, HUMAN)), by.get((first, "greedy"))
    if human is None or greedy is None:
        return ""
    lines = []
    for name in ("greedy + break (holds, near)", "contrastive search 0.6, k=4"):
        r = by.get((first, name))
        if r is None:
            continue
        ppl = r.perplexity / greedy.perplexity - 1
        hit = r.holtzman <= 0.02 and r.seq_rep_4 <= 2 * human.seq_rep_4 and ppl <= 0.10
        lines.append(
            f"{name}: Holtzman {_pct(r.holtzman)} (<= 2%), seq-rep-4 {r.seq_rep_4:.3f} (<= 2 x "
            f"human = {2 * human.seq_rep_4:.3f}), perplexity {ppl:+.1%} vs greedy (<= +10%): "
            f"{'hit' if hit else 'missed'}"
        )
    for r in rows:
        if r.model == first or r.setup != "greedy" or r.val_loss is None:
            continue
        ratio = r.seq_rep_4 / greedy.seq_rep_4 if greedy.seq_rep_4 else float("nan")
        loss = r.val_loss / greedy.val_loss - 1
        hit = ratio <= 0.25 and loss <= 0.05
        lines.append(
            f"{r.model} greedy: seq-rep-4 {r.seq_rep_4:.3f} = {ratio:.2f} x {first}'s (<= 0.25), "
            f"val loss {loss:+.1%} (<= +5%): {'hit' if hit else 'missed'}"
        )
    n, near, exact = recall(rows, config)
    if n:
        lines.append(
            f"near-duplicate rule: fires on {near:.0%} of the {n} generations Holtzman's rule "
            f"calls repetitive (>= 90%: {'hit' if near >= 0.9 else 'missed'}); the exact "
            f"detector on {exact:.0%}"
        )
    return "\n".join(lines)


def plot(rows: list[BenchRow], path: str | os.PathLike, title: str = "") -> None:
    """Two panels as a PNG: repetition per row (seq-rep-4, Holtzman, both detectors) with the
    published anchors as lines, and each row's repetition against its perplexity, where the
    remedies that keep text fluent and unrepetitive sit low and to the left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = len({r.model for r in rows}) > 1
    labels = [f"{r.model}: {r.setup}" if named else r.setup for r in rows]
    fig, (ax1, ax2) = plt.subplots(
        1, 2, figsize=(15, max(4.5, 0.42 * len(rows) + 1.5)), width_ratios=(3, 2)
    )
    y = list(range(len(rows)))[::-1]  # the first row on top
    height = 0.2
    series = (
        ("seq-rep-4", [r.seq_rep_4 for r in rows]),
        ("ends in repetition (Holtzman)", [r.holtzman for r in rows]),
        ("exact detector fires", [r.fired for r in rows]),
        ("near-duplicate rule fires", [r.near_fired for r in rows]),
    )
    for k, (label, values) in enumerate(series):
        ax1.barh([i + (1.5 - k) * height for i in y], values, height, label=label)
    for (label, value), style in zip(ANCHOR_LINES, (":", "--", "-."), strict=True):
        ax1.axvline(value, color="black", linestyle=style, linewidth=1, label=f"{label} {value:g}")
    ax1.set_yticks(y, labels, fontsize=8)
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("fraction")
    ax1.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3)
    ax1.set_title("repetition (lower is better; human text is the floor)")
    markers = {}
    for r, label in zip(rows, labels, strict=True):
        marker = markers.setdefault(r.model, "osD^v<>"[len(markers) % 7])
        if r.setup == HUMAN:
            marker = "*"
        ax2.scatter(r.seq_rep_4, r.perplexity, marker=marker, s=60)
        ax2.annotate(
            label,
            (r.seq_rep_4, r.perplexity),
            fontsize=6,
            xytext=(4, 2),
            textcoords="offset points",
        )
    ax2.set_yscale("log")
    ax2.set_xlabel("seq-rep-4 of the output")
    ax2.set_ylabel("perplexity of the output under its model")
    ax2.set_title("repetition against fluency")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

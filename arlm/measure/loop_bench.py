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
from arlm.measure.heldout import held_out_ids, held_out_windows
from arlm.sampling import SamplingParams
from arlm.validate import check_int

HUMAN = "human (held-out continuation)"

# The setups of the issue, by name; repetition penalty and DRY are applied to greedy decoding,
# so their rows differ from the greedy row by that one processor.
SETUPS: dict[str, dict] = {
    "greedy": {"temperature": 0.0},
    "temperature 0.7": {"temperature": 0.7},
    "temperature 1.0": {"temperature": 1.0},
    "top-p 0.95": {"temperature": 1.0, "top_p": 0.95},
    "greedy + repetition penalty 1.2": {"temperature": 0.0, "repetition_penalty": 1.2},
    "greedy + DRY 0.8": {"temperature": 0.0, "dry_multiplier": 0.8},
    "greedy + break policy": {"temperature": 0.0, "loop_policy": "break"},
}

# Published anchors, printed beside the results.
ANCHORS = (
    "Holtzman et al. 2020, Table 1 (GPT-2 Large): generations ending in repetition, greedy "
    "73.66%, nucleus p=0.95 0.36%, human text 0.28%.\n"
    "Welleck et al. 2020: seq-rep-4 of greedy decoding from an MLE model 0.442, human text 0.006."
)


@dataclass
class BenchConfig:
    """prompts: how many held-out prompts; prompt_tokens, max_tokens: their length and the
    continuation's. detector: the loop detector's thresholds (its defaults when None)."""

    prompts: int = option(50, help="held-out prompts")
    prompt_tokens: int = option(32, help="tokens per prompt")
    max_tokens: int = option(128, help="tokens per continuation")
    corpus: str = option("builtin", help="the held-out text's corpus")
    seed: int = option(0, help="seed of the sampled setups")
    detector: LoopDetectorConfig = field(default_factory=LoopDetectorConfig)

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
    )


def loop_bench(
    lm: LM,
    config: BenchConfig | None = None,
    setups: dict[str, dict] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[BenchRow]:
    """The human row, then one row per setup (``SETUPS`` by default)."""
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
    prompts = [p for p, _ in pairs]
    rows = [measure(lm, HUMAN, prompts, [c for _, c in pairs], config)]
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
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_table(rows: list[BenchRow]) -> str:
    """A markdown table of the rows."""
    lines = [
        "| setup | seq-rep-4 | rep-2 | rep-3 | rep-4 | diversity | Holtzman rep. | detector "
        "fires | tokens to fire | perplexity | loops broken |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        to_fire = f"{r.tokens_to_fire:.1f}" if r.tokens_to_fire is not None else "-"
        broken = f"{r.loops_broken:.2f}" if r.loops_broken is not None else "-"
        lines.append(
            f"| {r.setup} | {r.seq_rep_4:.3f} | {r.rep_2:.3f} | {r.rep_3:.3f} | {r.rep_4:.3f} | "
            f"{r.diversity:.3f} | {_pct(r.holtzman)} | {_pct(r.fired)} | {to_fire} | "
            f"{r.perplexity:.2f} | {broken} |"
        )
    return "\n".join(lines)


def ordering(rows: list[BenchRow]) -> str:
    """Whether the published orderings hold here: greedy repeats more than nucleus sampling,
    which repeats no less than human text (Holtzman), and greedy's seq-rep-4 is above human
    text's (Welleck)."""
    by = {r.setup: r for r in rows}
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


def plot(rows: list[BenchRow], path: str | os.PathLike, title: str = "") -> None:
    """Repetition (seq-rep-4, Holtzman %, detector %) and perplexity per setup, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.setup for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.5))
    x = range(len(rows))
    width = 0.27
    for k, (label, values) in enumerate(
        (
            ("seq-rep-4", [r.seq_rep_4 for r in rows]),
            ("ends in repetition (Holtzman)", [r.holtzman for r in rows]),
            ("detector fires", [r.fired for r in rows]),
        )
    ):
        ax1.bar([i + (k - 1) * width for i in x], values, width, label=label)
    ax1.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("fraction")
    ax1.legend(fontsize=8)
    ax1.set_title("repetition")
    ax2.bar(list(x), [r.perplexity for r in rows], color="gray")
    ax2.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax2.set_yscale("log")
    ax2.set_title("perplexity of the output under the model")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""Speculative decoding: decode tok/s with and without each proposer, beside transformers'
assisted generation on the same weights, in one run.

Two models are trained once with ``arlm train`` on the built-in corpus (the Python language
reference) and cached under ``benchmarks/out/speculative/``: a target of 6 layers x 384 and a
draft of 2 layers x 384, same tokenizer (about 25 minutes on one core of a 2-core machine; a
later run reuses them). Both are exported to Hugging Face folders for transformers.

Parts (``--parts``, all by default):

- ``ngram``: prompt lookup on input-grounded work, greedy, batch 1. Each prompt is a passage of
  the corpus, a blank line, and the passage's first line again: the model goes on to copy the
  passage. arlm without speculation, with ``{"method": "ngram"}``, and transformers' greedy
  ``generate`` and ``prompt_lookup_num_tokens`` (the same k).
- ``draft``: the draft model, greedy, batch 1 (the same prompts): arlm with
  ``{"method": "draft"}``, the int4 self-draft, and transformers' ``assistant_model``. Then
  sampled at temperature 0.8: the acceptance and speed (that the tokens follow the target's
  distribution is for tests/test_speculative.py).
- ``batch``: how speculation's gain changes with the number of sequences decoding together
  (prompt lookup forced on at every size), the cost of a verify row whose guesses are all
  wrong (which sets ``POSITION_COST``), and at 16 concurrent sequences the engine's default,
  which switches speculation off above ``DEFAULT_DISABLE_BY_BATCH_SIZE`` decode rows.

Speeds are decode tokens per second: (N - 1) / (time for N tokens - time for 1 token), the
median over ``--rounds`` alternating rounds, for arlm and transformers alike (prefill excluded).
Greedy runs check that every setting gives the same tokens as arlm without speculation.

Run: ``python benchmarks/speculative.py [--parts ngram,draft,batch] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from report import print_table  # benchmarks/report.py, beside this script

import arlm
from arlm.engine.speculation import POSITION_COST, summary
from arlm.formats.hf import export_hf
from arlm.speculative.config import DEFAULT_DISABLE_BY_BATCH_SIZE
from arlm.speculative.proposer import Guess
from arlm.train.corpus import builtin_documents

OUT = Path(__file__).parent / "out" / "speculative"
TRAIN = [
    "--corpus", "builtin", "--preset", "small", "--n-head", "6", "--n-embd", "384",
    "--block-size", "256", "--vocab-size", "4096", "--batch-size", "4", "--lr", "2e-3",
    "--eval-interval", "250", "--ckpt-interval", "100", "--seed", "0", "--steps", "500",
]  # fmt: skip
LAYERS = {"target": 6, "draft": 2}
K = 4  # guesses per step, arlm's and transformers'
NEW_TOKENS = 96


def trained(name: str) -> Path:
    """The run folder of ``name``, trained (or its training finished) first where needed."""
    out = OUT / name
    state = out / "train_state.json"
    if state.exists() and json.loads(state.read_text()).get("step") == 500:
        return out
    cmd = [sys.executable, "-m", "arlm", "train", *TRAIN, "--n-layer", str(LAYERS[name])]
    cmd += ["--out", str(out), "--cache-dir", str(OUT / "cache")]
    if state.exists():
        cmd.append("--resume")
    print(f"training the {name} ({LAYERS[name]} layers x 384): {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out


def exported(run: Path) -> Path:
    """``run`` as a Hugging Face folder (written once)."""
    folder = run.parent / f"{run.name}-hf"
    if not (folder / "config.json").exists():
        lm = arlm.load(run, device="cpu", dtype="float32")
        export_hf(lm.model, lm.tokenizer, folder)
    return folder


def grounded_prompts(tokenizer, n: int = 4, passage_tokens: int = 120) -> list[list[int]]:
    """Passages of the corpus, each followed by a blank line and its first line again: the
    continuation copies the passage (what prompt lookup is for)."""
    prompts = []
    for doc in builtin_documents():
        ids = tokenizer.encode(doc, add_special_tokens=False)
        if len(ids) < passage_tokens + 40:
            continue
        passage = tokenizer.decode(ids[:passage_tokens])
        first_line = passage.split("\n")[0]
        prompts.append(tokenizer.encode(passage + "\n\n" + first_line, add_special_tokens=False))
        if len(prompts) == n:
            return prompts
    raise RuntimeError("the corpus has too few long documents")


def arlm_runner(lm, prompt, new_tokens: int = NEW_TOKENS, **sampling):
    def run(n):
        return lambda: lm.generate(prompt, max_tokens=n, ignore_eos=True, **sampling).token_ids

    return run(new_tokens), run(1)


def hf_runner(model, prompt, new_tokens: int = NEW_TOKENS, **kw):
    ids = torch.tensor([prompt], device=model.device)

    def run(n):
        def go():
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
            return out[0, len(prompt) :].tolist()

        return go

    return run(new_tokens), run(1)


def measure(settings: dict, prompts, rounds: int, new_tokens: int = NEW_TOKENS) -> dict:
    """Per setting: (decode tok/s over the prompts, its tokens per prompt). Each prompt's time
    is the median over ``rounds`` of (time for ``new_tokens``) - (time for 1 token), the
    runners (``arlm_runner``, ``hf_runner``) made for ``new_tokens``; the settings alternate
    within every round, so the machine's drift falls on all of them alike."""
    runners = {name: [make(p) for p in prompts] for name, make in settings.items()}
    for pairs in runners.values():  # warm-up: allocation, first calls
        pairs[0][1](), pairs[0][0]()
    times = {name: [[] for _ in prompts] for name in settings}
    tokens = {name: [None] * len(prompts) for name in settings}
    for _ in range(rounds):
        for i in range(len(prompts)):
            for name in settings:
                run_n, run_1 = runners[name][i]
                start = time.perf_counter()
                run_1()
                first = time.perf_counter() - start
                start = time.perf_counter()
                tokens[name][i] = run_n()
                times[name][i].append(time.perf_counter() - start - first)
    total = len(prompts) * (new_tokens - 1)
    return {
        name: (total / sum(statistics.median(t) for t in times[name]), tokens[name])
        for name in settings
    }


def table(title: str, results: dict, base: str, reference: list, notes: dict) -> None:
    rows = []
    for name, (rate, tokens) in results.items():
        # sampled runs draw their tokens otherwise with speculation: nothing to compare
        same = "-" if reference is None else "yes" if tokens == reference else "NO"
        rows.append(
            [name, f"{rate:.1f}", f"{rate / results[base][0]:.2f}x", same, notes.get(name, "")]
        )
    print_table(title, ["setting", "decode tok/s", f"vs {base}", "same tokens", "acceptance"], rows)


def counters(lm) -> dict:
    """The engine's speculation counters now (building the engine if need be)."""
    return {k: v for k, v in lm.engine.stats().items() if k.startswith("spec_decode")}


def acceptance(lm, before: dict) -> str:
    """The acceptance since ``before`` (``counters``), one line."""
    now = counters(lm)
    return summary({k: v - before[k] for k, v in now.items()}).removeprefix("speculation: ")


def part_ngram(target: Path, target_hf, prompts, rounds: int) -> None:
    plain = arlm.load(target, device="cpu", dtype="float32")
    spec = arlm.load(
        target, device="cpu", dtype="float32",
        speculative={"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4},
    )  # fmt: skip
    greedy = dict(temperature=0)
    settings = {
        "arlm": lambda p: arlm_runner(plain, p, **greedy),
        "arlm ngram": lambda p: arlm_runner(spec, p, **greedy),
        "transformers": lambda p: hf_runner(target_hf, p),
        "transformers prompt_lookup": lambda p: hf_runner(target_hf, p, prompt_lookup_num_tokens=K),
    }
    before = counters(spec)
    results = measure(settings, prompts, rounds)
    notes = {"arlm ngram": acceptance(spec, before)}
    table(
        "prompt lookup, input-grounded, greedy, batch 1", results, "arlm", results["arlm"][1], notes
    )
    ratio = results["arlm ngram"][0] / results["transformers prompt_lookup"][0]
    print(f"arlm ngram vs transformers prompt_lookup_num_tokens={K}: {ratio:.2f}x")


def part_draft(target: Path, draft: Path, target_hf, draft_hf, prompts, rounds: int) -> None:
    plain = arlm.load(target, device="cpu", dtype="float32")
    drafted = arlm.load(
        target, device="cpu", dtype="float32",
        speculative={"method": "draft", "model": str(draft), "num_speculative_tokens": K},
    )  # fmt: skip
    self_draft = arlm.load(
        target, device="cpu", dtype="float32",
        speculative={"method": "draft", "model": str(target), "quantization": "int4",
                     "num_speculative_tokens": K},
    )  # fmt: skip
    greedy = dict(temperature=0)
    settings = {
        "arlm": lambda p: arlm_runner(plain, p, **greedy),
        "arlm draft": lambda p: arlm_runner(drafted, p, **greedy),
        "arlm int4 self-draft": lambda p: arlm_runner(self_draft, p, **greedy),
        "transformers": lambda p: hf_runner(target_hf, p),
        "transformers assistant_model": lambda p: hf_runner(target_hf, p, assistant_model=draft_hf),
    }
    draft_hf.generation_config.num_assistant_tokens = K
    draft_hf.generation_config.num_assistant_tokens_schedule = "constant"
    before = {lm: counters(lm) for lm in (drafted, self_draft)}
    results = measure(settings, prompts, rounds)
    notes = {
        "arlm draft": acceptance(drafted, before[drafted]),
        "arlm int4 self-draft": acceptance(self_draft, before[self_draft]),
    }
    table("draft model, greedy, batch 1", results, "arlm", results["arlm"][1], notes)
    ratio = results["arlm draft"][0] / results["transformers assistant_model"][0]
    print(f"arlm draft vs transformers assistant_model (num_assistant_tokens={K}): {ratio:.2f}x")
    sampled = dict(temperature=0.8, seed=0)
    settings = {
        "arlm t=0.8": lambda p: arlm_runner(plain, p, **sampled),
        "arlm draft t=0.8": lambda p: arlm_runner(drafted, p, **sampled),
    }
    before = counters(drafted)
    results = measure(settings, prompts, rounds)
    notes = {"arlm draft t=0.8": acceptance(drafted, before)}
    table("draft model, sampled at temperature 0.8, batch 1", results, "arlm t=0.8", None, notes)


def batch_rate(lm, prompts, n: int) -> float:
    """Tokens per second of ``prompts`` decoded together, NEW_TOKENS each, greedy (prefill
    excluded: the time of a 1-token generation of the same batch is subtracted)."""
    greedy = dict(temperature=0, ignore_eos=True)
    start = time.perf_counter()
    lm.generate(prompts, max_tokens=1, progress=False, **greedy)
    first = time.perf_counter() - start
    start = time.perf_counter()
    lm.generate(prompts, max_tokens=n, progress=False, **greedy)
    return len(prompts) * (n - 1) / (time.perf_counter() - start - first)


class _Wrong:
    """Guesses that are never right (id 0 never follows in this corpus' prose)."""

    def propose(self, seqs, ks):
        return [Guess([0] * k) for k in ks]

    def release(self, seq) -> None:
        pass


def free_prompts(tokenizer, n: int = 16) -> list[list[int]]:
    """The first 24 tokens of documents: nothing to copy, so prompt lookup guesses only where
    the model repeats itself."""
    docs = [d for d in builtin_documents() if len(d) > 400]
    return [tokenizer.encode(d, add_special_tokens=False)[:24] for d in docs[:n]]


def part_batch(target: Path, prompts, free, rounds: int) -> None:
    def load(spec=None):
        return arlm.load(target, device="cpu", dtype="float32", speculative=spec)

    plain = load()
    forced = load({"method": "ngram", "num_speculative_tokens": K, "disable_by_batch_size": 10**6})
    auto = load({"method": "ngram", "num_speculative_tokens": K})
    wrong = load({"method": "ngram", "num_speculative_tokens": K, "adaptive": False})
    n = 64
    rows = []
    for size in (1, 2, 4, 8, 16, 32):
        row = [str(size)]
        for source in (prompts, free):
            batch = (source * size)[:size]
            plain_rate = statistics.median(batch_rate(plain, batch, n) for _ in range(rounds))
            forced_rate = statistics.median(batch_rate(forced, batch, n) for _ in range(rounds))
            row += [f"{plain_rate:.1f}", f"{forced_rate:.1f}", f"{forced_rate / plain_rate:.2f}x"]
        rows.append(row)
    print_table(
        "prompt lookup forced on at every batch size, greedy: input-grounded prompts | free text",
        ["sequences", "arlm tok/s", "ngram tok/s", "ratio", "arlm tok/s", "ngram tok/s", "ratio"],
        rows,
    )
    wrong.generate(prompts[0], max_tokens=2)
    wrong.engine.speculator.proposer = _Wrong()
    plain_rate = statistics.median(batch_rate(plain, prompts[:1], n) for _ in range(rounds))
    wrong_rate = statistics.median(batch_rate(wrong, prompts[:1], n) for _ in range(rounds))
    per_position = (plain_rate / wrong_rate - 1) / K
    print(
        f"\nverify rows of {K} wrong guesses, batch 1: {wrong_rate:.1f} tok/s against "
        f"{plain_rate:.1f}; one more position costs {per_position:.3f} of a decode step "
        f"(POSITION_COST is {POSITION_COST})"
    )
    # always-wrong guesses with the adaptive k and the default switch-off: what it costs
    # where it cannot pay
    adaptive = load({"method": "ngram", "num_speculative_tokens": K})
    adaptive.generate(prompts[0], max_tokens=2)
    adaptive.engine.speculator.proposer = _Wrong()
    for size in (1, 16):
        batch = (prompts * size)[:size]
        plain_rate = statistics.median(batch_rate(plain, batch, n) for _ in range(rounds))
        wrong_rate = statistics.median(batch_rate(adaptive, batch, n) for _ in range(rounds))
        print(
            f"always-wrong guesses, adaptive k, {size} sequences: {wrong_rate:.1f} tok/s against "
            f"{plain_rate:.1f} without, {wrong_rate / plain_rate:.2f}x"
        )
    for name, source in (("input-grounded", prompts), ("free-text", free)):
        batch = (source * 16)[:16]
        plain_rate = statistics.median(batch_rate(plain, batch, n) for _ in range(rounds))
        auto_rate = statistics.median(batch_rate(auto, batch, n) for _ in range(rounds))
        print(
            f"16 concurrent {name} sequences, prompt lookup on with the default switch-off "
            f"(above {DEFAULT_DISABLE_BY_BATCH_SIZE} decode rows): {auto_rate:.1f} tok/s against "
            f"{plain_rate:.1f} without, {auto_rate / plain_rate:.2f}x "
            f"(cost {max(0.0, 1 - auto_rate / plain_rate):.1%})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="ngram,draft,batch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    target, draft = trained("target"), trained("draft")
    target_hf = AutoModelForCausalLM.from_pretrained(exported(target)).eval()
    draft_hf = AutoModelForCausalLM.from_pretrained(exported(draft)).eval()
    for m in (target_hf, draft_hf):
        m.generation_config.eos_token_id = None  # every run generates NEW_TOKENS
        m.generation_config.pad_token_id = 0
    tokenizer = arlm.load(target, device="cpu").tokenizer
    prompts = grounded_prompts(tokenizer)
    print(
        f"{torch.get_num_threads()} threads; {len(prompts)} prompts of "
        f"{', '.join(str(len(p)) for p in prompts)} tokens, {NEW_TOKENS} new tokens each, "
        f"k={K}, median of {args.rounds} rounds"
    )
    parts = args.parts.split(",")
    if "ngram" in parts:
        part_ngram(target, target_hf, prompts, args.rounds)
    if "draft" in parts:
        part_draft(target, draft, target_hf, draft_hf, prompts, args.rounds)
    if "batch" in parts:
        part_batch(target, prompts, free_prompts(tokenizer), args.rounds)


if __name__ == "__main__":
    main()

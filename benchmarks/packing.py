"""Supervised fine-tuning with and without packing: ``arlm train --packing`` against the padded
batches it replaces, on the same conversations, in one process.

The model: the random-weight Llama of ``benchmarks/finetune.py`` (``--shape``; the default
``llama-30m`` is 8 layers x 512, float32), saved by transformers. The corpus: ``--examples``
prompt/completion pairs of random words whose lengths spread as chat data's do, most short and
a few long (prompts of 4 to ``--window`` / 2 words, drawn from a log-uniform spread; completions
of 2 to 40 words). Each side trains ``--steps`` steps of ``--batch`` rows of up to ``--window``
tokens (`TrainConfig` as ``arlm train --init-from`` builds it, LoRA off), after one warm-up step,
alternating a step of each side so that drift in the machine's speed falls on both alike.

Per side: seconds per step (median), the examples and the trained (completion) tokens a step
takes in, and those per second. A padded row holds one example, padded to the longest of its
batch; a packed row holds as many as fit in the window (``arlm.train.chat.PackedSplit``), so
a step of packed rows computes more positions and takes in more examples. The ratio that
counts is trained tokens per second. Run: ``python benchmarks/packing.py`` (about 2 minutes on
2 cores). Writes ``benchmarks/out/packing.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from finetune import SHAPES, make_model

from arlm.train import TrainConfig, Trainer

OUT = Path(__file__).parent / "out"
WORDS = [
    "river",
    "stone",
    "light",
    "cloud",
    "north",
    "harbour",
    "lantern",
    "copper",
    "meadow",
    "signal",
]


def write_corpus(path: Path, n: int, window: int, seed: int = 0) -> None:
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with open(path, "w") as f:
        for _ in range(n):
            prompt = words(int(math.exp(rng.uniform(math.log(4), math.log(window // 2)))))
            completion = " " + words(rng.randint(2, 40))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-30m", choices=sorted(SHAPES))
    p.add_argument("--examples", type=int, default=2000)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_model(root / "model", SHAPES[args.shape], args.window)
        corpus = root / "chats.jsonl"
        write_corpus(corpus, args.examples, args.window)
        trainers = {}
        for side, packing in (("padded", False), ("packed", True)):
            cfg = TrainConfig(
                init_from=str(root / "model"),
                corpus=str(corpus),
                out=str(root / side),
                cache_dir=str(root / "cache"),
                steps=10**9,
                batch_size=args.batch,
                block_size=args.window,
                warmup_steps=0,
                lr=1e-4,
                packing=packing,
            )
            trainers[side] = Trainer(cfg, progress=False)
        times = {side: [] for side in trainers}
        taken = {side: [0, 0] for side in trainers}  # examples, trained tokens
        for step in range(args.steps + 1):
            for side, trainer in trainers.items():
                split = trainer.shards.train
                state = trainer.batch_generator.get_state()
                picks = split.sample(args.batch, trainer.batch_generator)
                trainer.batch_generator.set_state(state)  # the step draws the same rows
                start = time.perf_counter()
                trainer.train_step().item()
                if step == 0:
                    continue  # warm-up
                times[side].append(time.perf_counter() - start)
                rows = [split.rows[i] for i in picks] if side == "packed" else [[i] for i in picks]
                examples = [split.split.examples[i] if side == "packed" else split.examples[i]
                            for row in rows for i in row]  # fmt: skip
                taken[side][0] += len(examples)
                taken[side][1] += sum(int(e.trained[1 : args.window + 1].sum()) for e in examples)
    results = {}
    print(f"\n{args.shape}, {args.examples} examples, rows of up to {args.window} tokens x "
          f"{args.batch}, median of {args.steps} steps")  # fmt: skip
    print(f"{'side':<8} {'s/step':>7} {'examples/step':>14} {'trained tok/step':>17} "
          f"{'examples/s':>11} {'trained tok/s':>14}")  # fmt: skip
    for side in trainers:
        seconds = statistics.median(times[side])
        examples, trained = (v / args.steps for v in taken[side])
        results[side] = {
            "seconds_per_step": seconds,
            "examples_per_step": examples,
            "trained_tokens_per_step": trained,
            "examples_per_s": examples / seconds,
            "trained_tokens_per_s": trained / seconds,
            "rows": len(trainers[side].shards.train),
        }
        r = results[side]
        print(f"{side:<8} {seconds:>7.2f} {examples:>14.1f} {trained:>17.1f} "
              f"{r['examples_per_s']:>11.1f} {r['trained_tokens_per_s']:>14.1f}")  # fmt: skip
    ratio = results["packed"]["trained_tokens_per_s"] / results["padded"]["trained_tokens_per_s"]
    print(f"  packed / padded, trained tokens per second: {ratio:.2f}x")
    print(f"  rows to draw from: {results['padded']['rows']} examples, "
          f"{results['packed']['rows']} packed rows")  # fmt: skip
    OUT.mkdir(exist_ok=True)
    path = OUT / "packing.json"
    path.write_text(json.dumps({"args": vars(args), "results": results, "ratio": ratio}, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

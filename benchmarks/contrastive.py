"""Contrastive search's cost per token beside greedy decoding's, at batch 1.

Both run through ``lm.generate`` on the same prompt: greedy through the engine, contrastive
search (``penalty_alpha`` 0.6, ``top_k`` 4 by default) through its decoder, which scores the k
candidates with one forward of k rows per step. In alternating rounds, each continues a 32-token
prompt by 128 tokens (fewer if the context
ends first; end-of-text ignored); the prints are medians over the rounds and their
ratio. The issue's target is a ratio of at most 1.5 for k = 4.

Run: ``python benchmarks/contrastive.py [MODEL]`` (MODEL: a checkpoint folder; default a
random-weight model of the "small" preset, 4.3M parameters); ``--k 8`` for another k.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import arlm
from arlm.api import LM
from arlm.config import ModelConfig
from arlm.model import Transformer
from arlm.tokenizer import Tokenizer
from arlm.train.corpus import builtin_documents


def _model(path: str | None) -> LM:
    if path:
        return arlm.load(path, device="cpu", dtype="float32")
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(builtin_documents()[:20], vocab_size=4096)
    config = ModelConfig.preset("small", vocab_size=tokenizer.vocab_size)
    return LM(Transformer(config).eval(), tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a checkpoint folder (default: random small)")
    parser.add_argument("--k", type=int, default=4, help="contrastive search's top_k")
    parser.add_argument("--alpha", type=float, default=0.6, help="its penalty_alpha")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    lm = _model(args.model)
    prompt = list(range(100, 132))
    tokens = min(args.tokens, lm.config.block_size - len(prompt))  # within the context
    common = dict(max_tokens=tokens, temperature=0, ignore_eos=True)
    settings = {
        "greedy": common,
        f"contrastive k={args.k}": {**common, "top_k": args.k, "penalty_alpha": args.alpha},
    }
    for kw in settings.values():  # warm-up: allocation, first calls
        lm.generate(prompt, **kw)
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, kw in settings.items():
            start = time.perf_counter()
            out = lm.generate(prompt, **kw)
            elapsed = time.perf_counter() - start
            assert len(out.token_ids) == tokens
            times[name].append(elapsed / tokens * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, ms in medians.items():
        print(f"{name:<20} {ms:7.2f} ms/token (median of {args.rounds} rounds)")
    greedy, search = medians.values()
    print(f"contrastive / greedy: {search / greedy:.2f}x (target <= 1.5x for k = 4)")


if __name__ == "__main__":
    main()

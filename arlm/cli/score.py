"""``arlm score``: the log-probability and perplexity of a text."""

from __future__ import annotations

import argparse
import sys

from arlm.cli.common import add_cache_options, add_model_options, load_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="log-probability and perplexity of a text file")
    add_model_options(p)
    p.add_argument("file", help="a UTF-8 text file ('-' for standard input)")
    p.add_argument("--per-token", action="store_true", help="print each token's log-probability")
    p.add_argument(
        "--chunk-size",
        type=int,
        help="feed N tokens per forward through the KV cache (to measure a cache kind's quality)",
    )
    add_cache_options(p, engine=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import arlm

    if args.file == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise FileNotFoundError(f"cannot read {args.file}: {e.strerror}") from e
    lm = arlm.load(args.model, **load_kwargs(args))
    score = lm.score(text, chunk_size=args.chunk_size)
    if args.per_token:
        for token_id, lp in zip(score.token_ids, score.token_logprobs, strict=False):
            print(f"{lp:10.4f}  {lm.tokenizer.decode([token_id])!r}")
    n = len(score.token_logprobs)
    print(
        f"tokens: {n}  total logprob: {score.total_logprob:.4f}  "
        f"mean: {score.total_logprob / n:.4f}  perplexity: {score.perplexity:.4f}"
    )

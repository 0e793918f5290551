"""The ``arlm`` command: train, generate, score."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

from arlm.sampling import SamplingParams
from arlm.train import TrainConfig, TrainingError

TRAIN_DEFAULTS = TrainConfig()
SAMPLING_DEFAULTS = SamplingParams()


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an arlm checkpoint directory or a Hugging Face model folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights' dtype (default: float32)",
    )


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    d = SAMPLING_DEFAULTS
    p.add_argument("--max-tokens", type=int, help=f"tokens to generate (default: {d.max_tokens})")
    p.add_argument("--temperature", type=float, help=f"0 is greedy (default: {d.temperature})")
    p.add_argument(
        "--top-k", type=int, help=f"keep the k likeliest tokens, 0 = off (default: {d.top_k})"
    )
    p.add_argument("--top-p", type=float, help=f"nucleus sampling mass (default: {d.top_p})")
    p.add_argument(
        "--min-p", type=float, help=f"drop tokens below min-p x the top one (default: {d.min_p})"
    )
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        default=None,
        help="keep generating past the end-of-text token",
    )


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arlm", description="A complete autoregressive language-model stack."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = TRAIN_DEFAULTS
    p = sub.add_parser(
        "train",
        help="train a model by teacher forcing",
        description="Train a model on a corpus; progress, eval and checkpoints go to --out.",
    )
    p.add_argument(
        "--corpus",
        help=f"'builtin', a text file, a folder of .txt/.md files or a glob (default: {d.corpus})",
    )
    p.add_argument("--preset", help=f"model size (default: {d.preset})")
    p.add_argument("--steps", type=int, help=f"optimizer steps to train to (default: {d.steps})")
    p.add_argument("--out", help=f"run folder (default: {d.out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, help=f"(default: {d.seed})")
    p.add_argument("--batch-size", type=int, help=f"(default: {d.batch_size})")
    p.add_argument("--block-size", type=int, help="context length (default: the preset's)")
    p.add_argument(
        "--grad-accum", type=int, help=f"micro-batches per step (default: {d.grad_accum})"
    )
    p.add_argument("--lr", type=float, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--warmup-steps", type=int, help=f"(default: {d.warmup_steps})")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary (default: the preset's)")
    p.add_argument("--eval-interval", type=int, help=f"(default: {d.eval_interval})")
    p.add_argument("--ckpt-interval", type=int, help=f"(default: {d.ckpt_interval})")
    p.add_argument("--device", help=f"(default: {d.device})")
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    p.add_argument("--cache-dir", help="where encoded corpora are cached (default: ~/.cache/arlm)")
    p.add_argument("--sample", default="The", help="prompt for a sample after training")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("generate", help="generate text from a prompt (streams to the terminal)")
    _add_model_options(p)
    p.add_argument("prompt", help="the text to continue")
    _add_sampling_options(p)
    p.add_argument("--stats", action="store_true", help="print token counts and speeds")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("score", help="log-probability and perplexity of a text file")
    _add_model_options(p)
    p.add_argument("file", help="a UTF-8 text file ('-' for standard input)")
    p.add_argument("--per-token", action="store_true", help="print each token's log-probability")
    p.set_defaults(run=cmd_score)

    p = sub.add_parser("export", help="write a model in another format")
    _add_model_options(p)
    p.add_argument("out", help="the folder to write (must not exist or be empty)")
    p.add_argument(
        "--format",
        default="hf",
        choices=["hf"],
        help="hf: a Hugging Face folder that transformers loads (default: hf)",
    )
    p.set_defaults(run=cmd_export)
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from arlm.api import LM
    from arlm.train import Trainer, saved_train_config

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.resume:
        out = given.get("out", TRAIN_DEFAULTS.out)
        steps = given.get("steps", saved_train_config(out).steps)
        cfg = dataclasses.replace(TRAIN_DEFAULTS, out=out, steps=steps)
    else:
        cfg = TrainConfig(**given)
    trainer = Trainer(cfg, resume=args.resume)
    n_params = trainer.model.num_params()
    print(
        f"model: {trainer.cfg.preset}, {n_params / 1e6:.2f}M parameters, "
        f"vocabulary {trainer.tokenizer.vocab_size}; "
        f"corpus: {len(trainer.shards.train):,} train / {len(trainer.shards.val):,} val tokens"
    )
    result = trainer.fit()
    print(
        f"trained to step {result.step} in {result.seconds:.0f}s; "
        f"final validation loss {result.val_loss:.4f} "
        f"(perplexity {math.exp(result.val_loss):.2f}); checkpoint in {result.out}"
    )
    if result.step == trainer.cfg.steps and args.sample:
        lm = LM(trainer.model, trainer.tokenizer)
        print(f"sample (temperature 0.8, seed 0):\n{args.sample}", end="")
        for piece in lm.stream(args.sample, max_tokens=120, temperature=0.8, top_k=50, seed=0):
            print(piece, end="", flush=True)
        print()


def cmd_generate(args: argparse.Namespace) -> None:
    import arlm

    params = SamplingParams(**_sampling_kwargs(args))
    lm = arlm.load(args.model, device=args.device, dtype=args.dtype)
    started = time.perf_counter()
    for piece in lm.stream(args.prompt, params=params):
        print(piece, end="", flush=True)
    print()
    if args.stats:
        u = piece.usage
        print(
            f"[{u.prompt_tokens} prompt tokens, {u.completion_tokens} generated, finish: "
            f"{piece.finish_reason}; time to first token {u.prefill_seconds * 1e3:.1f} ms, "
            f"prefill {u.prefill_tokens_per_second:.1f} tok/s, "
            f"decode {u.decode_tokens_per_second:.1f} tok/s, "
            f"KV cache {u.kv_cache_bytes / 2**20:.2f} MiB, "
            f"total {time.perf_counter() - started:.2f} s]",
            file=sys.stderr,
        )


def cmd_score(args: argparse.Namespace) -> None:
    import arlm

    if args.file == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise FileNotFoundError(f"cannot read {args.file}: {e.strerror}") from e
    lm = arlm.load(args.model, device=args.device, dtype=args.dtype)
    score = lm.score(text)
    if args.per_token:
        for token_id, lp in zip(score.token_ids, score.token_logprobs, strict=False):
            print(f"{lp:10.4f}  {lm.tokenizer.decode([token_id])!r}")
    n = len(score.token_logprobs)
    print(
        f"tokens: {n}  total logprob: {score.total_logprob:.4f}  "
        f"mean: {score.total_logprob / n:.4f}  perplexity: {score.perplexity:.4f}"
    )


def cmd_export(args: argparse.Namespace) -> None:
    import arlm
    from arlm.hf import export_hf

    lm = arlm.load(args.model, device=args.device, dtype=args.dtype)
    export_hf(lm.model, lm.tokenizer, args.out)
    print(f"wrote {args.out} ({args.format})")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, TrainingError) as e:
        print(f"arlm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"arlm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``arlm export``: a model in another format (Hugging Face, GGUF, a quantized arlm checkpoint)."""

from __future__ import annotations

import argparse
from pathlib import Path

from arlm.cli.common import add_model_options, model_kwargs


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a model in another format")
    add_model_options(p, runs=False)
    p.add_argument(
        "out",
        help="the folder (hf, arlm; must not exist or be empty) or file (gguf; must not exist) "
        "to write",
    )
    p.add_argument(
        "--format",
        default="hf",
        choices=["hf", "gguf", "arlm"],
        help="hf: a Hugging Face folder that transformers loads; gguf: one file that llama.cpp "
        "loads; arlm: an arlm checkpoint, e.g. quantized with --quantize (default: hf)",
    )
    p.add_argument(
        "--type",
        default="f32",
        choices=["f32", "f16", "q8_0"],
        help="gguf only: how the weight matrices are stored; q8_0 is 8-bit (default: f32)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import arlm

    if args.format != "gguf" and args.type != "f32":
        raise ValueError(f"--type {args.type}: --type applies to --format gguf only")
    out = Path(args.out)
    if args.format == "arlm" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new path")
    lm = arlm.load(args.model, **model_kwargs(args))
    if args.format == "gguf":
        from arlm.formats.gguf import export_gguf

        export_gguf(lm.model, lm.tokenizer, args.out, type=args.type)
    elif args.format == "arlm":
        from arlm.formats.checkpoint import save_model

        save_model(out, lm.model, lm.tokenizer)
    else:
        from arlm.formats.hf import export_hf

        export_hf(lm.model, lm.tokenizer, args.out)
    print(f"wrote {args.out} ({args.format})")

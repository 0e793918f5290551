"""The ``arlm`` command: one module per command, options derived from the config dataclasses
(``arlm.cli.options``)."""

from __future__ import annotations

import argparse
import sys

from arlm.cli import bench, export, generate, loops, prepare, score, serve, train
from arlm.train.trainer import TrainingError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arlm", description="A complete autoregressive language-model stack."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (prepare, train, generate, score, export, serve, bench, loops):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(bench.expand(sys.argv[1:] if argv is None else argv))
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

"""``arlm prepare``: encode a corpus once into token shards that ``arlm train --corpus DIR``
reads; any size, in bounded memory, resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arlm.cli.options import add_options, given
from arlm.train.corpus import ACCEPTED
from arlm.train.prepare import PrepareConfig


def add_parser(sub) -> None:
    p = sub.add_parser(
        "prepare",
        help="encode a corpus into token shards for training (any size; resumable)",
        description="Encode a corpus into token shards in --out, for arlm train --corpus OUT. "
        "Interrupted (Ctrl-C, a kill), the same command continues where it stopped.",
    )
    p.add_argument("corpus", help=ACCEPTED)
    p.add_argument("--out", required=True, help="the folder to write the shards to")
    add_options(p, PrepareConfig)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from arlm.tokenizer import Tokenizer
    from arlm.train.data import TOKENIZER
    from arlm.train.prepare import prepare

    config = PrepareConfig(**given(args, PrepareConfig))
    tokenizer = None
    if config.tokenizer is not None:
        path = Path(config.tokenizer)
        tokenizer = Tokenizer.from_file(path / TOKENIZER if path.is_dir() else path)
    try:
        shards = prepare(
            args.corpus,
            Path(args.out),
            tokenizer=tokenizer,
            vocab_size=config.vocab_size,
            shard_tokens=config.shard_tokens,
            val_fraction=config.val_fraction,
            tokenizer_sample_bytes=config.tokenizer_sample_bytes,
            batch_bytes=config.batch_bytes,
        )
    except KeyboardInterrupt:
        print("stopped; the same command continues from the last complete shard", file=sys.stderr)
        raise
    meta = shards.meta
    train, val = len(shards.train), len(shards.val)
    if meta["split"] == "document":
        shard_count = f"{len(meta['train']['shards'])} + {len(meta['val']['shards'])} shards"
        rule = f"by document, about {meta['val_fraction']:.0%} of them held out"
    else:
        shard_count = f"{len(meta['train']['shards'])} shards"
        rule = f"too few documents to split by: the last {meta['val_fraction']:.0%} of tokens"
    seconds = meta["seconds"]
    print(
        f"documents: {meta['documents']:,} ({meta['bytes'] / 1e6:,.1f} MB); validation: {rule}\n"
        f"tokens: {train:,} train / {val:,} val in {shard_count} of {meta['dtype']} "
        f"(vocabulary {shards.tokenizer.vocab_size})\n"
        f"time: {seconds:,.1f} s encoding ({(train + val) / seconds:,.0f} tokens/s, "
        f"{meta['bytes'] / 1e6 / seconds:,.1f} MB/s) + {meta['tokenizer_seconds']:,.1f} s "
        f"training the tokenizer\n"
        f"train on it: arlm train --corpus {shards.directory}"
    )

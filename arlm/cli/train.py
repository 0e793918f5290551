"""``arlm train``: teacher forcing on a corpus; progress, eval and checkpoints go to --out.

Under ``torchrun --nproc-per-node N -m arlm train ...`` each process is one data-parallel rank
(``--sharding fsdp``: holding a shard of the model); rank 0 alone prints, samples and writes."""

from __future__ import annotations

import argparse
import dataclasses
import math

from arlm.cli.options import add_options, given
from arlm.train.trainer import TrainConfig


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model by teacher forcing",
        description="Train a model on a corpus; progress, eval and checkpoints go to --out.",
    )
    add_options(p, TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--sample", default="The", help="prompt for a sample after training")
    p.set_defaults(run=run)


def _corpus_size(shards) -> str:
    """A token corpus's splits in tokens; a chat corpus's in examples."""
    from arlm.train.chat import ChatCorpus
    from arlm.train.preference import PreferenceCorpus

    if isinstance(shards, (ChatCorpus, PreferenceCorpus)):
        what = "conversations" if isinstance(shards, ChatCorpus) else "preference pairs (DPO)"
        return (
            f"{len(shards.train):,} train / {len(shards.val):,} val {what} "
            f"({shards.train.tokens:,} / {shards.val.tokens:,} tokens)"
        )
    return f"{len(shards.train):,} train / {len(shards.val):,} val tokens"


def run(args: argparse.Namespace) -> None:
    from arlm.api import LM
    from arlm.formats.checkpoint import load_model
    from arlm.model.lora import merge_lora
    from arlm.train.distributed import close_world
    from arlm.train.sharding import is_sharded
    from arlm.train.trainer import Trainer, saved_train_config

    options = given(args, TrainConfig)
    if args.resume:
        out = options.get("out", TrainConfig.out)
        steps = options.get("steps", saved_train_config(out).steps)
        cfg = dataclasses.replace(TrainConfig(), out=out, steps=steps)
    else:
        cfg = TrainConfig(**options)
    trainer = Trainer(cfg, resume=args.resume)
    if trainer.world.is_main:
        c, cfg = trainer.model.config, trainer.cfg
        experts = "" if c.n_experts is None else f", {c.n_experts_per_tok} of {c.n_experts} experts"
        print(
            f"model: {cfg.init_from or cfg.preset_name} ({c.n_layer} layers, {c.n_head} heads, "
            f"width {c.n_embd}{experts}, context {c.block_size}), "
            f"{trainer.model.num_params() / 1e6:.2f}M parameters, vocabulary "
            f"{trainer.tokenizer.vocab_size}; corpus: {_corpus_size(trainer.shards)}"
        )
        if cfg.lora is not None:
            trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
            print(
                f"LoRA: rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g} on {cfg.lora_targets}: "
                f"{trained / 1e6:.3f}M parameters train, the rest are frozen"
            )
    try:
        result = trainer.fit()
    finally:
        close_world(trainer.world)
    if not trainer.world.is_main:
        return
    loss = f"final validation loss {result.val_loss:.4f}"
    if trainer.preference is None:
        loss += f" (perplexity {math.exp(result.val_loss):.2f})"
    else:
        rewards, preference = trainer.val_rewards, trainer.preference
        loss += f" ({preference.kind} loss; {preference.start:.4f} where training began)"
        if rewards:
            loss += (
                f", reward accuracy {rewards['val_reward_accuracy']:.0%}, margin "
                f"{rewards['val_reward_margin']:.3f}"
            )
    print(
        f"trained to step {result.step} in {result.seconds:.0f}s; {loss}; "
        f"checkpoint in {result.out}"
    )
    if result.step == trainer.cfg.steps and args.sample:
        if is_sharded(trainer.model):  # this rank held a shard: the whole model is on disk
            lm = LM(*load_model(result.out, device=trainer.device))
        else:
            # training is over: the adapters join the weights (QLoRA's stay beside its
            # quantized layers, which hold no float weights to join)
            if trainer.cfg.lora is not None and trainer.cfg.quantize is None:
                merge_lora(trainer.model)
            lm = LM(trainer.model, trainer.tokenizer)
        print(f"sample (temperature 0.8, seed 0):\n{args.sample}", end="")
        for piece in lm.stream(args.sample, max_tokens=120, temperature=0.8, top_k=50, seed=0):
            print(piece, end="", flush=True)
        print()

"""Shared fixtures: a tokenizer and a small run trained once per test session."""

from __future__ import annotations

import pytest
import torch

from arlm.config import ModelConfig
from arlm.model import Transformer
from arlm.tokenizer import Tokenizer
from arlm.train import TrainConfig, Trainer
from arlm.train.corpus import builtin_documents


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(builtin_documents(), vocab_size=512)


def make_model(family: str = "gpt2", vocab_size: int = 512, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    preset = "tiny" if family == "gpt2" else "llama-tiny"
    config = ModelConfig.preset(preset, vocab_size=vocab_size, **overrides)
    model = Transformer(config).eval()
    if family == "llama":  # give the norms non-trivial gains so they are really tested
        with torch.no_grad():
            for _name, p in model.named_parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_dir):
    """A tiny model trained on the built-in corpus: (Trainer, TrainResult)."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = TrainConfig(
        preset="tiny",
        steps=300,
        batch_size=16,
        lr=3e-3,
        warmup_steps=20,
        out=str(out),
        eval_interval=100,
        ckpt_interval=300,
        cache_dir=str(cache_dir),
        vocab_size=1024,
    )
    trainer = Trainer(cfg, progress=False)
    return trainer, trainer.fit()

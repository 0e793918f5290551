"""Shared fixtures: a tokenizer and a small run trained once per test session; and how the
suite shares two cores under pytest-xdist (``make test`` runs ``pytest -n 2 --dist loadgroup``)."""

from __future__ import annotations

import os

import pytest
import torch

from arlm.config import ModelConfig
from arlm.model import Transformer
from arlm.tokenizer import Tokenizer
from arlm.train import TrainConfig, Trainer
from arlm.train.corpus import builtin_documents

# Session fixtures that cost seconds: every test that uses one runs on the same xdist worker, so
# each is built once per run, not once per worker.
SHARED_ON_ONE_WORKER = ("trained_run", "docs_results")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # two workers on two cores: one intra-op thread each (the tiny models gain nothing from
        # more, and OpenMP threads of two processes fighting over two cores stall each other);
        # servers and training runs that a test starts inherit the same
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups off the items
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Groups for ``--dist loadgroup``: the users of an expensive session fixture share one
    worker; so do the tests of a module whose module-scoped fixtures they use (a live server, a
    torchrun baseline, a model), so each module fixture is built once. Other tests go wherever
    a worker is free."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        if fixtures is None:
            continue
        shared = [name for name in SHARED_ON_ONE_WORKER if name in fixtures.name2fixturedefs]
        module_scoped = any(
            d.scope == "module" for defs in fixtures.name2fixturedefs.values() for d in defs
        )
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
        elif module_scoped:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


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

"""Shared fixtures: a tokenizer and a small run trained once per test session; and how the
suite shares two cores under pytest-xdist (``make test`` runs ``pytest -n 2 --dist loadfile``)."""

from __future__ import annotations

import getpass
import os
import tempfile

# torch.compile's cache does not key its C++ code by ATen's vector level: code built for this
# CPU's own level and reused under another fails to compile or, silently, gives NaN (the
# compiled decode step, torch 2.13: avx512 code under ATEN_CPU_CAPABILITY=avx2). A cache per
# level, set before arlm's imports fix the cache's place
if (level := os.environ.get("ATEN_CPU_CAPABILITY")) and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{level}"
    )

import pytest
import torch

from arlm.config import ModelConfig
from arlm.model import Transformer
from arlm.tokenizer import Tokenizer
from arlm.train import TrainConfig, Trainer
from arlm.train.corpus import builtin_documents

# The files whose tests use ``trained_run``: under ``make test`` (``pytest -n 2 --dist loadfile``)
# they run on one worker, so the model is trained once per run, not once per worker. Collection
# fails if a test elsewhere takes the fixture, so this list cannot silently go stale.
TRAINED_RUN_FILES = ("tests/test_bench.py", "tests/test_cli.py", "tests/test_quantize.py",
                     "tests/test_train.py")  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # two workers on two cores: one intra-op thread each (the tiny models gain nothing from
        # more, and OpenMP threads of two processes fighting over two cores stall each other);
        # servers and training runs that a test starts inherit the same
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    strays = sorted(
        {
            item.nodeid.split("::")[0]
            for item in items
            if "trained_run" in getattr(item, "fixturenames", ())
            and item.nodeid.split("::")[0] not in TRAINED_RUN_FILES
        }
    )
    if strays:
        raise pytest.UsageError(
            f"{', '.join(strays)} use trained_run: add them to TRAINED_RUN_FILES in "
            "tests/conftest.py (its users share one xdist worker)"
        )


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook; without xdist it is never called
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile`` with the files of ``TRAINED_RUN_FILES`` as one unit. A file's tests
    share a worker, so a module-scoped fixture (a live server, a torchrun baseline) and the docs
    runner are built once. (``--dist loadgroup`` would say this with markers, but xdist 3.8
    writes the group into ``item._nodeid``, which pytest 9 no longer reads.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class TrainedRunTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "trained_run" if file in TRAINED_RUN_FILES else file

    return TrainedRunTogether(config, log)


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
def base(tmp_path_factory, cache_dir):
    """A tiny Llama-shaped model trained briefly on the built-in corpus: its run folder, the
    model the fine-tuning tests start from (--init-from)."""
    out = tmp_path_factory.mktemp("base") / "run"
    cfg = TrainConfig(
        preset="llama-tiny",
        steps=20,
        batch_size=8,
        block_size=64,
        vocab_size=512,
        warmup_steps=2,
        eval_interval=20,
        eval_iters=2,
        out=str(out),
        cache_dir=str(cache_dir),
    )
    Trainer(cfg, progress=False).fit()
    return out


def fine_tune_config(base, corpus, out, cache_dir, **settings) -> TrainConfig:
    """A short fine-tune of ``base`` (the fixture's run) on ``corpus`` into ``out``: what the
    fine-tuning tests share; ``settings`` give their steps, batches, rates and the rest."""
    paths = dict(init_from=str(base), corpus=str(corpus), out=str(out), cache_dir=str(cache_dir))
    return TrainConfig(**paths, **(dict(warmup_steps=2, eval_iters=2) | settings))


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

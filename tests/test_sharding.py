"""Sharded training (FSDP2 under torchrun, gloo, CPU): 2 ranks holding half the model each follow
the run of one process holding the whole batch, with and without activation checkpointing;
their checkpoint is one arlm checkpoint that resumes in one process; a killed rank leaves the
last checkpoint loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import arlm
from arlm.config import ModelConfig
from arlm.model.transformer import Transformer
from arlm.train.distributed import World
from arlm.train.sharding import local_bytes, shard_model
from arlm.train.trainer import TrainConfig, make_optimizer
from tests.test_distributed import _rank_pids, assert_same_run, ok, train

FSDP = ["--sharding", "fsdp"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        words = " ".join(f"word{(i * 7 + j * 3) % 41} and more text {j}" for j in range(60))
        (folder / f"doc{i:02d}.txt").write_text(words + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


FLAT = ["--lr", "2e-3", "--min-lr", "2e-3"]  # a run stopped and resumed follows one schedule


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus, cache) -> Path:
    """6 steps of 1 process x batch 4: the run the sharded ones must follow."""
    out = tmp_path_factory.mktemp("one") / "run"
    ok(train(out, corpus, cache, "--steps", "6", "--batch-size", "4", *FLAT))
    return out


def test_two_fsdp_ranks_follow_one_process_and_their_checkpoint_resumes_in_one(
    tmp_path, corpus, cache, one_process
):
    # steps 1-3 on 2 ranks x batch 2, each rank holding half of every tensor; steps 4-6 in one
    # process x batch 4 from the checkpoint rank 0 gathered: one run, step by step
    out = tmp_path / "moved"
    two = ok(train(out, corpus, cache, "--steps", "3", "--batch-size", "2", *FLAT, *FSDP,
                   nproc=2))  # fmt: skip
    assert "global batch: 4 sequences x 32 = 128 tokens (2 per micro-batch x 1" in two.stdout
    assert two.stdout.count("trained to step 3") == 1  # rank 0 alone reports
    saved = json.loads((out / "train_state.json").read_text())
    assert saved["world_size"] == 2 and saved["train_config"]["sharding"] == "fsdp"
    resumed = ok(train(out, corpus, cache, "--resume", "--steps", "6"))
    assert "4 per micro-batch x 1 micro-batches x 1 process" in resumed.stdout
    assert_same_run(one_process, out)


def test_fsdp_with_activation_checkpointing_and_accumulation_follows_one_process(
    tmp_path, corpus, cache, one_process
):
    # 2 ranks x 2 micro-batches of 1, each block's activations recomputed in the backward pass:
    # recomputation and the deferred reduce-scatter change nothing but the order of sums
    run = train(tmp_path / "ac", corpus, cache, "--steps", "6", "--batch-size", "1",
                "--grad-accum", "2", "--activation-checkpointing", *FLAT, *FSDP,
                nproc=2)  # fmt: skip
    assert ok(run).stdout.count("trained to step 6") == 1
    assert_same_run(one_process, tmp_path / "ac")
    # what rank 0 wrote is a whole model again: it loads in one process
    assert arlm.load(tmp_path / "ac", device="cpu").model.config.n_layer == 2


def test_a_killed_fsdp_rank_leaves_the_last_checkpoint_loadable(tmp_path, corpus, cache):
    out = tmp_path / "run"
    proc = train(out, corpus, cache, "--steps", "100000", "--batch-size", "2",
                 "--ckpt-interval", "3", *FSDP, nproc=2, stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_state.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 2
        time.sleep(1.0)  # into later steps and checkpoint writes (and their gathers)
        os.kill(ranks[-1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "SIGKILL" in output, output[-3000:]
    lm = arlm.load(out, device="cpu")
    assert lm.model.config.n_layer == 2
    step = json.loads((out / "train_state.json").read_text())["step"]
    assert step > 0 and step % 3 == 0
    ok(train(out, corpus, cache, "--resume", "--steps", str(step + 2)))
    assert json.loads((out / "train_state.json").read_text())["step"] == step + 2


def test_an_unknown_sharding_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"sharding='zero3' is not allowed.*'ddp', 'fsdp'"):
        TrainConfig(sharding="zero3")


def test_local_bytes_counts_a_whole_model_in_one_process():
    # one process: nothing is sharded, so the counts are the model's own (the benchmark's DDP
    # side); a tied head is one matrix
    config = ModelConfig.preset("tiny", n_layer=1, n_head=2, n_embd=16, vocab_size=50)
    model = Transformer(config)
    wrapped = shard_model(model, World(), torch.device("cpu"), "fsdp", bf16=False)
    assert wrapped is model
    optimizer = make_optimizer(model, TrainConfig())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    n = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    counted = local_bytes(model, optimizer)
    assert counted["params"] == counted["grads"] == 4 * n
    steps = sum(s["step"].numel() * s["step"].element_size() for s in optimizer.state.values())
    assert counted["optimizer"] == 8 * n + steps  # two float32 moments per parameter

"""Data-parallel training under torchrun (gloo, CPU): N processes follow the run of one process
holding the whole global batch, survive a killed rank, and resume with another world size."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import arlm
from tests.serving import free_socket

# a small model on a small corpus: each torchrun launch costs seconds, not minutes
MODEL = [
    "--preset", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "64",
    "--block-size", "32", "--vocab-size", "300",
]  # fmt: skip
SCHEDULE = ["--warmup-steps", "2", "--log-interval", "1", "--eval-interval", "4"]
SCHEDULE += ["--eval-iters", "2", "--sample", ""]
# float32 sums in another order (the all-reduce) drift in the last bits; AdamW keeps it small
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        words = " ".join(f"word{(i * 7 + j * 3) % 41} and more text {j}" for j in range(60))
        (folder / f"doc{i:02d}.txt").write_text(words + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # the corpus is encoded once for every test here


def _env() -> dict[str, str]:
    # one thread per process: two ranks on two cores, not four threads fighting over them
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train(out: Path, corpus: str, cache: Path, *args: str, nproc: int = 1, shape=MODEL, **popen):
    """``arlm train`` in one process, or under torchrun with ``nproc`` ranks; ``shape``: the
    model's options (none for a fine-tune, whose model comes from --init-from)."""
    if nproc == 1:
        launcher = [sys.executable, "-m", "arlm"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        launcher += ["--nproc-per-node", str(nproc), "-m", "arlm"]
    command = [*launcher, "train", "--out", str(out), "--corpus", corpus]
    command += ["--cache-dir", str(cache), *shape, *SCHEDULE, *args]
    if popen:
        return subprocess.Popen(command, env=_env(), **popen)
    return subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)


def free_port() -> int:
    with free_socket() as sock:  # closed again: the rendezvous binds it (a race, seldom lost)
        return sock.getsockname()[1]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_same_run(a: Path, b: Path, weights: str = "model.safetensors") -> None:
    la, lb = losses(a), losses(b)
    assert la.keys() == lb.keys()
    for step in la:
        assert abs(la[step] - lb[step]) < LOSS_TOL, (step, la[step], lb[step])
    wa, wb = load_file(a / weights), load_file(b / weights)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=WEIGHT_TOL, rtol=0, msg=name)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus, cache) -> Path:
    """6 steps of 1 process x batch 4: the run the multi-process ones must follow."""
    out = tmp_path_factory.mktemp("one") / "run"
    one = ok(train(out, corpus, cache, "--steps", "6", "--batch-size", "4"))
    assert "global batch: 4 sequences x 32 = 128 tokens" in one.stdout
    return out


def test_two_ranks_follow_one_process_with_the_whole_batch(tmp_path, corpus, cache, one_process):
    two = ok(train(tmp_path / "two", corpus, cache, "--steps", "6", "--batch-size", "2", nproc=2))
    assert "global batch: 4 sequences x 32 = 128 tokens (2 per micro-batch x 1" in two.stdout
    assert two.stdout.count("trained to step 6") == 1  # rank 0 alone reports
    assert two.stdout.count("step 6: val loss") == 1
    assert_same_run(one_process, tmp_path / "two")
    # and with gradient accumulation: 2 ranks x 2 micro-batches of 1
    accum = train(tmp_path / "accum", corpus, cache, "--steps", "6", "--batch-size", "1",
                  "--grad-accum", "2", nproc=2)  # fmt: skip
    ok(accum)
    assert_same_run(one_process, tmp_path / "accum")


def test_a_mixture_of_experts_trains_on_two_ranks(tmp_path, corpus, cache):
    """16 experts, 1 a token, 64 tokens a rank a step: an expert gets no token on some rank in
    most steps, and DDP still finds every gradient it waits for (a zero one) on every rank."""
    experts = ["--n-experts", "16", "--n-experts-per-tok", "1", "--batch-size", "2"]
    two = ok(train(tmp_path / "moe", corpus, cache, "--steps", "4", *experts, nproc=2))
    assert "1 of 16 experts" in two.stdout
    assert two.stdout.count("trained to step 4") == 1
    lm = arlm.load(tmp_path / "moe")
    assert lm.config.n_experts == 16 and len(lm.model.h[0].mlp.experts) == 16


def test_lora_on_two_ranks_follows_one_process(tmp_path, corpus, cache, one_process):
    """LoRA under DDP: the model is frozen, only the adapters' gradients are averaged, and two
    ranks of batch 2 train the adapters one process of batch 4 trains."""
    lora = ["--init-from", str(one_process), "--lora-rank", "4", "--lr", "1e-2", "--steps", "4"]
    one = ok(train(tmp_path / "one", corpus, cache, *lora, "--batch-size", "4", shape=[]))
    assert "LoRA: rank 4, alpha 8" in one.stdout
    two = train(tmp_path / "two", corpus, cache, *lora, "--batch-size", "2", nproc=2, shape=[])
    assert ok(two).stdout.count("trained to step 4") == 1
    assert_same_run(tmp_path / "one", tmp_path / "two", weights="adapter_model.safetensors")


def test_two_nodes_meet_through_a_rendezvous_endpoint(tmp_path, corpus, cache, one_process):
    # two "machines" on the loopback: one launcher per node, joined by torchrun's c10d rendezvous
    port = str(free_port())
    launchers = []
    for _node in range(2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        command += ["--nproc-per-node", "1", "--rdzv-backend", "c10d"]
        command += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "nodes"]
        command += ["-m", "arlm", "train", "--out", str(tmp_path / "nodes"), "--corpus", corpus]
        command += ["--cache-dir", str(cache), *MODEL, *SCHEDULE, "--steps", "6"]
        command += ["--batch-size", "2"]
        launchers.append(subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))  # fmt: skip
    outputs: list[str] = []
    try:
        for p in launchers:
            outputs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
        # a hung node: neither launcher nor its rank may outlive the test (and take the CPU
        # from the tests after it). A launcher stops its rank on SIGTERM (the rank runs in a
        # session of its own: killing the launcher alone would leave it); what both printed
        # says where each stopped.
        for p in launchers:
            p.terminate()
        outputs += [p.communicate(timeout=60)[0] for p in launchers[len(outputs) :]]
        pytest.fail("the two nodes did not finish in 300 s:\n" + "\n----\n".join(outputs))
    assert [p.returncode for p in launchers] == [0, 0], outputs
    assert sum(o.count("trained to step 6") for o in outputs) == 1
    assert_same_run(one_process, tmp_path / "nodes")


def test_resume_with_another_world_size_keeps_the_global_batch(tmp_path, corpus, cache):
    # a flat learning rate after warm-up: stopping at step 4 then going on to 8 follows the
    # same schedule as running to 8 at once
    flat = ["--lr", "2e-3", "--min-lr", "2e-3"]
    ok(train(tmp_path / "straight", corpus, cache, "--steps", "8", "--batch-size", "4", *flat))
    ok(train(tmp_path / "moved", corpus, cache, "--steps", "4", "--batch-size", "2", *flat,
             nproc=2))  # fmt: skip
    resumed = ok(train(tmp_path / "moved", corpus, cache, "--resume", "--steps", "8"))
    assert "4 per micro-batch x 1 micro-batches x 1 process" in resumed.stdout
    assert_same_run(tmp_path / "straight", tmp_path / "moved")


def test_resume_refuses_a_world_size_that_does_not_divide_the_global_batch(tmp_path, corpus, cache):
    ok(train(tmp_path / "run", corpus, cache, "--steps", "2", "--batch-size", "3"))
    refused = train(tmp_path / "run", corpus, cache, "--resume", "--steps", "4", nproc=2)
    assert refused.returncode != 0
    assert "cannot resume a run of 1 process(es) with 2" in refused.stderr + refused.stdout


def _rank_pids(launcher_pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher_pid)], capture_output=True)
    return [int(p) for p in out.stdout.split()]


def test_a_killed_rank_stops_the_run_and_leaves_the_last_checkpoint(tmp_path, corpus, cache):
    out = tmp_path / "run"
    proc = train(out, corpus, cache, "--steps", "100000", "--batch-size", "2",
                 "--ckpt-interval", "3", nproc=2, stdout=subprocess.PIPE,
                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_state.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        ranks = _rank_pids(proc.pid)
        assert len(ranks) == 2
        time.sleep(1.0)  # let it run into the middle of later steps and checkpoint writes
        os.kill(ranks[-1], signal.SIGKILL)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "Signal 9 (SIGKILL)" in output or "SIGKILL" in output, output[-3000:]
    lm = arlm.load(out)  # the last checkpoint is whole
    assert lm.model.config.n_layer == 2
    step = json.loads((out / "train_state.json").read_text())["step"]
    assert step > 0 and step % 3 == 0
    ok(train(out, corpus, cache, "--resume", "--steps", str(step + 2)))
    assert json.loads((out / "train_state.json").read_text())["step"] == step + 2


# a rank's exit after its run: its last barrier's Work stays held, so gloo's worker thread never
# frees it (taking the GIL) while the main thread destroys the group with DDP's reducer (joining
# that thread, holding the GIL); that deadlock hung a finished run now and then
CLOSING = """
import sys
from pathlib import Path

import torch
from arlm import collectives
from arlm.train import distributed

world, device = distributed.init_world("cpu")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
model(torch.ones(2, 4)).sum().backward()
distributed.barrier(world)
(work,) = collectives._LATEST_BARRIER
assert work.is_completed()
distributed.close_world(world)
del model  # the reducer, and with it the process group
(Path(sys.argv[1]) / f"closed{world.rank}").touch()  # (the ranks' prints would interleave)
"""


def test_a_rank_leaves_the_group_holding_its_last_barrier(tmp_path):
    script = tmp_path / "closing.py"
    script.write_text(CLOSING)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", str(script), str(tmp_path)]
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("closed*")) == ["closed0", "closed1"]

"""The training step's speed options keep its numbers: the chunked loss, bfloat16 autocast,
torch.compile, and the FLOPs count behind MFU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arlm.config import ModelConfig
from arlm.model import Transformer
from arlm.model.loss import linear_cross_entropy
from arlm.train import TrainConfig, Trainer
from arlm.train.flops import model_flops_per_token
from tests.numerics import assert_close


def _rows(n=300, c=24, v=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, requires_grad=True)
    w = (0.1 * torch.randn(v, c, generator=g)).requires_grad_()
    t = torch.randint(v, (n,), generator=g)
    t[::7] = -100  # ignored positions take no part in the loss or its gradient
    return x, w, t


@pytest.mark.parametrize("bf16", [False, True])
def test_chunked_loss_and_gradients_equal_the_plain_cross_entropy(bf16):
    x, w, t = _rows()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ref = F.cross_entropy((x @ w.t()).float(), t, ignore_index=-100)
    ref.backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = linear_cross_entropy(x, w, t, chunk_rows=64)  # several chunks and a short last one
    (2 * loss).backward()  # the saved gradients are scaled by the incoming one
    if bf16:
        # bfloat16 matmuls round differently when split in chunks: measured tolerances
        tol = dict(atol=2e-2, rtol=0)
        torch.testing.assert_close(loss, ref, **tol)
        torch.testing.assert_close(x.grad, 2 * gx, atol=1e-3, rtol=5e-2)
        torch.testing.assert_close(w.grad, 2 * gw, atol=1e-3, rtol=5e-2)
        with torch.no_grad():
            torch.testing.assert_close(linear_cross_entropy(x, w, t), ref, **tol)
        return
    # float32 sums in another order. Each gradient is a sum of terms (dloss/dlogits times x or
    # w) whose signs cancel, so it rounds at the size of |dloss/dlogits| @ |x| or @ |w|, not at
    # its own
    with torch.no_grad():
        dlogits = F.softmax(x @ w.t(), -1) - F.one_hot(t.clamp(min=0), w.size(0))
        dlogits = dlogits * (t != -100)[:, None] / (t != -100).sum()
    assert_close(loss, ref)
    assert_close(x.grad, 2 * gx, scale=2 * (dlogits.abs() @ w.abs()).max().item())
    assert_close(w.grad, 2 * gw, scale=2 * (dlogits.abs().t() @ x.abs()).max().item())
    with torch.no_grad():
        assert_close(linear_cross_entropy(x, w, t), ref)


def test_model_loss_without_logits_matches_the_loss_with_them():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=300, n_layer=2, block_size=32))
    idx = torch.randint(300, (3, 32))
    logits, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    none, chunked = model(idx[:, :-1], idx[:, 1:], return_logits=False)
    chunked.backward()
    assert logits is not None and none is None
    assert_close(chunked, loss)
    # the two losses hand back gradients summed in other orders; each parameter's gradient
    # rounds at the size of its own entries (measured: up to 7 units at its largest entry)
    for p, g in zip(model.parameters(), grads, strict=True):
        assert_close(p.grad, g)


def test_flops_per_token_counts_every_weight_that_multiplies():
    config = ModelConfig.preset("tiny", vocab_size=300)
    model = Transformer(config)
    # every weight but the position table, the norms' gains and the biases is a matmul weight
    small = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 1)
    matmul = model.num_params() - model.wpe.weight.numel() - small
    attention = 12 * config.n_layer * config.n_embd * config.block_size
    assert model_flops_per_token(config) == 6 * matmul + attention


def _steps(tmp_path, cache_dir, name, n=3, **options):
    cfg = TrainConfig(
        preset="tiny", n_layer=2, block_size=32, vocab_size=300, batch_size=4, steps=n,
        warmup_steps=1, out=str(tmp_path / name), cache_dir=str(cache_dir), device="cpu",
        **options,
    )  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    return trainer, [float(trainer.train_step()) for _ in range(n)]


def test_bf16_autocast_trains_close_to_float32(tmp_path, cache_dir):
    _, f32 = _steps(tmp_path, cache_dir, "f32")
    _, bf16 = _steps(tmp_path, cache_dir, "bf16", bf16=True)
    assert bf16 == pytest.approx(f32, abs=0.05)
    assert bf16 != f32  # autocast really ran in bfloat16


def test_compiled_step_gives_the_eager_losses(tmp_path, cache_dir):
    _, eager = _steps(tmp_path, cache_dir, "eager")
    trainer, compiled = _steps(tmp_path, cache_dir, "compiled", compile=True)
    assert trainer.forward_model is not trainer.model  # the step ran through torch.compile
    assert compiled == pytest.approx(eager, abs=1e-4)


def test_the_training_loss_traces_as_one_graph():
    """No data-dependent shapes in the chunked loss: each would make a GPU step wait for the
    host and split the compiled step (as boolean indexing of the ignored rows did)."""
    import torch._dynamo

    model = Transformer(ModelConfig.preset("tiny", vocab_size=300, n_layer=1, block_size=32))
    idx = torch.randint(300, (2, 33))
    targets = idx[:, 1:].clone()
    targets[:, ::5] = -100

    def step(x, y):
        return model(x, y, return_logits=False)[1]

    explained = torch._dynamo.explain(step)(idx[:, :-1], targets)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

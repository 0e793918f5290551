"""RMSNorm's Triton kernel (``arlm.model.norm_kernel``, what ``RMSNorm`` runs for inference on
CUDA) against the module's PyTorch ops: on CUDA when there is one, else in Triton's
interpreter. The interpreter casts float32 to bfloat16 by truncation (a GPU rounds to
nearest), so there bfloat16 agrees within a few units of its precision, float32 within
rounding."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from arlm.model.transformer import RMSNorm
from tests.numerics import assert_close
from tests.triton_interpreter import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# (features, Gemma's 1 + gain): Llama-3.2-1B's width, Gemma 3 1B's, Phi-3's, one that is not a
# multiple of anything the kernel loads
SHAPES = [(2048, False), (1152, True), (3072, False), (40, True)]


def _norm_against_module(device: str) -> None:
    from arlm.model.norm_kernel import rms_norm

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n, plus_one in SHAPES:
            norm = RMSNorm(n, 1e-6, plus_one=plus_one).to(dtype)
            with torch.no_grad():  # gains away from their initial 1 (or 0)
                norm.weight.add_(0.3 * torch.randn(n, generator=g).to(dtype))
            wide = (3 * torch.randn(4, 3, n + 8, generator=g)).to(dtype)
            for x in (wide[..., :n].contiguous(), wide[..., 8:]):  # rows apart by n + 8 too
                with torch.no_grad():
                    want = norm(x)  # on the CPU: the PyTorch ops
                got = rms_norm(x.to(device), norm.weight.to(device), norm.eps, plus_one).cpu()
                assert got.dtype == want.dtype and got.shape == want.shape
                if dtype == torch.float32 or device == "cuda":
                    assert_close(got, want, dtype=dtype, ulps=4 if dtype == torch.float32 else 1)
                else:  # truncated casts: within a unit or two at each value's size
                    assert_close(got, want, dtype=dtype, ulps=4)


def test_the_rms_norm_kernel_equals_the_module():
    """Llama's gain (the normalised row rounded to the input's dtype, then times the gain) and
    Gemma's (times 1 + gain in float32, rounded once), float32 and bfloat16, rows that lie
    apart by more than their width."""
    if torch.cuda.is_available():
        _norm_against_module("cuda")
        return
    run_interpreted(
        "from tests.test_norm_kernel import _norm_against_module as check; check('cpu')"
    )


def test_the_module_runs_the_kernel_only_for_inference_on_cuda():
    """Training needs the PyTorch ops' gradients, and a CPU has no Triton device: both keep
    them (a CPU forward under no_grad gives the ops' numbers exactly)."""
    norm = RMSNorm(16, 1e-5)
    x = torch.randn(2, 16, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    with torch.no_grad():
        h = torch.nn.functional.rms_norm(x.float(), (16,), eps=1e-5)
        assert torch.equal(norm(x), norm.weight * h)

"""The model's Triton kernels (``arlm.model.kernels``: what ``RMSNorm``, ``apply_rope`` and
SwiGLU's activation run for inference on CUDA) and the KV store's
(``arlm.kv_cache.store_kernel``) against the PyTorch ops they replace: on CUDA
when there is one, else in Triton's interpreter. The interpreter casts float32 to bfloat16 by
truncation (a GPU rounds to nearest), so there bfloat16 agrees within a few units of its
precision; float32 agrees within rounding (the norm's sum goes in another order, silu's
exponential is another) or exactly (the rotary embedding does the ops' products and sums,
rounded alike)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from arlm.model.transformer import RMSNorm, apply_rope
from tests.numerics import assert_close
from tests.triton_interpreter import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

# (features, Gemma's 1 + gain): Llama-3.2-1B's width, Gemma 3 1B's, Phi-3's, one that is not a
# multiple of anything the kernel loads
NORMS = [(2048, False), (1152, True), (3072, False), (40, True)]

# (heads, head_dim, rotary_dim, per-row tables): q and k heads of a grouped model (4 + 2), a
# partial rotary of 32 of 80 channels (Phi-2's), one table per row (the engine's positions),
# more heads than one program takes at a head size of 256 (Gemma's)
ROPES = [(6, 64, 64, False), (5, 80, 32, True), (40, 256, 256, True)]


def _run(check: str) -> None:
    """``check('cuda')`` here on a GPU, else ``check('cpu')`` interpreted."""
    if torch.cuda.is_available():
        globals()[check]("cuda")
        return
    run_interpreted(f"from tests.test_model_kernels import {check} as check; check('cpu')")


def _close(got: torch.Tensor, want: torch.Tensor, device: str, exact_float32: bool) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        if exact_float32:
            assert torch.equal(got, want)
        else:
            assert_close(got, want, ulps=4)
    elif device == "cuda":  # the GPU rounds as the ops do: a unit at most, from sum orders
        assert_close(got, want, dtype=want.dtype, ulps=1)
    else:  # truncated casts: within a unit or two at each value's size
        assert_close(got, want, dtype=want.dtype, ulps=4)


def check_norms(device: str) -> None:
    from arlm.model.kernels import rms_norm

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n, plus_one in NORMS:
            norm = RMSNorm(n, 1e-6, plus_one=plus_one).to(dtype)
            with torch.no_grad():  # gains away from their initial 1 (or 0)
                norm.weight.add_(0.3 * torch.randn(n, generator=g).to(dtype))
            wide = (3 * torch.randn(4, 3, n + 8, generator=g)).to(dtype)
            residual = (3 * torch.randn(4, 3, n, generator=g)).to(dtype)
            weight = norm.weight.to(device)
            for x in (wide[..., :n].contiguous(), wide[..., 8:]):  # rows apart by n + 8 too
                with torch.no_grad():  # on the CPU: the PyTorch ops
                    want, want_sum = norm(x), residual + x
                    want_of_sum = norm(want_sum)
                got, none = rms_norm(x.to(device), weight, norm.eps, plus_one)
                _close(got.cpu(), want, device, exact_float32=False)
                assert none is None
                # the residual add joined: the sum, rounded as the add rounds it, and its norm
                got, got_sum = rms_norm(
                    x.to(device), weight, norm.eps, plus_one, residual=residual.to(device)
                )
                _close(got_sum.cpu(), want_sum, device, exact_float32=True)
                _close(got.cpu(), want_of_sum, device, exact_float32=False)


def check_ropes(device: str) -> None:
    from arlm.model.kernels import apply_rope as rope_kernel

    g = torch.Generator().manual_seed(1)
    B, T = 2, 5
    for dtype in (torch.float32, torch.bfloat16):
        for heads, hd, rotary, per_row in ROPES:
            # a fused projection's view: (B, T, heads + 1, hd) turned to (B, heads, T, hd),
            # one head more than turns (as v follows q and k)
            qkv = torch.randn(B, T, heads + 1, hd, generator=g).to(dtype)
            x = qkv.transpose(1, 2)[:, :heads]
            positions = torch.randint(0, 4000, (B, T) if per_row else (T,), generator=g)
            inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
            angles = positions.float()[..., None] * inv_freq
            emb = torch.cat((angles, angles), dim=-1)
            if per_row:
                emb = emb[:, None]
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            want = apply_rope(x, cos, sin)  # on the CPU: the PyTorch ops
            got = rope_kernel(x.to(device), cos.to(device), sin.to(device))
            _close(got.cpu(), want, device, exact_float32=True)


def check_swiglu(device: str) -> None:
    from arlm.model.kernels import silu_and_mul

    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        # Llama-3.2-1B's 8,192 hidden units (8 programs a row), and 1,000 (a last one cut)
        for n in (8192, 1000):
            h = (3 * torch.randn(3, 2, 2 * n, generator=g)).to(dtype)
            gate, up = h.chunk(2, dim=-1)
            want = torch.nn.functional.silu(gate) * up
            got = silu_and_mul(h.to(device)).cpu()
            _close(got, want, device, exact_float32=False)


def check_store(device: str) -> None:
    from arlm.kv_cache.store_kernel import store_rows

    g = torch.Generator().manual_seed(3)
    blocks, H, bs, hd, N = 6, 3, 4, 40, 7
    for dtype, plane_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                               (torch.float32, torch.bfloat16)):  # fmt: skip
        # keys and values as the attention's views of its fused projection (1, H, N, hd)
        qkv = torch.randn(1, N, 2 * H + 1, hd, generator=g).to(dtype)
        k, v = qkv.transpose(1, 2)[:, 1 : 1 + H], qkv.transpose(1, 2)[:, 1 + H :]
        planes = [torch.randn(blocks, H, bs, hd, generator=g).to(plane_dtype) for _ in "kv"]
        cells = _cells(blocks, H, bs, N, g)
        got = [p.to(device) for p in planes]
        store_rows(k.to(device), v.to(device), *got, _column(cells, device))
        _assert_planes(got, _stored(planes, cells, k, v), dtype, device)


def _cells(blocks: int, H: int, bs: int, N: int, g: torch.Generator) -> torch.Tensor:
    """N tokens' cells at distinct random positions of the planes (blocks, H, bs, hd), as
    ``PagedKVCache.write_cells`` gives them: each token's first KV head's row."""
    slots = torch.randperm(blocks * bs, generator=g)[:N]
    return slots // bs * H * bs + slots % bs


def _column(cells: torch.Tensor, device: str) -> torch.Tensor:
    """``cells`` on ``device`` as a column of a wider tensor (stride 2), as a graph's static
    inputs hold them."""
    return torch.stack((cells, -cells), dim=1).to(device)[:, 0]


def _stored(planes: list[torch.Tensor], cells: torch.Tensor, k, v) -> list[torch.Tensor]:
    """Copies of the planes as the cache's ops leave them (``StepWrites.store``): the rows of
    k and v (1, n_kv_head, N, hd), token-major, token t's head h at ``cells[t] + h *
    block_size``."""
    want = [p.clone() for p in planes]
    H, bs = planes[0].size(1), planes[0].size(2)
    rows_at = (cells[:, None] + torch.arange(H) * bs).flatten()
    for plane, x in zip(want, (k, v), strict=True):
        rows = x[0].transpose(0, 1).reshape(-1, x.size(-1)).to(plane.dtype)
        plane.view(-1, x.size(-1)).index_copy_(0, rows_at, rows)
    return want


def _assert_planes(got: list[torch.Tensor], want: list[torch.Tensor], dtype, device) -> None:
    """Planes a kernel wrote from ``dtype`` values equal the ops' ``want``, exactly where no
    cast lies between or on a GPU."""
    for a, b in zip(got, want, strict=True):
        if dtype == b.dtype or device == "cuda":
            assert torch.equal(a.cpu(), b)
        else:  # the interpreter truncates float32 to bfloat16
            assert_close(a.cpu(), b, dtype=b.dtype, ulps=2)


def check_rope_store(device: str) -> None:
    from arlm.kv_cache.base import StoreTarget
    from arlm.model.kernels import apply_rope as rope_kernel

    g = torch.Generator().manual_seed(4)
    T, blocks, bs = 5, 6, 4
    # (query heads, KV heads, head_dim, rotary_dim): a grouped model (4 a KV head), Phi-2's
    # partial rotary, more heads than one program takes (Gemma's 256)
    for n_q, n_kv, hd, rotary in ((8, 2, 64, 64), (4, 4, 80, 32), (24, 8, 256, 256)):
        for dtype, plane_dtype in ((torch.float32, torch.float32),
                                   (torch.bfloat16, torch.bfloat16),
                                   (torch.float32, torch.bfloat16)):  # fmt: skip
            # one row of T tokens as the attention's views of its fused projection
            qkv = torch.randn(1, T, n_q + 2 * n_kv, hd, generator=g).to(dtype).transpose(1, 2)
            qk, v = qkv[:, : n_q + n_kv], qkv[:, n_q + n_kv :]
            positions = torch.randint(0, 4000, (1, T), generator=g)
            inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
            emb = (positions[..., None] * inv_freq.repeat(2))[:, None]
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            planes = [torch.randn(blocks, n_kv, bs, hd, generator=g).to(plane_dtype) for _ in "kv"]
            cells = _cells(blocks, n_kv, bs, T, g)
            got = [p.to(device) for p in planes]
            target = StoreTarget(*got, _column(cells, device))
            (c, s), x = (t.to(device) for t in (cos, sin)), qk.to(device)
            got_qk = rope_kernel(x, c, s, n_q, store=(v.to(device), target)).cpu()
            _close(got_qk, apply_rope(qk, cos, sin), device, exact_float32=True)  # the ops'
            # the planes as the cache's store leaves them, given the keys the kernel turned
            _assert_planes(got, _stored(planes, cells, got_qk[:, n_q:], v), dtype, device)


def check_rope_norms(device: str) -> None:
    from arlm.kv_cache.base import StoreTarget
    from arlm.model.kernels import apply_rope as rope_kernel

    g = torch.Generator().manual_seed(5)
    T = 5
    # (query heads, KV heads, head_dim, rotary_dim, Gemma's 1 + gain): Qwen3's heads (16 + 8
    # of 128), Gemma 3 1B's (4 + 1 of 256), a partial rotary of a head size that is not a
    # power of two (its padded channels have no gain)
    for n_q, n_kv, hd, rotary, plus_one in ((16, 8, 128, 128, False), (4, 1, 256, 256, True),
                                            (4, 2, 80, 32, False)):  # fmt: skip
        for dtype in (torch.float32, torch.bfloat16):
            norms = [RMSNorm(hd, 1e-6, plus_one=plus_one).to(dtype) for _ in "qk"]
            with torch.no_grad():  # gains away from their initial 1 (or 0), unlike each other
                for norm in norms:
                    norm.weight.add_(0.3 * torch.randn(hd, generator=g).to(dtype))
            qkv = torch.randn(1, T, n_q + 2 * n_kv, hd, generator=g).to(dtype).transpose(1, 2)
            qk, v = 3 * qkv[:, : n_q + n_kv], qkv[:, n_q + n_kv :]
            positions = torch.randint(0, 4000, (T,), generator=g)
            inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
            emb = positions[..., None] * inv_freq.repeat(2)
            cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
            with torch.no_grad():  # on the CPU: the model's ops
                q, k = qk.split([n_q, n_kv], dim=1)
                want = apply_rope(torch.cat((norms[0](q), norms[1](k)), dim=1), cos, sin)
            gains = (norms[0].weight.to(device), norms[1].weight.to(device), 1e-6, plus_one)
            x, c, s = (t.to(device) for t in (qk, cos, sin))
            got = rope_kernel(x, c, s, n_q, gains).cpu()
            _close(got, want, device, exact_float32=False)
            # the same with the store: the keys it turned and the values in their cells
            planes = [torch.zeros(3, n_kv, 4, hd, dtype=dtype) for _ in "kv"]
            cells = _cells(3, n_kv, 4, T, g)
            written = [p.to(device) for p in planes]
            target = StoreTarget(*written, _column(cells, device))
            stored = rope_kernel(x, c, s, n_q, gains, (v.to(device), target)).cpu()
            assert torch.equal(stored, got)
            _assert_planes(written, _stored(planes, cells, got[:, n_q:], v), dtype, device)


def test_the_rms_norm_kernel_equals_the_module():
    """Llama's gain (the normalised row rounded to the input's dtype, then times the gain) and
    Gemma's (times 1 + gain in float32, rounded once), float32 and bfloat16, rows that lie
    apart by more than their width, alone or after the residual add."""
    _run("check_norms")


def test_the_rotary_kernel_equals_the_ops():
    """Queries and keys as the attention's fused projection lays them out, a shared table and
    one per row, partial rotary, head sizes of 64, 80 and 256, float32 and bfloat16."""
    _run("check_ropes")


def test_the_rotary_kernel_stores_the_turned_keys_and_the_values_as_the_cache_would():
    """One row of tokens (an engine step's): the kernel's queries and keys equal the ops', and
    the planes hold what the ops and the cache's store would have written (the turned keys,
    the values) at scattered cells, nothing else touched; grouped heads, a partial rotary,
    heads spread over programs, planes of another float type than the model's."""
    _run("check_rope_store")


def test_the_rotary_kernel_normalises_each_head_as_the_query_and_key_norms_do():
    """Qwen3's and Gemma 3's query and key norms before the rotation in the same kernel: each
    head by its kind's gain (Llama's rounding, or Gemma's 1 + gain), float32 and bfloat16, a
    partial rotary of 80-wide heads; with the store too, the same queries and keys and the
    planes holding them."""
    _run("check_rope_norms")


def test_the_swiglu_kernel_equals_the_ops():
    """silu of the gate times the up projection, from the fused projection's output (the gate
    first), float32 and bfloat16, row widths a program's multiple and not."""
    _run("check_swiglu")


def test_the_kv_store_kernel_writes_what_the_ops_write():
    """Keys and values as views of a fused projection, written to scattered cells of float
    planes, of their dtype or another (the cache's own), nothing else touched."""
    _run("check_store")


def test_the_model_runs_the_kernels_only_for_inference_on_cuda():
    """Training needs the PyTorch ops' gradients, and a CPU has no Triton device: both keep
    them (a CPU forward under no_grad gives the ops' numbers exactly)."""
    norm = RMSNorm(16, 1e-5)
    x = torch.randn(2, 16, requires_grad=True)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is not None
    with torch.no_grad():
        h = torch.nn.functional.rms_norm(x.float(), (16,), eps=1e-5)
        assert torch.equal(norm(x), norm.weight * h)

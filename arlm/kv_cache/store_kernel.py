"""A forward's new keys and values written into float KV blocks by one Triton kernel.

``paged._store`` writes each layer's keys and values with PyTorch ops: the attention's keys
and values are views of its fused projection whose rows are not contiguous, so each plane
takes a copy into rows and an ``index_copy_`` into the blocks, four kernels a layer, 64 of a
16-layer step, each a few microseconds of a replayed graph. Here one program per token writes
its key and value heads straight from the views into their cells, cast to the planes' dtype
as ``to`` casts them. Float blocks only (int8/int4 codecs quantize first, with PyTorch ops).
Models that turn their keys by rotary angles store them from the rotary kernel instead, as it
turns them (``arlm.model.kernels.apply_rope``); this one serves the others (GPT-2). Imported
only where it runs (CUDA, or Triton's interpreter in the tests)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_rows(
    K,
    V,
    KPlane,
    VPlane,
    Cells,
    sk_t,
    sk_h,
    sv_t,
    sv_h,
    H,
    s_cell,
    head_stride,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
):
    # one program: one token's H key heads and H value heads; head h's row of the planes
    # (seen as rows of HEAD_DIM) is Cells[token] + h * head_stride (Cells by its stride: a column
    # of a graph's static inputs)
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    ok = (h < H)[:, None] & (d < HEAD_DIM)[None, :]
    cell = tl.load(Cells + t * s_cell).to(tl.int64) + h * head_stride
    to = cell[:, None] * HEAD_DIM + d[None, :]
    k = tl.load(K + t * sk_t + h[:, None] * sk_h + d[None, :], mask=ok)
    tl.store(KPlane + to, k.to(KPlane.dtype.element_ty), mask=ok)
    v = tl.load(V + t * sv_t + h[:, None] * sv_h + d[None, :], mask=ok)
    tl.store(VPlane + to, v.to(VPlane.dtype.element_ty), mask=ok)


def store_rows(
    k: torch.Tensor,
    v: torch.Tensor,
    k_plane: torch.Tensor,
    v_plane: torch.Tensor,
    cells: torch.Tensor,
) -> None:
    """Write ``k`` and ``v`` (1, n_kv_head, N, hd), any strides with contiguous vectors, into
    the float planes (num_blocks, n_kv_head, block_size, hd) seen as rows of hd: token t's
    head h at row ``cells[t] + h * block_size`` (``cells`` (N,), as
    ``PagedKVCache.write_cells`` gives them)."""
    _, H, N, hd = k.shape
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    _store_rows[(N,)](
        k,
        v,
        k_plane,
        v_plane,
        cells,
        k.stride(2),
        k.stride(1),
        v.stride(2),
        v.stride(1),
        H,
        cells.stride(0),
        k_plane.size(2),
        HEADS_PAD=triton.next_power_of_2(H),
        HEAD_DIM=hd,
        HEAD_DIM_PAD=triton.next_power_of_2(hd),
        num_warps=4,
    )

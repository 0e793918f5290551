"""The model's elementwise work in single Triton kernels, for inference on CUDA.

Outside ``torch.compile`` every PyTorch op is a kernel launch, and a decode step of a small
batch is made of launches that each do a few microseconds of work, in a graph replay too.
Three of the model's pieces took several each where one does: ``RMSNorm`` (to float32,
``rms_norm``, back to the input's dtype, times the gain: four kernels a norm in bfloat16, 132
of a 16-layer step; the residual adds join the norms after them), the rotary embedding
(times cos, the halves swapped and negated, times sin, the sum: five a layer, 80 of a 16-layer
step) and SwiGLU's activation (silu of the gate, times the up projection: two a layer). The
rotary kernel also normalises each head first where the model does (Qwen3's and Gemma 3's
query and key norms) and writes the turned keys and the values into the KV cache's blocks
(``arlm.kv_cache.base.StoreTarget``), so attention's inputs take one launch a layer. Each
kernel here is one launch with the PyTorch ops' roundings, so that a model gives the same
numbers on either path: every intermediate the ops round to the tensors' dtype is rounded
here too. Imported only where they run (CUDA, or Triton's interpreter in the tests), so arlm
itself does not need Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from arlm.kv_cache.base import StoreTarget


@triton.jit
def _rms_norm_rows(
    X,
    R,
    S,
    W,
    Y,
    sx,
    sr,
    ss,
    sy,
    n,
    eps,
    PLUS_ONE: tl.constexpr,
    RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # one program: one row of n features; with RESIDUAL, the row of X + R (rounded to X's
    # dtype, as the add rounds it) is written to S and normalised
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(X + row * sx + cols, mask=ok, other=0.0).to(tl.float32)
    if RESIDUAL:
        r = tl.load(R + row * sr + cols, mask=ok, other=0.0).to(tl.float32)
        x = (x + r).to(X.dtype.element_ty)
        tl.store(S + row * ss + cols, x, mask=ok)
        x = x.to(tl.float32)
    h = x * tl.rsqrt(tl.sum(x * x, 0) / n + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    if PLUS_ONE:  # noqa: SIM108 (a compile-time branch: each kernel keeps one)
        y = h * (1.0 + w)
    else:  # rounded to the input's dtype first, as the reference implementation does
        y = h.to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + row * sy + cols, y.to(Y.dtype.element_ty), mask=ok)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    plus_one: bool,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``RMSNorm``'s output for ``x`` (..., n) and its gain ``weight`` (n,): the row normalised
    in float32, rounded to its dtype, times the gain (Llama); or, ``plus_one`` (Gemma), times
    ``1 + gain`` in float32 and rounded once. With ``residual`` (x's shape and dtype), of
    ``x + residual`` instead, which comes back too: (the norm, the sum or None)."""
    n = x.size(-1)
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    # Llama's output takes the common dtype of gain and rounded input; Gemma's the input's
    dtype = x.dtype if plus_one else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(rows.shape, dtype=dtype, device=x.device)
    added = None
    if residual is not None:
        residual = residual.reshape(-1, n)
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        added = torch.empty_like(rows, memory_format=torch.contiguous_format)
    block = triton.next_power_of_2(n)
    _rms_norm_rows[(rows.size(0),)](
        rows,
        rows if residual is None else residual,  # not read without one
        y if added is None else added,  # not written without one
        weight,
        y,
        rows.stride(0),
        0 if residual is None else residual.stride(0),
        0 if added is None else added.stride(0),
        y.stride(0),
        n,
        eps,
        PLUS_ONE=plus_one,
        RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=num_warps(block),
    )
    return y.view(x.shape), None if added is None else added.view(x.shape)


def num_warps(block: int) -> int:
    """Warps for rows of ``block`` features: 8 values a thread, from 1 warp to 16."""
    return min(16, max(1, block // 256))


@triton.jit
def _rope_rows(
    X,
    Cos,
    Sin,
    Y,
    QGain,
    KGain,
    V,
    KPlane,
    VPlane,
    Cells,
    sx_b,
    sx_h,
    sx_t,
    sy_b,
    sy_h,
    sy_t,
    sc_b,
    sc_t,
    sv_t,
    sv_h,
    T,
    H,
    N_Q,
    eps,
    s_cell,
    head_stride,
    ROTARY: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    HEADS: tl.constexpr,
    NORM: tl.constexpr,
    STORE: tl.constexpr,
):
    # one program: HEADS heads of one row's one position; channels past ROTARY pass unturned.
    # Heads from N_Q on are keys. NORM: each head first normalised as RMSNorm does, by
    # QGain's or KGain's gain (1) or 1 + gain (2). STORE (one row of tokens): the keys,
    # turned, written into their cells of KPlane, and the values of the same heads into VPlane's
    bt = tl.program_id(0)
    b, t = bt // T, bt % T
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    d = tl.arange(0, HEAD_DIM_PAD)
    ok = (h < H)[:, None] & (d < HEAD_DIM)[None, :]
    turns = d < ROTARY
    first = d < ROTARY // 2
    dtype = X.dtype.element_ty
    at = X + b.to(tl.int64) * sx_b + t * sx_t + h[:, None] * sx_h
    x = tl.load(at + d[None, :], mask=ok, other=0.0)
    # the channel each turns with: its pair in the other half
    partner = tl.where(first, d + ROTARY // 2, d - ROTARY // 2)
    xp = tl.load(at + partner[None, :], mask=ok & turns[None, :], other=0.0).to(tl.float32)
    if NORM:
        # each head's inverse root mean square, applied to its channels and their partners
        x32 = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(x32 * x32, 1) / HEAD_DIM + eps)[:, None]
        is_q = (h < N_Q)[:, None]
        d_ok = d < HEAD_DIM
        g = tl.where(is_q, tl.load(QGain + d, d_ok)[None, :], tl.load(KGain + d, d_ok)[None, :])
        qp, kp = tl.load(QGain + partner, d_ok), tl.load(KGain + partner, d_ok)
        gp = tl.where(is_q, qp[None, :], kp[None, :])
        x = _gained(x32 * inv, g.to(tl.float32), NORM, dtype)
        xp = _gained(xp * inv, gp.to(tl.float32), NORM, dtype).to(tl.float32)
    swapped = tl.where(first[None, :], -xp, xp)  # cat(-x2, x1), negated exactly in float32
    angle = b.to(tl.int64) * sc_b + t * sc_t + d
    c = tl.load(Cos + angle, mask=turns, other=0.0).to(tl.float32)[None, :]
    s = tl.load(Sin + angle, mask=turns, other=0.0).to(tl.float32)[None, :]
    # x * cos + swapped * sin, each product and the sum rounded to the dtype as the ops do
    a = (x.to(tl.float32) * c).to(dtype)
    r = (swapped * s).to(dtype)
    y = tl.where(turns[None, :], (a.to(tl.float32) + r.to(tl.float32)).to(dtype), x)
    tl.store(Y + b.to(tl.int64) * sy_b + t * sy_t + h[:, None] * sy_h + d[None, :], y, mask=ok)
    if STORE:
        kv = h - N_Q
        is_kv = ok & (kv >= 0)[:, None]
        cell = tl.load(Cells + t * s_cell).to(tl.int64) + kv * head_stride  # KV head kv's row
        to = cell[:, None] * HEAD_DIM + d[None, :]
        tl.store(KPlane + to, y.to(KPlane.dtype.element_ty), mask=is_kv)
        v = tl.load(V + t.to(tl.int64) * sv_t + kv[:, None] * sv_h + d[None, :], mask=is_kv)
        tl.store(VPlane + to, v.to(VPlane.dtype.element_ty), mask=is_kv)


@triton.jit
def _gained(h, gain, NORM: tl.constexpr, dtype: tl.constexpr):
    """RMSNorm's output from the normalised float32 ``h``: rounded to ``dtype``, then times
    the gain (1: Llama's, Qwen3's), or times 1 + gain in float32, rounded once (2: Gemma's)."""
    if NORM == 1:  # noqa: SIM108 (a compile-time branch: each kernel keeps one)
        y = h.to(dtype).to(tl.float32) * gain
    else:
        y = h * (1.0 + gain)
    return y.to(dtype)


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_q: int | None = None,
    norm: tuple[torch.Tensor, torch.Tensor, float, bool] | None = None,
    store: tuple[torch.Tensor, StoreTarget] | None = None,
) -> torch.Tensor:
    """``arlm.model.transformer.apply_rope``'s output for ``x`` (B, H, T, head_dim) and
    ``cos``, ``sin`` of x's dtype, (T, rotary_dim) or one table per row (B, 1, T, rotary_dim),
    in x's layout (its heads of a position next to each other, as a projection's view has
    them). With ``n_q``, x's first n_q heads are queries and the rest keys, and

    - ``norm`` (query gain, key gain, eps, Gemma's ``plus_one``; gains of x's dtype): each head
      is first normalised as ``RMSNorm`` does with its kind's gain (Qwen3's and Gemma 3's
      ``q_norm`` and ``k_norm``), where those were two launches and a concatenation;
    - ``store`` (values (1, n_kv_head, T, head_dim), where they go), for one row of tokens:
      the keys, turned, and the values are also written into the target's planes, as
      ``arlm.kv_cache.store_kernel.store_rows`` writes them, where that was a launch too."""
    B, H, T, hd = x.shape
    if (norm is not None or store is not None) and n_q is None:
        raise ValueError("a norm or a store needs n_q: which of x's heads are queries")
    if store is not None and B != 1:
        raise ValueError(f"a store takes one row of tokens (an engine step's), not {B}")
    rotary = cos.size(-1)
    if x.stride(-1) != 1:
        x = x.contiguous()
    # (B, 1, T, rotary) strides either way; a shared table's rows 0 apart
    cos, sin = (c.expand(B, 1, T, rotary) if c.dim() == 2 else c for c in (cos, sin))
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    y = torch.empty(B, T, H, hd, dtype=x.dtype, device=x.device).transpose(1, 2)
    q_gain, k_gain, eps, plus_one = norm if norm is not None else (x, x, 0.0, False)
    v, target = store if store is not None else (x, None)  # x: not read
    if target is not None and v.stride(-1) != 1:
        v = v.contiguous()
    hd_pad = triton.next_power_of_2(hd)
    heads = rope_heads(H, hd_pad, norm is not None)
    _rope_rows[(B * T, triton.cdiv(H, heads))](
        x,
        cos,
        sin,
        y,
        q_gain,
        k_gain,
        v,
        x if target is None else target.k_plane,
        x if target is None else target.v_plane,
        x if target is None else target.cells,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        y.stride(0),
        y.stride(1),
        y.stride(2),
        cos.stride(0),
        cos.stride(2),
        v.stride(2),
        v.stride(1),
        T,
        H,
        H if n_q is None else n_q,
        eps,
        0 if target is None else target.cells.stride(0),
        0 if target is None else target.k_plane.size(2),
        ROTARY=rotary,
        HEAD_DIM=hd,
        HEAD_DIM_PAD=hd_pad,
        HEADS=heads,
        NORM=0 if norm is None else 2 if plus_one else 1,
        STORE=target is not None,
        num_warps=4,
        # float32: products and sum rounded apart, as the ops' kernels do (no fused multiply-add)
        enable_fp_fusion=False,
    )
    return y


def rope_heads(heads: int, head_dim_pad: int, norm: bool) -> int:
    """Heads a rotary program takes: up to 4,096 values, 2,048 where it normalises them
    first (its gains' tiles spilled registers in the sm_90 compile at 4,096)."""
    return min(triton.next_power_of_2(heads), max(1, (2048 if norm else 4096) // head_dim_pad))


@triton.jit
def _silu_and_mul_rows(H, Y, sh, sy, n, BLOCK: tl.constexpr):
    # one program: BLOCK features of one row; the gate is the row's first n, the up its last n
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    gate = tl.load(H + row * sh + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(H + row * sh + n + cols, mask=ok, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty)  # silu, rounded as F.silu's
    tl.store(Y + row * sy + cols, (act.to(tl.float32) * up).to(Y.dtype.element_ty), mask=ok)


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` for ``h`` (..., 2n) holding the gate and then the up projection."""
    n = h.size(-1) // 2
    rows = h.reshape(-1, 2 * n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    y = torch.empty(rows.size(0), n, dtype=h.dtype, device=h.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_rows[(rows.size(0), triton.cdiv(n, block))](
        rows, y, rows.stride(0), y.stride(0), n, BLOCK=block, num_warps=4
    )
    return y.view(*h.shape[:-1], n)

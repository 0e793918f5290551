"""Decode attention over paged blocks: each row's one query against the positions its block
table holds.

A decode step's rows hold arbitrary blocks at arbitrary lengths. ``decode_attention`` takes
them as device tensors (``tables``, ``lengths``), so one call serves any batch without host-side
setup and can be captured in a CUDA graph. On CUDA it runs a Triton kernel that follows row b's
block table through exactly ``lengths[b]`` positions (never a gathered copy), split along the
sequence so that even one row keeps many multiprocessors busy (flash-decoding); the splits'
partial results are merged by their log-sum-exp. A sliding-window layer's rows read only their
window's positions, from ``lengths[b] - window`` on: the kernel's splits cover just those, so a
long row of a windowed layer costs what its window does. Elsewhere, and for the kernel's own
tests, ``decode_attention_reference`` does the same with PyTorch ops.

Only float planes (the float codec) take this path; the engine runs quantized blocks through
``PagedStep``'s other paths.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def decode_attention(
    q: torch.Tensor,
    k_plane: torch.Tensor,
    v_plane: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Attention of q (B, n_head, hd), row b over positions ``0..lengths[b]-1`` of the blocks
    ``tables[b]`` (B, max blocks) of k_plane, v_plane (num_blocks, n_kv_head, block_size, hd)
    -> (B, n_head, hd); with a sliding ``window``, over its last ``window`` positions only.
    ``use_triton`` None: the kernel on CUDA, the reference elsewhere. Every length is >= 1."""
    if use_triton is None:
        use_triton = q.device.type == "cuda"
    if not use_triton:
        return decode_attention_reference(q, k_plane, v_plane, tables, lengths, scale, window)
    return _triton_decode(q, k_plane, v_plane, tables, lengths, scale, window)


def as_rows(blocks: torch.Tensor, rows: int) -> torch.Tensor:
    """Blocks gathered row after row, (rows * width, n_kv_head, block_size, hd), as each row's
    positions in order: (rows, n_kv_head, width * block_size, hd)."""
    x = blocks.view(rows, -1, *blocks.shape[1:]).transpose(1, 2)  # (rows, H, width, bs, hd)
    return x.reshape(rows, x.size(1), -1, x.size(-1))


def decode_attention_reference(
    q: torch.Tensor,
    k_plane: torch.Tensor,
    v_plane: torch.Tensor,
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """``decode_attention`` with PyTorch ops: the rows' blocks gathered whole, a length mask
    (and a window's)."""
    B, index = tables.size(0), tables.flatten()
    keys = as_rows(k_plane.index_select(0, index), B)
    values = as_rows(v_plane.index_select(0, index), B)
    position = torch.arange(keys.size(2), device=q.device)
    visible = position < lengths[:, None]  # (B, positions)
    if window is not None:
        visible &= position >= lengths[:, None] - window
    y = F.scaled_dot_product_attention(
        q[:, :, None],
        keys,
        values,
        attn_mask=visible[:, None, None, :],
        scale=scale,
        enable_gqa=q.size(1) != keys.size(1),
    )
    return y[:, :, 0]


def num_splits(batch: int, n_kv_head: int, device: torch.device) -> int:
    """Splits along the sequence: enough programs to cover the multiprocessors about twice."""
    if device.type != "cuda":
        return 4  # the interpreter (tests): a few, so that merging is exercised
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(32, (2 * sms) // max(1, batch * n_kv_head)))


def _triton_decode(q, k_plane, v_plane, tables, lengths, scale, window) -> torch.Tensor:
    kernel = _kernel()
    B, n_head, hd = q.shape
    n_kv = k_plane.size(1)
    group = n_head // n_kv
    splits = num_splits(B, n_kv, q.device)
    hd_pad = max(16, 1 << (hd - 1).bit_length())
    out = torch.empty(B, n_head, splits, hd_pad, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, n_head, splits, dtype=torch.float32, device=q.device)
    out_dtype = q.dtype
    q = q.to(k_plane.dtype).contiguous()  # a cache may store another float type than the model
    kernel[(B, n_kv, splits)](
        q,
        k_plane,
        v_plane,
        tables,
        lengths,
        out,
        lse,
        scale,
        0 if window is None else window,
        q.stride(0),
        q.stride(1),
        tables.stride(0),
        k_plane.stride(0),
        k_plane.stride(1),
        k_plane.stride(2),
        v_plane.stride(0),
        v_plane.stride(1),
        v_plane.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, 1 << (group - 1).bit_length()),
        HEAD_DIM=hd,
        HEAD_DIM_PAD=hd_pad,
        BLOCK_SIZE=k_plane.size(2),
        BLOCK_N=64,
        SPLITS=splits,
        IEEE=k_plane.dtype == torch.float32,
    )
    out = out[..., :hd]
    if splits > 1:  # merge the splits by their log-sum-exp; an empty split weighs 0
        weight = torch.exp(lse - lse.amax(dim=-1, keepdim=True))  # (B, n_head, splits)
        out = (out * weight[..., None]).sum(2) / weight.sum(-1, keepdim=True)
    else:
        out = out[:, :, 0]
    return out.to(out_dtype)


@functools.cache
def _kernel():
    """The Triton kernel, built on first use (Triton is imported only where it runs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def split_decode(
        Q,
        K,
        V,
        Tables,
        Lengths,
        Out,
        Lse,
        scale,
        window,  # a sliding window's length; 0: none
        sq_b,
        sq_h,
        st_b,
        sk_s,
        sk_h,
        sk_p,
        sv_s,
        sv_h,
        sv_p,
        so_b,
        so_h,
        so_s,
        sl_b,
        sl_h,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        HEAD_DIM_PAD: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr,
        IEEE: tl.constexpr,
    ):
        # one program: one row, one kv head (and the GROUP query heads that share it), one
        # split of the positions the row's query sees (the last ``window`` of them, or all)
        b = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(Lengths + b)
        first = tl.where(window > 0, tl.maximum(length - window, 0), 0)
        per_split = tl.cdiv(tl.cdiv(length - first, SPLITS), BLOCK_N) * BLOCK_N
        lo = first + split * per_split
        hi = tl.minimum(lo + per_split, length)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, HEAD_DIM_PAD)
        heads = kv_head * GROUP + g
        g_ok = g < GROUP
        d_ok = d < HEAD_DIM
        q = tl.load(
            Q + b * sq_b + heads[:, None] * sq_h + d[None, :],
            mask=g_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)  # softmax denominators
        acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < hi
            kv_ok = n_ok[:, None] & d_ok[None, :]
            # each position's block from the row's table, then its offset in the block
            block = tl.load(Tables + b * st_b + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
            at = n % BLOCK_SIZE
            k_rows = K + block * sk_s + kv_head * sk_h + at * sk_p
            v_rows = V + block * sv_s + kv_head * sv_h + at * sv_p
            k = tl.load(k_rows[:, None] + d[None, :], mask=kv_ok, other=0.0)
            # float32 planes: exact products (the default would round inputs to tf32)
            precision = "ieee" if IEEE else None
            s = tl.dot(q, tl.trans(k), input_precision=precision)
            s = tl.where(n_ok[None, :], s * scale, float("-inf"))  # (GROUP_PAD, BLOCK_N)
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(v_rows[:, None] + d[None, :], mask=kv_ok, other=0.0)
            pv = tl.dot(p.to(v.dtype), v, input_precision=precision)
            acc = acc * alpha[:, None] + pv
            total = total * alpha + tl.sum(p, 1)
            m = m_new
        has = total > 0  # a split past the row's length saw nothing
        out = acc / tl.where(has, total, 1.0)[:, None]
        lse = tl.where(has, m + tl.log(tl.where(has, total, 1.0)), float("-inf"))
        tl.store(
            Out + b * so_b + heads[:, None] * so_h + split * so_s + d[None, :],
            out,
            mask=g_ok[:, None],
        )
        tl.store(Lse + b * sl_b + heads * sl_h + split, lse, mask=g_ok)

    return split_decode

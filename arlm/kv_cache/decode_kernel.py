"""The Triton kernel behind ``arlm.kv_cache.decode_attention``: ``split_decode``, one program
per tile of rows (consecutive positions of one sequence, or one row), KV head and split of the
positions the tile's queries see, reading the rows' blocks through their table and decoding
quantized ones as it reads them. Split along the sequence, the last of a tile's splits to
finish weighs all their results into the output (``merge_splits``), so a step takes one
launch a layer for its attention, not two. Imported only where it runs (CUDA, or Triton's
interpreter in the tests), so arlm itself does not need Triton."""

import triton
import triton.language as tl


@triton.jit
def load_vectors(P, Scale, Low, at, aux, d, n_ok, d_ok, QUANT: tl.constexpr):
    """The vectors of BLOCK_N positions, (BLOCK_N, HEAD_DIM_PAD): from plane ``P`` where
    each starts (element offsets ``at``), as stored (floats) or decoded to float32 with
    their scales (and minimums) at offsets ``aux`` of those planes."""
    mask = n_ok[:, None] & d_ok[None, :]
    # QUANT is a compile-time constant: each kernel keeps one branch (one return, at the end)
    if QUANT == 0:
        x = tl.load(P + at[:, None] + d[None, :], mask=mask, other=0.0)
    elif QUANT == 8:
        scale = tl.load(Scale + aux, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        codes = tl.load(P + at[:, None] + d[None, :], mask=mask, other=0)
        x = codes.to(tl.float32) * scale
    else:  # int4: element 2j in the low nibble of byte j, 2j+1 in the high one
        scale = tl.load(Scale + aux, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        packed = tl.load(P + at[:, None] + (d // 2)[None, :], mask=mask, other=0)
        codes = tl.where((d % 2 == 0)[None, :], packed & 15, packed >> 4)
        low = tl.load(Low + aux, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        x = codes.to(tl.float32) * scale + low
    return x


@triton.jit
def split_decode(
    Q,
    K,
    V,
    KScale,
    KLow,
    VScale,
    VLow,
    Tables,
    Lengths,
    Tiles,
    Y,
    Out,
    Lse,
    Counters,
    scale,
    window,  # a sliding window's length; 0: none
    softcap,  # the scores' tanh cap (read where SOFTCAP)
    sq_b,
    sq_h,
    st_b,
    sk_s,
    sk_h,
    sk_p,
    sv_s,
    sv_h,
    sv_p,
    sa_s,
    sa_h,
    sa_p,
    so_b,
    so_h,
    so_s,
    sl_b,
    sl_h,
    sy_b,
    sy_h,
    stile,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    ROWS: tl.constexpr,  # rows a program takes (a tile's most)
    TILED: tl.constexpr,  # tiles from ``Tiles`` (first row, rows); else one row a program
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    MERGE_HEADS: tl.constexpr,  # query heads a row's merge takes: GROUP padded to a power of two
    CHUNK: tl.constexpr,  # splits the merge loads at once
    QUANT: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot's input_precision
    SOFTCAP: tl.constexpr,  # scores become softcap * tanh(score / softcap) (Gemma 2)
):
    # one program: one tile of rows that share a block table (consecutive positions of one
    # sequence), one kv head (and the GROUP query heads that share it), one split of the
    # positions the tile's queries see; each query sees its own row's (the last ``window``
    # of them, or all). Its ROWS x GROUP_PAD query vectors are one operand of tl.dot, so the
    # tile's rows read each key and value once between them
    t = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    j = tl.arange(0, ROWS * GROUP_PAD)  # query vector j: row j // GROUP_PAD, head j % GROUP_PAD
    g = j % GROUP_PAD
    heads = kv_head * GROUP + g
    if TILED:
        first_row = tl.load(Tiles + t * stile)
        count = tl.load(Tiles + t * stile + 1)
        row = first_row + j // GROUP_PAD
        ok = (j // GROUP_PAD < count) & (g < GROUP)
        length = tl.load(Lengths + row, mask=ok, other=0)
        seen = tl.where(window > 0, tl.maximum(length - window, 0), 0)
        # the tile's positions: from the first any of its queries sees to the last
        last = tl.max(length, 0)
        first = tl.min(tl.where(ok, seen, last), 0)
    else:  # ROWS is 1: every vector is row t's (its length one number, as the compiler sees)
        first_row = t
        row = t + 0 * j
        ok = g < GROUP
        last = tl.load(Lengths + t)
        first = tl.where(window > 0, tl.maximum(last - window, 0), 0)
    per_split = tl.cdiv(tl.cdiv(last - first, SPLITS), BLOCK_N) * BLOCK_N
    lo = first + split * per_split
    hi = tl.minimum(lo + per_split, last)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(
        Q + row[:, None] * sq_b + heads[:, None] * sq_h + d[None, :],
        mask=ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m = tl.full([ROWS * GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([ROWS * GROUP_PAD], tl.float32)  # softmax denominators
    acc = tl.zeros([ROWS * GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        # each position's block from the tile's table, then its offset in the block
        block = tl.load(Tables + first_row * st_b + n // BLOCK_SIZE, mask=n_ok, other=0)
        block = block.to(tl.int64)
        at = n % BLOCK_SIZE
        aux = block * sa_s + kv_head * sa_h + at * sa_p  # its scale's (and minimum's)
        k_at = block * sk_s + kv_head * sk_h + at * sk_p
        k = load_vectors(K, KScale, KLow, k_at, aux, d, n_ok, d_ok, QUANT).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        if SOFTCAP:  # tanh(x) as 2 * sigmoid(2x) - 1: Triton's language has no tanh
            s = softcap * (2.0 * tl.sigmoid(s * (2.0 / softcap)) - 1.0)
        if TILED:  # each query's own positions, seen <= n < length, in one unsigned compare
            reach = (length - seen).to(tl.uint32)
            visible = (n[None, :] - seen[:, None]).to(tl.uint32) < reach[:, None]
            s = tl.where(visible & n_ok[None, :], s, float("-inf"))  # (vectors, BLOCK_N)
        else:  # one row: the split's range is its positions
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # a query that has seen nothing yet (a shorter row of the tile, or a window that
        # starts later) keeps -inf: exponents from 0 there give it weights of 0, not NaN
        m_from = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_from)
        p = tl.exp(s - m_from[:, None])
        v_at = block * sv_s + kv_head * sv_h + at * sv_p
        v = load_vectors(V, VScale, VLow, v_at, aux, d, n_ok, d_ok, QUANT).to(q.dtype)
        pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        total = total * alpha + tl.sum(p, 1)
        m = m_new
    has = total > 0  # a split past the query's positions saw nothing
    out = acc / tl.where(has, total, 1.0)[:, None]
    if SPLITS == 1:  # the row's result: written as the output, nothing to merge
        tl.store(
            Y + row[:, None] * sy_b + heads[:, None] * sy_h + d[None, :],
            out.to(Y.dtype.element_ty),
            mask=ok[:, None] & d_ok[None, :],
        )
    else:
        lse = tl.where(has, m + tl.log(tl.where(has, total, 1.0)), float("-inf"))
        at = row[:, None] * so_b + heads[:, None] * so_h + split * so_s + d[None, :]
        tl.store(Out + at, out, mask=ok[:, None])
        tl.store(Lse + row * sl_b + heads * sl_h + split, lse, mask=ok)
        # the split that finishes last for this tile and KV head merges them all: every
        # thread's results stored before the count goes up (the barrier, then the count's
        # release), and read by the last only after its count (its acquire); it puts the
        # count back to 0 for the next launch, in a step and its graph replays alike
        tl.debug_barrier()
        counter = Counters + t * tl.num_programs(1) + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            tl.store(counter, 0)
            rows = tl.load(Tiles + t * stile + 1) if TILED else 1
            merge_splits(
                Out, Lse, Y, first_row, rows, kv_head, so_b, so_h, so_s, sl_b, sl_h, sy_b,
                sy_h, GROUP, MERGE_HEADS, HEAD_DIM, HEAD_DIM_PAD, SPLITS, SPLITS_PAD, CHUNK,
            )  # fmt: skip


@triton.jit
def merge_splits(
    Out,
    Lse,
    Y,
    first_row,
    rows,
    kv_head,
    so_b,
    so_h,
    so_s,
    sl_b,
    sl_h,
    sy_b,
    sy_h,
    GROUP: tl.constexpr,
    HEADS: tl.constexpr,  # GROUP padded to a power of two
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Y for ``rows`` rows from ``first_row`` on, the GROUP query heads of ``kv_head`` each:
    each split's result weighed by the softmax of their log-sum-exps (a split that saw
    nothing has -inf, weight 0; one at least saw the row's own position), CHUNK splits a
    load. Loops, not unrolled: an unrolled merge's loads were hoisted together and spilled.
    Loads skip the multiprocessor's own cache (``.cg``): other programs wrote what they read."""
    g = tl.arange(0, HEADS)
    ok = g < GROUP
    heads = kv_head * GROUP + g
    s = tl.arange(0, SPLITS_PAD)
    c = tl.arange(0, CHUNK)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = d < HEAD_DIM
    for r in range(rows):
        row = first_row + r
        lse = tl.load(
            Lse + row * sl_b + heads[:, None] * sl_h + s[None, :],
            mask=ok[:, None] & (s < SPLITS)[None, :],
            other=float("-inf"),
            cache_modifier=".cg",
        )
        top = tl.where(ok, tl.max(lse, 1), 0.0)
        total = tl.sum(tl.exp(lse - top[:, None]), 1)
        y = tl.zeros([HEADS, HEAD_DIM_PAD], tl.float32)
        for first in range(0, SPLITS, CHUNK):
            k = first + c
            k_ok = ok[:, None] & (k < SPLITS)[None, :]
            part = tl.load(
                Lse + row * sl_b + heads[:, None] * sl_h + k[None, :],
                mask=k_ok,
                other=float("-inf"),
                cache_modifier=".cg",
            )
            weight = tl.exp(part - top[:, None])  # (HEADS, CHUNK)
            at = row * so_b + heads[:, None, None] * so_h + k[None, :, None] * so_s
            out = tl.load(
                Out + at + d[None, None, :],
                mask=k_ok[:, :, None] & d_ok[None, None, :],
                other=0.0,
                cache_modifier=".cg",
            )
            y += tl.sum(out * weight[:, :, None], 1)
        y = y / tl.where(ok, total, 1.0)[:, None]
        tl.store(
            Y + row * sy_b + heads[:, None] * sy_h + d[None, :],
            y.to(Y.dtype.element_ty),
            mask=ok[:, None] & d_ok[None, :],
        )

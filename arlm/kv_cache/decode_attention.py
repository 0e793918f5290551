"""Decode attention over paged blocks: each row's one query against the positions its block
table holds.

A decode step's rows hold arbitrary blocks at arbitrary lengths. ``decode_attention`` takes
them as device tensors (``tables``, ``lengths``), so one call serves any batch without host-side
setup and can be captured in a CUDA graph. On CUDA it runs a Triton kernel that follows row b's
block table through exactly ``lengths[b]`` positions (never a gathered copy), split along the
sequence so that even one row keeps many multiprocessors busy (flash-decoding); the last split
of a row to finish merges the splits' partial results by their log-sum-exp, in the same
launch. A sliding-window layer's rows read only their window's positions, from
``lengths[b] - window`` on: the kernel's splits cover just those, so a long row of a windowed
layer costs what its window does. Elsewhere, and for the kernel's own tests,
``decode_attention_reference`` does the same with PyTorch ops.

Rows that share a block table (a prompt chunk's positions, a verify row's guesses, in a step
replayed from a CUDA graph) can be given to the kernel in tiles (``row_tiles``): one program
then holds several rows' queries, each masked to its own row's positions, and reads each key
and value once for all of them. A tile fills the 16 query vectors ``tl.dot`` takes at least
(16 rows for one query head per KV head, 4 for four), which a lone row pads with empty heads,
so a tile costs what a lone row's program does.

Blocks are read through their codec (``arlm.kv_cache.codec``): float planes as they are, int8
and int4 codes with their per-vector scales (and int4's minimums) turned back into the query's
dtype inside the kernel, so a quantized cache reads its smaller blocks and nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arlm.kv_cache.base import capped_attention
from arlm.kv_cache.codec import Codec, FloatCodec, Int4Codec, Int8Codec


def decode_attention(
    q: torch.Tensor,
    codec: Codec,
    k_planes: list[torch.Tensor],
    v_planes: list[torch.Tensor],
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    tiles: torch.Tensor | None = None,
    softcap: float | None = None,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Attention of q (B, n_head, hd), row b over positions ``0..lengths[b]-1`` of the blocks
    ``tables[b]`` (B, max blocks) of a layer's key and value planes (each (num_blocks,
    n_kv_head, block_size, width), as ``codec`` stores them) -> (B, n_head, hd); with a
    sliding ``window``, over its last ``window`` positions only; with ``softcap``, each score
    capped as ``capped_attention`` caps it. ``use_triton`` None: the kernel on CUDA, the
    reference elsewhere. Every length is >= 1.

    ``tiles`` (P, 2), from ``row_tiles``: the kernel's programs' rows, (first row, rows) each,
    rows of one tile sharing a block table (a prompt chunk's or a verify row's positions), so
    that they read each key and value once between them; every row in one tile, the tiles
    past the last (0, 0). None: a tile per row. The reference does not need them."""
    if use_triton is None:
        use_triton = q.device.type == "cuda"
    if not use_triton:
        return decode_attention_reference(
            q, codec, k_planes, v_planes, tables, lengths, scale, window, softcap
        )
    return _triton_decode(
        q, codec, k_planes, v_planes, tables, lengths, scale, window, tiles, softcap
    )


def group_pad(group: int) -> int:
    """The query heads of one KV head, padded to a power of two."""
    return 1 << (group - 1).bit_length()


def rows_per_tile(group: int) -> int:
    """Rows a kernel program takes at most, for ``group`` query heads per KV head: as many as
    fill the 16 query vectors ``tl.dot`` needs at least (16 for one head a KV head, 4 for
    four), so a tile costs a lone decode row's padded program and no more registers."""
    return max(1, 16 // group_pad(group))


def row_tiles(spans: list[int], per_tile: int, first_row: int = 0) -> list[int]:
    """The kernel's tiles for rows laid out span after span from ``first_row`` on, ``spans``
    giving each span's rows (consecutive positions of one sequence, on one block table): up
    to ``per_tile`` rows of one span a tile, as flat (first row, rows) pairs."""
    tiles, row = [], first_row
    for count in spans:
        for first in range(row, row + count, per_tile):
            tiles += (first, min(per_tile, row + count - first))
        row += count
    return tiles


def as_rows(blocks: torch.Tensor, rows: int) -> torch.Tensor:
    """Blocks gathered row after row, (rows * width, n_kv_head, block_size, hd), as each row's
    positions in order: (rows, n_kv_head, width * block_size, hd)."""
    x = blocks.view(rows, -1, *blocks.shape[1:]).transpose(1, 2)  # (rows, H, width, bs, hd)
    return x.reshape(rows, x.size(1), -1, x.size(-1))


def decode_attention_reference(
    q: torch.Tensor,
    codec: Codec,
    k_planes: list[torch.Tensor],
    v_planes: list[torch.Tensor],
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``decode_attention`` with PyTorch ops: the rows' blocks gathered whole and decoded, a
    length mask (and a window's)."""
    B, index = tables.size(0), tables.flatten()

    def gathered(planes: list[torch.Tensor]) -> torch.Tensor:
        return as_rows(codec.decode([p.index_select(0, index) for p in planes], q.dtype), B)

    keys, values = gathered(k_planes), gathered(v_planes)
    position = torch.arange(keys.size(2), device=q.device)
    visible = position < lengths[:, None]  # (B, positions)
    if window is not None:
        visible &= position >= lengths[:, None] - window
    mask = visible[:, None, None, :]
    if softcap is not None:
        return capped_attention(q[:, :, None], keys, values, mask, scale, softcap)[0][:, :, 0]
    y = F.scaled_dot_product_attention(
        q[:, :, None],
        keys,
        values,
        attn_mask=mask,
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


# how the kernel reads a codec's planes (its QUANT): floats, int8 codes with a scale, int4
# codes packed two per byte with a scale and a minimum
_QUANT = {FloatCodec: 0, Int8Codec: 8, Int4Codec: 4}


def tile(head_dim_pad: int, quant: int, element_bytes: int, tiled: bool = False) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the kernel: how many positions a program loads at once, and
    its warps, for planes of ``element_bytes`` (``quant``: ``_QUANT``'s), taking rows one a
    program or in ``tiled`` tiles. Chosen so that sm_90's compile keeps every variant in
    registers (a spill to local memory costs a decode kernel its bandwidth), as ``cuobjdump``
    counts them in ``tests/test_kernel_compile.py``, not timed: 64 positions and 4 warps
    spilled at head sizes of 128 and 256 (888 and 936 bytes of stack in bfloat16, 2-4 KB
    quantized), for int8 and int4 blocks at 64 and, under Triton 3.6, for float32 at 64;
    tiles of at most 4,096 elements over 8 warps do not. 16-bit float blocks up to 64 wide
    keep 64 positions and 4 warps for lone rows, the shape measured on an H200; in tiles,
    whose queries each carry their own length, they spilled 8-40 bytes under Triton 3.9 at
    4 warps, none at 8."""
    block_n = min(64, max(16, 4096 // head_dim_pad))
    narrow = quant == 0 and element_bytes == 2 and head_dim_pad <= 64 and not tiled
    return block_n, 4 if narrow else 8


def _triton_decode(
    q: torch.Tensor,
    codec: Codec,
    k_planes: list[torch.Tensor],
    v_planes: list[torch.Tensor],
    tables: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int | None,
    tiles: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor:
    # Triton: imported only where it runs
    from arlm.kv_cache.decode_kernel import split_decode

    quant = _QUANT[type(codec)]
    k_plane, v_plane = k_planes[0], v_planes[0]
    B, n_head, hd = q.shape
    n_kv = k_plane.size(1)
    group = n_head // n_kv
    splits = num_splits(B, n_kv, q.device)
    hd_pad = max(16, 1 << (hd - 1).bit_length())
    y = torch.empty(B, n_head, hd, dtype=q.dtype, device=q.device)
    # float blocks: products in their dtype (a cache may store another float type than the
    # model); quantized ones are decoded into the query's
    if quant == 0:
        q = q.to(k_plane.dtype)
    if q.stride(-1) != 1:  # rows and heads go by their strides; a vector must be contiguous
        q = q.contiguous()
    # a quantized codec's scales (and int4's minimums), (num_blocks, n_kv_head, block_size, 1)
    # each, all of one layout (the key's strides serve all); float blocks have none (the key
    # plane stands in, never read)
    k_aux, v_aux = k_planes[1:] or [k_plane], v_planes[1:] or [k_plane]
    k_scale, k_low, v_scale, v_low = k_aux[0], k_aux[-1], v_aux[0], v_aux[-1]
    tiled = tiles is not None
    block_n, num_warps = tile(hd_pad, quant, k_plane.element_size(), tiled)
    programs = tiles.size(0) if tiled else B
    # the splits' results and log-sum-exps, for the last split to merge; one split (many rows
    # on a GPU) writes its result as the output and needs neither
    if splits > 1:
        out = torch.empty(B, n_head, splits, hd_pad, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, n_head, splits, dtype=torch.float32, device=q.device)
        counters = split_counters(q.device, programs * n_kv)
        out_strides, lse_strides = out.stride()[:3], lse.stride()[:2]
    else:
        out = lse = counters = y  # not read
        out_strides, lse_strides = (0, 0, 0), (0, 0)
    pad = group_pad(group)
    splits_pad = max(2, 1 << (splits - 1).bit_length())
    split_decode[(programs, n_kv, splits)](
        q,
        k_plane,
        v_plane,
        k_scale,
        k_low,
        v_scale,
        v_low,
        tables,
        lengths,
        tiles if tiled else lengths,  # not read without tiles
        y,
        out,
        lse,
        counters,
        scale,
        0 if window is None else window,
        1.0 if softcap is None else softcap,
        q.stride(0),
        q.stride(1),
        tables.stride(0),
        k_plane.stride(0),
        k_plane.stride(1),
        k_plane.stride(2),
        v_plane.stride(0),
        v_plane.stride(1),
        v_plane.stride(2),
        k_scale.stride(0),
        k_scale.stride(1),
        k_scale.stride(2),
        *out_strides,
        *lse_strides,
        y.stride(0),
        y.stride(1),
        tiles.stride(0) if tiled else 0,
        GROUP=group,
        # a tile's rows fill the 16 query vectors tl.dot takes at least; a lone row pads its
        # heads to them
        GROUP_PAD=pad if tiled else max(16, pad),
        ROWS=rows_per_tile(group) if tiled else 1,
        TILED=tiled,
        HEAD_DIM=hd,
        HEAD_DIM_PAD=hd_pad,
        BLOCK_SIZE=k_plane.size(2),
        BLOCK_N=block_n,
        SPLITS=splits,
        SPLITS_PAD=splits_pad,
        MERGE_HEADS=pad,
        CHUNK=merge_chunk(pad, splits_pad, hd_pad, num_warps),
        QUANT=quant,
        # float32 queries: exact products ("tf32", the default, would round their inputs; a
        # constant, as the compiler does not fold a choice made inside the kernel)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        SOFTCAP=softcap is not None,
        num_warps=num_warps,
    )
    return y


def merge_chunk(heads: int, splits_pad: int, head_dim_pad: int, num_warps: int) -> int:
    """Splits the merge loads at once for a row's ``heads`` query heads: as many as keep
    its (heads, splits, head_dim) load to 16 float32 values a thread."""
    fits = max(1, (16 * 32 * num_warps) // (heads * head_dim_pad))
    return min(splits_pad, 1 << (fits.bit_length() - 1))


# a counter per program and KV head of a split launch, on each device: how many of its
# splits have finished. The launch that counts to the last puts it back to 0, so one zeroed
# buffer serves every launch and every replay of a captured one (launches on one device
# queue on one stream at a time, as arlm runs its forwards)
_COUNTERS: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least ``n`` zeroed int32 counters on ``device``: the same buffer each call, grown
    where it is short (on a GPU, to begin with, one per multiprocessor: splits are taken only
    where rows and KV heads fill fewer programs than that, so a graph's capture finds it made)."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < n:
        if device.type == "cuda":
            n = max(n, torch.cuda.get_device_properties(device).multi_processor_count)
        have = torch.zeros(n, dtype=torch.int32, device=device)
        _COUNTERS[device] = have
    return have

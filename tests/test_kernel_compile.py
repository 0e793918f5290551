"""arlm's Triton kernels as a GPU gets them, built on this CPU: Triton compiles it for an
H100/H200 (sm_90) through its own passes and the ptxas its wheel carries, with no GPU present.
What Triton's interpreter (``tests/test_cuda_graphs.py``) cannot show: that each variant
compiles at all, and that it keeps to registers (``cuobjdump``'s resource usage: a spill to
local memory costs a memory-bound kernel its bandwidth)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from arlm.kv_cache.decode_attention import group_pad, merge_chunk, rows_per_tile, tile


def _nvidia_backend() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton.backends

    return "nvidia" in triton.backends.backends


pytestmark = pytest.mark.skipif(not _nvidia_backend(), reason="needs triton's NVIDIA backend")

PLANES = {  # codec -> (the key/value planes' type, QUANT, bytes per element)
    "bfloat16": ("*bf16", 0, 2),
    "float32": ("*fp32", 0, 4),
    "int8": ("*i8", 8, 1),
    "int4": ("*u8", 4, 1),
}


def _compile(
    codec: str,
    head_dim: int,
    query: str = "*bf16",
    group: int | None = None,
    splits: int = 8,
    softcap: bool = False,
):
    """The kernel compiled for sm_90, as ``decode_attention`` launches it for ``codec`` blocks
    of ``head_dim`` (blocks of 16 positions): taking its rows one a program (4 query heads per
    KV head), or, with ``group`` query heads per KV head, from a graph step's tiles; over
    ``splits`` splits (one writes the output, more float32 results that the last merges);
    capping the scores (``softcap``: Gemma 2) or not."""
    tiled = group is not None
    group = group or 4
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from arlm.kv_cache.decode_kernel import split_decode

    plane, quant, element_bytes = PLANES[codec]
    block_n, num_warps = tile(head_dim, quant, element_bytes, tiled)
    pad = group_pad(group)
    splits_pad = max(2, 1 << (splits - 1).bit_length())
    constants = dict(GROUP=group, GROUP_PAD=pad if tiled else max(16, pad),
                     ROWS=rows_per_tile(group) if tiled else 1, TILED=tiled,
                     HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim, BLOCK_SIZE=16,
                     BLOCK_N=block_n, SPLITS=splits, SPLITS_PAD=splits_pad, MERGE_HEADS=pad,
                     CHUNK=merge_chunk(pad, splits_pad, head_dim, num_warps), QUANT=quant,
                     PRECISION="ieee" if query == "*fp32" else "tf32",
                     SOFTCAP=softcap)  # fmt: skip
    aux = "*fp16" if quant else plane  # the scale (and minimum) planes
    types = dict(Q=query, K=plane, V=plane, KScale=aux, KLow=aux, VScale=aux, VLow=aux,
                 Tables="*i64", Lengths="*i64", Tiles="*i64", Y=query, Out="*fp32",
                 Lse="*fp32", Counters="*i32", scale="fp32", window="i32",
                 softcap="fp32")  # fmt: skip
    signature = {
        name: types.get(name, "constexpr" if name in constants else "i64")  # strides: i64
        for name in split_decode.arg_names
    }
    source = ASTSource(fn=split_decode, signature=signature, constexprs=constants)
    return triton_compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
    )


def _compile_norm(n: int, dtype: str, plus_one: bool, residual: bool):
    """RMSNorm's kernel compiled for sm_90 as ``arlm.model.kernels.rms_norm`` launches it
    for rows of ``n`` features of ``dtype``, after the ``residual`` add or not."""
    import triton
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from arlm.model.kernels import _rms_norm_rows, num_warps

    block = triton.next_power_of_2(n)
    constants = dict(PLUS_ONE=plus_one, RESIDUAL=residual, BLOCK=block)
    types = dict(X=dtype, R=dtype, S=dtype, W=dtype, Y=dtype, n="i32", eps="fp32")
    signature = {
        name: types.get(name, "constexpr" if name in constants else "i64")
        for name in _rms_norm_rows.arg_names
    }
    source = ASTSource(fn=_rms_norm_rows, signature=signature, constexprs=constants)
    return triton_compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps(block)}
    )


def _compile_rope(head_dim: int, rotary: int, heads: int, dtype: str, norm: int, store: bool):
    """The rotary embedding's kernel compiled for sm_90 as ``arlm.model.kernels.apply_rope``
    launches it for ``heads`` heads of ``head_dim`` (``rotary`` of them turning), normalising
    each head first (``norm`` 1: Qwen3's gain, 2: Gemma's) or not (0), writing the keys and
    values into a cache's planes of the same dtype too (``store``) or not."""
    import triton
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from arlm.model.kernels import _rope_rows, rope_heads

    pad = triton.next_power_of_2(head_dim)
    constants = dict(ROTARY=rotary, HEAD_DIM=head_dim, HEAD_DIM_PAD=pad,
                     HEADS=rope_heads(heads, pad, norm > 0), NORM=norm, STORE=store)  # fmt: skip
    types = dict(X=dtype, Cos=dtype, Sin=dtype, Y=dtype, QGain=dtype, KGain=dtype, V=dtype,
                 KPlane=dtype, VPlane=dtype, Cells="*i64", T="i32", H="i32", N_Q="i32",
                 head_stride="i32", eps="fp32")  # fmt: skip
    signature = {name: types.get(name, "constexpr" if name in constants else "i64")
                 for name in _rope_rows.arg_names}  # fmt: skip
    source = ASTSource(fn=_rope_rows, signature=signature, constexprs=constants)
    options = {"num_warps": 4, "enable_fp_fusion": False}
    return triton_compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _compile_swiglu(dtype: str):
    """SwiGLU's activation kernel compiled for sm_90 as ``arlm.model.kernels.silu_and_mul``
    launches it for rows of 1,024 hidden units or more."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from arlm.model.kernels import _silu_and_mul_rows

    types = dict(H=dtype, Y=dtype, n="i32")
    signature = {name: types.get(name, "constexpr" if name == "BLOCK" else "i64")
                 for name in _silu_and_mul_rows.arg_names}  # fmt: skip
    source = ASTSource(fn=_silu_and_mul_rows, signature=signature, constexprs={"BLOCK": 1024})
    return triton_compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def _compile_store(heads: int, head_dim: int, dtype: str, plane: str):
    """The KV store's kernel compiled for sm_90 as ``arlm.kv_cache.store_kernel.store_rows``
    launches it for ``heads`` KV heads of ``head_dim``, ``dtype`` vectors into ``plane``s."""
    import triton
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from arlm.kv_cache.store_kernel import _store_rows

    constants = dict(HEADS_PAD=triton.next_power_of_2(heads), HEAD_DIM=head_dim,
                     HEAD_DIM_PAD=triton.next_power_of_2(head_dim))  # fmt: skip
    types = dict(K=dtype, V=dtype, KPlane=plane, VPlane=plane, Cells="*i64", H="i32",
                 head_stride="i32")  # fmt: skip
    signature = {name: types.get(name, "constexpr" if name in constants else "i64")
                 for name in _store_rows.arg_names}  # fmt: skip
    source = ASTSource(fn=_store_rows, signature=signature, constexprs=constants)
    return triton_compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})


def _stack_line(tmp_path: Path, compiled) -> str:
    """``cuobjdump``'s resource line for a compiled kernel (skips where the wheel has none)."""
    import triton

    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip("this triton wheel carries no cuobjdump")
    usage = subprocess.run(
        [str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True
    ).stdout
    (line,) = [x for x in usage.splitlines() if "REG:" in x]
    return line


@pytest.mark.parametrize("tiles_of", [None, 1, 4])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("codec", ["bfloat16", "float32", "int8", "int4"])
def test_every_variant_compiles_and_keeps_to_registers(tmp_path: Path, codec, head_dim, tiles_of):
    """Head sizes of GPT-2 and Llama-3.2-1B (64), of most 7-8B models (128) and of Gemma 3
    (256), over float, int8 and int4 blocks, rows one a program (eager decode) or in a graph
    step's tiles for ``tiles_of`` query heads per KV head (16 rows a tile for GPT-2's one, 4
    for Llama's four): no stack (spilled registers) in the cubin. float32
    queries take ``input_precision="ieee"``, passed in as a constant: chosen inside the
    kernel, Triton 3.9 did not fold the choice and failed to compile that variant."""
    query = "*fp32" if codec == "float32" else "*bf16"
    line = _stack_line(tmp_path, _compile(codec, head_dim, query, tiles_of))
    assert " STACK:0 " in line, line


@pytest.mark.parametrize("tiles_of", [None, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_one_split_writing_the_query_s_dtype_keeps_to_registers(tmp_path, head_dim, tiles_of):
    """Many rows on a GPU take one split, whose result the kernel writes in bfloat16."""
    line = _stack_line(tmp_path, _compile("bfloat16", head_dim, "*bf16", tiles_of, splits=1))
    assert " STACK:0 " in line, line


@pytest.mark.parametrize("tiles_of", [None, 1, 4])
@pytest.mark.parametrize("splits", [2, 5, 32])
def test_the_merge_of_the_splits_keeps_to_registers(tmp_path: Path, splits, tiles_of):
    """The last split's merge inside the kernel, at the fewest splits, a count that is not a
    power of two and the most ``num_splits`` picks, at a head size of 256 (the widest loads
    of the splits' results, in the most chunks), lone rows and tiles."""
    line = _stack_line(tmp_path, _compile("bfloat16", 256, "*bf16", tiles_of, splits=splits))
    assert " STACK:0 " in line, line


@pytest.mark.parametrize(
    "codec,head_dim,tiles_of",
    [("bfloat16", 256, None), ("bfloat16", 256, 2), ("int8", 256, None), ("bfloat16", 128, 2)],
)
def test_the_capped_variants_compile_and_keep_to_registers(tmp_path, codec, head_dim, tiles_of):
    """Gemma 2's cap on the scores (a sigmoid a score more) at its head sizes (256 for 2B and
    9B, 128 for 27B) and its two query heads per KV head in a graph step's tiles."""
    line = _stack_line(tmp_path, _compile(codec, head_dim, "*bf16", tiles_of, softcap=True))
    assert " STACK:0 " in line, line


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize(
    "n,dtype,plus_one",
    [(2048, "*bf16", False), (1152, "*bf16", True), (8192, "*bf16", False), (4096, "*fp32", True)],
)
def test_the_rms_norm_kernel_compiles_and_keeps_to_registers(
    tmp_path: Path, n, dtype, plus_one, residual
):
    """RMSNorm's kernel at Llama-3.2-1B's width, Gemma 3 1B's (not a power of two), a 70B
    model's and in float32, alone and after the residual add: a row a program, no stack."""
    line = _stack_line(tmp_path, _compile_norm(n, dtype, plus_one, residual))
    assert " STACK:0 " in line, line


@pytest.mark.parametrize(
    "head_dim,rotary,heads,dtype",
    [
        (64, 64, 40, "*bf16"),
        (80, 32, 48, "*bf16"),
        (128, 128, 40, "*fp32"),
        (256, 256, 12, "*bf16"),
    ],
)
@pytest.mark.parametrize("norm,store", [(0, False), (0, True), (1, True), (2, False)])
def test_the_rotary_kernel_compiles_and_keeps_to_registers(
    tmp_path: Path, head_dim, rotary, heads, dtype, norm, store
):
    """The rotary embedding's kernel at Llama-3.2-1B's q and k heads (32 + 8 of 64), Phi-2's
    partial rotary, a 7-8B model's heads in float32 and Gemma's head size; alone, storing the
    keys and values, after Qwen3's head norms and storing, after Gemma's: no stack."""
    line = _stack_line(tmp_path, _compile_rope(head_dim, rotary, heads, dtype, norm, store))
    assert " STACK:0 " in line, line


@pytest.mark.parametrize("dtype", ["*bf16", "*fp32"])
def test_the_swiglu_kernel_compiles_and_keeps_to_registers(tmp_path: Path, dtype):
    line = _stack_line(tmp_path, _compile_swiglu(dtype))
    assert " STACK:0 " in line, line


@pytest.mark.parametrize(
    "heads,head_dim,dtype,plane",
    [(8, 64, "*bf16", "*bf16"), (8, 128, "*fp32", "*bf16"), (16, 256, "*bf16", "*bf16")],
)
def test_the_kv_store_kernel_compiles_and_keeps_to_registers(
    tmp_path: Path, heads, head_dim, dtype, plane
):
    """The KV store at Llama-3.2-1B's 8 KV heads, float32 vectors into bfloat16 blocks, and
    16 heads of Gemma's size: no stack."""
    line = _stack_line(tmp_path, _compile_store(heads, head_dim, dtype, plane))
    assert " STACK:0 " in line, line

"""The interface every cache kind offers attention, and the helpers the kinds share."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right

from arlm.kv_cache.codec import Codec

# rotate(x, positions): x (B, n_kv_head, N, head_dim) turned by the rotary angle of each of the
# N positions (N,); the model provides it, so a cache can move keys without knowing RoPE's math
Rotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# What attention's queries may see: True where a query may look (T, S), a lower-right causal
# bias (the T queries are the last T of the S keys, each seeing the keys up to its own), or
# None for plain causal alignment
Mask = torch.Tensor | CausalBias | None


@dataclass
class StoreTarget:
    """Where a forward's new keys and values go in one layer's float planes, (num_blocks,
    n_kv_head, block_size, head_dim) each, seen as rows of head_dim: token t's KV head h at row
    ``cells[t] + h * block_size`` (``PagedKVCache.write_cells``). A caller that
    writes them there itself (the rotary kernel, as it turns the keys) tells ``attend``
    so (``stored=True``), and the cache does not write them again."""

    k_plane: torch.Tensor
    v_plane: torch.Tensor
    cells: torch.Tensor


class Cache(Protocol):
    """What the model calls, and what users read for accounting. All byte and token counts are
    totals over every sequence the cache holds."""

    def prepare(self, start_pos: int, T: int, rotate: Rotate | None = None) -> None: ...

    # where the layer's new keys and values may be written by the caller; None: by the cache
    def store_target(self, layer: int) -> StoreTarget | None: ...

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,  # None: 1/sqrt(head_dim)
        stored: bool = False,  # k and v written where ``store_target`` said
        softcap: float | None = None,  # the scores' tanh cap (``capped_attention``); None: none
    ) -> torch.Tensor: ...

    @property
    def nbytes(self) -> int: ...  # bytes of the tensors the cache allocated

    @property
    def used_bytes(self) -> int: ...  # of those, the bytes holding positions now

    @property
    def bytes_per_token(self) -> int: ...  # one position of one sequence in every layer, k and v

    @property
    def tokens(self) -> int: ...  # positions held now (by the layers that hold the most)

    @property
    def capacity(self) -> int: ...  # positions the allocated tensors can hold (likewise)

    # per layer: a sliding-window layer holds at most its window (``layer_lengths``)
    def layer_tokens(self, layer: int) -> int: ...  # positions ``layer`` holds now

    def layer_capacity(self, layer: int) -> int: ...  # positions ``layer``'s tensors can hold


def sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask,
    scale: float | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of q (B, n_head, T, hd) over k, v (B, n_kv_head, S, hd) where ``mask`` lets
    them look (``Mask``); ``scale`` multiplies the scores (None: 1/sqrt(hd)); ``softcap`` caps
    them (``capped_attention``)."""
    T, S = q.size(2), k.size(2)
    if softcap is not None:
        return capped_attention(q, k, v, mask, scale, softcap)[0]
    # on CUDA, not cuDNN's kernel: it builds a plan for every new shape (3.7 ms of host time a
    # call, measured on an H200), and a cache's shapes change with every step
    with sdpa_kernel(_CUDA_BACKENDS) if q.is_cuda else nullcontext():
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            # without a mask, T > 1 queries line up with the last T keys only when S == T
            is_causal=mask is None and T > 1 and T == S,
            scale=scale,
            enable_gqa=q.size(1) != k.size(1),
        )


_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# float32 scores capped attention forms at once outside training (128 MiB): longer prompt
# chunks go through in slices of their queries, each query's result the same
CAPPED_SCORES = 1 << 25


def capped_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask,
    scale: float | None,
    softcap: float,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sdpa`` with Gemma 2's cap on the scores: each (after ``scale``) becomes ``softcap *
    tanh(score / softcap)`` before the softmax. PyTorch's fused kernels have no such step, so
    the scores are formed whole, in the inputs' dtype, and the softmax taken in float32, as the
    reference implementation does (outside training, ``CAPPED_SCORES`` at a time); also each
    query's log-sum-exp (B, n_head, T) in float32, for callers that merge results over parts
    of the keys. A query that sees no key gets zeros and a log-sum-exp of -inf. The query heads
    that share a KV head are one batch of queries to it (no copy of the keys and values per
    head)."""
    B, H, T, hd = q.shape
    S = k.size(2)
    scale = hd**-0.5 if scale is None else scale
    if isinstance(mask, CausalBias):  # lower-right: the T queries are the last T of S keys
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    elif mask is None and T > 1 and T == S:  # plain causal alignment, as ``sdpa`` reads None
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None and mask.dim() == 4:  # (b, 1, T, S): every head's, over (b, 1, 1, T, S)
        mask = mask[:, :, None]
    rows = max(1, CAPPED_SCORES // (B * H * S))
    if rows >= T or torch.is_grad_enabled():
        return _capped(q, k, v, mask, scale, softcap, dropout_p)
    parts = []
    for i in range(0, T, rows):  # a mask with a row per query is sliced with them
        part = mask[..., i : i + rows, :] if mask is not None and mask.size(-2) == T else mask
        parts.append(_capped(q[:, :, i : i + rows], k, v, part, scale, softcap, dropout_p))
    return torch.cat([y for y, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2)


def _capped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``capped_attention`` of all of q at once, ``mask`` over (B, n_kv_head, group, T, S)."""
    B, H, T, hd = q.shape
    Hkv, S = k.size(1), k.size(2)
    G = H // Hkv
    queries = q.reshape(B, Hkv, G * T, hd)  # head h = kv * G + g, as enable_gqa pairs them
    scores = torch.matmul(queries, k.transpose(-1, -2)).view(B, Hkv, G, T, S)
    # rounded op by op as the reference rounds them (in bfloat16, a fused factor differs)
    scores = torch.tanh(scores * scale / softcap) * softcap
    scores = scores.float()
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:  # additive
        scores = scores + mask
    top = scores.amax(dim=-1, keepdim=True)
    top = top.masked_fill(top == float("-inf"), 0.0)  # a query that sees nothing: weights 0
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    lse = (top + total.log()).view(B, H, T)
    weights = weights / total.clamp_min(torch.finfo(torch.float32).tiny)
    if dropout_p:
        weights = F.dropout(weights, dropout_p)
    out = torch.matmul(weights.to(v.dtype).view(B, Hkv, G * T, S), v)
    return out.view(B, H, T, hd), lse


class DenseCache:
    """A cache that hands attention every key and value its queries see, in one tensor per
    layer: ``_prepare`` makes room and returns each layer's mask, ``update`` stores and returns
    k, v."""

    _masks: list[Mask]

    def prepare(self, start_pos: int, T: int, rotate: Rotate | None = None) -> None:
        self._masks = self._prepare(start_pos, T, rotate)

    def store_target(self, layer: int) -> None:
        """None: ``update`` stores (and returns what attention reads)."""
        return None

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float | None = None,
        stored: bool = False,
        softcap: float | None = None,
    ) -> torch.Tensor:
        k, v = self.update(layer, k, v)
        return sdpa(q, k, v, self._masks[layer], scale, softcap)


def alloc_planes(
    codec: Codec,
    n_layer: int,
    lead: tuple[int, ...],
    head_dim: int,
    device: torch.device | str,
) -> list[list[torch.Tensor]]:
    """Per layer, the zeroed planes of ``codec`` with leading shape ``lead``."""
    return [
        [torch.zeros(*lead, p.width, dtype=p.dtype, device=device) for p in codec.planes(head_dim)]
        for _ in range(n_layer)
    ]


def planes_nbytes(*layers: list[list[torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for planes in layers for ps in planes for t in ps)


def causal_mask(start_pos: int, T: int, device: torch.device) -> Mask:
    """The mask for T queries at ``start_pos..`` over keys ``0..start_pos+T-1``; ``None`` where
    plain causal alignment is right (one query sees every key; a prefill from 0 has S == T). On
    CUDA a lower-right causal bias: FlashAttention applies it itself, where a dense mask would
    rule FlashAttention out for a kernel that reads the mask. On a CPU the dense mask: PyTorch
    makes the bias dense there anyway (in as much time, measured at 64-512 queries)."""
    if T == 1 or start_pos == 0:
        return None
    if device.type == "cuda":
        return causal_lower_right(T, start_pos + T)
    keys = torch.arange(start_pos + T, device=device)
    queries = torch.arange(start_pos, start_pos + T, device=device)
    return keys[None, :] <= queries[:, None]  # (T, start_pos + T)


def window_mask(
    start_pos: int, T: int, window: int | None, device: torch.device
) -> tuple[int, Mask]:
    """(first key, mask) for T queries at ``start_pos..`` over keys ``first..start_pos+T-1``
    when each query sees only the keys less than ``window`` positions before it (sliding-window
    attention); ``window`` None sees every earlier key. Keys before ``first`` are out of every
    query's window, so attention need not read them; ``None`` is plain causal alignment."""
    if window is None or start_pos + T <= window:  # the window cuts nothing
        return 0, causal_mask(start_pos, T, device)
    first = max(0, start_pos - window + 1)
    if T == 1:
        return first, None
    keys = torch.arange(first, start_pos + T, device=device)
    queries = torch.arange(start_pos, start_pos + T, device=device)[:, None]
    return first, (keys <= queries) & (keys > queries - window)  # (T, start_pos + T - first)


def layer_views(
    windows: list[int | None], start_pos: int, T: int, device: torch.device
) -> list[tuple[int, Mask]]:
    """``window_mask`` for each layer's window, computed once per distinct window."""
    views = {w: window_mask(start_pos, T, w, device) for w in set(windows)}
    return [views[w] for w in windows]


def layer_lengths(windows: list[int | None], max_len: int) -> list[int]:
    """Positions each layer stores per sequence of up to ``max_len``: all of them, or, for a
    sliding-window layer whose window W is shorter, W in a ring (position p at offset p % W).
    A query sees only the last W positions, so the ring holds everything it reads."""
    return [w if w is not None and w < max_len else max_len for w in windows]


def rings_hold(
    lengths: list[int], max_len: int, held: int, start: int, end: int, resume: int
) -> bool:
    """Whether a sequence stored in layers of ``lengths`` positions (``layer_lengths``) that
    has written positions ``0..held-1`` in order still holds, in every layer, the positions of
    ``start..end-1`` that going on from position ``resume`` reads. A layer of ``max_len`` holds
    them all; a ring of W holds only positions ``held-W..held-1``, and going on from ``resume``
    needs ``resume-W..resume-1`` of it: the window of the query at ``resume``, and the ring full
    behind it, as after any write (so it can be rewound or copied from again)."""
    for span in set(lengths):
        lo = max(start, resume - span)
        if span < max_len and lo < end and (end > held or lo < held - span):
            return False
    return True


@dataclass(frozen=True)
class RingChunk:
    """Where a forward of positions ``start..end-1`` reads and writes a ring of ``span``
    positions that holds the positions before ``start``: its queries see keys ``first..end-1``,
    the old ones at offsets ``held``; of the new ones, the last ``span`` stay (``keep``, indices
    0..T-1) at offsets ``dst``. Reading the old keys before writing lets a chunk of any length
    attend to its whole window through a ring of just the window."""

    held: torch.Tensor
    keep: torch.Tensor
    dst: torch.Tensor

    @classmethod
    def make(cls, first: int, start: int, end: int, span: int, device: torch.device) -> RingChunk:
        long = dict(dtype=torch.long, device=device)
        keep = torch.arange(max(start, end - span), end, **long)
        held = torch.arange(first, start, **long) % span
        return cls(held, keep - start, keep % span)

    def update(
        self, codec: Codec, planes: list[torch.Tensor], x: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Store the new vectors ``x`` (B, n_kv_head, T, hd) in the ring ``planes`` (B,
        n_kv_head, span, width); the keys (or values) ``first..end-1`` the queries see, as they
        read back (quantized like the stored ones)."""
        parts = [part.to(p.dtype) for part, p in zip(codec.encode(x), planes, strict=True)]
        old = codec.decode([p.index_select(2, self.held) for p in planes], dtype)
        new = codec.decode(parts, dtype)
        for plane, part in zip(planes, parts, strict=True):
            plane.index_copy_(2, self.dst, part.index_select(2, self.keep))
        return torch.cat((old, new), dim=2)


def layer_masks(
    windows: list[int | None], start_pos: int, T: int, device: torch.device
) -> list[Mask]:
    """Each layer's mask for T queries over the same T keys (teacher forcing: no cache)."""
    return [mask for _, mask in layer_views(windows, start_pos, T, device)]


def require_int_position(start_pos: int | torch.Tensor, kind: str) -> int:
    if isinstance(start_pos, torch.Tensor):
        raise ValueError(
            f"the {kind} cache moves all rows together, so start_pos must be one int; "
            "rows at their own positions run through the engine (arlm.engine)"
        )
    return start_pos


def storage_bytes(obj: object) -> int:
    """Bytes of every distinct tensor storage reachable from a cache object's public attributes.

    An independent count of what a cache really allocated, to check its ``nbytes`` against;
    private attributes hold the current forward's indices, not what the cache stores. Each
    object is walked once (a part may point back at its cache).
    """
    seen, walked, total, stack = set(), set(), 0, [obj]
    while stack:
        x = stack.pop()
        if id(x) in walked:
            continue
        walked.add(id(x))
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(x, list | tuple):
            stack.extend(x)
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif type(x).__module__.startswith("arlm.kv_cache"):
            stack.extend(v for k, v in vars(x).items() if not k.startswith("_"))
    return total

"""A decoder-only transformer with causally masked attention, in GPT-2, Llama and Gemma layouts,
each block's MLP dense or a sparse mixture of experts.

``forward(idx, targets)`` is teacher forcing: one parallel pass over a whole sequence, the loss
against the same sequence shifted by one. ``forward(idx, kv_cache=..., start_pos=...)`` is the
inference path: the new positions attend to themselves and to what the cache already holds.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from arlm.config import ModelConfig
from arlm.devices import fused_inference
from arlm.kv_cache import Cache
from arlm.kv_cache.base import Mask, capped_attention, layer_masks
from arlm.model.loss import linear_cross_entropy
from arlm.model.quantize import quantized_linear


class RMSNorm(nn.Module):
    """RMSNorm with a gain of ``weight`` (Llama), or of ``1 + weight`` (``plus_one``: Gemma)."""

    def __init__(self, dim: int, eps: float, plus_one: bool = False) -> None:
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_inference(x):  # the same numbers in one kernel where the ops below are four
            from arlm.model.kernels import rms_norm

            return rms_norm(x, self.weight, self.eps, self.plus_one)[0]
        # normalise in float32 so bfloat16 weights give the reference implementation's numbers
        h = F.rms_norm(x.float(), (x.size(-1),), eps=self.eps)
        if self.plus_one:  # Gemma applies its gain in float32 too, and rounds once at the end
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def add_and_norm(
    norm: nn.Module, x: torch.Tensor, h: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream ``x + h`` (``x`` where ``h`` is None) and ``norm`` of it: for an
    RMSNorm in inference on a GPU one kernel, where the add and the norm are two."""
    if h is None:
        return x, norm(x)
    if isinstance(norm, RMSNorm) and fused_inference(x) and h.dtype == x.dtype:
        from arlm.model.kernels import rms_norm

        normed, x = rms_norm(h, norm.weight, norm.eps, norm.plus_one, residual=x)
        return x, normed
    x = x + h
    return x, norm(x)


def make_norm(config: ModelConfig, dim: int | None = None) -> nn.Module:
    """The config's norm over ``dim`` features (None: n_embd)."""
    dim = config.n_embd if dim is None else dim
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps, bias=config.bias)
    return RMSNorm(dim, config.norm_eps, plus_one=config.norm == "rmsnorm_plus_one")


def make_linear(config: ModelConfig, in_features: int, out_features: int, bias: bool) -> nn.Module:
    """A float linear layer, or an empty quantized one when the config says the weights are."""
    if config.quantization is None:
        return nn.Linear(in_features, out_features, bias=bias)
    return quantized_linear(
        in_features, out_features, bias, config.quantization, config.quant_group_size
    )


def make_embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding table; built on the meta device (for a checkpoint to fill), one that skips
    nn.Embedding's own init, whose normal_ costs seconds there the first time (it imports
    PyTorch's Python decompositions) and has no values to draw anyway."""
    if torch.empty(0).is_meta:  # inside `with torch.device("meta")`
        return nn.Embedding.from_pretrained(torch.empty(num, dim), freeze=False)
    return nn.Embedding(num, dim)


def rope_frequencies(
    config: ModelConfig, *, local: bool = False, long: bool = False
) -> torch.Tensor:
    """Inverse frequencies (rotary_dim/2,) of the full-attention layers, with the config's RoPE
    scaling; ``local``: of the sliding-window layers (their own theta, unscaled, where the config
    sets ``rope_local_theta``); ``long``: LongRoPE's long factors instead of its short ones."""
    if local and config.rope_local_theta is not None:
        theta, scaling = config.rope_local_theta, {}
    else:
        theta, scaling = config.rope_theta, config.rope_scaling or {}
    dim = config.rotary_dim
    # float32 throughout, as the reference implementation computes it
    arange = torch.arange(0, dim, 2, device="cpu").float()  # cpu even under a meta-device init
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "longrope":  # each frequency slowed by its own factor
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], device="cpu")
        factors = factors.float()
        return 1.0 / (factors * theta ** (arange / dim))
    inv_freq = 1.0 / (theta ** (arange / dim))
    if kind == "linear":  # every frequency slowed alike: positions stretched by `factor`
        inv_freq = inv_freq / scaling["factor"]
    if kind == "llama3":
        # long wavelengths are slowed by `factor`, short ones kept, the band between blended
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        in_band = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(in_band, blended, inv_freq)
    return inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, n_head, T, head_dim); cos, sin: (..., T, rotary_dim). The first rotary_dim channels
    # turn, the rest pass (partial rotary); the two halves of those are the pairs (HF layout)
    if fused_inference(x) and cos.dtype == sin.dtype == x.dtype:
        from arlm.model.kernels import apply_rope as rope_kernel

        return rope_kernel(x, cos, sin)  # one kernel where the ops below are five
    rotary_dim = cos.size(-1)
    if rotary_dim < x.size(-1):
        turned = apply_rope(x[..., :rotary_dim], cos, sin)
        return torch.cat((turned, x[..., rotary_dim:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = (
            config.n_head,
            config.n_kv_head,
            config.head_dim,
        )
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        # one fused projection: a single pass over the input for q, k and v
        self.c_attn = make_linear(config, config.n_embd, qkv_dim, config.qkv_bias)
        attn_dim = config.n_head * config.head_dim  # n_embd, unless the config sets head_dim
        self.c_proj = make_linear(config, attn_dim, config.n_embd, config.bias)
        # Qwen3 and Gemma 3 normalise each head's queries and keys (one gain per channel, shared
        # by the heads)
        self.q_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, config.head_dim) if config.qk_norm else None
        # a scale other than 1/sqrt(head_dim) (Gemma's query_pre_attn_scalar), or None
        self.scale = config.attn_scale
        self.softcap = config.attn_softcap  # Gemma 2's tanh cap on the scores, or None
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: Cache | None,
        mask: Mask,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        heads = self.n_head + 2 * self.n_kv_head  # q heads, then k heads, then v heads
        qkv = self.c_attn(x).view(B, T, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, hd)
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=1)
        qk, stored = self._queries_and_keys(qk, v, rope, kv_cache)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
        if kv_cache is not None:  # the cache applies the layer's window itself
            # (B, n_head, T, hd)
            y = kv_cache.attend(self.layer_idx, q, k, v, self.scale, stored, self.softcap)
        else:  # teacher forcing: the whole sequence, causally masked (and windowed, by mask)
            y = self._attention(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.c_proj(y)

    def _queries_and_keys(
        self,
        qk: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv_cache: Cache | None,
    ) -> tuple[torch.Tensor, bool]:
        """The queries and keys (B, n_head + n_kv_head, T, hd) as attention takes them: each
        head normalised (Qwen3, Gemma 3), then turned by the rotary angles, q and k by the same
        angles in one pass; and whether the keys and values were stored. For inference on a
        GPU one kernel does all of it, and writes the keys and values into the cache's float
        blocks too where the cache takes them so: one launch a layer where the norms, their
        concatenation, the rotation and the store were up to five."""
        norm = self.q_norm
        fused = (
            rope is not None
            and fused_inference(qk)
            and rope[0].dtype == rope[1].dtype == qk.dtype
            and (norm is None or isinstance(norm, RMSNorm) and norm.weight.dtype == qk.dtype)
        )
        if not fused:
            if norm is not None:
                q, k = qk.split([self.n_head, self.n_kv_head], dim=1)
                qk = torch.cat((norm(q), self.k_norm(k)), dim=1)
            return (qk if rope is None else apply_rope(qk, *rope)), False
        from arlm.model.kernels import apply_rope as rope_kernel

        gains = None if norm is None else (norm.weight, self.k_norm.weight, norm.eps, norm.plus_one)
        target = kv_cache.store_target(self.layer_idx) if kv_cache is not None else None
        store = None if target is None else (v, target)
        return rope_kernel(qk, *rope, self.n_head, gains, store), store is not None

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask
    ) -> torch.Tensor:
        """Causal (or masked) attention of the whole sequence: (B, n_head, T, head_dim)."""
        if self.softcap is not None:  # no fused kernel caps the scores
            dropout = self.dropout if self.training else 0.0
            return capped_attention(q, k, v, mask, self.scale, self.softcap, dropout)[0]
        out_dtype = None
        if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # PyTorch's CPU flash-attention backward is several times slower in bfloat16 than
            # in float32 (a 4 x 128 model's training step spends 40% of its time there), so
            # under CPU autocast attention runs in float32; the projections stay in bfloat16
            out_dtype = torch.get_autocast_dtype("cpu")
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if out_dtype is not None else nullcontext():
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and q.size(2) > 1,
                dropout_p=self.dropout if self.training else 0.0,
                scale=self.scale,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        return y if out_dtype is None else y.to(out_dtype)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, hidden: int | None = None) -> None:
        """``hidden`` units (default: the config's ``intermediate_size``)."""
        super().__init__()
        self.kind = config.mlp
        hidden = hidden or config.intermediate_size
        # a gated MLP's gate and up projections are fused into one matrix of 2*hidden rows
        gated = self.kind != "gelu"
        self.c_fc = make_linear(config, config.n_embd, 2 * hidden if gated else hidden, config.bias)
        self.c_proj = make_linear(config, hidden, config.n_embd, config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activate(self.c_fc(x)))

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        """The hidden units from ``c_fc``'s output: GELU, or the gate's SiLU / GELU times up."""
        if self.kind == "gelu":
            return F.gelu(h, approximate="tanh")
        if self.kind == "swiglu" and fused_inference(h):  # one kernel where the ops are two
            from arlm.model.kernels import silu_and_mul

            return silu_and_mul(h)
        gate, up = h.chunk(2, dim=-1)
        gate = F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate="tanh")
        return gate * up


class Router(nn.Linear):
    """Each token's score for every expert: a float (n_experts, n_embd) matrix, which weight
    quantization leaves alone (a rounded router picks other experts)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config.n_embd, config.n_experts, bias=False)


class MoE(nn.Module):
    """A sparse mixture of experts (Mixtral, Qwen3-MoE, Qwen2-MoE): the router's softmax picks
    each token's ``n_experts_per_tok`` most probable experts, MLPs of the config's kind, and the
    token's output is their outputs weighted by those probabilities (rescaled to sum to 1 with
    ``norm_topk_prob``), plus, with ``shared_expert_size``, a shared expert's output scaled by
    a sigmoid gate."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.renormalize = config.n_experts_per_tok, config.norm_topk_prob
        self.round_weights = config.round_router_weights
        self.router = Router(config)
        self.experts = nn.ModuleList(MLP(config) for _ in range(config.n_experts))
        # the experts' weights as one (gate and up, down) pair of stacked tensors, once
        # stack_experts has made them so
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None
        self.shared_expert = self.shared_gate = None
        if config.shared_expert_size is not None:
            self.shared_expert = MLP(config, config.shared_expert_size)
            self.shared_gate = nn.Linear(config.n_embd, 1, bias=False)

    def forward(self, x: torch.Tensor, router_logits: list | None = None) -> torch.Tensor:
        """``router_logits``: a list to append this layer's (tokens, n_experts) scores to, for
        the load-balancing loss."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        out = self._routed(x, router_logits)
        if self.shared_expert is not None:  # rounded as transformers' Qwen2-MoE rounds it
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared_expert(x)
        return out.view(shape)

    def _routed(self, x: torch.Tensor, router_logits: list | None) -> torch.Tensor:
        """The routed experts' weighted sum for tokens ``x`` (tokens, n_embd)."""
        logits = self.router(x)
        if router_logits is not None:
            router_logits.append(logits)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (tokens, k), most probable first
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.round_weights:
            weights = weights.to(x.dtype)
        if self.stacked is not None and not self.training:
            return self._grouped(x, weights, chosen)
        if len(x) == 1 and not self.training:  # a lone row's decode step
            return self._one_token(x, weights[0], chosen[0])
        # every (slot, token) pair grouped by expert, each expert running once over its tokens,
        # in transformers' order (slot, then token: a matmul's rows in another order can round
        # differently in bfloat16); the counts are the one read of the device per layer, which
        # no CUDA graph can capture (the decode graphs run _grouped instead)
        by_slot = chosen.t().flatten()
        pairs = by_slot.argsort(stable=True)
        counts = torch.bincount(by_slot, minlength=len(self.experts)).tolist()
        tokens = (pairs % len(x)).split(counts)
        weights = weights.t().flatten()[pairs].split(counts)
        # each token's weighted sum in float32, rounded once, as transformers sums it
        out = torch.zeros_like(x, dtype=torch.float32)
        for expert, rows, w in zip(self.experts, tokens, weights, strict=True):
            # in training an expert without tokens still runs (on none): its weights then get
            # a zero gradient rather than none, which DDP and FSDP wait for on every rank
            if len(rows) or self.training:
                out.index_add_(0, rows, (expert(x[rows]) * w[:, None]).float())
        return out.to(x.dtype)

    def cannot_group(self) -> str | None:
        """Why ``stack_experts`` cannot run on these experts, or None."""
        linears = [m for e in self.experts for m in (e.c_fc, e.c_proj)]
        if self.experts[0].kind == "gelu" or any(
            type(m) is not nn.Linear or m.bias is not None for m in linears
        ):
            return (
                "a mixture of experts whose experts are not float, unbiased, gated linear layers "
                f"({type(linears[0]).__name__}, {self.experts[0].kind}): its routing reads how "
                "many tokens each expert takes"
            )
        weight = linears[0].weight
        if weight.device.type == "cuda" and weight.dtype != torch.bfloat16:
            return f"a {weight.dtype} mixture of experts on CUDA (grouped products take bfloat16)"
        return None

    def stack_experts(self) -> None:
        """Hold the experts' weights as two stacked tensors, (n_experts, 2 * hidden, n_embd) and
        (n_experts, n_embd, hidden), each expert's linear layers becoming views of them (no
        memory more): inference then runs all experts in one grouped matrix product per
        projection, which reads how many tokens each expert takes on the device, so a CUDA
        graph can capture it. Needs float, unbiased, gated experts (not packed or quantized),
        on the device they will run on (the stacked tensors are not the module's buffers)."""
        if self.stacked is not None:
            return  # a second engine on the same model
        reason = self.cannot_group()
        if reason is not None:
            raise ValueError(f"the experts cannot be grouped: {reason}")
        fcs = [e.c_fc for e in self.experts]
        projs = [e.c_proj for e in self.experts]
        with torch.no_grad():
            gate_up = torch.stack([m.weight for m in fcs])
            down = torch.stack([m.weight for m in projs])
        for e, (fc, proj) in enumerate(zip(fcs, projs, strict=True)):
            fc.weight = nn.Parameter(gate_up[e], requires_grad=False)
            proj.weight = nn.Parameter(down[e], requires_grad=False)
        self.stacked = (gate_up, down)

    def _grouped(
        self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor
    ) -> torch.Tensor:
        """``forward``'s sum through ``stacked``, without reading the device: each token's
        experts in ascending order (the grouping's order of summing), the (token, expert) pairs
        sorted by expert, counted by a scatter, and multiplied in two grouped products."""
        gate_up, down = self.stacked
        n, k = chosen.shape
        chosen, order = chosen.sort(dim=-1)
        weights = weights.gather(-1, order).flatten()
        experts = chosen.flatten()  # (n * k,) in (token, slot) order
        pairs = experts.argsort(stable=True)  # grouped by expert
        ones = torch.ones_like(experts, dtype=torch.int32)
        counts = ones.new_zeros(len(self.experts)).index_add_(0, experts, ones)
        offsets = counts.cumsum(0, dtype=torch.int32)
        h = F.grouped_mm(x[pairs // k], gate_up.transpose(1, 2), offs=offsets)
        h = F.grouped_mm(self.experts[0].activate(h), down.transpose(1, 2), offs=offsets)
        h = (h * weights[pairs, None]).float()
        spread = torch.empty_like(h)
        spread[pairs] = h  # back to (token, slot) order
        spread = spread.view(n, k, -1)
        out = spread[:, 0]
        for slot in range(1, k):  # summed slot by slot, in float32, as the grouping sums
            out = out + spread[:, slot]
        return out.to(x.dtype)

    def _one_token(
        self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor
    ) -> torch.Tensor:
        """``forward``'s sum for one token (``x`` (1, n_embd)), in the same order and rounding
        without the grouping's sorts, splits and scatters: at batch 1 they took about a tenth of
        a bfloat16 decode step."""
        ids = chosen.tolist()
        out = None
        for slot in sorted(range(self.top_k), key=ids.__getitem__):  # by expert, as grouped
            h = (self.experts[ids[slot]](x) * weights[slot : slot + 1]).float()
            out = h if out is None else out + h
        return out.to(x.dtype)


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over every layer's routing, as transformers computes
    it: ``n_experts * sum_e f_e * P_e``, where ``f_e`` is the share of tokens that chose expert
    ``e`` (counting each of a token's ``top_k`` choices) and ``P_e`` the mean router probability of
    ``e``, both over all layers' tokens. It is ``top_k`` when routing is uniform, more when a few
    experts take the tokens; its gradient reaches the router through ``P``."""
    probs = torch.softmax(torch.cat(router_logits).float(), dim=-1)  # (layers * tokens, E)
    chosen = probs.topk(top_k, dim=-1).indices.flatten()
    # counted on the device (bincount would read its size back to the host)
    counts = probs.new_zeros(probs.size(1)).index_add_(0, chosen, probs.new_ones(len(chosen)))
    return probs.size(1) * (counts / len(probs) * probs.mean(dim=0)).sum()


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config) if config.n_experts is None else MoE(config)
        # Gemma also normalises what attention and the MLP add to the residual stream
        sandwich = config.family == "gemma"
        self.post_attn_norm = make_norm(config) if sandwich else None
        self.post_mlp_norm = make_norm(config) if sandwich else None
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x, pending, rope, kv_cache, mask, router_logits: list | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream ``x`` and what the block before adds to it, ``pending`` (None
        before the first): the add is left to this block's first norm, so that on a GPU the
        two are one kernel. Returns the stream and this block's ``pending`` likewise.
        ``router_logits``: a list a mixture of experts appends its router's scores to."""
        x, h = add_and_norm(self.ln_1, x, pending)
        h = self.attn(h, rope, kv_cache, mask)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x, h = add_and_norm(self.ln_2, x, self.resid_dropout(h))
        h = self.mlp(h) if router_logits is None else self.mlp(h, router_logits)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x, self.resid_dropout(h)


def segment_masks(segments: torch.Tensor, windows: list[int | None]) -> list[torch.Tensor]:
    """Each layer's attention mask (B, 1, T, T) for rows of packed examples: a query sees the
    keys of its own segment (``segments`` (B, T)) at or before it, and within the layer's
    window (None: no window), one mask per distinct window."""
    T = segments.size(1)
    index = torch.arange(T, device=segments.device)
    behind = index[None, :] - index[:, None]  # key - query: <= 0 at or before the query
    base = ((segments[:, :, None] == segments[:, None, :]) & (behind <= 0))[:, None]
    masks = {w: base if w is None or w >= T else base & (behind > -w) for w in set(windows)}
    return [masks[w] for w in windows]


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = make_embedding(config.vocab_size, config.n_embd)
        self.wpe = (
            make_embedding(config.block_size, config.n_embd)
            if config.positions == "learned"
            else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = make_linear(config, config.n_embd, config.vocab_size, False)
        # a quantized head keeps its own quantized copy of the embedding matrix
        if config.tie_embeddings and config.quantization is None:
            self.lm_head.weight = self.wte.weight
        # kept in float32 outside the module's buffers, so casting the model to bfloat16 does not
        # round the rotation frequencies (and the reference implementation does not round them):
        # "full" for the full-attention layers, "local" for sliding-window layers that turn by a
        # theta of their own (Gemma 3), "long" for LongRoPE's long factors; each twice over, as
        # the two halves of a head turn by the same angles
        self.inv_freq: dict[str, torch.Tensor] = {}
        if config.positions == "rope":
            self.inv_freq["full"] = rope_frequencies(config).repeat(2)
            if config.rope_local_theta is not None:
                self.inv_freq["local"] = rope_frequencies(config, local=True).repeat(2)
            if config.rope_type == "longrope":
                self.inv_freq["long"] = rope_frequencies(config, long=True).repeat(2)
        # teacher forcing masks only the sliding-window layers; the rest run plain causal
        self.windows = config.layer_windows
        local = config.rope_local_theta is not None
        self.layer_rope = ["local" if local and w is not None else "full" for w in self.windows]
        # Gemma's embeddings are scaled by sqrt(n_embd), rounded to float32 as the reference does
        self.embed_scale = (
            float(torch.tensor(config.n_embd**0.5, device="cpu"))
            if config.family == "gemma"
            else None
        )
        self._no_masks = [None] * config.n_layer
        if self.wte.weight.is_meta:
            return  # a shape for a checkpoint's tensors: nothing to draw (see make_embedding)
        self.apply(self._init_weights)
        # residual projections start smaller, so the residual stream's variance stays flat in depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def set_dropout(self, p: float) -> None:
        """Train with dropout ``p``: fine-tuning a model that was saved with another."""
        self.config = replace(self.config, dropout=p)  # validated there
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, Attention):
                module.dropout = p

    def _head_is_plain(self) -> bool:
        """A float head with nothing between it and the loss: the chunked loss applies."""
        return isinstance(self.lm_head, nn.Linear) and self.config.logit_softcap is None

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """The architecture's parameter count (a tied matrix once), however the weights are held
        (quantized or packed layers keep theirs in other forms)."""
        with torch.device("meta"):
            reference = Transformer(replace(self.config, quantization=None))
        return sum(p.numel() for p in reference.parameters())

    def _full_kind(
        self, positions: torch.Tensor, seq_ends: torch.Tensor | None
    ) -> str | torch.Tensor:
        """The frequencies the full-attention layers turn by in a forward over ``positions``:
        LongRoPE as transformers runs it, where a sequence whose forward reaches past the
        original context turns all its positions by the long factors ("long"), any other by the
        short ones ("full"). With ``seq_ends``, each token by its own sequence's reach: a bool
        tensor like ``positions``, True where long, never read here (on a GPU a read waits for
        the device, and a captured decode step cannot read at all)."""
        if "long" not in self.inv_freq:
            return "full"
        original = self.config.rope_scaling["original_max_position_embeddings"]
        if seq_ends is None:
            return "long" if int(positions.max()) + 1 > original else "full"
        return seq_ends > original

    def _rope(
        self, positions: torch.Tensor, dtype: torch.dtype, kind: str = "full", scaled: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the ``kind`` frequencies (a key of ``inv_freq``) for ``positions`` (T,)
        as (T, rotary_dim), or (B, T) as (B, 1, T, rotary_dim); ``scaled``: times LongRoPE's
        attention factor, as the full-attention layers apply it."""
        inv_freq = self.inv_freq[kind]
        if inv_freq.device != positions.device:
            inv_freq = self.inv_freq[kind] = inv_freq.to(positions.device)
        # the positions promoted to float32 by the product: one kernel where a cast, the
        # product and a concatenation of its halves were three (in a decode graph too)
        emb = positions[..., None] * inv_freq  # (..., T, rotary_dim)
        if emb.dim() == 3:
            emb = emb[:, None]  # one table per row, shared by the heads
        cos, sin = emb.cos(), emb.sin()
        factor = (self.config.rope_scaling or {}).get("attention_factor")
        if scaled and kind != "local" and factor is not None and factor != 1.0:
            cos, sin = cos * factor, sin * factor
        return cos.to(dtype), sin.to(dtype)

    def _ropes(
        self, positions: torch.Tensor, dtype: torch.dtype, full: str | torch.Tensor
    ) -> list[tuple]:
        """Each layer's (cos, sin), computed once per kind of layer; ``full`` as ``_full_kind``
        gives it (a mask picks the long or the short table token by token)."""
        tables = {}
        for kind in set(self.layer_rope):
            if kind == "local" or isinstance(full, str):
                tables[kind] = self._rope(positions, dtype, full if kind == "full" else kind)
                continue
            long, short = self._rope(positions, dtype, "long"), self._rope(positions, dtype)
            pick = full[:, None, :, None]  # (B, 1, T, 1), as the per-row tables
            tables[kind] = tuple(torch.where(pick, a, b) for a, b in zip(long, short, strict=True))
        return [tables[k] for k in self.layer_rope]

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor, kind: str = "full") -> torch.Tensor:
        """``x`` (B, n_kv_head, N, head_dim) turned further by the full-attention layers' rotary
        angles of ``positions`` (N,); unscaled, as keys carry the attention factor once already."""
        return apply_rope(x, *self._rope(positions, x.dtype, kind, scaled=False))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: Cache | None = None,
        start_pos: int = 0,
        positions: torch.Tensor | None = None,
        last_only: bool = False,
        logits_at: torch.Tensor | None = None,
        return_logits: bool = True,
        seq_ends: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits for token ids ``idx`` (B, T) at positions ``start_pos .. start_pos+T-1``.

        ``positions`` (B, T) gives every token its own position instead: the engine's flat
        batches mix rows at different positions (its ``kv_cache`` knows which row each is).
        The caller keeps them within the context: reading them here would make the host wait
        for the device (and a captured forward cannot).
        With ``targets`` (B, T), also the mean cross-entropy; target -100 is ignored.
        ``return_logits=False`` (with targets) returns no logits and computes the loss without
        ever holding them whole (``arlm.model.loss``), which saves memory in training.
        ``last_only`` projects only the last position to the vocabulary (decoding needs no more);
        ``logits_at`` (K,) only the given positions of a one-row batch: logits (1, K, vocab).
        ``seq_ends`` (B, T), with ``positions``: how far each token's sequence reaches in this
        forward (LongRoPE chooses its factors by it; default: the furthest position + 1).
        ``segments`` (B, T), teacher forcing only: each token attends to the earlier tokens of
        its own segment alone (examples packed into one row, ``positions`` restarting at each).
        """
        B, T = idx.shape
        if positions is None:
            positions = torch.arange(start_pos, start_pos + T, device=idx.device)  # (T,)
            # known without reading the tensor (torch.compile keeps one graph)
            if self.wpe is not None and start_pos + T > self.config.block_size:
                raise ValueError(
                    f"positions up to {start_pos + T} exceed the context length "
                    f"{self.config.block_size} of this model (learned positions cannot "
                    "extrapolate)"
                )
        x = self.wte(idx)
        if self.embed_scale is not None:  # in the model's dtype, as the reference scales it
            x = x * x.new_full((), self.embed_scale)
        ropes, rotate = [None] * len(self.h), None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            full = self._full_kind(positions, seq_ends)
            ropes = self._ropes(positions, x.dtype, full)
            # a cache that turns stored keys (the StreamingLLM window) holds one sequence
            rotate = functools.partial(self._rotate, kind=full if isinstance(full, str) else "long")
        x = self.drop(x)
        masks = self._no_masks
        if segments is not None:
            if kv_cache is not None:
                raise ValueError("segments are for teacher forcing; a KV cache holds one sequence")
            masks = segment_masks(segments, self.windows)
        elif kv_cache is not None:
            kv_cache.prepare(start_pos, T, rotate)
        elif self.config.sliding_window is not None:
            masks = layer_masks(self.windows, 0, T, idx.device)
        pending = None
        # teacher forcing a mixture of experts: each layer's routing, for the balancing loss
        balancing = targets is not None and self.training and self.config.n_experts is not None
        router_logits = [] if balancing and self.config.router_aux_loss_coef > 0 else None
        for block, mask, rope in zip(self.h, masks, ropes, strict=True):
            x, pending = block(x, pending, rope, kv_cache, mask, router_logits)
        x = add_and_norm(self.ln_f, x, pending)[1]  # row by row: the rows below are the same
        if last_only:
            x = x[:, -1:]
        elif logits_at is not None:
            x = x[:, logits_at]
        if targets is not None and not return_logits and self._head_is_plain():
            # training needs the loss alone: head and cross-entropy in chunks, no (B*T, vocab)
            loss = linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.reshape(-1))
            return None, self._balanced(loss, router_logits)
        logits = self.lm_head(x)
        if (cap := self.config.logit_softcap) is not None:  # Gemma's tanh cap, before any loss
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
            )
            loss = self._balanced(loss, router_logits)
        return logits, loss

    def _balanced(self, loss: torch.Tensor, router_logits: list | None) -> torch.Tensor:
        """``loss`` plus the experts' load-balancing term, where this forward collected one."""
        if not router_logits:
            return loss
        balance = load_balancing_loss(router_logits, self.config.n_experts_per_tok)
        return loss + self.config.router_aux_loss_coef * balance

"""Model FLOPs utilisation: the FLOPs a training step must do, against what this device can do.

MFU counts only the model's arithmetic (not recomputation or overheads), so it compares runs
across hardware and implementations: 6 FLOPs per weight per token (2 forward, 4 backward),
plus attention's two matmuls over the context, as in the PaLM paper's appendix B.
"""

from __future__ import annotations

import time

import torch

from arlm.config import ModelConfig


def model_flops_per_token(
    config: ModelConfig, context: int | None = None, adapter_params: int | None = None
) -> float:
    """Training FLOPs per token over windows of ``context`` tokens (None: the model's context):
    ``6 N + 12 n_layer (n_head head_dim) T``, where N counts the weights that multiply
    activations (not the embedding lookups; a tied output head is a matmul, so the shared matrix
    counts once; of a mixture of experts, the router, the experts a token runs through and a
    shared expert). With low-rank adapters (``adapter_params`` of them) the model's weights are
    frozen: 4 FLOPs per weight (no weight gradients), and 6 per adapter weight."""
    c = config
    attn = (c.n_head + 2 * c.n_kv_head) * c.head_dim * c.n_embd + c.n_head * c.head_dim * c.n_embd
    mlp_rows = 2 * c.intermediate_size if c.mlp != "gelu" else c.intermediate_size  # gated
    mlp = mlp_rows * c.n_embd + c.intermediate_size * c.n_embd
    if c.n_experts is not None:  # each token runs through its experts only, and the router
        mlp = c.n_experts_per_tok * mlp + c.n_experts * c.n_embd
        if c.shared_expert_size is not None:  # and the gated shared expert (and its gate)
            mlp += 3 * c.shared_expert_size * c.n_embd + c.n_embd
    head = c.vocab_size * c.n_embd
    n_matmul = c.n_layer * (attn + mlp) + head
    attention = 12 * c.n_layer * c.n_head * c.head_dim * (context or c.block_size)
    if adapter_params is not None:
        return 4 * n_matmul + 6 * adapter_params + attention
    return 6 * n_matmul + attention


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a large square matmul on ``device`` in ``dtype``: the ceiling MFU is read
    against, measured rather than taken from a datasheet (a CPU's depends on its cores,
    threads and vector units)."""
    n = 4096 if device.type == "cuda" else 1024
    # operands from a generator of their own: the global one belongs to training (dropout)
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    best = float("inf")
    for _ in range(4):  # the first warms the kernels up; the best of the rest is the ceiling
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - t) / 4)
    return 2 * n**3 / best

"""The output head and the cross-entropy in one pass over row chunks, never holding the logits.

Teacher forcing's loss needs the logits of every position: (B*T, vocab) floats, 600 MB in
float32 for a batch of 12 x 256 over GPT-2's 50,257 tokens, plus as much again for their
gradient. Computing the loss chunk by chunk, and each chunk's gradient right away (the softmax
minus the one-hot target), keeps one chunk's logits alive at a time; the backward pass then
only scales the gradients already found.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ROWS = 1024  # rows of logits alive at once: 1024 x 50,257 float32 is 200 MB


def _chunk_loss(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of rows ``x`` (n, C) and the softmax of their logits (n, V)."""
    logits = (x @ weight.t()).float()  # (n, V); the matmul in autocast's dtype when enabled
    loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    return loss, logits.softmax(dim=-1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk_rows):
        n_valid = (targets != -100).sum().clamp(min=1)
        grad_x = torch.empty_like(x)
        # a frozen head (LoRA) needs no gradient of its own: a (V, C) product a chunk saved
        wants_w = ctx.needs_input_grad[1]
        grad_w = torch.zeros(weight.shape if wants_w else (), dtype=torch.float32, device=x.device)
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        for i in range(0, x.size(0), chunk_rows):
            xc, tc = x[i : i + chunk_rows], targets[i : i + chunk_rows]
            loss, grad_logits = _chunk_loss(xc, weight, tc)
            total += loss
            # d(loss)/d(logits) = softmax - one_hot(target), zero on ignored rows; by scatter
            # and multiply, not boolean indexing, whose data-dependent shape makes the host wait
            # for the device and splits a torch.compile graph, once per chunk
            valid = tc != -100
            grad_logits.scatter_add_(1, tc.clamp(min=0)[:, None], -valid[:, None].float())
            grad_logits.mul_(valid[:, None])
            # in the weight's dtype; under autocast the matmuls run in its dtype, as forward's
            grad_logits = grad_logits.to(weight.dtype)
            grad_x[i : i + chunk_rows] = (grad_logits @ weight).to(x.dtype)
            if wants_w:
                grad_w += (grad_logits.t() @ xc.to(weight.dtype)).float()
        ctx.save_for_backward(grad_x / n_valid, (grad_w / n_valid).to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        grad_w = grad_w * grad_loss if ctx.needs_input_grad[1] else None
        return grad_x * grad_loss, grad_w, None, None


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS
) -> torch.Tensor:
    """Mean cross-entropy of ``x @ weight.T`` against ``targets`` (-100 ignored), for rows
    ``x`` (N, C), ``weight`` (V, C) and ``targets`` (N,), without materialising (N, V)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, chunk_rows)
    total = sum(
        _chunk_loss(x[i : i + chunk_rows], weight, targets[i : i + chunk_rows])[0]
        for i in range(0, x.size(0), chunk_rows)
    )
    return total / (targets != -100).sum().clamp(min=1)

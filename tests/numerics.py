"""How close two computations of one quantity must be when they take different paths.

A batched forward and a one-sequence forward, a cached decode step and a whole-sequence forward,
arlm and transformers: each sums the same terms, but ATen picks its kernels by shape, by path
and by the CPU (``ATEN_CPU_CAPABILITY``: default, avx2, avx512), and kernels sum in different
orders. Their results differ by rounding alone, which is relative to the size of the terms
summed, not to the size of the result: the KL of two nearly equal distributions is a difference
of log-probabilities of size ~log(vocab), so its rounding is ~eps * log(vocab) even when the KL
itself is 1e-4. A tolerance is therefore ``ulps`` units of the dtype's precision at ``scale``,
the size of the terms the quantity is computed from: absolute, and as large near zero as
anywhere else.

ULPS: each value a tiny model computes has gone through some dozens of reductions (layers x
matmuls, attention's softmax, norms), each of which can differ by a few units of roundoff
between two summation orders (sqrt(K) for K terms in practice, K at worst). 64 units at the
scale of the largest term covers any order ATen picks with room to spare, and stays orders of
magnitude below what a real mistake moves a logit by (a wrong position, mask, scale or cache
slot: 1e-2 and more).
"""

from __future__ import annotations

import torch

ULPS = 64


def tolerance(scale: float, dtype: torch.dtype = torch.float32, ulps: float = ULPS) -> float:
    """The absolute tolerance for a quantity computed in ``dtype`` from terms of size ``scale``."""
    return ulps * torch.finfo(dtype).eps * scale


def assert_close(
    actual,
    expected,
    *,
    scale: float | None = None,
    dtype: torch.dtype = torch.float32,
    ulps: float = ULPS,
) -> float:
    """Assert that two paths' values (tensors, floats or lists of them) agree within
    ``tolerance(scale, dtype, ulps)``; ``scale`` defaults to the largest ``|expected|``, which
    is right for values such as logits, and must be given for a quantity near zero (a KL, a
    difference of log-probabilities): the size of the terms it is computed from. Returns the
    tolerance, for tests that go on to compare choices made from these values."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    if scale is None:
        scale = expected.abs().max().item()
    atol = tolerance(scale, dtype, ulps)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)
    return atol


def assert_clear_choices(logits: torch.Tensor, atol: float | None = None, ranks: int = 1) -> None:
    """Assert that in every row of ``logits`` (..., V) the top ``ranks`` tokens are each ahead of
    the next by more than ``2 * atol`` (default: ``tolerance`` at the logits' size): two paths
    whose logits agree within ``atol`` then rank them alike, and pick the same greedy token
    (``ranks=1``), whatever kernels they ran on. A test that compares greedy tokens (or top-k
    lists) of two paths checks this on the reference's logits at each choice, so that a near-tie
    cannot flip one; with random weights a near-tie is a property of the input, so such a test
    picks inputs without one."""
    logits = logits.float()
    if atol is None:  # banned tokens (-inf) have no size
        atol = tolerance(logits[logits.isfinite()].abs().max().item())
    top = logits.topk(ranks + 1, dim=-1).values
    gaps = (top[..., :-1] - top[..., 1:]).reshape(-1, ranks)
    row, rank = divmod(int(gaps.argmin()), ranks)
    worst = gaps[row, rank].item()
    assert worst > 2 * atol, (
        f"choice {row} of {gaps.size(0)} is a near-tie: its tokens ranked {rank + 1} and "
        f"{rank + 2} are {worst:.3g} apart, within twice the tolerance {atol:.3g}; pick another "
        "input"
    )


def choice_logits(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V): the logits that each of ``tokens`` was chosen from after ``prompt``, from
    one teacher-forced forward of ``model`` (an arlm ``Transformer``)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0][0]
    return logits[len(prompt) - 1 : -1]


def hf_greedy(
    hf: torch.nn.Module, ids: torch.Tensor, n: int = 32, atol: float | None = None
) -> list[int]:
    """A transformers model's ``n`` greedy tokens after ``ids`` (1, T). arlm rounds otherwise, so
    none of them may be a near-tie that logits agreeing within ``atol`` (default: float32's
    tolerance at their size) could flip: asserted here, on the logits transformers chose from."""
    out = hf.generate(
        ids,
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    choices = torch.cat(out.logits).float()
    assert_clear_choices(choices, atol)
    return out.sequences[0, ids.shape[1] :].tolist()


def assert_decode_matches(lm, hf: torch.nn.Module, prompt: torch.Tensor, atol: float) -> None:
    """arlm's greedy decode of 32 tokens after ``prompt`` (1, T) follows a transformers model's
    arithmetic: transformers fed the same tokens as its ``generate`` feeds them (the prompt in one
    forward through its own cache, then a token per forward) gives each token the log-probability
    arlm gave it, and ranks it first, both within ``atol``.

    For bfloat16, where comparing greedy tokens cannot work: a unit of bfloat16 at 4 is 0.03, so
    two logits often tie exactly, and two implementations part on a tie however close their
    arithmetic. This compares the numbers along arlm's own path instead."""
    import transformers

    out = lm.generate(prompt[0].tolist(), max_tokens=32, temperature=0, ignore_eos=True, logprobs=0)
    cache, logits = transformers.DynamicCache(config=hf.config), []
    with torch.no_grad():
        logits.append(hf(prompt, past_key_values=cache).logits[0, -1])
        for token in out.token_ids[:-1]:
            logits.append(hf(torch.tensor([[token]]), past_key_values=cache).logits[0, -1])
    reference = torch.log_softmax(torch.stack(logits).float(), dim=-1)
    want = reference.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
    got = torch.tensor([lp.logprob for lp in out.logprobs])
    diff = (got - want).abs().max().item()
    assert diff < atol, f"log-probabilities differ by {diff:.3g}, more than {atol}"
    behind = (reference.max(dim=-1).values - want).max().item()
    assert behind <= atol, f"a token is {behind:.3g} behind transformers' greedy choice"

"""Throughput of Hugging Face transformers' continuous batching, as a peer for arlm's batching.

All requests are queued at once on one ``ContinuousBatchingManager`` (from
``model.init_continuous_batching``, the engine under ``model.generate_batch``): a background
thread schedules up to ``max_num_seqs`` sequences per forward step, mixing chunked prefills and
decodes over a paged KV cache, with the model's own ``sdpa`` (or ``paged|eager``) attention.
It measures wall-clock seconds from the first request queued to the last one finished, after a
short warm-up on the same manager, with EOS ignored so every request makes exactly ``max_tokens``
tokens.

Sampling: greedy when every temperature is 0; otherwise multinomial sampling with per-request
temperatures (``per_request_processors``). Greedy and sampling cannot be mixed in one run, so
requests with temperature 0 then sample at a tiny temperature (argmax up to exact ties). Seeds
are not per request: the first request's seed, if any, seeds the run.
"""

from __future__ import annotations

import inspect
import math
import time

import torch

_GREEDY_EPS = 1e-4  # temperature standing in for greedy inside a sampling run


def available() -> str | None:
    """None when the installed transformers has continuous batching, else why not."""
    try:
        import transformers
        from transformers import ContinuousBatchingConfig  # noqa: F401
        from transformers.generation.continuous_batching import ContinuousBatchingManager  # noqa: F401
    except ImportError as error:
        return f"transformers has no continuous batching here ({error})"
    if not hasattr(transformers.GenerationMixin, "init_continuous_batching"):
        return f"transformers {transformers.__version__} has no init_continuous_batching"
    return None


def run_transformers_cb(
    model, requests: list[dict], max_num_seqs: int, *, max_batch_tokens: int = 2048
) -> dict:
    """Runs ``requests`` with continuous batching; see the module docstring for what is timed.

    ``max_num_seqs`` caps the sequences per forward step (``max_requests_per_batch``), and
    ``max_batch_tokens`` the query tokens per step (prefills are chunked to fit).
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    temperatures = [float(r.get("temperature") or 0.0) for r in requests]
    do_sample = any(t > 0 for t in temperatures)
    seed = next((r["seed"] for r in requests if r.get("seed") is not None), None)
    notes = ["prefix caching off"]
    sample_kw = {}
    if do_sample:
        temperatures = [t if t > 0 else _GREEDY_EPS for t in temperatures]
        # The per-request temperature processor only exists when the config's own temperature
        # is neither None nor 1.0, so use the first temperature that is not 1.0 as the default.
        default = next((t for t in temperatures if t != 1.0), None)
        if default is not None:
            sample_kw["temperature"] = default
        notes.append("per-request temperatures, multinomial sampling, no top-k/top-p")
        if _GREEDY_EPS in temperatures:
            notes.append(f"temperature 0 sampled at {_GREEDY_EPS} (greedy and sampling can't mix)")
        if len({r.get("seed") for r in requests}) > 1:
            notes.append(f"one seed for the whole run ({seed}), not per request")
    else:
        notes.append("greedy")

    gen_config = GenerationConfig(do_sample=do_sample, eos_token_id=-1, top_k=None, **sample_kw)
    # On CPU the cache size can't be inferred from free memory well (and without psutil it logs
    # an error), so size it: max_num_seqs of the longest sequences, plus headroom for the
    # scheduler, which stops admitting prefills below 15% free blocks.
    page_size = 256
    longest = max(len(r["prompt_token_ids"]) + r["max_tokens"] for r in requests)
    num_blocks = math.ceil(1.3 * max_num_seqs * math.ceil(longest / page_size)) + 1
    # transformers before 5.2x named the page ``block_size`` (5.17 on the GPU image)
    params = inspect.signature(ContinuousBatchingConfig).parameters
    page_kw = "page_size" if "page_size" in params else "block_size"
    cb_config = ContinuousBatchingConfig(
        **{page_kw: page_size},
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=max_num_seqs,
        allow_block_sharing=False,  # random prompts share no prefix; keeps the warm-up out of it
        per_request_processors=bool(sample_kw),
        seed=seed,
    )

    def submit(manager, reqs: list[dict]) -> list[str]:
        ids = []
        # The warm-up list is a prefix of the requests, so it pairs with their temperatures.
        for r, temperature in zip(reqs, temperatures, strict=False):
            kw = {"temperature": temperature} if sample_kw else {}
            ids.append(
                manager.add_request(
                    r["prompt_token_ids"], max_new_tokens=r["max_tokens"], eos_token_id=-1, **kw
                )
            )
        return ids

    def collect(manager, ids: list[str]) -> dict[str, list[int]]:
        done: dict[str, list[int]] = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped early")
                continue
            if result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"request {result.request_id} failed: {result.error}")
                done[result.request_id] = result.generated_tokens
        return done

    model.eval()
    # The background thread inherits the caller's inference mode when it starts.
    with torch.inference_mode():
        manager = model.init_continuous_batching(
            generation_config=gen_config, continuous_batching_config=cb_config
        )
        manager.start()
        try:
            # Warm-up: a few short requests (their own blocks, freed before the timed run).
            warm = [
                dict(
                    r,
                    prompt_token_ids=r["prompt_token_ids"][:64],
                    max_tokens=min(4, r["max_tokens"]),
                )
                for r in requests[:max_num_seqs]
            ]
            collect(manager, submit(manager, warm))
            start = time.perf_counter()
            ids = submit(manager, requests)
            done = collect(manager, ids)
            seconds = time.perf_counter() - start
        finally:
            manager.stop(block=True)  # also restores the model's attention implementation
            manager.destroy()

    outputs = [done[i] for i in ids]
    output_tokens = sum(len(o) for o in outputs)
    return {
        "seconds": seconds,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / seconds,
        "outputs": outputs,
        "note": f"transformers continuous batching (max_batch_tokens={max_batch_tokens}, "
        f"num_blocks={num_blocks}x{page_size}): " + "; ".join(notes),
    }

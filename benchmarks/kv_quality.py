"""What each KV cache kind does to quality, against the contiguous float32 cache.

1. Perplexity on held-out text (the last tenth of the built-in corpus, which training never
   sees), fed through each cache kind in chunks of 16, each chunk attending to what the cache
   holds of the chunks before: the contiguous kinds (float32, bfloat16, int8, int4) and the
   window through ``lm.score(text, chunk_size=16)``; the engine's paged cache (``PagedKVCache``)
   as the engine prefills prompts, every text in its own blocks, one chunk of each per forward.
2. Greedy agreement: the share of identical tokens over 256 greedy tokens, position by position.
   The contiguous kinds and the window decode each prompt alone through that cache; the paged
   kinds through the engine, the prompts submitted together and decoded in one batch.
3. The window past the context: a rotary model scores texts 8x longer than its context through a
   dense cache (positions it was never trained on) and through windowed caches, with and without
   attention sinks; perplexity per 256-position stretch.

Needs trained models: ``arlm train --out runs/small`` (GPT-2 layout) and
``arlm train --preset llama-small --out runs/llama-small`` (about five minutes each on two CPU
cores). Run: ``python benchmarks/kv_quality.py`` (about three minutes). Prints the tables and
writes ``benchmarks/out/kv_quality.png``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from report import print_table, save_figure  # benchmarks/report.py, beside this script

import arlm
from arlm.kv_cache import (
    Cache,
    CacheConfig,
    KVCache,
    PagedKVCache,
    PagedRow,
    StepLayout,
    make_codec,
)
from arlm.measure.heldout import held_out_ids
from arlm.sampling import SamplingParams
from arlm.train.data import default_cache_dir

KINDS = {  # label -> arlm.load keywords; the contiguous cache, float32 the reference
    "float32": {},
    "bfloat16": {"kv_cache_dtype": "bfloat16"},
    "int8": {"kv_cache_dtype": "int8"},
    "int4": {"kv_cache_dtype": "int4"},
}
PAGED_KINDS = {  # the engine's paged cache
    "paged": {},
    "paged int8": {"kv_cache_dtype": "int8"},
}
ROPE_KINDS = {"window 4+60": {"kv_window": 60}}  # rotary models only: a quarter of the context
CHUNK = 16
N_GREEDY, N_PROMPTS = 256, 4
LONG = 8  # the long texts are this many contexts long


def held_out(lm: arlm.LM, cache_dir: Path) -> list[int]:
    return held_out_ids(lm.tokenizer, "builtin", cache_dir)


def perplexity(lm: arlm.LM, segments: list[list[int]], chunk_size: int | None) -> float:
    logprobs = []
    for seg in segments:
        logprobs += lm.score(seg, chunk_size=chunk_size).token_logprobs
    return math.exp(-math.fsum(logprobs) / len(logprobs))


def with_start(lm: arlm.LM, ids: list[int]) -> list[int]:
    """``ids`` after the tokenizer's start token, as ``lm.score`` scores them."""
    start = lm.tokenizer.bos_token_id
    return ids if start is None or (ids and ids[0] == start) else [start, *ids]


@torch.inference_mode()
def paged_perplexity(lm: arlm.LM, segments: list[list[int]]) -> float:
    """Perplexity of ``segments`` through the engine's paged cache: each segment in its own blocks,
    fed in chunks of ``CHUNK``, one chunk of every segment per forward (the flat layout the
    engine's runner builds when it prefills several prompts)."""
    model = lm.model
    dtype = model.wte.weight.dtype
    texts = [with_start(lm, seg) for seg in segments]
    per_text = -(-max(len(t) for t in texts) // 16)
    cache = PagedKVCache.for_model(
        lm.config,
        len(texts) * per_text,
        16,
        device=lm.device,
        dtype=dtype,
        codec=make_codec(lm.cache_config.dtype, dtype),
    )
    cache.reserve(len(texts) * per_text)
    tables = [[i + len(texts) * j for j in range(per_text)] for i in range(len(texts))]
    logprobs = []
    for start in range(0, max(len(t) for t in texts) - 1, CHUNK):
        fed = [
            (i, min(CHUNK, len(t) - 1 - start)) for i, t in enumerate(texts) if start < len(t) - 1
        ]
        layout = StepLayout([], [PagedRow(tables[i], start, n) for i, n in fed])
        idx = [tok for i, n in fed for tok in texts[i][start : start + n]]
        targets = [tok for i, n in fed for tok in texts[i][start + 1 : start + 1 + n]]
        logits = model(
            torch.tensor([idx], device=lm.device),
            kv_cache=cache.step(layout),
            positions=torch.tensor([layout.positions()], device=lm.device),
        )[0][0]
        lp = F.log_softmax(logits.float(), -1).gather(
            -1, torch.tensor(targets, device=lm.device)[:, None]
        )
        logprobs += lp[:, 0].tolist()
    return math.exp(-math.fsum(logprobs) / len(logprobs))


@torch.inference_mode()
def cache_greedy(lm: arlm.LM, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of each prompt alone, through the cache kind ``lm`` was loaded with (the
    contiguous cache, or the window): the prompt in one forward, then a token per forward."""
    model = lm.model
    out = []
    for prompt in prompts:
        cache = lm.cache_config.build(
            lm.config, 1, len(prompt) + N_GREEDY, device=lm.device, dtype=model.wte.weight.dtype
        )
        ids, pos, tokens = torch.tensor([prompt], device=lm.device), 0, []
        for _ in range(N_GREEDY):
            logits = model(ids, kv_cache=cache, start_pos=pos, last_only=True)[0]
            pos += ids.size(1)
            tokens.append(int(logits[0, -1].float().argmax()))
            ids = torch.tensor([tokens[-1:]], device=lm.device)
        out.append(tokens)
    return out


def engine_greedy(lm: arlm.LM, prompts: list[list[int]]) -> list[list[int]]:
    """Greedy tokens of ``prompts`` submitted together to the engine (``lm.generate`` on a
    list, without its progress bar): decoded in one batch over the paged cache."""
    params = SamplingParams(max_tokens=N_GREEDY, temperature=0, ignore_eos=True)
    return [c.token_ids for c in lm.engine.generate(prompts, params, progress=False)]


def agreement(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """(share of positions with the same token, mean position of the first difference)."""
    pairs = list(zip(a, b, strict=True))
    same = [sum(x == y for x, y in zip(s, t, strict=True)) / len(s) for s, t in pairs]
    first = [
        next((i for i, (x, y) in enumerate(zip(s, t, strict=True)) if x != y), len(s))
        for s, t in pairs
    ]
    return sum(same) / len(same), sum(first) / len(first)


def compare_kinds(path: str, cache_dir: Path, n_segments: int) -> list[list[str]]:
    reference = arlm.load(path)
    block = reference.config.block_size
    val = held_out(reference, cache_dir)
    segments = [val[i * block : (i + 1) * block] for i in range(n_segments)]
    prompts = [seg[:1] for seg in segments[:N_PROMPTS]]  # 1 + 256 positions fit a 256 context
    one_pass = perplexity(reference, segments, None)
    base_ppl = perplexity(reference, segments, CHUNK)
    base_tokens = cache_greedy(reference, prompts)
    kinds = {label: (kw, False) for label, kw in KINDS.items()}
    if reference.config.positions == "rope":
        kinds.update({label: (kw, False) for label, kw in ROPE_KINDS.items()})
    kinds.update({label: (kw, True) for label, kw in PAGED_KINDS.items()})
    rows = [["one forward (no cache)", f"{one_pass:.3f}", f"{one_pass / base_ppl:.5f}", "", ""]]
    for label, (kw, slot) in kinds.items():
        if not kw and not slot:  # the reference itself
            ppl, (same, first) = base_ppl, (1.0, N_GREEDY)
        else:
            lm = arlm.load(path, **kw)
            if slot:
                ppl, tokens = paged_perplexity(lm, segments), engine_greedy(lm, prompts)
            else:
                ppl, tokens = perplexity(lm, segments, CHUNK), cache_greedy(lm, prompts)
            same, first = agreement(tokens, base_tokens)
        rows.append([label, f"{ppl:.3f}", f"{ppl / base_ppl:.5f}", f"{same:.3f}", f"{first:.0f}"])
    return rows


@torch.inference_mode()
def stretch_perplexities(
    model: torch.nn.Module, cache: Cache, ids: list[int], stretch: int
) -> list[float]:
    """Perplexity of each ``stretch``-long piece of ``ids``, scored through ``cache``."""
    logprobs = []
    for start in range(0, len(ids) - 1, CHUNK):
        end = min(start + CHUNK, len(ids) - 1)
        logits = model(torch.tensor([ids[start:end]]), kv_cache=cache, start_pos=start)[0][0]
        lp = F.log_softmax(logits.float(), -1).gather(
            -1, torch.tensor(ids[start + 1 : end + 1])[:, None]
        )
        logprobs += lp[:, 0].tolist()
    return [
        math.exp(-sum(logprobs[i : i + stretch]) / len(logprobs[i : i + stretch]))
        for i in range(0, len(logprobs), stretch)
    ]


def past_the_context(path: str, cache_dir: Path, n_texts: int) -> tuple[list, dict]:
    lm = arlm.load(path)
    model, config, block = lm.model, lm.config, lm.config.block_size
    val = held_out(lm, cache_dir)
    n = LONG * block
    texts = [[0, *val[i * n : (i + 1) * n]] for i in range(n_texts)]
    settings = {
        "dense (no window)": None,
        f"sinks 4 + window {block - 4}": CacheConfig(window=block - 4, sink_tokens=4),
        f"no sinks, window {block}": CacheConfig(window=block, sink_tokens=0),
        "sinks 4 + window 60": CacheConfig(window=60, sink_tokens=4),
        "no sinks, window 64": CacheConfig(window=64, sink_tokens=0),
    }
    # the yardstick: each stretch scored on its own, as the model sees text within its context
    curves = {
        "each stretch alone": [
            sum(lm.score(ids[i + 1 : i + block + 1]).perplexity for ids in texts) / len(texts)
            for i in range(0, n, block)
        ]
    }
    for label, setting in settings.items():
        per_text = []
        for ids in texts:
            if setting is None:  # rotary positions go past the context; nothing refuses them
                cache = KVCache.for_model(config, 1, len(ids))
            else:
                cache = setting.build(config, 1, len(ids))
            per_text.append(stretch_perplexities(model, cache, ids, block))
        curves[label] = [sum(col) / len(col) for col in zip(*per_text, strict=True)]
    header = [f"{i * block}-{(i + 1) * block - 1}" for i in range(LONG)]
    rows = [[label, *(f"{p:.1f}" for p in ys)] for label, ys in curves.items()]
    return [header, rows], curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpt2", default="runs/small", help="a trained GPT-2 layout model")
    parser.add_argument("--llama", default="runs/llama-small", help="a trained rotary model")
    parser.add_argument("--segments", type=int, default=16, help="held-out contexts to score")
    parser.add_argument("--long-texts", type=int, default=4, help="texts for the window test")
    parser.add_argument("--cache-dir", default=None, help="token shards (default: arlm's)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    header = ["cache", "perplexity", "vs float32", "greedy agreement", "first difference"]
    for name, path in (("gpt2", args.gpt2), ("llama", args.llama)):
        rows = compare_kinds(path, cache_dir, args.segments)
        print_table(
            f"{name} ({path}): perplexity on {args.segments} held-out contexts fed in chunks of "
            f"{CHUNK}; greedy agreement over {N_GREEDY} tokens from {N_PROMPTS} prompts",
            header,
            rows,
        )
    (stretch_header, rows), curves = past_the_context(args.llama, cache_dir, args.long_texts)
    print_table(
        f"llama ({args.llama}): perplexity by position over {args.long_texts} held-out texts of "
        f"{LONG}x the context",
        ["cache", *stretch_header],
        rows,
    )
    # texts differ in difficulty along the way; against the yardstick, what the cache does shows
    yardstick = curves.pop("each stretch alone")
    relative = {k: [p / y for p, y in zip(ys, yardstick, strict=True)] for k, ys in curves.items()}
    print_table(
        "the same, relative to each stretch scored alone (above 1: worse than no history at all)",
        ["cache", *stretch_header],
        [[k, *(f"{r:.2f}" for r in ys)] for k, ys in relative.items()],
    )
    plot(relative, stretch_header)


def plot(curves: dict[str, list[float]], labels: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, ys in curves.items():
        ax.plot(range(len(ys)), ys, marker="o", label=label)
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.axhline(1.0, color="grey", ls=":")
    ax.set(
        xlabel="positions",
        ylabel="perplexity / each stretch scored alone",
        title="past the context (256): dense vs windowed caches (llama layout)",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, "kv_quality.png")


if __name__ == "__main__":
    main()

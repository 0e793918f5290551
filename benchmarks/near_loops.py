"""False reports of the near-duplicate loop rule on human text, for a grid of thresholds.

Human text has no loops, so every report on it is false. The text is the built-in corpus (the
Python reference, 79 documents, 112k tokens in the 4096-token tokenizer ``arlm train`` makes),
cut into 128-token windows as a generation of ``arlm loops bench`` is 128 tokens; each window
is pushed through a fresh detector and counts as reported when the rule fires anywhere in it.
Whole documents are run too, and for each setting the largest overlap any window of human text
reaches (the margin to ``min_overlap``). The target: at most one false report per 500
documents. Run: ``python benchmarks/near_loops.py`` (a minute; it prepares the corpus on first
use).
"""

from __future__ import annotations

from arlm.loops.near import NearLoopConfig, NearLoopDetector
from arlm.train.data import default_cache_dir
from arlm.train.prepare import load_or_prepare

GRID = [
    NearLoopConfig(),  # the default
    NearLoopConfig(window=64, ngram=3, min_overlap=0.5),
    NearLoopConfig(window=64, ngram=3, min_overlap=0.6),
    NearLoopConfig(window=64, ngram=4, min_overlap=0.5),
    NearLoopConfig(window=96, ngram=4, min_overlap=0.5),
]
WINDOW = 128


def documents() -> list[list[int]]:
    shards = load_or_prepare("builtin", default_cache_dir(), vocab_size=4096, progress=False)
    ends = set(shards.tokenizer.eos_token_ids)
    docs, current = [], []
    for token in shards.train.tolist() + shards.val.tolist():
        if token in ends:
            docs.append(current)
            current = []
        else:
            current.append(token)
    return docs


def scan(tokens: list[int], config: NearLoopConfig) -> tuple[bool, float]:
    """Whether the rule fires in ``tokens``, and the largest full-window overlap seen."""
    detector, fired, top = NearLoopDetector(config), False, 0.0
    for i, token in enumerate(tokens):
        fired |= detector.push(token) is not None
        if i + 1 >= config.window:
            top = max(top, detector.overlap)
    return fired, top


def main() -> None:
    docs = documents()
    windows = [d[i : i + WINDOW] for d in docs for i in range(0, len(d) - WINDOW + 1, WINDOW)]
    print(f"{len(docs)} documents, {len(windows)} windows of {WINDOW} tokens")
    print("| window | n-gram | min overlap | windows reported | per 500 | documents reported "
          "| largest human overlap |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for config in GRID:
        found = [scan(w, config) for w in windows]
        reported = sum(f for f, _ in found)
        top = max(t for _, t in found)
        whole = sum(scan(d, config)[0] for d in docs)
        print(
            f"| {config.window} | {config.ngram} | {config.min_overlap} | {reported} / "
            f"{len(windows)} | {500 * reported / len(windows):.2f} | {whole} / {len(docs)} | "
            f"{top:.3f} |"
        )


if __name__ == "__main__":
    main()

"""``arlm prepare`` on a corpus far larger than the memory it may use: peak RSS and speed.

A synthetic corpus of JSON lines is generated once, deterministically, into
``benchmarks/out/prepare/`` (and reused): English-like documents of Zipf-distributed words (common
English words first, then pseudo-words of English syllables, a few accented ones and numbers),
commas, sentences and paragraphs of random lengths, and every 20,000th document a few megabytes
long. ``arlm prepare`` then encodes it in a subprocess whose resident memory is read from
``/proc`` ten times a second, attributed to training the tokenizer until ``tokenizer.json``
appears and to encoding after; ``ru_maxrss`` of the finished child is the overall peak.

The target: peak RSS under 1 GB, whatever the corpus's size.

Run: ``python benchmarks/prepare.py`` (a few minutes on two cores; ``--gigabytes``, and
``--tokenizer PATH`` to encode with a given tokenizer instead of training one).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from report import print_table  # benchmarks/report.py, beside this script

from arlm.atomic import atomic_path

OUT = Path(__file__).parent / "out" / "prepare"
# the most common English words, in order
COMMON = (
    "the of and to a in is that it for was on are as with his they at be this from have or by "
    "one had not but what all were when we there can an your which their said if do will each "
    "about how up out them then she many some so these would other into has more her two like "
    "him see time could no make than first been its who now people my made over did down only "
    "way find use may water long little very after words called just where most know"
)
ONSETS = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "st", "th", "ch"]
ONSETS += ["sh", "br", "tr", "pl", "gr", "w", "v", "cl"]
VOWELS = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "io", "ee", "y"]
CODAS = ["", "n", "r", "s", "t", "l", "nd", "st", "ng", "ck", "m", "rt", "ss"]


def vocabulary(rng: np.random.Generator, size: int = 40_000) -> np.ndarray:
    """Words by rank: common English words, then pseudo-words, some accented, some numbers;
    each also with a comma after it (the second half)."""
    words = COMMON.split()
    seen = set(words)
    while len(words) < size:
        kind = rng.random()
        if kind < 0.02:
            word = str(int(rng.integers(1, 3000)))
        else:
            syllables = int(rng.choice([1, 2, 3, 4], p=[0.3, 0.4, 0.22, 0.08]))
            word = "".join(
                ONSETS[rng.integers(len(ONSETS))]
                + VOWELS[rng.integers(len(VOWELS))]
                + CODAS[rng.integers(len(CODAS))]
                for _ in range(syllables)
            )
            if kind < 0.03:
                word = word.replace("e", "é", 1)
        if word and word not in seen:
            seen.add(word)
            words.append(word)
    return np.array(words + [w + "," for w in words], dtype=object)


def document(rng: np.random.Generator, words: np.ndarray, weights: np.ndarray, big: bool) -> str:
    """Paragraphs of sentences of Zipf-distributed words."""
    n_sentences = int(rng.integers(20_000, 40_000)) if big else int(rng.lognormal(3.0, 1.0)) + 1
    lengths = rng.integers(4, 28, size=n_sentences)
    ids = rng.choice(len(weights), size=int(lengths.sum()), p=weights)
    ids += (rng.random(len(ids)) < 0.07) * (len(words) // 2)  # a comma after 7% of words
    tokens = words[ids]
    ends = rng.choice([".", ".", ".", ".", "?", "!", ";"], size=n_sentences)
    breaks = rng.random(n_sentences) < 0.2  # a paragraph ends after a fifth of the sentences
    parts, start = [], 0
    for length, end, paragraph in zip(lengths, ends, breaks, strict=True):
        sentence = " ".join(tokens[start : start + length]).rstrip(",")
        start += length
        parts.append(sentence[0].upper() + sentence[1:] + end + ("\n\n" if paragraph else " "))
    return "".join(parts).rstrip()


def generate(path: Path, size: int, seed: int = 0) -> None:
    """At least ``size`` bytes of JSON lines at ``path``, the same bytes every time."""
    rng = np.random.default_rng(seed)
    words = vocabulary(rng)
    ranks = np.arange(len(words) // 2)
    weights = 1.0 / (ranks + 2.7) ** 1.07
    weights /= weights.sum()
    written, index = 0, 0
    started = time.perf_counter()
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        while written < size:
            text = document(rng, words, weights, big=index % 20_000 == 19_999)
            line = json.dumps({"id": index, "text": text}) + "\n"
            f.write(line)
            written += len(line)
            index += 1
            if index % 20_000 == 0:
                rate = written / 1e6 / (time.perf_counter() - started)
                print(f"  generated {written / 1e9:.2f} GB ({rate:.0f} MB/s)", flush=True)


def rss(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes, 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gigabytes", type=float, default=1.0, help="corpus size (default: 1)")
    parser.add_argument("--tokenizer", help="encode with this tokenizer.json instead of training")
    parser.add_argument("--vocab-size", type=int, default=4096, help="(default: 4096)")
    args = parser.parse_args()

    corpus = OUT / f"corpus-{args.gigabytes:g}GB.jsonl"
    size = int(args.gigabytes * 1e9)
    if not corpus.is_file():
        print(f"generating {corpus} ({args.gigabytes:g} GB, once)")
        generate(corpus, size)
    out = OUT / "shards"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "arlm", "prepare", str(corpus), "--out", str(out)]
    command += ["--vocab-size", str(args.vocab_size)]
    if args.tokenizer:
        command += ["--tokenizer", args.tokenizer]
    print("$ " + " ".join(command[1:]), flush=True)
    peaks = {"tokenizer": 0, "encoding": 0}
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    while child.poll() is None:
        phase = "encoding" if (out / "tokenizer.json").is_file() else "tokenizer"
        peaks[phase] = max(peaks[phase], rss(child.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - started
    summary = child.stdout.read()
    print(summary, end="")
    if child.returncode:
        sys.exit(f"arlm prepare failed with exit status {child.returncode}")
    max_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux

    meta = json.loads((out / "meta.json").read_text())
    mb, tokens = meta["bytes"] / 1e6, meta["tokens"]
    encode_s, tokenizer_s = meta["seconds"], meta["tokenizer_seconds"]
    rows = [
        [
            "tokenizer" + (" (given)" if args.tokenizer else f" ({args.vocab_size} ids)"),
            f"{tokenizer_s:.1f}",
            f"{peaks['tokenizer'] / 2**20:,.0f}",
            "",
            "",
        ],
        [
            "encoding",
            f"{encode_s:.1f}",
            f"{peaks['encoding'] / 2**20:,.0f}",
            f"{tokens / encode_s:,.0f}",
            f"{mb / encode_s:.2f}",
        ],
        ["all (wall)", f"{wall:.1f}", f"{max_rss / 2**20:,.0f}", f"{tokens / wall:,.0f}", ""],
    ]
    print_table(
        f"arlm prepare: {mb:,.0f} MB, {meta['documents']:,} documents -> {tokens:,} tokens "
        f"({meta['dtype']}, split by {meta['split']})",
        ["phase", "seconds", "peak RSS MiB", "tokens/s", "MB/s"],
        rows,
    )
    verdict = "met" if max_rss < 2**30 else "NOT met"
    print(f"\npeak RSS {max_rss / 2**20:,.0f} MiB: the 1 GiB target is {verdict}")


if __name__ == "__main__":
    main()

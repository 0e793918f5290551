"""Held-out text for the loop measurements: the validation split the trainer never trains on.

The split is the trainer's own (``arlm.train.prepare``: a tenth of the documents, or the last
tenth of the token stream of a corpus with few documents), so for a model trained on the corpus
this text is unseen.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from arlm.loops.metrics import split_sentences
from arlm.tokenizer import Tokenizer
from arlm.train.data import default_cache_dir
from arlm.train.prepare import load_or_prepare

# A prose sentence: a capital letter first, a word and a full stop last, no table rules, grammar
# or prompts in between.
_PROSE = re.compile(r"[A-Z](?!.*(\||>>>|::=|==|--|\.\.\.)).{20,200}[a-z]\.")


def held_out_ids(
    tokenizer: Tokenizer, corpus: str = "builtin", cache_dir: str | os.PathLike | None = None
) -> list[int]:
    """The validation split of ``corpus`` in ``tokenizer``'s ids (documents end in end-of-text)."""
    cache = Path(cache_dir or default_cache_dir())
    return load_or_prepare(corpus, cache, tokenizer=tokenizer, progress=False).val.tolist()


def held_out_windows(
    ids: list[int], end_ids: set[int], prompt_tokens: int, continuation_tokens: int, count: int
) -> list[tuple[list[int], list[int]]]:
    """Up to ``count`` (prompt, continuation) pairs from consecutive, non-overlapping windows of
    ``ids`` that hold no end-of-text id, so each prompt is continued by its own document."""
    size = prompt_tokens + continuation_tokens
    pairs = []
    for start in range(0, len(ids) - size + 1, size):
        window = ids[start : start + size]
        if not end_ids.intersection(window):
            pairs.append((window[:prompt_tokens], window[prompt_tokens:]))
            if len(pairs) == count:
                break
    return pairs


def held_out_sentences(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """The prose sentences of the held-out ids, in order, each once. The first document is left
    out: the split may begin inside it."""
    end_ids = set(tokenizer.eos_token_ids)
    documents, current = [], []
    for token in ids:
        if token in end_ids:
            documents.append(current)
            current = []
        else:
            current.append(token)
    documents = documents[1:] if documents else []  # the first may start mid-document
    sentences, seen = [], set()
    for doc in documents:
        # the corpus wraps its prose at about 70 columns: rejoin each paragraph's lines
        paragraphs = tokenizer.decode(doc).split("\n\n")
        text = "\n".join(" ".join(p.split()) for p in paragraphs)
        for sentence in split_sentences(text):
            if _PROSE.fullmatch(sentence) and sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
    return sentences

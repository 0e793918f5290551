"""Repetition metrics from the text-degeneration literature, over lists of hashable tokens.

Every rate here is a fraction in [0, 1], never a percentage: multiply by 100 to compare with
papers that report percentages (SimCTG's rep-n, for one). A metric with nothing to measure (no
n-grams, no sentences) is 0.0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Hashable, Sequence

from arlm.validate import check_int

Tokens = Sequence[Hashable]

# A sentence ends at a run of . ! or ? followed by whitespace; a line break always ends one.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")


def _ngrams(tokens: Tokens, n: int) -> list[tuple]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def seq_rep_n(continuations: Sequence[Tokens], n: int = 4) -> float:
    """seq-rep-n of Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training".

    Per continuation: ``1 - |unique n-grams| / |n-grams|``; the result is the mean over
    continuations. A continuation shorter than ``n`` (no n-grams) contributes 0.
    """
    check_int("n", n, 1)
    if not continuations:
        return 0.0
    total = 0.0
    for tokens in continuations:
        grams = _ngrams(tokens, n)
        if grams:
            total += 1.0 - len(set(grams)) / len(grams)
    return total / len(continuations)


def rep_n(texts: Sequence[Tokens], n: int) -> float:
    """rep-n of Su et al. 2022, "A Contrastive Framework for Neural Text Generation" (SimCTG).

    ``1 - sum_x |unique n-grams(x)| / sum_x |n-grams(x)|``: unique n-grams are counted within
    each text, and both counts are pooled over the texts, as in SimCTG's evaluation code (so
    long texts weigh more than in :func:`seq_rep_n`). SimCTG reports it x100. Its code also
    skips each text's last n-gram; this counts every n-gram.
    """
    check_int("n", n, 1)
    unique = total = 0
    for tokens in texts:
        grams = _ngrams(tokens, n)
        unique += len(set(grams))
        total += len(grams)
    return 1.0 - unique / total if total else 0.0


def diversity(texts: Sequence[Tokens]) -> float:
    """Diversity of Su et al. 2022: ``prod_{n=2..4} (1 - rep_n(texts, n))``."""
    result = 1.0
    for n in (2, 3, 4):
        result *= 1.0 - rep_n(texts, n)
    return result


def _repeat_counts(gold_tokens: Tokens, predictions: Tokens, l: int) -> tuple[int, int]:  # noqa: E741
    """(repeats, wrong repeats) of the next-token predictions over ``gold_tokens``."""
    check_int("l", l, 1)
    if len(predictions) != len(gold_tokens):
        raise ValueError(
            f"len(predictions)={len(predictions)} must equal len(gold_tokens)={len(gold_tokens)}"
        )
    window: Counter = Counter()  # the gold tokens at t - l .. t - 1
    repeats = wrong = 0
    for t, (gold, pred) in enumerate(zip(gold_tokens, predictions, strict=True)):
        if window[pred]:
            repeats += 1
            wrong += pred != gold
        window[gold] += 1
        if t >= l:
            window[gold_tokens[t - l]] -= 1
    return repeats, wrong


def rep_l(gold_tokens: Tokens, predictions: Tokens, l: int) -> float:  # noqa: E741
    """rep/l of Welleck et al. 2019: how often the greedy next token repeats recent context.

    ``predictions[t]`` is the model's argmax prediction for ``gold_tokens[t]``, made from
    ``gold_tokens[:t]`` (teacher forcing). The result is the fraction of positions ``t`` with
    ``predictions[t]`` in ``gold_tokens[max(0, t - l):t]``. Position 0 has empty context and
    never counts as a repeat, but is in the denominator, as in the authors' code.
    """
    repeats, _ = _repeat_counts(gold_tokens, predictions, l)
    return repeats / len(gold_tokens) if gold_tokens else 0.0


def wrep_l(gold_tokens: Tokens, predictions: Tokens, l: int) -> float:  # noqa: E741
    """wrep/l of Welleck et al. 2019: :func:`rep_l` counting only wrong predictions.

    Same alignment as :func:`rep_l`; the numerator counts positions whose prediction is in the
    previous ``l`` gold tokens and differs from ``gold_tokens[t]``. The denominator is still
    every position (the authors' code normalises by the token count), so ``rep_l - wrep_l`` is
    the rate of correct repeats.
    """
    _, wrong = _repeat_counts(gold_tokens, predictions, l)
    return wrong / len(gold_tokens) if gold_tokens else 0.0


def distinct_n(texts: Sequence[Tokens], n: int) -> float:
    """distinct-n of Li et al. 2016, "A Diversity-Promoting Objective Function for ...".

    ``|n-grams distinct across all texts| / |n-grams in all texts|``. (Li et al. divide by the
    number of generated tokens; dividing by n-grams, as most later work does, keeps it in
    [0, 1] for every n.)
    """
    check_int("n", n, 1)
    distinct: set[tuple] = set()
    total = 0
    for tokens in texts:
        grams = _ngrams(tokens, n)
        distinct.update(grams)
        total += len(grams)
    return len(distinct) / total if total else 0.0


def holtzman_repetition(tokens: Tokens, min_phrase: int = 2, min_repeats: int = 3) -> bool:
    """Whether a generation ends in a repeating loop, per Holtzman et al. 2020.

    "The Curious Case of Neural Text Degeneration" counts a generation as repeating when it
    ends with a phrase of at least two tokens repeated at least three times. Read here as:
    for some ``L >= min_phrase`` the last ``L * min_repeats`` tokens are ``min_repeats``
    consecutive copies of one ``L``-token phrase. A run of one token qualifies once it is
    ``min_phrase * min_repeats`` long (the phrase is then that token ``min_phrase`` times).
    """
    check_int("min_phrase", min_phrase, 1)
    check_int("min_repeats", min_repeats, 2)
    size = len(tokens)
    tail = list(tokens)
    for length in range(min_phrase, size // min_repeats + 1):
        span = length * min_repeats
        # The tail is made of copies exactly when it has period `length`.
        if tail[size - span : size - length] == tail[size - span + length :]:
            return True
    return False


def rep_sen(sentences: Sequence[Hashable]) -> float:
    """rep-sen of Xu et al. 2022, "Learning to Break the Loop".

    The fraction of sentences that repeat an earlier sentence of the same text:
    ``1 - |unique sentences| / |sentences|``. Sentences are compared exactly; use
    :func:`split_sentences` to get them from a string.
    """
    return 1.0 - len(set(sentences)) / len(sentences) if sentences else 0.0


def split_sentences(text: str) -> list[str]:
    """Split ``text`` after ``.``, ``!`` or ``?`` followed by whitespace, and at line breaks.

    Sentences are stripped and empty ones dropped. Deliberately simple: abbreviations such as
    "e.g. this" split too, which affects repeated and unique sentences alike.
    """
    return [part.strip() for part in _SENTENCE_END.split(text) if part.strip()]

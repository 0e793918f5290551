"""Repetition metrics against values worked by hand."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arlm.loops import metrics


def test_seq_rep_n_averages_per_continuation():
    # [1,2,1,2,1]: bigrams 12 21 12 21 -> 2 unique of 4 -> 0.5
    # [1,2,3]: bigrams 12 23 -> 0;  [1]: no bigrams -> contributes 0
    assert metrics.seq_rep_n([[1, 2, 1, 2, 1], [1, 2, 3], [1]], n=2) == pytest.approx(0.5 / 3)
    # Default n=4: a b a b a b -> 4-grams abab baba abab -> 2 unique of 3
    assert metrics.seq_rep_n(["ababab"]) == pytest.approx(1 / 3)


def test_rep_n_pools_counts_over_texts():
    # unique 2 + 2 over total 4 + 2 -> 1 - 4/6, where seq_rep_n gives (0.5 + 0) / 2
    texts = [[1, 2, 1, 2, 1], [1, 2, 3]]
    assert metrics.rep_n(texts, 2) == pytest.approx(1 / 3)
    assert metrics.seq_rep_n(texts, 2) == pytest.approx(0.25)


def test_diversity_multiplies_rep_2_to_4():
    # a b a b a b: rep-2 = 1 - 2/5, rep-3 = 1 - 2/4, rep-4 = 1 - 2/3
    assert metrics.diversity(["ababab"]) == pytest.approx((2 / 5) * (2 / 4) * (2 / 3))
    assert metrics.diversity(["abcdef"]) == 1.0


def test_rep_l_and_wrep_l():
    gold = ["a", "b", "a", "b", "c"]
    preds = ["b", "a", "a", "c", "b"]
    # l=2, context gold[t-2:t]:
    # t=0 b in []     no
    # t=1 a in [a]    repeat, gold b: wrong
    # t=2 a in [a b]  repeat, gold a: right
    # t=3 c in [b a]  no
    # t=4 b in [a b]  repeat, gold c: wrong
    assert metrics.rep_l(gold, preds, 2) == pytest.approx(3 / 5)
    assert metrics.wrep_l(gold, preds, 2) == pytest.approx(2 / 5)
    # l=1: only t=1 (a in [a]) and t=4 (b in [b]) repeat, both wrong
    assert metrics.rep_l(gold, preds, 1) == pytest.approx(2 / 5)
    assert metrics.wrep_l(gold, preds, 1) == pytest.approx(2 / 5)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=30),
    st.integers(1, 6),
)
def test_rep_l_matches_its_definition(pairs, l):  # noqa: E741
    gold = [g for g, _ in pairs]
    preds = [p for _, p in pairs]
    repeats = [preds[t] in gold[max(0, t - l) : t] for t in range(len(gold))]
    wrong = [r and preds[t] != gold[t] for t, r in enumerate(repeats)]
    size = max(len(gold), 1)
    assert metrics.rep_l(gold, preds, l) == pytest.approx(sum(repeats) / size)
    assert metrics.wrep_l(gold, preds, l) == pytest.approx(sum(wrong) / size)


def test_distinct_n_counts_distinct_across_texts():
    texts = [["a", "b", "a", "b"], ["a", "b", "c"]]
    # bigrams ab ba ab | ab bc -> 3 distinct of 5; unigrams: 3 distinct of 7
    assert metrics.distinct_n(texts, 2) == pytest.approx(3 / 5)
    assert metrics.distinct_n(texts, 1) == pytest.approx(3 / 7)


@pytest.mark.parametrize(
    ("tokens", "kwargs", "expected"),
    [
        ("xyababab", {}, True),  # "ab" three times at the end
        ("abab", {}, False),  # only twice
        ("abababc", {}, False),  # the repeats are not at the end
        ("aaaaaa", {}, True),  # "aa" three times
        ("aaaaa", {}, False),
        ("abcabcabc", {}, True),
        ("abcabcabc", {"min_phrase": 4}, False),
        ("abab", {"min_repeats": 2}, True),
        ("", {}, False),
    ],
)
def test_holtzman_repetition(tokens, kwargs, expected):
    assert metrics.holtzman_repetition(list(tokens), **kwargs) is expected


def test_rep_sen_and_split_sentences():
    # two of the four sentences repeat an earlier one
    assert metrics.rep_sen(["A.", "B.", "A.", "A."]) == pytest.approx(0.5)
    text = "Hi there. How are you? Hi there.\nOk!"
    sentences = metrics.split_sentences(text)
    assert sentences == ["Hi there.", "How are you?", "Hi there.", "Ok!"]
    assert metrics.rep_sen(sentences) == pytest.approx(0.25)
    assert metrics.split_sentences("  One...  two!!\n\n three  ") == ["One...", "two!!", "three"]


def test_nothing_to_measure_is_zero():
    assert metrics.seq_rep_n([]) == 0.0
    assert metrics.rep_n([[1]], 2) == 0.0
    assert metrics.distinct_n([], 1) == 0.0
    assert metrics.rep_l([], [], 4) == 0.0 and metrics.wrep_l([], [], 4) == 0.0
    assert metrics.rep_sen([]) == 0.0


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: metrics.seq_rep_n([[1]], n=0), "n"),
        (lambda: metrics.rep_n([[1]], 0), "n"),
        (lambda: metrics.distinct_n([[1]], -1), "n"),
        (lambda: metrics.rep_l([1, 2], [1], 2), "len"),
        (lambda: metrics.wrep_l([1], [1], 0), "l"),
        (lambda: metrics.holtzman_repetition([1], min_phrase=0), "min_phrase"),
        (lambda: metrics.holtzman_repetition([1], min_repeats=1), "min_repeats"),
    ],
)
def test_bad_arguments_are_rejected(call, name):
    with pytest.raises(ValueError, match=name):
        call()

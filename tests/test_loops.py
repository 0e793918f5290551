"""LoopDetector against a brute-force reading of the rule, plus constructed streams."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arlm.loops import LoopDetector, LoopDetectorConfig, LoopReport, find_loops

# --- reference: the rule, rescanning the whole history on every push ---------------------------


def reference_reports(stream, min_pattern_size, max_pattern_size, min_count, min_span):
    """What push should return at each item, as (pattern_size, start, count, pattern, position)."""
    items, out, followed = [], [], None
    for x in stream:
        items.append(x)
        n = len(items)
        present = {}  # period -> start, for every period that makes a loop now
        for p in range(min_pattern_size, max_pattern_size + 1):
            start = n - p if p < n else 0
            while start > 0 and items[start - 1] == items[start - 1 + p]:
                start -= 1
            if n - start >= max(min_count * p, min_span):
                present[p] = start
        if followed is not None and present.get(followed[0]) == followed[1]:
            p, start = followed  # the followed loop goes on
        elif present:
            p = min(present)
            start = present[p]
            followed = (p, start)
        else:
            followed = None
            out.append(None)
            continue
        out.append((p, start, (n - start) // p, tuple(items[start : start + p]), n - 1))
    return out


def as_tuple(report: LoopReport | None):
    if report is None:
        return None
    return (report.pattern_size, report.start, report.count, report.pattern, report.position)


def detector_reports(stream, *params):
    detector = LoopDetector(*params)
    return [as_tuple(detector.push(x)) for x in stream]


# --- property tests ---------------------------------------------------------------------------

params = st.tuples(
    st.integers(1, 4), st.integers(0, 40), st.integers(2, 4), st.integers(0, 24)
).map(lambda t: (t[0], t[0] + t[1], t[2], t[3]))


@st.composite
def loopy_streams(draw):
    """Runs of copies of short blocks, with partial copies, mutations and noise between them."""
    alphabet = draw(st.integers(1, 4))
    symbol = st.integers(0, alphabet - 1)
    stream: list[int] = []
    for _ in range(draw(st.integers(1, 6))):
        block = draw(st.lists(symbol, min_size=1, max_size=12))
        copies = block * draw(st.integers(1, 6)) + block[: draw(st.integers(0, len(block)))]
        if copies and draw(st.booleans()):
            copies[draw(st.integers(0, len(copies) - 1))] = draw(symbol)
        stream += copies + draw(st.lists(symbol, max_size=4))
    return stream[:90]


@settings(max_examples=250, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from((None, 0, "a")), max_size=70), params)
def test_matches_reference_on_random_streams(stream, p):
    # None included: the detector must not confuse it with the empty slots of its buffer.
    assert detector_reports(stream, *p) == reference_reports(stream, *p)


@settings(max_examples=250, deadline=None, derandomize=True)
@given(loopy_streams(), params)
def test_matches_reference_on_loopy_streams(stream, p):
    assert detector_reports(stream, *p) == reference_reports(stream, *p)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(loopy_streams(), params)
def test_find_loops_keeps_the_last_report_of_each_episode(stream, p):
    expected, previous = [], None
    for rep in reference_reports(stream, *p) + [None]:
        if previous is not None and (rep is None or rep[:2] != previous[:2]):
            expected.append(previous)
        previous = rep
    names = ("min_pattern_size", "max_pattern_size", "min_count", "min_span")
    found = find_loops(stream, **dict(zip(names, p, strict=True)))
    assert [as_tuple(r) for r in found] == expected


def test_matches_reference_on_a_long_seeded_stream():
    # Loops much longer than the window: exercises the refill after a long followed loop.
    rng = random.Random(7)
    stream: list[int] = []
    while len(stream) < 600:
        block = [rng.randrange(3) for _ in range(rng.randint(1, 5))]
        stream += block * rng.randint(1, 40) + [rng.randrange(3)]
    p = (1, 6, 2, 5)
    assert detector_reports(stream, *p) == reference_reports(stream, *p)


def test_runs_stop_at_the_first_item():
    # When "b" breaks the followed None-loop, the period-8 run must not count a match before
    # index 0 (where the buffer holds no items yet, which must not pass for None).
    stream = ["b", None, None, None, "b", None, None, None, "b"]
    assert detector_reports(stream, 1, 9, 2, 2) == reference_reports(stream, 1, 9, 2, 2)


# --- constructed streams ----------------------------------------------------------------------


def first_report(stream, **params):
    detector = LoopDetector(**params)
    for x in stream:
        rep = detector.push(x)
        if rep is not None:
            return rep
    return None


def test_loop_after_a_prefix_starts_exactly_at_its_onset():
    stream = [10, 11, 12, 13, 14] + [1, 2, 3] * 5
    rep = first_report(stream, min_count=3, min_span=0)
    assert rep == LoopReport(pattern_size=3, start=5, count=3, pattern=(1, 2, 3), position=13)
    assert find_loops(stream, min_count=3, min_span=0) == [
        LoopReport(pattern_size=3, start=5, count=5, pattern=(1, 2, 3), position=19)
    ]


def test_onset_reaches_into_the_prefix_when_the_prefix_already_repeats():
    # 3 then [1, 2, 3] * 3: the onset is the prefix's 3, and the pattern is read from there.
    rep = first_report([9, 3, 1, 2, 3, 1, 2, 3, 1, 2], min_count=3, min_span=0)
    assert (rep.start, rep.pattern, rep.position) == (1, (3, 1, 2), 9)


def test_single_token_loop_fires_at_min_span():
    detector = LoopDetector()  # defaults: min_count=3, min_span=32
    reports = [detector.push("a") for _ in range(40)]
    assert reports[:31] == [None] * 31
    assert reports[31] == LoopReport(1, 0, 32, ("a",), 31)
    assert reports[39] == LoopReport(1, 0, 40, ("a",), 39)
    assert detector.report == reports[39] and len(detector) == 40


def test_long_period_is_found_with_its_full_block():
    rng = random.Random(0)
    block = [f"tok{i}" for i in range(1000)]
    prefix = [rng.random() for _ in range(37)]  # floats never equal a block item
    stream = prefix + block * 3 + block[:10]
    detector = LoopDetector(max_pattern_size=1024)
    reports = [detector.push(x) for x in stream]
    fired = next(i for i, r in enumerate(reports) if r is not None)
    assert fired == 37 + 3000 - 1
    assert reports[fired] == LoopReport(1000, 37, 3, tuple(block), fired)
    assert reports[-1].count == 3 and reports[-1].position == len(stream) - 1


def test_period_longer_than_max_pattern_size_is_not_a_loop():
    block = list(range(1100))
    assert find_loops(block * 4, max_pattern_size=1024) == []


def test_one_changed_item_delays_the_loop():
    block = list(range(10))
    changed = block[:5] + [99] + block[6:]
    # The period-10 run restarts after the changed item (index 15), so three copies are
    # complete only at index 16 + 30 - 1.
    detector = LoopDetector(min_count=3, min_span=0)
    reports = [detector.push(x) for x in block + changed + block + block + block]
    assert reports[:45] == [None] * 45
    assert reports[45] == LoopReport(10, 16, 3, (6, 7, 8, 9, 0, 1, 2, 3, 4, 5), 45)


def test_counting_never_fires():
    assert find_loops(range(5000)) == []
    assert find_loops(range(5000), min_span=0, min_count=2) == []


def test_numbered_list_never_fires():
    lines = [f"{i}. foo" for i in range(1, 300)]
    assert find_loops(lines, min_span=0) == []
    tokens = [tok for line in lines for tok in (line.split(".")[0], ".", " foo", "\n")]
    assert find_loops(tokens, min_span=0) == []


def test_the_smallest_period_is_reported():
    rep = first_report("ab" * 20, min_count=3, min_span=0)
    assert (rep.pattern_size, rep.pattern, rep.position) == (2, ("a", "b"), 5)
    # With periods below 3 excluded, "abab" is the smallest period left.
    rep = first_report("ab" * 20, min_pattern_size=3, min_count=3, min_span=0)
    assert (rep.pattern_size, rep.pattern, rep.position) == (4, tuple("abab"), 11)


def test_a_followed_loop_keeps_its_period_while_it_continues():
    # "aaaab" repeated: every "aaa" is a period-1 loop; period 5 fires at the third "b" and is
    # then followed, although each later "aaa" makes period 1 qualify again.
    stream = "aaaab" * 5
    detector = LoopDetector(min_count=3, min_span=0)
    reports = [detector.push(x) for x in stream]
    assert reports[2] == LoopReport(1, 0, 3, ("a",), 2)
    assert reports[14] == LoopReport(5, 0, 3, tuple("aaaab"), 14)
    assert all(r.pattern_size == 5 and r.start == 0 for r in reports[14:])
    assert [as_tuple(r) for r in reports] == reference_reports(stream, 1, 1024, 3, 0)


def test_a_broken_loop_reports_none_then_a_new_loop_fires():
    stream = ["x"] * 6 + ["y"] + ["z", "w"] * 4
    detector = LoopDetector(min_count=3, min_span=6)
    reports = [detector.push(s) for s in stream[:7]]
    assert reports[5] == LoopReport(1, 0, 6, ("x",), 5)
    assert reports[6] is None and detector.report is None  # "y" breaks the loop
    reports += [detector.push(s) for s in stream[7:]]
    assert reports[7:12] == [None] * 5
    assert reports[12] == LoopReport(2, 7, 3, ("z", "w"), 12)
    assert find_loops(stream, min_count=3, min_span=6) == [
        LoopReport(1, 0, 6, ("x",), 5),
        LoopReport(2, 7, 4, ("z", "w"), 14),
    ]


def test_reset_forgets_the_stream():
    detector = LoopDetector(min_span=0)
    for x in [1, 2] * 5:
        detector.push(x)
    assert detector.report is not None
    detector.reset()
    assert len(detector) == 0 and detector.report is None
    # The loop must build up again, with indices counted from the reset.
    assert [detector.push(x) for x in [1, 2] * 2 + [1]] == [None] * 5
    assert detector.push(2) == LoopReport(2, 0, 3, (1, 2), 5)


def test_agent_steps_as_tuples():
    steps = [("search", "weather paris"), ("open", "https://example.com/a")]
    stream = [("plan", "find the forecast")] + steps * 4
    rep = find_loops(stream, min_count=3, min_span=0)
    assert rep == [LoopReport(2, 1, 4, tuple(steps), 8)]


def test_memory_stays_bounded():
    detector = LoopDetector(max_pattern_size=64)
    for i in range(20_000):
        detector.push(i % 5000)
    assert len(detector) == 20_000
    assert len(detector._ring) == 64 and sum(map(len, detector._pos.values())) == 64


@pytest.mark.parametrize(
    ("params", "name"),
    [
        ({"min_pattern_size": 0}, "min_pattern_size"),
        ({"min_pattern_size": 5, "max_pattern_size": 4}, "max_pattern_size"),
        ({"min_count": 1}, "min_count"),
        ({"min_span": -1}, "min_span"),
        ({"min_count": 2.5}, "min_count"),
    ],
)
def test_bad_parameters_are_rejected(params, name):
    with pytest.raises(ValueError, match=name):
        LoopDetector(**params)
    with pytest.raises(ValueError, match=name):
        LoopDetectorConfig(**params)


def test_from_config_uses_its_thresholds():
    config = LoopDetectorConfig(min_pattern_size=2, max_pattern_size=8, min_count=4, min_span=0)
    assert LoopDetector.from_config(config).config == config

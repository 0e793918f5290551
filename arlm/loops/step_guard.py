"""The step guard: repetition rules over an agent's steps, checked online as each step arrives.

``guard.push(step)`` takes the next step (an OpenAI chat message or a plain step, see
``arlm.loops.steps``) and returns a :class:`Verdict` when a rule fires, else ``None``.

The rules, each with its own threshold in :class:`GuardConfig` (0 turns it off). "In a row"
means no other call, result or agent message in between (results between calls are expected):

- ``repeated_error``: one call, each time followed by an error, N times in a row;
- ``action_failures``: one call failed N times among the last ``window`` results, in a row or not;
- ``same_error``: one error text N times among the last ``window`` results, from two or more
  different calls (an agent trying variations that all hit the same wall);
- ``repeated_action_observation``: one call with one result, N times in a row;
- ``repeated_action``: one call N times in a row, whatever its results;
- ``alternating``: two call-result pairs alternating, A,B,A,B,..., N copies of the pair;
- ``tool_cycle``: a cycle of 1 to 5 calls repeated N times, whatever the results;
- ``monologue``: one agent message N times with nothing in between;
- ``cycle``: any cycle of steps (calls, results and messages alike) of up to ``max_period``
  steps, N copies in a row: A,B,C,A,B,C,... and longer cycles, not only the short ones.

The exact rules are arlm's :class:`~arlm.loops.detector.LoopDetector` over a derived stream of
canonical steps (calls only, call-result pairs, failing calls, messages, everything), with a
unique breaker item where "in a row" is broken; each fires at exactly N copies. Equal steps are
found by canonical forms, and near-duplicates (a counter in the arguments) by a key function.

Escalation. The first time a rule fires the verdict is ``warn`` and carries a short message an
agent can read ("... 3 times in a row, since step 4 ... step back"); the run goes on. Once
``warnings`` warnings have been given, the next rule that fires, or the same repetition
continuing, is ``stop``. The agent gets one turn to react: within the turn that was warned
(its call and the results that answer it) a repetition that merely goes on returns ``None``,
and only a rule newly firing there returns another ``warn``. A turn starts at each agent step.

Cost. A push costs the same whatever the length of the history: each detector push costs at
most the number of occurrences of the item within its last ``max_pattern_size`` items (see
the detector), the windowed rules count over at most ``window`` results, and a verdict lists
at most N copies of a cycle (or ``window`` results). Memory is bounded the same way.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path

from arlm.config import option
from arlm.loops.detector import LoopDetector
from arlm.loops.steps import Call, Canon, Event, Result, mask_numbers, read_trace
from arlm.validate import check_int

# In priority order: when several rules fire at one step, the verdict names the first.
RULES = (
    "repeated_error",
    "action_failures",
    "same_error",
    "repeated_action_observation",
    "repeated_action",
    "alternating",
    "tool_cycle",
    "monologue",
    "cycle",
)
TOOL_CYCLE_MAX_PERIOD = 5  # gemini-cli's longest cycle of tool calls
NEAR_DUPLICATES: dict[str, Callable[[str], str]] = {"numbers": mask_numbers}
DEFAULT_ERROR_PREFIXES = ("error", "exception", "traceback")
LEVELS = ("warn", "stop")


def _check_threshold(name: str, value: object) -> None:
    check_int(name, value, 0, "0 (off) or >= 2")
    if value == 1:  # a threshold of one would fire on every step
        raise ValueError(f"{name}=1 is not allowed; it must be an integer 0 (off) or >= 2")


@dataclass
class GuardConfig:
    """The step guard's rules and thresholds; the defaults are the ``strict`` preset.

    Each rule's threshold counts repetitions (copies of a cycle, failures, messages) and the
    rule fires at exactly that count; 0 turns the rule off. The module docstring defines the
    rules. strict sits one below the agent tools it learns from where they differ: a repeated
    call is flagged at 3 (Cline warns at 3, Roo Code blocks the 4th), a repeated call-result
    pair at 3 (OpenHands: 4), a tool cycle at 4 copies (gemini-cli: 5), and it adds the rules
    none of them has: cycles of any period over every step, failures that are not in a row, and
    one error from different calls.
    """

    repeated_error: int = option(3, help="one call failing this many times in a row (0: off)")
    action_failures: int = option(
        3, help="one call failing this many times within the window (0: off)"
    )
    same_error: int = option(
        3, help="one error this many times within the window, from 2+ different calls (0: off)"
    )
    repeated_action_observation: int = option(
        3, help="one call with the same result this many times in a row (0: off)"
    )
    repeated_action: int = option(
        3, help="one call this many times in a row, whatever its results (0: off)"
    )
    alternating: int = option(
        3, help="copies of two call-result pairs alternating, A,B,A,B,... (0: off)"
    )
    tool_cycle: int = option(
        4, help="copies of a cycle of 1 to 5 calls, whatever their results (0: off)"
    )
    monologue: int = option(3, help="one agent message this many times in a row (0: off)")
    cycle: int = option(3, help="copies of any cycle of steps: calls, results, messages (0: off)")
    max_period: int = option(64, help="the longest cycle the cycle rule finds, in steps")
    window: int = option(20, help="results the windowed rules (action_failures, same_error) see")
    warnings: int = option(1, help="warn verdicts before the next repetition is a stop")
    near_duplicates: str | None = option(
        None,
        choices=sorted(NEAR_DUPLICATES),
        help="count near-duplicates as one: numbers (digits masked: page=3 and page=4 match)",
    )
    ignore_fields: list[str] = option(
        factory=list,
        flag="--ignore-field",
        help="a field of the arguments or of JSON results never compared (repeatable)",
    )
    error_prefixes: list[str] = option(
        factory=lambda: list(DEFAULT_ERROR_PREFIXES),
        flag="--error-prefix",
        help="a result whose text starts with this is an error (repeatable; replaces the "
        f"defaults {', '.join(DEFAULT_ERROR_PREFIXES)})",
    )

    def __post_init__(self) -> None:
        for name in RULES:
            _check_threshold(name, getattr(self, name))
        check_int("max_period", self.max_period, 1)
        check_int("window", self.window, 2)
        check_int("warnings", self.warnings, 0)
        if self.near_duplicates is not None and self.near_duplicates not in NEAR_DUPLICATES:
            raise ValueError(
                f"near_duplicates={self.near_duplicates!r} is not allowed; choose one of "
                f"{sorted(NEAR_DUPLICATES)} or None (off)"
            )
        for name in ("ignore_fields", "error_prefixes"):
            value = getattr(self, name)
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name}={value!r} is not allowed; it must be a list of strings")

    @classmethod
    def preset(cls, name: str, **overrides) -> GuardConfig:
        """The named preset (see ``PRESETS``) with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown guard preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_OFF = dict.fromkeys(RULES, 0)

PRESETS: dict[str, dict] = {
    # arlm's own: every rule on, the GuardConfig defaults; warns once, then stops.
    "strict": {},
    # OpenHands' stuck detector: 4 identical call-result pairs, 3 identical calls each followed
    # by an error, 3 identical agent messages with nothing in between, A,B,A,B,A,B over the
    # last 6 call-result pairs (3 copies of the pair). It stops at once, without a warning.
    "openhands": {
        **_OFF,
        "repeated_action_observation": 4,
        "repeated_error": 3,
        "monologue": 3,
        "alternating": 3,
        "warnings": 0,
    },
    # gemini-cli: a cycle of 1 to 5 tool calls (name and arguments) repeated 5 times; the first
    # detection injects a "step back" message, the second ends the turn.
    "gemini-cli": {**_OFF, "tool_cycle": 5, "warnings": 1},
}


@dataclass(frozen=True)
class Verdict:
    """What the guard says about the step just pushed.

    level: ``warn`` (put ``message`` in the agent's context and go on) or ``stop`` (end the
    run). rule: the rule that fired (the first in ``RULES`` order when several did; the others
    are in ``also``). step: the index of this push (0-based; every push counts, user messages
    too). since: the step where the repetition began. steps: the steps that show it, the last
    threshold copies of the cycle (or the failures counted). cycle: the repeated block in
    canonical form (one item for the windowed rules: the call or the error). count: copies (or
    failures) so far.
    """

    level: str
    rule: str
    step: int
    since: int
    steps: tuple[int, ...]
    cycle: tuple[str, ...]
    count: int
    message: str
    also: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Firing:
    rule: str
    new: bool  # the rule reached its threshold at this step (else a repetition went on)
    since: int
    steps: tuple[int, ...]
    cycle: tuple[str, ...]
    count: int
    callers: int = 0  # same_error: the different calls that returned the error


class _Breaker:
    """An item equal to nothing else: breaks "in a row" in a derived stream."""

    __slots__ = ()


@dataclass
class _Watch:
    rule: str
    threshold: int
    detector: LoopDetector
    episode: tuple[int, int, int] | None = None  # (start, period, since step) of the loop seen


class _Lens:
    """One derived stream of the steps, watched by one exact detector per rule, with the steps
    of its latest items (to name the steps of a verdict)."""

    def __init__(self, rules: list[tuple[str, int, int, int]], show: Callable) -> None:
        self.watches = [
            _Watch(rule, n, LoopDetector(lo, hi, min_count=n, min_span=0))
            for rule, n, lo, hi in rules
        ]
        self.show = show  # item -> readable text
        # A loop is first reported count periods after its onset, or a little later when it
        # is found as another loop breaks: two periodic runs overlap by less than the sum of
        # their periods (Fine and Wilf). (count + 3) periods keep every onset and the steps of
        # the last count copies; on random loopy streams onsets stay within (count + 1).
        self._items: deque[tuple[int, ...]] = deque(
            maxlen=max((n + 3) * hi for _, n, _, hi in rules)
        )
        self._n = 0

    def _steps_of(self, i: int) -> tuple[int, ...]:
        offset = i - (self._n - len(self._items))
        if offset < 0:  # a negative index would silently wrap around
            raise IndexError(f"item {i} is older than the {len(self._items)} kept")
        return self._items[offset]

    def push(self, item: Hashable, steps: tuple[int, ...]) -> list[_Firing]:
        n = self._n
        self._n += 1
        self._items.append(steps)
        fired = []
        for w in self.watches:
            report = w.detector.push(item)
            if report is None:
                w.episode = None
                continue
            p = report.pattern_size
            new = w.episode is None or w.episode[:2] != (report.start, p)
            if new:
                w.episode = (report.start, p, self._steps_of(report.start)[0])
            first = max(report.start, n + 1 - w.threshold * p)
            involved = sorted({s for i in range(first, n + 1) for s in self._steps_of(i)})
            cycle = tuple(self.show(x) for x in report.pattern)
            fired.append(_Firing(w.rule, new, w.episode[2], tuple(involved), cycle, report.count))
        return fired


@dataclass(frozen=True, slots=True)
class _Error:
    index: int  # among results
    call: str
    text: str
    steps: tuple[int, ...]


class _Failures:
    """action_failures and same_error: counts over the errors among the last ``window``
    results, each added and dropped once, so a push costs O(1) amortized."""

    def __init__(self, window: int, failures: int, same_error: int) -> None:
        self.window, self.failures, self.same_error = window, failures, same_error
        self._n = 0
        self._errors: deque[_Error] = deque()
        self._by_call: dict[str, deque[_Error]] = {}
        self._by_text: dict[str, deque[_Error]] = {}
        self._callers: dict[str, Counter[str]] = {}

    def _forget(self, e: _Error) -> None:
        for table, key in ((self._by_call, e.call), (self._by_text, e.text)):
            table[key].popleft()  # the oldest: errors are added in order
            if not table[key]:
                del table[key]
        callers = self._callers[e.text]
        callers[e.call] -= 1
        if not callers[e.call]:
            del callers[e.call]
        if not callers:
            del self._callers[e.text]

    def _repeats(self, text: str) -> bool:
        return len(self._by_text.get(text, ())) >= self.same_error and len(self._callers[text]) > 1

    def push(self, call: str | None, result: Result, steps: tuple[int, ...]) -> list[_Firing]:
        n = self._n
        self._n += 1
        while self._errors and self._errors[0].index <= n - self.window:
            self._forget(self._errors.popleft())
        if not result.error or call is None:  # an error of an unknown call is nobody's failure
            return []
        e = _Error(n, call, result.text, steps)
        repeated_before = bool(self.same_error) and self._repeats(e.text)
        self._errors.append(e)
        self._by_call.setdefault(call, deque()).append(e)
        self._by_text.setdefault(e.text, deque()).append(e)
        self._callers.setdefault(e.text, Counter())[call] += 1
        fired = []
        failed = self._by_call[call]
        if self.failures and len(failed) >= self.failures:
            fired.append(_evidence("action_failures", len(failed) == self.failures, failed, call))
        if self.same_error and self._repeats(e.text):
            same = self._by_text[e.text]
            callers = len(self._callers[e.text])
            fired.append(
                dataclasses.replace(
                    _evidence("same_error", not repeated_before, same, e.text), callers=callers
                )
            )
        return fired


def _evidence(rule: str, new: bool, errors: deque[_Error], item: str) -> _Firing:
    steps = tuple(sorted({s for e in errors for s in e.steps}))
    return _Firing(rule, new, errors[0].steps[0], steps, (item,), len(errors))


def _show_pair(pair: tuple[str, bool, str]) -> str:
    call, _, text = pair
    return f"{call} -> {text}"


def _show_step(item: tuple) -> str:
    if item[0] == "call":
        return item[1]
    if item[0] == "result":
        return f"-> {item[2]}"
    return f"says {item[1]!r}"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(f: _Firing, window: int) -> str:
    """What repeats, in words an agent can act on."""
    c = [_short(x) for x in f.cycle]
    n, rule = f.count, f.rule
    if rule == "repeated_error":
        return f"the call {c[0]} failed {n} times in a row"
    if rule == "action_failures":
        return f"the call {c[0]} failed {n} times in the last {window} results"
    if rule == "same_error":
        return (
            f"{n} of the last {window} results were the same error ({c[0]}), from "
            f"{f.callers} different calls"
        )
    if rule == "repeated_action_observation":
        return f"the call and result {c[0]} came {n} times in a row"
    if rule == "repeated_action":
        return f"the same call {c[0]} came {n} times in a row"
    if rule == "alternating":
        return f"alternating between {c[0]} and {c[1]}, {n} times"
    if rule == "monologue":
        return f"the same message {c[0]!r} came {n} times in a row"
    what = "call" if rule == "tool_cycle" else "step"
    if len(c) == 1:
        return f"the same {what} {c[0]} came {n} times in a row"
    return f"the same {len(c)} {what}s ({'; '.join(c)}) came {n} times over"


class StepGuard:
    """Watches an agent's steps; ``push(step)`` returns a :class:`Verdict` or ``None``.

    config: a preset name (``strict``, ``openhands``, ``gemini-cli``; see ``PRESETS``) or a
    :class:`GuardConfig`; keyword overrides are ``GuardConfig`` fields set on top. key: a
    near-duplicate key function applied to every compared text (instead of
    ``near_duplicates``), e.g. one that drops a request id the ignored fields cannot reach.

    ``reset()`` starts over (a new task). ``stopped`` says whether a stop was given;
    ``episodes`` counts, per rule, the times it reached its threshold.
    """

    def __init__(
        self,
        config: GuardConfig | str = "strict",
        *,
        key: Callable[[str], str] | None = None,
        **overrides,
    ) -> None:
        if isinstance(config, str):
            config = GuardConfig.preset(config, **overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if key is not None and config.near_duplicates is not None:
            raise ValueError(
                f"give either key= or near_duplicates={config.near_duplicates!r}, not both"
            )
        self.config = config
        near = NEAR_DUPLICATES[config.near_duplicates] if config.near_duplicates else None
        self.canon = Canon(
            frozenset(config.ignore_fields),
            tuple(p.lower() for p in config.error_prefixes),
            key or near,
        )
        self.reset()

    def _lens(self, rules: tuple[tuple[str, int, int], ...], show: Callable) -> _Lens | None:
        on = [
            (r, getattr(self.config, r), lo, hi) for r, lo, hi in rules if getattr(self.config, r)
        ]
        return _Lens(on, show) if on else None

    def reset(self) -> None:
        """Forget every step pushed so far."""
        c = self.config
        self._calls = self._lens(
            (("repeated_action", 1, 1), ("tool_cycle", 1, TOOL_CYCLE_MAX_PERIOD)), str
        )
        self._pairs = self._lens(
            (("repeated_action_observation", 1, 1), ("alternating", 2, 2)), _show_pair
        )
        self._failing = self._lens((("repeated_error", 1, 1),), str)
        self._messages = self._lens((("monologue", 1, 1),), str)
        self._all = self._lens((("cycle", 1, c.max_period),), _show_step)
        self._window = (
            _Failures(c.window, c.action_failures, c.same_error)
            if c.action_failures or c.same_error
            else None
        )
        self._n = 0
        self._turn = 0
        # calls awaiting their result: tool-call id (or a unique key) -> (call key, step)
        self._pending: dict[Hashable, tuple[str, int]] = {}
        self._warned_turn = -1
        self._warnings = 0
        self._stopped = False
        self.episodes: Counter[str] = Counter()

    def __len__(self) -> int:
        return self._n

    @property
    def stopped(self) -> bool:
        return self._stopped

    def push(self, step: object) -> Verdict | None:
        """Watch the next step; the verdict, if a rule fires. A step of neither accepted shape
        raises ``ValueError`` and is not counted."""
        agent, events = self.canon.events(step)
        index = self._n
        self._n += 1
        if agent:
            self._turn += 1
            self._pending.clear()  # calls never answered are dropped with their turn
        fired: list[_Firing] = []
        for event in events:
            fired += self._watch(event, index)
        for f in fired:
            if f.new:
                self.episodes[f.rule] += 1
        return self._decide(index, fired)

    def _answered(self, result: Result) -> tuple[str | None, int | None]:
        """The call a result answers: by its id, else the oldest unanswered call."""
        if result.call_id is not None:
            found = self._pending.pop(result.call_id, None)
            return found if found is not None else (None, None)
        if self._pending:
            return self._pending.pop(next(iter(self._pending)))
        return None, None

    def _watch(self, event: Event, index: int) -> list[_Firing]:
        here = (index,)
        fired: list[_Firing] = []

        def feed(lens: _Lens | None, item: Hashable, steps: tuple[int, ...] = here) -> None:
            if lens is not None:
                fired.extend(lens.push(item, steps))

        if isinstance(event, Call):
            self._pending[event.id if event.id is not None else object()] = (event.key, index)
            feed(self._all, ("call", event.key))
            feed(self._calls, event.key)
            feed(self._messages, _Breaker())
        elif isinstance(event, Result):
            call, call_step = self._answered(event)
            both = here if call_step is None else (call_step, index)
            feed(self._all, ("result", event.error, event.text))
            feed(self._pairs, (call, event.error, event.text) if call else _Breaker(), both)
            feed(self._failing, call if call and event.error else _Breaker(), both)
            feed(self._messages, _Breaker())
            if self._window is not None:
                fired.extend(self._window.push(call, event, both))
        else:  # a Message
            feed(self._all, ("say", event.text))
            feed(self._messages, event.text)
            for lens in (self._calls, self._pairs, self._failing):
                feed(lens, _Breaker())
        return fired

    def _decide(self, index: int, fired: list[_Firing]) -> Verdict | None:
        if not fired:
            return None
        fired.sort(key=lambda f: RULES.index(f.rule))
        main = fired[0]
        if self._stopped:
            level = "stop"
        elif self._warned_turn == self._turn:
            new = [f for f in fired if f.new]
            if not new:  # already warned this turn; the agent has not had its say yet
                return None
            level, main = "warn", new[0]
        elif self._warnings < self.config.warnings:
            level = "warn"
            self._warnings += 1
            self._warned_turn = self._turn
        else:
            level = "stop"
            self._stopped = True
        what = _describe(main, self.config.window)
        if level == "warn":
            message = (
                f"Loop warning: {what}, since step {main.since} (rule {main.rule}). Repeating "
                "it will not change the outcome: step back and try a different approach, or "
                "say what blocks you."
            )
        else:
            message = f"Loop stop: {what}, since step {main.since} (rule {main.rule})."
        also = tuple(dict.fromkeys(f.rule for f in fired if f.rule != main.rule))
        return Verdict(
            level, main.rule, index, main.since, main.steps, main.cycle, main.count, message, also
        )


@dataclass
class GuardedTrace:
    """A trace replayed through a guard as the run would have gone: its verdicts up to and
    including the first stop, each with its 1-based line; ``episodes``: the times each rule
    reached its threshold up to there; ``after_stop``: the steps the stop would have saved."""

    path: Path
    steps: int
    verdicts: list[tuple[int, Verdict]] = field(default_factory=list)
    episodes: Counter[str] = field(default_factory=Counter)
    after_stop: int = 0

    @property
    def stopped(self) -> bool:
        return bool(self.verdicts) and self.verdicts[-1][1].level == "stop"


def guard_trace(
    path: str | os.PathLike, config: GuardConfig | str = "strict", **overrides
) -> GuardedTrace:
    """Replay the JSON-lines trace at ``path`` (OpenAI chat messages or plain steps, one per
    line) through a fresh ``StepGuard(config, **overrides)``. A malformed line raises
    ``ValueError`` naming the file and line."""
    guard = StepGuard(config, **overrides)
    steps = read_trace(path)
    out = GuardedTrace(Path(path), len(steps))
    for i, (line, step) in enumerate(steps):
        try:
            verdict = guard.push(step)
        except ValueError as e:
            raise ValueError(f"{path}:{line}: {e}") from e
        if verdict is not None:
            out.verdicts.append((line, verdict))
            if verdict.level == "stop":
                out.after_stop = len(steps) - i - 1
                break
    out.episodes = Counter(guard.episodes)
    return out

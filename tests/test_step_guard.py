"""The step guard: each rule at exactly its threshold, near-misses, near-duplicates, escalation,
the exact-cycle rule against a brute-force reading, canonical forms, and bad input."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arlm.loops import GuardConfig, StepGuard, Verdict
from arlm.loops.step_guard import PRESETS, RULES, guard_trace
from arlm.loops.steps import Canon, canonical_arguments, mask_numbers

# --- steps in the OpenAI chat shape -------------------------------------------------------------

_ids = iter(range(10**9))


def call(name: str, **arguments) -> dict:
    """An assistant message with one tool call (a fresh tool-call id each time)."""
    return {
        "role": "assistant",
        "content": "Let me try.",
        "tool_calls": [
            {
                "id": f"call_{next(_ids)}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
        ],
    }


def result(text: str) -> dict:
    return {"role": "tool", "tool_call_id": None, "content": text}


def say(text: str) -> dict:
    return {"role": "assistant", "content": text}


def answered(calls: list[dict], results: list[dict]) -> list[dict]:
    """Each call followed by its result, the result carrying the call's id."""
    steps = []
    for c, r in zip(calls, results, strict=True):
        steps += [c, {**r, "tool_call_id": c["tool_calls"][0]["id"]}]
    return steps


def only(rule: str, threshold: int, **more) -> StepGuard:
    """A guard with one rule on, stopping at once (no warnings), so every firing is a verdict."""
    return StepGuard(**{**dict.fromkeys(RULES, 0), rule: threshold, "warnings": 0, **more})


def verdicts(guard: StepGuard, steps: list[dict]) -> list[Verdict | None]:
    return [guard.push(s) for s in steps]


def first_fired(out: list[Verdict | None]) -> int | None:
    return next((i for i, v in enumerate(out) if v is not None), None)


# --- each rule at exactly its threshold, and its near-misses ------------------------------------


def repeated_action(n: int, last: dict | None = None) -> list[dict]:
    calls = [call("read_file", path="a.txt") for _ in range(n)]
    if last is not None:
        calls[-1] = last
    return answered(calls, [result(f"attempt {i}: busy") for i in range(n)])


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_repeated_action_fires_at_the_nth_call(n):
    out = verdicts(only("repeated_action", n), repeated_action(n + 1))
    assert first_fired(out) == 2 * (n - 1)  # the n-th call, whatever its results
    v = out[2 * (n - 1)]
    assert (v.rule, v.level, v.since, v.count) == ("repeated_action", "stop", 0, n)
    assert v.steps == tuple(range(0, 2 * n - 1, 2)) and v.cycle == ('read_file({"path":"a.txt"})',)


def test_repeated_action_near_misses():
    assert first_fired(verdicts(only("repeated_action", 3), repeated_action(2))) is None
    different = repeated_action(3, last=call("read_file", path="b.txt"))
    assert first_fired(verdicts(only("repeated_action", 3), different)) is None
    interleaved = answered(
        [call("read_file", path="a.txt"), call("ls"), call("read_file", path="a.txt")] * 2,
        [result("x")] * 6,
    )
    assert first_fired(verdicts(only("repeated_action", 3), interleaved)) is None
    # an agent message in between breaks "in a row" too
    broken = repeated_action(2) + [say("hmm")] + repeated_action(1)
    assert first_fired(verdicts(only("repeated_action", 3), broken)) is None


@pytest.mark.parametrize("n", [2, 4])
def test_repeated_action_observation_fires_at_the_nth_result(n):
    steps = answered([call("grep", q="x") for _ in range(n)], [result("no match")] * n)
    out = verdicts(only("repeated_action_observation", n), steps)
    assert first_fired(out) == 2 * n - 1
    assert out[-1].steps == tuple(range(2 * n)) and out[-1].count == n
    assert out[-1].cycle == ('grep({"q":"x"}) -> no match',)


def test_repeated_action_observation_near_misses():
    guard = only("repeated_action_observation", 3)
    other_result = answered([call("grep", q="x")] * 3, [result("no match")] * 2 + [result("1 hit")])
    assert first_fired(verdicts(guard, other_result)) is None
    other_arg = answered(
        [call("grep", q="x"), call("grep", q="x"), call("grep", q="y")], [result("no match")] * 3
    )
    assert first_fired(verdicts(only("repeated_action_observation", 3), other_arg)) is None


def test_repeated_error_fires_at_the_nth_failure_in_a_row():
    errors = [result(f"Error: timeout after {i} s") for i in (1, 2, 3)]  # errors may differ
    steps = answered([call("fetch", url="u")] * 3, errors)
    out = verdicts(only("repeated_error", 3), steps)
    assert first_fired(out) == 5 and out[5].count == 3
    # near-misses: the last one succeeds; a different argument; an interleaved failing call
    ok = answered([call("fetch", url="u")] * 3, errors[:2] + [result("200 OK")])
    assert first_fired(verdicts(only("repeated_error", 3), ok)) is None
    other = answered([call("fetch", url="u")] * 2 + [call("fetch", url="v")], errors)
    assert first_fired(verdicts(only("repeated_error", 3), other)) is None
    between = answered([call("fetch", url="u"), call("ls"), call("fetch", url="u")] * 2, errors * 2)
    assert first_fired(verdicts(only("repeated_error", 3), between)) is None


def test_action_failures_counts_failures_not_in_a_row_within_the_window():
    pairs = []
    for i in range(3):
        pairs += [(call("build"), result(f"error: step {i} failed")), (call("ls"), result("a b"))]
    steps = answered([c for c, _ in pairs], [r for _, r in pairs])
    out = verdicts(only("action_failures", 3), steps)
    assert first_fired(out) == 9  # the third failure of build(), not in a row
    assert out[9].steps == (0, 1, 4, 5, 8, 9) and out[9].since == 0
    assert out[9].cycle == ("build({})",)
    # with a window of 4 results the first failure has left it by the third
    assert first_fired(verdicts(only("action_failures", 3, window=4), steps)) is None


def test_same_error_from_different_calls():
    calls = [call("open", path=p) for p in ("a", "b", "c")]
    steps = answered(calls, [result("Error: permission denied")] * 3)
    out = verdicts(only("same_error", 3), steps)
    assert first_fired(out) == 5
    assert "from 3 different calls" in out[5].message
    assert out[5].cycle == ("Error: permission denied",)
    # near-misses: one call failing three times (that is action_failures); different errors
    same_call = answered([call("open", path="a")] * 3, [result("Error: permission denied")] * 3)
    assert first_fired(verdicts(only("same_error", 3), same_call)) is None
    varied = answered(calls, [result(f"Error: {w}") for w in ("denied", "missing", "busy")])
    assert first_fired(verdicts(only("same_error", 3), varied)) is None


@pytest.mark.parametrize("n", [2, 3])
def test_alternating_fires_at_n_copies_of_the_pair(n):
    steps = answered([call("a"), call("b")] * n, [result("ra"), result("rb")] * n)
    out = verdicts(only("alternating", n), steps)
    assert first_fired(out) == 4 * n - 1
    assert out[-1].cycle == ("a({}) -> ra", "b({}) -> rb") and out[-1].count == n
    changed = steps[:-1] + [{**steps[-1], "content": "rb, at last"}]
    assert first_fired(verdicts(only("alternating", n), changed)) is None


def test_tool_cycle_of_up_to_five_calls_whatever_the_results():
    names = ["plan", "edit", "test"]
    calls = [call(x) for x in names * 5]
    steps = answered(calls, [result(f"run {i}") for i in range(15)])
    out = verdicts(only("tool_cycle", 5), steps)
    assert first_fired(out) == 2 * 14  # the last call of the fifth copy
    assert out[28].cycle == ("plan({})", "edit({})", "test({})")
    # a cycle of six calls is beyond gemini-cli's five
    six = answered([call(f"t{i % 6}") for i in range(36)], [result("ok")] * 36)
    assert first_fired(verdicts(only("tool_cycle", 5), six)) is None


def test_monologue_is_one_message_with_nothing_between():
    steps = [say("I will now fix it."), say("I will now   fix it."), say("I will now fix it.")]
    out = verdicts(only("monologue", 3), steps)
    assert first_fired(out) == 2 and out[2].cycle == ("I will now fix it.",)
    broken = steps[:2] + answered([call("ls")], [result("x")]) + steps[2:]
    assert first_fired(verdicts(only("monologue", 3), broken)) is None


def test_cycle_of_any_period_over_every_step():
    block = answered([call("search", q="x"), call("open", id=1)], [result("1 hit"), result("404")])
    block += [say("That failed; searching again.")]  # a period of 5 steps
    out = verdicts(only("cycle", 3), block * 3)
    assert first_fired(out) == 14
    assert len(out[14].cycle) == 5 and out[14].since == 0 and out[14].steps == tuple(range(15))
    assert (
        out[14].cycle[1] == "-> 1 hit"
        and out[14].cycle[4] == "says 'That failed; searching again.'"
    )
    near = block * 2 + block[:-2] + [{**block[-2], "content": "200 OK"}, block[-1]]
    assert first_fired(verdicts(only("cycle", 3), near)) is None
    # periods beyond max_period are not looked for
    assert first_fired(verdicts(only("cycle", 3, max_period=4), block * 3)) is None


# --- near-duplicates --------------------------------------------------------------------------


def test_a_counter_in_the_arguments_needs_the_near_duplicate_key():
    steps = answered([call("list_issues", page=i) for i in range(1, 6)], [result("[]")] * 5)
    assert first_fired(verdicts(only("repeated_action", 3), steps)) is None
    out = verdicts(only("repeated_action", 3, near_duplicates="numbers"), steps)
    assert first_fired(out) == 4 and out[4].cycle == ('list_issues({"page":#})',)
    custom = StepGuard(**{**dict.fromkeys(RULES, 0), "repeated_action": 3}, key=mask_numbers)
    assert first_fired(verdicts(custom, steps)) == 4
    with pytest.raises(ValueError, match="either key= or near_duplicates"):
        StepGuard(near_duplicates="numbers", key=mask_numbers)


def test_alternating_failures_with_slightly_different_arguments():
    # two failing approaches, each retried with a new attempt number: the exact rules miss it
    calls, results = [], []
    for i in range(3):
        calls += [call("pip_install", pkg="torch", attempt=i), call("conda_install", n=i)]
        results += [result(f"error: resolver failed ({i})"), result(f"error: solve {i} failed")]
    steps = answered(calls, results)
    exact = StepGuard(action_failures=0, same_error=0)
    assert all(v is None for v in verdicts(exact, steps))
    out = verdicts(StepGuard(near_duplicates="numbers"), steps)
    fired = [(i, v.rule, v.level) for i, v in enumerate(out) if v is not None]
    # pip_install failed a third time (not in a row); then conda_install did, completing the
    # third copy of the alternation
    assert fired == [(9, "action_failures", "warn"), (11, "action_failures", "stop")]
    assert out[11].also == ("alternating", "cycle")


# --- escalation -----------------------------------------------------------------------------


def test_strict_warns_then_stops_and_gives_the_agent_its_turn():
    steps = answered([call("read_file", path="x")] * 5, [result("Error: no such file")] * 5)
    out = verdicts(StepGuard(), steps)
    levels = [(i, v.level, v.rule) for i, v in enumerate(out) if v is not None]
    assert levels[0] == (4, "warn", "repeated_action")  # the third call
    # its result completes three more rules in the same turn: warned again, not stopped
    assert levels[1] == (5, "warn", "repeated_error")
    assert out[5].also == ("action_failures", "repeated_action_observation", "cycle")
    assert levels[2] == (6, "stop", "repeated_action")  # the fourth call: stop
    assert "since step 0" in out[4].message and "step back" in out[4].message
    assert out[6].message.startswith("Loop stop: the same call read_file")


def test_a_repetition_going_on_in_the_warned_turn_is_not_repeated():
    # z,r,a,r,a,r,a: the cycle (r, a) reaches three copies at a call (step 6)
    steps = answered([call("z")] + [call("a")] * 4, [result("r")] * 5)
    out = verdicts(StepGuard(**{**dict.fromkeys(RULES, 0), "cycle": 3}), steps)
    assert first_fired(out) == 6 and out[6].level == "warn" and out[6].since == 1
    assert out[7] is None  # its result goes on with the cycle: the agent has not answered yet
    assert out[8].level == "stop"  # the agent's next call goes on with it


def test_presets_match_the_tools():
    assert PRESETS["openhands"]["repeated_action_observation"] == 4
    steps = answered([call("ls")] * 4, [result("a.txt")] * 4)
    out = verdicts(StepGuard("openhands"), steps)
    assert first_fired(out) == 7 and out[7].level == "stop"  # no warning first
    out = verdicts(StepGuard("gemini-cli"), steps + answered([call("ls")] * 2, [result("a")] * 2))
    fired = [(i, v.level) for i, v in enumerate(out) if v is not None]
    assert fired == [(8, "warn"), (10, "stop")]  # the fifth call, then the sixth
    assert StepGuard("strict").config == GuardConfig()


def test_reset_and_stopped():
    guard = StepGuard("openhands")
    verdicts(guard, answered([call("ls")] * 4, [result("a")] * 4))
    assert guard.stopped and guard.episodes["repeated_action_observation"] == 1
    guard.reset()
    assert not guard.stopped and len(guard) == 0 and not guard.episodes


# --- the exact-cycle rule against a brute-force reading -------------------------------------


def brute_force_cycle(items: list, count: int, max_period: int) -> list:
    """(period, onset) of the loop the rule reports at each item, rescanning the history: the
    smallest period whose latest copies reach ``count``, kept while that loop goes on."""
    out, followed = [], None
    for n in range(1, len(items) + 1):
        present = {}
        for p in range(1, max_period + 1):
            start = max(n - p, 0)
            while start > 0 and items[start - 1] == items[start - 1 + p]:
                start -= 1
            if n - start >= count * p:
                present[p] = start
        if followed is not None and present.get(followed[0]) == followed[1]:
            pass
        elif present:
            followed = (min(present), present[min(present)])
        else:
            followed = None
        out.append(followed)
    return out


step_kinds = st.sampled_from(["a1", "a2", "b1", "ok", "err", "say", "user"])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(step_kinds, max_size=60), st.integers(2, 4), st.integers(1, 12), st.randoms())
def test_cycle_rule_matches_brute_force(kinds, count, max_period, rnd):
    steps, items, item_step = [], [], []
    for i, kind in enumerate(kinds):
        if kind == "user":  # counted as a step, never compared
            steps.append({"role": "user", "content": "go on"})
            continue
        if kind[0] in "ab":
            args = {"x": int(kind[1]), "y": [1, 2]}
            order = list(args.items())
            rnd.shuffle(order)  # key order and spacing must not matter
            text = json.dumps(dict(order), indent=rnd.choice([None, 2]))
            steps.append(
                {
                    "role": "assistant",
                    "tool_calls": [{"function": {"name": kind[0], "arguments": text}}],
                }
            )
            items.append(("call", kind[0], json.loads(text)["x"]))
        elif kind in ("ok", "err"):
            steps.append({"role": "tool", "content": "fine" if kind == "ok" else "Error: no"})
            items.append(("result", kind))
        else:
            steps.append({"role": "assistant", "content": rnd.choice(["hm  ok", " hm ok"])})
            items.append(("say",))
        item_step.append(i)
    guard = only("cycle", count, max_period=max_period)
    out = verdicts(guard, steps)
    expected = brute_force_cycle(items, count, max_period)
    got = [out[s] for s in item_step]
    for n, (v, e) in enumerate(zip(got, expected, strict=True)):
        if e is None:
            assert v is None
        else:
            period, onset = e
            assert v is not None and len(v.cycle) == period
            assert v.since == item_step[onset] and v.count == (n + 1 - onset) // period
    assert all(out[i] is None for i, k in enumerate(kinds) if k == "user")


# --- canonical forms --------------------------------------------------------------------------


def test_canonical_arguments():
    assert canonical_arguments('{"b": 1,\n  "a": [1, 2]}') == '{"a":[1,2],"b":1}'
    assert canonical_arguments({"a": {"ts": 5, "k": 1}, "ts": 9}, ignore=["ts"]) == '{"a":{"k":1}}'
    assert canonical_arguments("not json  at\tall") == "not json at all"
    assert mask_numbers("page=3, line 12.5") == "page=#, line #"


def test_ignored_fields_and_result_shapes():
    guard = only("repeated_action_observation", 2, ignore_fields=["request_id"])
    steps = [
        call("get", key="k", request_id="r1"),
        {"role": "tool", "content": [{"type": "text", "text": "value:  7"}]},
        call("get", key="k", request_id="r2"),
        {"role": "tool", "content": "value: 7"},
    ]
    assert first_fired(verdicts(guard, steps)) == 3
    canon = Canon()
    assert canon.result("[]", False).text == "[]" and canon.result([], False).text == ""
    assert canon.result('{"b": 1, "a": null}', False).text == '{"a":null,"b":1}'
    assert canon.result('{"error": "quota"}', False).error
    assert canon.result("Traceback (most recent call last): ...", False).error
    assert canon.result("all good", True).error and not canon.result("all good", False).error
    assert Canon(error_prefixes=("fail",)).result("FAILED: x", False).error


def test_plain_steps_and_parallel_calls():
    plain = [{"action": "ls", "arguments": {"d": "."}, "error": "no permission"}] * 3
    out = verdicts(only("repeated_error", 3), plain)
    assert first_fired(out) == 2 and out[2].steps == (0, 1, 2)
    # results pair with their calls by id, whatever their order
    two = {
        "role": "assistant",
        "tool_calls": [
            {"id": "p", "function": {"name": "ping", "arguments": "{}"}},
            {"id": "q", "function": {"name": "query", "arguments": "{}"}},
        ],
    }
    turn = [
        two,
        {"role": "tool", "tool_call_id": "q", "content": "Error: down"},
        {"role": "tool", "tool_call_id": "p", "content": "pong"},
    ]
    out = verdicts(only("action_failures", 2), turn * 2)
    assert first_fired(out) == 4 and out[4].cycle == ("query({})",)
    assert out[4].steps == (0, 1, 3, 4)


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("just text", "a step is a JSON object"),
        ({"role": "robot", "content": "x"}, "role 'robot' is not one of"),
        ({"thought": "x"}, r"a step needs 'role'.*\['thought'\]"),
        ({"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}, "string name"),
        ({"role": "assistant", "tool_calls": {"id": 1}}, "tool_calls must be a list"),
    ],
)
def test_bad_steps_are_named(step, message):
    guard = StepGuard()
    with pytest.raises(ValueError, match=message):
        guard.push(step)
    assert len(guard) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repeated_action": 1}, r"repeated_action=1 .* 0 \(off\) or >= 2"),
        ({"cycle": -2}, "cycle=-2"),
        ({"window": 1}, "window=1"),
        ({"near_duplicates": "words"}, "near_duplicates='words'"),
        ({"ignore_fields": "id"}, "ignore_fields='id'"),
    ],
)
def test_bad_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GuardConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown guard preset 'cline'"):
        StepGuard("cline")


def test_state_stays_bounded_on_a_long_run():
    guard = StepGuard(max_period=8, window=10)
    for i in range(3000):
        guard.push(call("step", n=i % 7))
        guard.push(result("Error: nope" if i % 3 else f"ok {i}"))
    assert len(guard) == 6000 and guard.stopped
    assert max(len(lens._items) for lens in (guard._calls, guard._pairs, guard._all)) <= 6 * 8
    assert len(guard._window._errors) <= 10 and not guard._pending


# --- trace files ------------------------------------------------------------------------------


def write_trace(path, steps) -> None:
    path.write_text("".join(json.dumps(s) + "\n" for s in steps))


def test_guard_trace_replays_until_the_stop(tmp_path):
    trace = tmp_path / "run.jsonl"
    steps = [{"role": "system", "content": "You are an agent."}]
    steps += answered([call("read_file", path="x")] * 6, [result("Error: no such file")] * 6)
    write_trace(trace, steps)
    replay = guard_trace(trace)
    assert replay.steps == 13 and replay.stopped
    assert [(line, v.level) for line, v in replay.verdicts] == [
        (6, "warn"),
        (7, "warn"),
        (8, "stop"),
    ]
    assert replay.after_stop == 5 and replay.episodes["repeated_action"] == 1
    (tmp_path / "bad.jsonl").write_text('{"role": "user", "content": "hi"}\n\n{"role": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: role 'x'"):
        guard_trace(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"role": "user"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2 is not a JSON value"):
        guard_trace(tmp_path / "broken.jsonl")
    with pytest.raises(FileNotFoundError, match="no trace file"):
        guard_trace(tmp_path / "missing.jsonl")


# --- the example agent, against a scripted model behind a local OpenAI-style server -------------


@pytest.fixture(scope="module")
def agent():
    """examples/agent.py, loaded from its file (examples/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "examples" / "agent.py"
    spec = importlib.util.spec_from_file_location("example_agent", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@contextmanager
def scripted_server(script):
    """A local ``POST /v1/chat/completions`` answering with ``script(messages)``; yields the
    base URL and the list of request bodies received. ``script`` may return an int: an HTTP
    error status to answer with."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(body)
            reply = script(body["messages"]) if self.path == "/v1/chat/completions" else 404
            if isinstance(reply, int):
                self.send_response(reply)
                self.end_headers()
                self.wfile.write(b'{"error": "scripted failure"}')
                return
            data = json.dumps({"choices": [{"index": 0, "message": reply}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", received
    finally:
        server.shutdown()
        server.server_close()


def tool_call(name: str, **arguments) -> dict:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": f"call_{next(_ids)}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)},
            }
        ],
    }


def stubborn(messages):
    """A model that keeps reading a file that is not there."""
    return tool_call("read_file", path="notes.txt")


def heeding(messages):
    """The same model, except that it changes course once it reads the guard's warning."""
    last = messages[-1]
    if last["role"] == "user" and last["content"].startswith("Loop warning"):
        return tool_call("list_files")
    if last["role"] == "tool" and "docs/notes.md" in last["content"]:
        return tool_call("read_file", path="docs/notes.md")
    if last["role"] == "tool" and last["content"].startswith("The answer"):
        return {"role": "assistant", "content": "It says the answer is 42."}
    return stubborn(messages)


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("The answer is 42.\n")
    return tmp_path


def test_example_agent_warned_then_stopped(agent, workdir, capsys):
    with scripted_server(stubborn) as (url, received):
        assert (
            agent.main(["What do the notes say?", "--workdir", str(workdir), "--base-url", url])
            == 0
        )
    out = capsys.readouterr().out
    assert "[6] assistant calls read_file" in out
    assert "guard warn (repeated_action): Loop warning: the same call read_file" in out
    assert "guard stop (repeated_action)" in out and out.endswith(
        "stopped by the guard at message 9\n"
    )
    # the file was tried three times; the fourth call came after the warning and was not run
    assert out.count("tool: Error: no such file 'notes.txt'") == 3 and len(received) == 4
    assert received[3]["messages"][-1]["role"] == "user"
    assert received[3]["messages"][-1]["content"].startswith("Loop warning: the call read_file")
    assert received[0]["tools"][1]["function"]["name"] == "read_file"


def test_example_agent_that_heeds_the_warning_answers(agent, workdir):
    with scripted_server(heeding) as (url, _):
        model = agent.chat_completion(url, "scripted")
        run = agent.run_agent(
            "What do the notes say?", model, agent.Folder(workdir), StepGuard(), log=lambda _: None
        )
    assert run.finish == "answer" and run.answer == "It says the answer is 42."
    assert [(i, v.level, v.rule) for i, v in run.verdicts] == [
        (6, "warn", "repeated_action"),
        (7, "warn", "repeated_error"),
    ]
    assert run.messages[9]["tool_calls"][0]["function"]["name"] == "list_files"
    # outside the folder is as missing as a missing file
    assert (
        agent.Folder(workdir).run("read_file", '{"path": "../x"}').startswith("Error: no such file")
    )


def test_example_agent_names_a_failing_server(agent, workdir, capsys):
    with scripted_server(lambda messages: 503) as (url, _):
        assert agent.main(["task", "--workdir", str(workdir), "--base-url", url]) == 1
    assert "chat/completions answered 503" in capsys.readouterr().err

"""The agent loop guard in the server: ``StepGuard`` over the tool calls and results a chat
request carries.

An agent sends its whole history with every request, so the guard needs no state between
requests: it replays the messages through a fresh ``StepGuard`` and judges the steps that are
new since the model last spoke (its last assistant message and what followed it); the verdicts
on earlier steps were given to earlier requests. A ``warn`` appends the guard's message to the
conversation for the model to read (as gemini-cli's loop recovery does) and is reported in the
response's ``agent_loop_guard`` field; a ``stop`` answers without generating, with
``finish_reason: "loop"`` and the same report.

Per request: ``agent_loop_guard: {"preset": "strict" | "openhands" | "gemini-cli", ...}`` with
any ``GuardConfig`` field as an override, or ``{"preset": null}`` to turn a server default off;
the server's default is ``--agent-loop-guard PRESET``.
"""

from __future__ import annotations

import dataclasses

from arlm.loops.step_guard import PRESETS, GuardConfig, StepGuard, Verdict
from arlm.serve.errors import APIError

GUARD_ROLE = "user"  # the role of the warning appended for the model: every template has it


def guard_config(request: dict | None, default: str | None) -> GuardConfig | None:
    """The guard a request runs under: its own ``agent_loop_guard``, else the server's preset
    (None: no guard). A 400 names a wrong preset or field."""
    if request is None:
        return None if default is None else GuardConfig.preset(default)
    fields = dict(request)
    preset = fields.pop("preset", default or "strict")
    if preset is None:
        if fields:
            raise APIError.bad_request(
                "agent_loop_guard with preset null turns the guard off; give no other fields",
                "agent_loop_guard",
            )
        return None
    try:
        if preset not in PRESETS:
            raise ValueError(
                f"agent_loop_guard.preset={preset!r} is not allowed; it must be one of "
                f"{', '.join(sorted(PRESETS))}, or null for off"
            )
        known = {f.name for f in dataclasses.fields(GuardConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"agent_loop_guard has unknown fields {unknown}; allowed: preset, "
                f"{', '.join(sorted(known))}"
            )
        return GuardConfig.preset(preset, **fields)
    except (TypeError, ValueError) as e:
        raise APIError.bad_request(e, "agent_loop_guard") from None


def judge(messages: list[dict], config: GuardConfig) -> Verdict | None:
    """The verdict on the steps of ``messages`` that are new since the last assistant
    message (inclusive): the first stop among them, else the last warning, else None."""
    guard = StepGuard(config)
    agent = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    new_from = agent[-1] if agent else 0
    verdicts = []
    for i, message in enumerate(messages):
        try:
            verdict = guard.push(message)
        except ValueError as e:
            raise APIError.bad_request(
                f"messages[{i}] cannot be read as an agent step: {e}", f"messages.{i}"
            ) from None
        if verdict is not None and i >= new_from:
            verdicts.append(verdict)
    stops = [v for v in verdicts if v.level == "stop"]
    return stops[0] if stops else (verdicts[-1] if verdicts else None)


def report(verdict: Verdict) -> dict:
    """The verdict as the response's ``agent_loop_guard`` field."""
    return {
        "level": verdict.level,
        "rule": verdict.rule,
        "count": verdict.count,
        "since": verdict.since,
        "steps": list(verdict.steps),
        "cycle": list(verdict.cycle),
        "message": verdict.message,
        "also": list(verdict.also),
    }


def warning_message(verdict: Verdict) -> dict:
    """The message a warning appends to the conversation for the model."""
    return {"role": GUARD_ROLE, "content": verdict.message}

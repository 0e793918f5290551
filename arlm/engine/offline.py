"""Offline batches: many prompts run to completion through one engine, results in order.

Every prompt is added at once, so the scheduler batches them as it would a server's traffic;
the outputs are read per request (``Engine.next_output``), so one prompt's samples are
collected while the others step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from arlm.engine.outputs import Completion
from arlm.sampling.params import SamplingParams

if TYPE_CHECKING:
    from arlm.engine.engine import Engine


def generate(
    engine: Engine,
    prompts: list[str | list[int]],
    params: SamplingParams | list[SamplingParams] | None = None,
    *,
    progress: bool = True,
    adapter: str | list[str | None] | None = None,
) -> list[Completion] | list[list[Completion]]:
    """Run ``prompts`` to completion on ``engine``, with one ``params`` for all or one each,
    and one LoRA ``adapter`` name for all or one each (None: the base model); one completion
    per prompt in order (a list of ``n`` per prompt when ``n`` > 1)."""
    params = _each("params", params or SamplingParams(), prompts)
    adapters = _each("adapter", adapter, prompts)
    every = zip(prompts, params, adapters, strict=True)
    ids = [engine.add_request(p, sp, adapter=a) for p, sp, a in every]
    done: dict[tuple[str, int], Completion] = {}
    total = sum(sp.n for sp in params)
    with tqdm(total=total, desc="generating", unit="seq", disable=not progress) as bar:
        for rid, sp in zip(ids, params, strict=True):
            finished = 0
            while finished < sp.n:
                out = engine.next_output(rid)
                if out.finished:
                    finished += 1
                    done[(rid, out.index)] = out.completion
                    bar.update(1)
    grouped = [[done[(rid, i)] for i in range(sp.n)] for rid, sp in zip(ids, params, strict=True)]
    if all(sp.n == 1 for sp in params):
        return [g[0] for g in grouped]
    return grouped


def _each(name: str, value, prompts: list) -> list:
    """``value`` for each prompt: a list of one each, checked, or one value for all."""
    if not isinstance(value, list):
        return [value] * len(prompts)
    if len(value) != len(prompts):
        raise ValueError(f"{len(value)} {name} for {len(prompts)} prompts; give one each")
    return value

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
) -> list[Completion] | list[list[Completion]]:
    """Run ``prompts`` to completion on ``engine``, with one ``params`` for all or one each;
    one completion per prompt in order (a list of ``n`` per prompt when ``n`` > 1)."""
    if isinstance(params, list):
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} params for {len(prompts)} prompts; give one each")
    else:
        params = [params or SamplingParams()] * len(prompts)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
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

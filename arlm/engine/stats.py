"""What ``Engine.stats`` reports: gauges (sequences by state, KV blocks in use), counters
(preemptions, prefix-cache and host-tier hits, loops, steps, replayed and overlapped steps,
speculative decoding's), what capturing the CUDA graphs took, and with LoRA adapter slots the
adapters that running and waiting sequences use, read from the parts that own them. The
server's ``/metrics`` and ``arlm generate --stats`` print these."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from arlm.engine.engine import Engine


def engine_stats(engine: Engine) -> dict[str, float | str]:
    """Gauges and counters of the engine now (the block counts are 0 with the windowed
    cache, which has no blocks); with LoRA adapters, the slots (``max_lora``), the adapters
    written into them (``lora_slot_writes``) and the names of the adapters running and waiting
    sequences use (``running_lora_adapters``, ``waiting_lora_adapters``: comma-separated, as
    vLLM's ``lora_requests_info`` labels them)."""
    bm, sched, chain = engine.block_manager, engine.scheduler, engine.chain
    graphs = engine.runner.decode_graphs
    used = bm.num_used_blocks if bm else 0
    host = bm.host if bm else None
    return {
        "running": len(sched.running),
        "waiting": len(sched.waiting),
        "swapped": len(sched.swapped),
        "preemptions": sched.num_preemptions,
        "blocks_in_use": used,
        "blocks_peak": bm.peak_in_use if bm else 0,
        "num_blocks": bm.num_blocks if bm else 0,
        "kv_cache_usage": used / bm.num_blocks if bm else 0.0,
        "prefix_cache_hit_tokens": bm.hit_tokens if bm else 0,
        "prefix_cache_queried_tokens": bm.queried_tokens if bm else 0,
        "offload_hits": host.hits if host is not None else 0,
        "loops_detected": chain.loops_detected,
        "loops_broken": chain.loops_broken,
        "steps": engine.steps,
        "graph_steps": graphs.steps if graphs else 0,
        "graph_capture_seconds": graphs.capture_seconds if graphs else 0.0,
        "graph_capture_bytes": graphs.capture_bytes if graphs else 0,
        "overlapped_steps": engine.overlap.steps if engine.overlap else 0,
        **(engine.speculator.metrics() if engine.speculator else {}),
        **(_lora_stats(engine) if engine.adapters is not None else {}),
    }


def _lora_stats(engine: Engine) -> dict[str, float | str]:
    sched = engine.scheduler

    def used(seqs) -> str:
        return ",".join(sorted({s.adapter for s in seqs if s.adapter is not None}))

    return {
        "max_lora": len(engine.adapters.rows),
        "lora_slot_writes": engine.adapters.slot_writes,
        "running_lora_adapters": used(sched.running),
        "waiting_lora_adapters": used([*sched.waiting, *sched.swapped]),
    }

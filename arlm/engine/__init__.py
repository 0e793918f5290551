"""The engine: continuous batching, arlm's one decode loop.

One request's path: ``Engine.add_request`` checks it and makes its sequences (requests.py);
each ``Engine.step`` asks the scheduler who runs (scheduler.py), which takes KV blocks from the
block manager's books (block_manager.py); the model runner carries out the block orders and runs
the forward (runner.py); the token chain samples and applies each row's token (token_chain.py);
the engine hands out the outputs.

EngineConfig   limits, and the sizes they come to   (config.py, memory.py)
Sequence       all per-request state                (sequence.py, text.py)
BlockManager   blocks, reference counts, prefix     (block_manager.py)
               cache, host tier: bookkeeping only
Scheduler      who runs in the next forward,        (scheduler.py)
               admission, preemption
ModelRunner    the cache's tensors, one forward     (runner.py, cuda_graphs.py)
TokenChain     sample -> append -> loop -> stop     (token_chain.py)
Engine         add_request / step / abort           (engine.py; offline.py: a batch of
               / outputs, stats                     prompts to completion; stats.py)
Overlap        the step in flight: the next one     (overlap.py)
               launched before it lands
AsyncEngine    a background step loop, async streams per request (async_engine.py)
"""

from arlm.engine.async_engine import AsyncEngine
from arlm.engine.engine import AdapterBusy, Engine, EngineConfig, InvalidRequest
from arlm.engine.outputs import Chunk, Completion, RequestOutput, Usage

__all__ = [
    "AdapterBusy",
    "AsyncEngine",
    "Chunk",
    "Completion",
    "Engine",
    "EngineConfig",
    "InvalidRequest",
    "RequestOutput",
    "Usage",
]

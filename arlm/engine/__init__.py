"""The engine: continuous batching, arlm's one decode loop.

Sequence       all per-request state           (sequence.py, text.py)
BlockManager   slots, blocks, prefix cache     (block_manager.py)
Scheduler      who runs in the next forward    (scheduler.py)
ModelRunner    batch tensors, one forward      (runner.py)
Engine         add_request / step / abort      (engine.py)
AsyncEngine    a background step loop, async streams per request (async_engine.py)
"""

from arlm.engine.async_engine import AsyncEngine
from arlm.engine.engine import Engine, EngineConfig, InvalidRequest
from arlm.engine.outputs import Chunk, Completion, RequestOutput, Usage

__all__ = [
    "AsyncEngine",
    "Chunk",
    "Completion",
    "Engine",
    "EngineConfig",
    "InvalidRequest",
    "RequestOutput",
    "Usage",
]

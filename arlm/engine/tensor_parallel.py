"""Engine steps across tensor-parallel ranks: rank 0 schedules and samples; every rank runs the
forward on its own shard of the model and its own heads' KV cache.

Rank 0's engine runs as ever, through a ``TensorParallelRunner`` wrapping its ``ModelRunner``.
Before each forward the wrapper sends the other ranks one message: the block manager's orders
for this step (copies on write, moves to and from the host tier) and the step's rows (block
table, cached positions, the tokens fed). Each other rank (``run_worker``) runs the same step
through its own ``ModelRunner``, which carries out the same orders on its cache; the forward's
collectives meet rank 0's, and only rank 0 samples from the logits. The messages are small
Python objects, broadcast over a CPU (gloo) group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from arlm.engine.block_manager import Orders
from arlm.engine.runner import ModelRunner
from arlm.engine.scheduler import ScheduledBatch
from arlm.engine.sequence import Sequence
from arlm.kv_cache.config import CacheConfig
from arlm.model.transformer import Transformer


@dataclass(frozen=True)
class TensorParallelGroup:
    """The ranks one model is split over: ``size`` of them, this one ``rank``; ``control`` is the
    CPU process group the step messages travel on (None: the default group, when it is gloo)."""

    rank: int
    size: int
    control: dist.ProcessGroup | None = None

    def broadcast(self, message: object = None) -> object:
        """Rank 0's ``message`` on every rank."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


@dataclass
class _Tokens:
    """The part of a sequence's token ids a step feeds, indexed as the whole list would be."""

    start: int
    ids: list[int]
    length: int  # of the whole sequence

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.ids[key.start - self.start : key.stop - self.start]
        return self.ids[key - self.start]


@dataclass(frozen=True)
class _Params:
    """What ``ModelRunner.run`` reads of a sequence's sampling parameters."""

    prompt_logprobs: int | None


@dataclass(eq=False)  # rows are told apart by identity, as sequences are
class _Row:
    """What ``ModelRunner.run`` reads of a sequence: its block table, cached positions, token
    ids, and what decides which prompt positions it scores (``arlm.engine.prompt_logprobs``:
    every rank must select the same rows, as the vocabulary's split gathers them)."""

    block_table: list[int]
    num_cached: int
    token_ids: _Tokens = field(repr=False)
    prompt_len: int
    params: _Params
    prompt_logprobs: list  # as long as the prompt positions already scored


def _row(s: Sequence, n: int) -> tuple:
    ids = s.token_ids[s.num_cached : s.num_cached + n]
    scoring = (s.prompt_len, s.params.prompt_logprobs, len(s.prompt_logprobs))
    return (s.block_table, s.num_cached, ids, len(s.token_ids), *scoring)


def _rows(batch: ScheduledBatch) -> tuple[list, list]:
    return [_row(s, 1) for s in batch.decode], [_row(s, n) for s, n in batch.prefill]


def _batch(decode: list, prefill: list) -> ScheduledBatch:
    def row(table, cached, ids, length, prompt_len, wanted, scored) -> _Row:
        tokens = _Tokens(cached, ids, length)
        return _Row(table, cached, tokens, prompt_len, _Params(wanted), [None] * scored)

    return ScheduledBatch(
        decode=[row(*r) for r in decode], prefill=[(row(*r), len(r[2])) for r in prefill]
    )


class TensorParallelRunner:
    """Rank 0's model runner: ``ModelRunner``'s interface, each step mirrored to the other
    ranks (see the module docstring). Making it tells the other ranks to build their runners
    with the same pool."""

    def __init__(
        self,
        model: Transformer,
        cache_config: CacheConfig,
        num_blocks: int,
        block_size: int,
        host_blocks: int = 0,
        held_blocks: int = 0,
        *,
        group: TensorParallelGroup,
    ) -> None:
        self.group = group
        args = (cache_config, num_blocks, block_size, host_blocks, held_blocks)
        group.broadcast(("runner", *args))
        self.inner = ModelRunner(model, *args)
        self.cache, self.windowed, self.decode_graphs = self.inner.cache, self.inner.windowed, None

    def decode_graphs_unsupported(self) -> str | None:
        # a captured graph would have to replay the other ranks' collectives in step
        return "tensor parallelism"

    def use_decode_graphs(self, *args, **kwargs) -> None:
        """Refused whatever the arguments (``ModelRunner.use_decode_graphs``'s)."""
        raise ValueError("decode graphs do not support tensor parallelism")

    @property
    def rewindable(self) -> bool:
        return self.inner.rewindable

    @property
    def kv_bytes_per_token(self) -> int:
        return self.inner.kv_bytes_per_token

    def kv_bytes(self, seq: Sequence) -> tuple[int, int]:
        return self.inner.kv_bytes(seq)

    def restart(self, seq: Sequence) -> None:
        self.inner.restart(seq)

    def preallocate(self, max_num_seqs: int, max_len: int) -> None:
        # every rank's pool, so no rank touches new memory mid-service
        self.group.broadcast(("preallocate", max_num_seqs, max_len))
        self.inner.preallocate(max_num_seqs, max_len)

    def run(self, batch: ScheduledBatch, orders: Orders | None):
        self.group.broadcast(("step", orders, *_rows(batch)))
        return self.inner.run(batch, orders)


def run_worker(model: Transformer, group: TensorParallelGroup) -> None:
    """A rank other than 0: run every step rank 0's engine sends, until it stops."""
    runner: ModelRunner | None = None
    while True:
        kind, *body = group.broadcast()
        if kind == "stop":
            return
        if kind == "runner":  # a new engine on rank 0: a new cache here, the same size
            runner = ModelRunner(model, *body)
            continue
        if kind == "preallocate":
            runner.preallocate(*body)
            continue
        orders, decode, prefill = body
        runner.run(_batch(decode, prefill), orders)

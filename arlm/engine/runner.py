"""The model runner: it owns the cache's tensors and runs one scheduled batch per forward.

Before the forward it carries out the block manager's orders (copies on write, blocks to and
from the host tier). The batch's tokens go in flat, (1, N): first one token per decoding
sequence, then each prefill chunk. Each token has its own position; the paged cache's step
object knows which block each writes and reads. Only the rows that sample next get their hidden
state projected to the vocabulary: every decode row, and a prefill chunk only when it ends its
sequence's tokens. After the forward the runner advances each row's ``num_cached``.

A windowed cache (``kv_window``) holds one sequence: the same batches of one row run through
``WindowedKVCache`` at that row's position, with no blocks; it cannot rewind (``rewindable``).

With ``use_decode_graphs``, a step of up to ``max_cudagraph_capture_size`` positions runs
through ``DecodeGraphs``, one row per position (decode rows, verify rows' positions, prompt
chunks' tokens), padded to a bucket and replayed from a CUDA graph (on CUDA), the host copying
only the rows' token ids, positions, block tables and which rows sample. Larger steps, and
steps that score prompt positions (their logits at every position), run eagerly.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from arlm.devices import to_device
from arlm.engine.block_manager import Orders
from arlm.engine.cuda_graphs import DecodeGraphs
from arlm.engine.prompt_logprobs import PromptRows, positions_to_score
from arlm.engine.scheduler import ScheduledBatch
from arlm.engine.sequence import Sequence
from arlm.kv_cache.codec import make_codec
from arlm.kv_cache.config import CacheConfig
from arlm.kv_cache.offload import HostKVPool
from arlm.kv_cache.paged import PagedKVCache, PagedRow, StepLayout
from arlm.kv_cache.windowed import WindowedKVCache
from arlm.model.multi_lora import AdapterRows
from arlm.model.transformer import Transformer


class ModelRunner:
    def __init__(
        self,
        model: Transformer,
        cache_config: CacheConfig,
        num_blocks: int,
        block_size: int,
        host_blocks: int = 0,
        held_blocks: int = 0,
        adapters: AdapterRows | None = None,
    ) -> None:
        self.model = model
        self.adapters = adapters  # which rows use which LoRA adapter, set before each forward
        self.device = model.wte.weight.device
        dtype = model.wte.weight.dtype
        codec = make_codec(cache_config.dtype, dtype)
        kw = dict(device=self.device, dtype=dtype, codec=codec)
        self.windowed: WindowedKVCache | None = None
        self.cache: PagedKVCache | None = None
        self.host: HostKVPool | None = None
        if cache_config.window is not None:
            self.windowed = WindowedKVCache.for_model(
                model.config, 1, cache_config.window, cache_config.sink_tokens, **kw
            )
        else:
            self.cache = PagedKVCache.for_model(
                model.config, num_blocks, block_size, held_blocks=held_blocks, **kw
            )
            if host_blocks:
                self.host = HostKVPool(self.cache, host_blocks)
        self.decode_graphs: DecodeGraphs | None = None

    def decode_graphs_unsupported(self) -> str | None:
        """Why decode steps cannot run through ``DecodeGraphs`` with this model and cache, or
        None when they can."""
        if self.windowed is not None:
            return "the windowed KV cache (kv_window)"
        if self.model.config.n_experts is not None:
            # a mixture is captured through its grouped products only (MoE.stack_experts)
            return self.model.h[0].mlp.cannot_group()
        return None

    def use_decode_graphs(
        self,
        capture: bool,
        max_batch: int,
        max_blocks: int,
        compile: bool = False,
        max_logits: int | None = None,
    ) -> None:
        """Run steps of up to ``max_batch`` positions, at most ``max_logits`` of them sampling
        (default: all), padded to buckets through static buffers, replayed from CUDA graphs
        when ``capture`` (else the same forward, eagerly: the CPU tests'), compiled first when
        ``compile``. Every block gets its memory now, as graphs replay fixed tensors."""
        reason = self.decode_graphs_unsupported()
        if reason is not None:
            raise ValueError(f"decode graphs do not support {reason}")
        if self.model.config.n_experts is not None:
            for block in self.model.h:
                block.mlp.stack_experts()
        self.cache.add_spare_block()
        self.decode_graphs = DecodeGraphs(
            self.model,
            self.cache,
            max_batch,
            max_blocks,
            capture=capture,
            compile=compile,
            max_logits=max_logits,
            adapters=self.adapters,
        )

    def preallocate(self, max_num_seqs: int, max_len: int) -> None:
        """Give the pool its memory now rather than as concurrency first needs it, up to what
        ``max_num_seqs`` sequences of ``max_len`` positions take: no request then waits while
        new memory is touched (the rest of a larger budget is taken only if sequences share
        blocks that densely). Nothing to do for the windowed cache, allocated whole."""
        if self.cache is not None:
            longest = -(-max_len // self.cache.block_size)
            self.cache.reserve(min(self.cache.num_blocks, max_num_seqs * longest))

    @property
    def rewindable(self) -> bool:
        return self.windowed is None

    @property
    def kv_bytes_per_token(self) -> int:
        return (self.windowed or self.cache).bytes_per_token

    def kv_bytes(self, seq: Sequence) -> tuple[int, int]:
        """KV cache bytes of ``seq``: (its blocks at their most, the positions it holds in
        them), or the windowed cache's (allocated, in use)."""
        if self.windowed is not None:
            return self.windowed.nbytes, self.windowed.used_bytes
        cache = self.cache
        # a row that ended while the step after it was in flight computed one position past
        # its ids (arlm.engine.overlap): not one it holds
        held = min(seq.num_cached, len(seq.token_ids))
        return seq.peak_blocks * cache.block_bytes, held * cache.bytes_per_token

    def restart(self, seq: Sequence) -> None:
        """Forget ``seq``'s cached positions (a cache that cannot rewind refills from 0)."""
        seq.num_cached = 0

    def apply(self, orders: Orders) -> None:
        """Carry out the block manager's orders: the pool grown to the blocks handed out, then
        every source read first, then written."""
        if orders is None:
            return
        cache, host = self.cache, self.host
        cache.reserve(orders.reserve)
        if not orders:
            return
        to_host = cache.read_blocks([d for d, _ in orders.to_host]) if orders.to_host else None
        from_host = host.read([h for h, _ in orders.from_host]) if orders.from_host else None
        copies = cache.read_blocks([s for s, _ in orders.copy]) if orders.copy else None
        if to_host is not None:
            host.write([h for _, h in orders.to_host], to_host)
        if from_host is not None:
            cache.write_blocks([d for _, d in orders.from_host], from_host)
        if copies is not None:
            cache.write_blocks([d for _, d in orders.copy], copies)

    @torch.inference_mode()
    def run(
        self, batch: ScheduledBatch, orders: Orders | None, fed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[Sequence], PromptRows | None]:
        """Carry out ``orders``, forward ``batch`` and advance its rows' ``num_cached``; the
        next-token logits (K, vocab) of the K rows that sample, followed by those of every
        position of the verify rows (1 + guesses each, in ``batch.verify`` order), the K rows'
        sequences in the same order, and the prompt positions scored for prompt
        log-probabilities with their logits (None when no sequence asked:
        ``arlm.engine.prompt_logprobs``). ``fed``: the input ids of the first ``len(fed)``
        decode rows, on the device, sampled by the step before and not yet on the host
        (``arlm.engine.overlap``); the other rows' come from their token ids."""
        if fed is not None and (batch.verify or self.cache is None or len(fed) > len(batch.decode)):
            raise ValueError("ids still on the device feed decode rows of the paged cache only")
        self.apply(orders)
        logits, rows, scored = self._forward(batch, fed)
        for seq in batch.decode:
            seq.num_cached += 1
        for seq, guesses in batch.verify:
            seq.num_cached += 1 + len(guesses)
        for seq, n in batch.prefill:
            seq.num_cached += n
        return logits, rows, scored

    def _adapters(self, slots: list[int] | None) -> AbstractContextManager:
        """Inside, the model's positions use the LoRA adapters in ``slots``; no adapter's cost
        where none does (or none is loaded: None)."""
        if slots is None or max(slots, default=-1) < 0:
            return nullcontext()
        return self.adapters.using(to_device(slots, torch.long, self.device))

    def _forward(
        self, batch: ScheduledBatch, fed: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[Sequence], PromptRows | None]:
        num_fed = 0 if fed is None else len(fed)  # the first rows' ids are on the device
        # one position per decode row, the fed ones' ids written in on the device below
        tokens = [0] * num_fed + [s.token_ids[s.num_cached] for s in batch.decode[num_fed:]]
        select, rows = list(range(len(batch.decode))), list(batch.decode)
        # verify rows: the pending token and the guesses, logits at every one of them, after
        # the rows that sample (arlm.engine.speculation)
        verify_select = []
        for seq, guesses in batch.verify:
            verify_select += range(len(tokens), len(tokens) + 1 + len(guesses))
            tokens += [seq.token_ids[seq.num_cached], *guesses]
        # prompt positions scored for prompt log-probabilities: their rows follow the sampling
        # rows in logits_at
        scored, scored_select = PromptRows(), []
        for seq, n in batch.prefill:
            start = seq.num_cached
            tokens.extend(seq.token_ids[start : start + n])
            if start + n == len(seq.token_ids):
                select.append(len(tokens) - 1)
                rows.append(seq)
            if wanted := positions_to_score(seq, start, n):
                scored.add(seq, wanted)
                at = len(tokens) - n - start  # flat index of position 0 of this sequence
                scored_select += [at + p for p in wanted]
        slots = None if self.adapters is None else _adapter_slots(batch)
        if self.windowed is not None:
            (seq,) = [*batch.decode, *(s for s, _ in batch.prefill)]
            if seq.num_cached == 0:  # a new sequence, or one refilled after a break
                self.windowed.reset()
            idx = to_device([tokens], torch.long, self.device)
            with self._adapters(slots):
                logits, _ = self.model(
                    idx, kv_cache=self.windowed, start_pos=seq.num_cached, last_only=True
                )
            return logits[0, : len(rows)].float(), rows, None
        layout = StepLayout(
            [PagedRow(s.block_table, s.num_cached, 1) for s in batch.decode],
            [PagedRow(s.block_table, s.num_cached, 1 + len(g)) for s, g in batch.verify]
            + [PagedRow(s.block_table, s.num_cached, n) for s, n in batch.prefill],
        )
        sampled = select + verify_select
        graphs = self.decode_graphs
        if graphs is not None and not scored_select and graphs.takes(len(tokens), len(sampled)):
            return graphs.run(layout.rows, tokens[num_fed:], sampled, fed, slots), rows, None
        idx = to_device([tokens], torch.long, self.device)
        if num_fed:
            idx[0, :num_fed] = fed
        positions = to_device([layout.positions()], torch.long, self.device)
        seq_ends = None
        if self.model.config.rope_type == "longrope":  # it picks a row's factors by the row's reach
            seq_ends = to_device([layout.sequence_ends()], torch.long, self.device)
        with self._adapters(slots):
            logits, _ = self.model(
                idx,
                kv_cache=self.cache.step(layout),
                positions=positions,
                logits_at=to_device(sampled + scored_select, torch.long, self.device),
                seq_ends=seq_ends,
            )
        logits = logits[0].float()
        if not scored_select:
            return logits, rows, None
        scored.logits = logits[len(sampled) :]
        return logits[: len(sampled)], rows, scored


def _adapter_slots(batch: ScheduledBatch) -> list[int]:
    """Each position's LoRA adapter slot, in the order ``ModelRunner._forward`` lays the
    positions out: decode rows, verify rows' positions, prompt chunks' tokens."""
    slots = [s.adapter_slot for s in batch.decode]
    slots += [s.adapter_slot for s, g in batch.verify for _ in range(1 + len(g))]
    return slots + [s.adapter_slot for s, n in batch.prefill for _ in range(n)]

"""The model runner: one scheduled batch in, one forward, the logits of the rows that sample.

The batch's tokens go in flat, (1, N): first one token per decoding sequence (in slot order,
as the slot cache's batched decode attention wants), then each prefill chunk. Each token has its
own position; the cache's step object knows which slot each writes and reads. Only the rows
that sample next get their hidden state projected to the vocabulary: every decode row, and a
prefill chunk only when it ends its prompt.

A windowed cache (``kv_window``) holds one sequence: it runs the same batches of one row through
``WindowedKVCache`` at that row's position, and cannot rewind (``rewindable``).

With ``use_decode_graphs``, a step of decode rows only runs through ``DecodeGraphs``: padded to
a batch-size bucket and replayed from a CUDA graph (on CUDA), the host copying only the rows'
token ids, positions and slots.
"""

from __future__ import annotations

import torch

from arlm.devices import to_device
from arlm.engine.cuda_graphs import DecodeGraphs
from arlm.engine.prompt_logprobs import PromptRows, positions_to_score
from arlm.engine.scheduler import ScheduledBatch
from arlm.engine.sequence import Sequence
from arlm.kv_cache.codec import FloatCodec, make_codec
from arlm.kv_cache.config import CacheConfig
from arlm.kv_cache.slots import PrefillChunk, SlotKVCache, StepLayout
from arlm.kv_cache.windowed import WindowedKVCache
from arlm.model.transformer import Transformer


class ModelRunner:
    def __init__(
        self, model: Transformer, cache_config: CacheConfig, num_slots: int, slot_len: int
    ) -> None:
        self.model = model
        self.device = model.wte.weight.device
        dtype = model.wte.weight.dtype
        codec = make_codec(cache_config.dtype, dtype)
        kw = dict(device=self.device, dtype=dtype, codec=codec)
        self.windowed: WindowedKVCache | None = None
        if cache_config.window is not None:
            self.windowed = WindowedKVCache.for_model(
                model.config, 1, cache_config.window, cache_config.sink_tokens, **kw
            )
        # with a window, the slot cache is a one-block stand-in the block manager accounts
        # against (the engine passes slot_len = one block); the windowed cache stores
        self.cache = SlotKVCache.for_model(model.config, num_slots, slot_len, **kw)
        self.decode_graphs: DecodeGraphs | None = None

    def decode_graphs_unsupported(self) -> str | None:
        """Why decode steps cannot run through ``DecodeGraphs`` with this model and cache, or
        None when they can."""
        if self.windowed is not None:
            return "the windowed KV cache (kv_window)"
        if not isinstance(self.cache.codec, FloatCodec):
            return f"a quantized KV cache ({self.cache.codec.name})"
        if any(span < self.cache.slot_len for span in self.cache.layer_len):
            return "sliding-window layers (their rings)"
        if self.model.config.rope_type == "longrope":
            return "LongRoPE (its factors depend on each row's length)"
        return None

    def use_decode_graphs(self, capture: bool) -> None:
        """Run decode-only steps padded to batch-size buckets through static buffers, replayed
        from CUDA graphs when ``capture`` (else the same forward, eagerly: the CPU tests'). Every
        slot is allocated now, as graphs replay fixed tensors."""
        reason = self.decode_graphs_unsupported()
        if reason is not None:
            raise ValueError(f"decode graphs do not support {reason}")
        self.cache.add_spare_slot()
        self.decode_graphs = DecodeGraphs(
            self.model, self.cache, self.cache.num_slots, capture=capture
        )

    @property
    def rewindable(self) -> bool:
        return self.windowed is None

    @property
    def kv_bytes_per_token(self) -> int:
        return (self.windowed or self.cache).bytes_per_token

    def kv_bytes(self, seq: Sequence, block_size: int) -> tuple[int, int]:
        """(allocated, most in use) KV cache bytes for ``seq``: its slot and its peak in whole
        blocks (a sliding-window layer's at most its window), or the windowed cache's own."""
        if self.windowed is not None:
            return self.windowed.nbytes, self.windowed.used_bytes
        cache = self.cache
        return cache.slot_bytes(cache.slot_len), cache.slot_bytes(seq.peak_blocks * block_size)

    def restart(self, seq: Sequence) -> None:
        """Forget ``seq``'s cached positions (a cache that cannot rewind refills from 0)."""
        seq.num_cached = 0

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[Sequence], PromptRows | None]:
        """Forward ``batch``; the next-token logits (K, vocab) of the K rows that sample, those
        rows' sequences in the same order, and the prompt positions scored for prompt
        log-probabilities with their logits (None when no sequence asked)."""
        if self.decode_graphs is not None and not batch.prefill:
            rows = batch.decode
            positions = [s.num_cached for s in rows]
            logits = self.decode_graphs.run(
                [s.token_ids[p] for s, p in zip(rows, positions, strict=True)],
                positions,
                [s.slot for s in rows],
            )
            for s, p in zip(rows, positions, strict=True):
                self.cache.lengths[s.slot] = p + 1
            return logits, rows, None
        decode = sorted(batch.decode, key=lambda s: s.slot)
        tokens, positions, chunks, select, rows = [], [], [], [], []
        for seq in decode:
            tokens.append(seq.token_ids[seq.num_cached])
            select.append(len(select))
            rows.append(seq)
        # hook (issue 25): prompt positions scored for prompt log-probabilities; their rows
        # follow the sampling rows in logits_at
        scored, scored_select = PromptRows(), []
        for seq, n in batch.prefill:
            start = seq.num_cached
            tokens.extend(seq.token_ids[start : start + n])
            chunks.append(PrefillChunk(seq.slot, start, n))
            if start + n == len(seq.token_ids):
                select.append(len(tokens) - 1)
                rows.append(seq)
            if wanted := positions_to_score(seq, start, n):  # hook (issue 25)
                scored.add(seq, wanted)
                at = len(tokens) - n - start  # flat index of position 0 of this sequence
                scored_select += [at + p for p in wanted]
        layout = StepLayout([s.slot for s in decode], [s.num_cached for s in decode], chunks)
        idx = to_device([tokens], torch.long, self.device)
        if self.windowed is not None:
            (seq,) = [*decode, *(s for s, _ in batch.prefill)]
            if seq.num_cached == 0:  # a new sequence, or one refilled after a break
                self.windowed.reset()
            logits, _ = self.model(
                idx, kv_cache=self.windowed, start_pos=seq.num_cached, last_only=True
            )
            return logits[0, : len(rows)].float(), rows, None
        positions = to_device([layout.positions()], torch.long, self.device)
        seq_ends = None
        if self.model.config.rope_type == "longrope":  # it picks a row's factors by the row's reach
            seq_ends = to_device([layout.sequence_ends()], torch.long, self.device)
        logits, _ = self.model(
            idx,
            kv_cache=self.cache.step(layout),
            positions=positions,
            logits_at=to_device(select + scored_select, torch.long, self.device),
            seq_ends=seq_ends,
        )
        logits = logits[0].float()
        if not scored_select:
            return logits, rows, None
        scored.logits = logits[len(select) :]  # hook (issue 25)
        return logits[: len(select)], rows, scored

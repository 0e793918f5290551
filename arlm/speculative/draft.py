"""A draft model as proposer: a smaller model sharing the target's tokenizer (or the target
itself, quantized) guesses k tokens through its own paged KV cache: greedily for a greedy
request, and for a sampled one by drawing from its distribution at the request's temperature
(returned with the guesses, for the rejection rule of ``arlm.speculative.rejection``), from a
generator of its own seeded from the request's seed.

The draft reuses the engine's ``ModelRunner`` and ``BlockManager`` for that cache, with one
``_DraftRow`` per sequence standing in for the engine's ``Sequence``: the ids the draft has
seen (the sequence's, then its own guesses), its cached positions and its block table. Each
``propose`` first brings every row up to date: the cached positions that still agree with the
sequence's ids are kept (accepted guesses stay; rejected ones, and whatever a loop break took
back, are dropped with their blocks), and the positions the draft lacks (the target's last
token, a prompt at the start) are fed in one chunk whose last position gives the first guess;
then k - 1 batched one-token steps give the rest. All rows of a step share one forward. On a
GPU the steps replay CUDA graphs (``use_decode_graphs``), as the target's do: a small draft's
eager step is mostly kernel launches. The first step does too where the positions it feeds
fit the graphs' rows (the usual catch-up: the target's last token and the guesses it
accepted; a short prompt); a longer prompt's runs eagerly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from arlm.engine.block_manager import BlockManager
from arlm.engine.runner import ModelRunner
from arlm.engine.scheduler import ScheduledBatch
from arlm.kv_cache.config import CacheConfig
from arlm.model.transformer import Transformer
from arlm.sampling.params import MIN_SAMPLING_TEMPERATURE
from arlm.speculative.proposer import Guess

# mixed into a request's seed for the draft's own generator, so the draft's draws are not the
# sequence's (which decide acceptance)
DRAFT_SEED_OFFSET = 0x5EC


@dataclass(frozen=True)
class _NoPromptScoring:
    prompt_logprobs: None = None  # the runner scores no prompt positions of a draft row


@dataclass(eq=False)
class _DraftRow:
    """What the runner and block manager read of a sequence, for the draft's cache."""

    token_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    block_table: list[int] = field(default_factory=list)
    peak_blocks: int = 0
    prompt_len: int = 0
    params: _NoPromptScoring = field(default_factory=_NoPromptScoring)
    prompt_logprobs: tuple = ()
    generator: torch.Generator | None = None  # a sampled request's draws

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_cached


def _agreeing(a: list[int], b: list[int], n: int) -> int:
    """How many of the first ``n`` ids ``a`` and ``b`` share."""
    if a[:n] == b[:n]:  # the usual case, at C speed
        return n
    return next(i for i in range(n) if a[i] != b[i])


class DraftProposer:
    """Greedy guesses of ``model`` for up to ``max_num_seqs`` sequences of up to ``max_len``
    positions (its cache's blocks get memory as they are first used, or all at once for
    graphs: ``use_decode_graphs``)."""

    def __init__(self, model: Transformer, max_num_seqs: int, max_len: int, block_size: int):
        self.model = model.eval()
        self.max_len, self.block_size = max_len, block_size
        self._pool(max_num_seqs)
        self.rows: dict[object, _DraftRow] = {}  # engine sequence -> its draft row

    def _pool(self, rows: int) -> None:
        """A cache (and its books) for ``rows`` sequences of ``max_len`` positions."""
        num_blocks = rows * math.ceil(self.max_len / self.block_size)
        self.runner = ModelRunner(self.model, CacheConfig(), num_blocks, self.block_size)
        self.blocks = BlockManager(num_blocks, self.block_size, prefix_caching=False)

    def use_decode_graphs(self, capture: bool, max_batch: int, k: int) -> None:
        """Run the steps of up to ``max_batch`` rows (the most that speculate at once) that
        feed each row at most ``k`` + 1 positions through CUDA graphs (``capture``; else the
        same padded forward eagerly, as the CPU tests do). Graphs replay fixed tensors, so the
        pool gets all its memory now, sized for ``max_batch`` sequences (more rows than that
        get no guesses while it is full). Called before any proposal."""
        self._pool(max_batch)
        blocks_per_row = math.ceil(self.max_len / self.block_size)
        self.runner.use_decode_graphs(
            capture, max_batch * (1 + k), blocks_per_row, max_logits=max_batch
        )

    def _sync(self, seq) -> _DraftRow:
        row = self.rows.get(seq)
        if row is None:
            row = self.rows[seq] = _DraftRow(prompt_len=seq.prompt_len)
            if seq.params.temperature >= MIN_SAMPLING_TEMPERATURE:
                row.generator = torch.Generator(device=self.runner.device)
                if seq.params.seed is None:
                    row.generator.seed()
                else:
                    row.generator.manual_seed(seq.params.seed + seq.index + DRAFT_SEED_OFFSET)
        ids = seq.token_ids
        keep = _agreeing(row.token_ids, ids, min(row.num_cached, len(ids)))
        row.token_ids = list(ids)
        row.num_cached = min(keep, len(ids) - 1)  # at least the last id is fed
        self.blocks.truncate(row)
        return row

    @torch.inference_mode()
    def propose(self, seqs: list, ks: list[int]) -> list[Guess]:
        """Per sequence, ``ks[i]`` guesses (fewer, or none, when the draft's pool is full)."""
        rows = [self._sync(seq) for seq in seqs]
        temperatures = [seq.params.temperature for seq in seqs]
        guesses = [Guess() for _ in seqs]
        probs: list[list[torch.Tensor]] = [[] for _ in seqs]
        active = [i for i, row in enumerate(rows) if self.blocks.ensure(row, len(row.token_ids))]
        # the positions each row lacks, in one chunk that ends its ids: its logits the first guess
        batch = ScheduledBatch(prefill=[(rows[i], rows[i].num_pending) for i in active])
        index = {id(row): i for i, row in enumerate(rows)}
        while active:
            logits, fed, _ = self.runner.run(batch, self.blocks.take_orders())
            tokens = logits.argmax(dim=-1).tolist()
            for j, row in enumerate(fed):
                i = index[id(row)]
                if row.generator is not None:  # q at the request's temperature, and a draw
                    q = (logits[j] / temperatures[i]).softmax(dim=-1)
                    probs[i].append(q)
                    tokens[j] = int(torch.multinomial(q, 1, generator=row.generator))
                row.token_ids.append(tokens[j])
                guesses[i].tokens.append(tokens[j])
            active = [
                i
                for i in active
                if len(guesses[i].tokens) < ks[i]
                and self.blocks.ensure(rows[i], len(rows[i].token_ids))
            ]
            batch = ScheduledBatch(decode=[rows[i] for i in active])
        for guess, qs in zip(guesses, probs, strict=True):
            if qs:
                guess.probs = torch.stack(qs)
        return guesses

    def release(self, seq) -> None:
        row = self.rows.pop(seq, None)
        if row is not None:
            self.blocks.free(row)

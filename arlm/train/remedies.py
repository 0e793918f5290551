"""Training-time loop remedies in one training step: unlikelihood (token, sequence or both) and
DITTO, added to the cross-entropy of the ordinary batch.

Each micro-step makes one forward over the ordinary windows, then (when on) the DITTO windows
(one sentence repeated) and, every ``unlikelihood_every`` steps, the model's own greedy
continuations of the batch's prefixes, stacked as rows of one batch, so data parallelism sees
one forward and one backward as it does for the plain loss. The loss is

    CE(ordinary) + w_ul * (UL_token(ordinary) / positions + UL_seq(continuations) / positions)
                 + w_ditto * DITTO(repeated) / positions

with each term divided by the number of positions it covers (the same on every rank).

Determinism. What is random here (the DITTO sentences) is drawn from a generator seeded by the
run's seed, the step and the micro-step, and every rank draws the same global rows and keeps its
slice: a resumed run, and a run over any number of processes, builds the same rows as one
uninterrupted process. The greedy continuations depend only on the weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from arlm.model.transformer import Transformer
from arlm.tokenizer import Tokenizer
from arlm.train.data import TokenSplit
from arlm.train.distributed import World
from arlm.train.ditto import ditto_loss, repetition_batch, sentence_end_ids
from arlm.train.unlikelihood import (
    greedy_continuations,
    repeated_ngram_mask,
    sequence_unlikelihood,
    token_unlikelihood,
)
from arlm.validate import check_float, check_int

UNLIKELIHOOD_KINDS = ("token", "sequence", "both")
# Welleck et al. continue 50-token prefixes and penalise repeated 4-grams; here the prefix is a
# quarter of the window and the continuation fills the rest.
REPEAT_NGRAM = 4


@dataclass(frozen=True)
class RemedySettings:
    """The remedy options of a ``TrainConfig`` (see its help texts)."""

    unlikelihood: str | None
    unlikelihood_weight: float
    unlikelihood_every: int
    ditto: bool
    ditto_weight: float
    ditto_lambda: float
    ditto_rows: int

    def __post_init__(self) -> None:
        if self.unlikelihood is not None and self.unlikelihood not in UNLIKELIHOOD_KINDS:
            raise ValueError(
                f"unlikelihood={self.unlikelihood!r} is not allowed; choose one of "
                f"{', '.join(UNLIKELIHOOD_KINDS)}, or leave it off"
            )
        check_float("unlikelihood_weight", self.unlikelihood_weight, lambda v: v >= 0, ">= 0")
        check_int("unlikelihood_every", self.unlikelihood_every, 1)
        check_float("ditto_weight", self.ditto_weight, lambda v: v >= 0, ">= 0")
        check_float("ditto_lambda", self.ditto_lambda, lambda v: 0 < v <= 1, "in (0, 1]")
        check_int("ditto_rows", self.ditto_rows, 1)

    @property
    def token(self) -> bool:
        return self.unlikelihood in ("token", "both")

    @property
    def sequence(self) -> bool:
        return self.unlikelihood in ("sequence", "both")

    @property
    def active(self) -> bool:
        return self.unlikelihood is not None or self.ditto


class RemedyLoss:
    """The step's loss with the remedies of ``settings`` (see the module docstring)."""

    def __init__(
        self,
        settings: RemedySettings,
        model: Transformer,
        train: TokenSplit,
        tokenizer: Tokenizer,
        world: World,
        seed: int,
    ) -> None:
        self.settings, self.model, self.train, self.world, self.seed = (
            settings,
            model,
            train,
            world,
            seed,
        )
        self.ends = sentence_end_ids(tokenizer) if settings.ditto else frozenset()

    def _generator(self, step: int, micro: int) -> torch.Generator:
        # one stream per (run, step, micro-step): nothing to save for an exact resume
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + micro)

    def loss(
        self, forward: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, step: int, micro: int
    ) -> torch.Tensor:
        """The loss of micro-step ``micro`` of optimizer step ``step`` (0-based, before the
        update) on the ordinary inputs ``x`` and targets ``y`` (B, T); ``forward`` is the model
        as training calls it (DDP or compiled wrapper)."""
        s, (B, T), device = self.settings, x.shape, x.device
        inputs, parts = [x], []
        if s.ditto:
            rank, size, rows = self.world.rank, self.world.size, s.ditto_rows
            windows, lengths = repetition_batch(
                self.train, self.ends, rows * size, T, self._generator(step, micro)
            )
            windows = windows[rank * rows : (rank + 1) * rows].to(device)
            lengths = lengths[rank * rows : (rank + 1) * rows].to(device)
            inputs.append(windows[:, :-1])
            parts.append(("ditto", windows[:, 1:], lengths))
        if s.sequence and step % s.unlikelihood_every == 0:
            prefix = max(1, T // 4)
            rows = greedy_continuations(self.model, x[:, :prefix], T + 1 - prefix)
            mask = repeated_ngram_mask(rows, REPEAT_NGRAM, prefix)[:, 1:]
            inputs.append(rows[:, :-1])
            parts.append(("sequence", rows[:, 1:], mask))
        logits, _ = forward(torch.cat(inputs))  # (rows, T, vocab)
        ordinary = logits[:B]
        loss = F.cross_entropy(
            ordinary.float().reshape(-1, ordinary.size(-1)), y.reshape(-1), ignore_index=-100
        )
        if s.token:
            loss = loss + s.unlikelihood_weight * token_unlikelihood(ordinary, y) / (B * T)
        at = B
        for kind, targets, extra in parts:
            rows = logits[at : at + len(targets)]
            at += len(targets)
            if kind == "ditto":
                term = ditto_loss(rows, targets, extra, s.ditto_lambda)
                loss = loss + s.ditto_weight * term / targets.numel()
            else:
                term = sequence_unlikelihood(rows, targets, extra)
                loss = loss + s.unlikelihood_weight * term / targets.numel()
        return loss

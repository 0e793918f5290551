"""Preference training: Direct Preference Optimization (Rafailov et al. 2023) on pairs of answers
to one prompt, one chosen and one rejected.

A preference corpus is a JSON-lines file of ``{"prompt": ..., "chosen": ..., "rejected": ...}``,
TRL's shape: the prompt a string and the answers strings (plain text, an end-of-sequence token
added), or the prompt a list of messages and each answer a list of messages or a string (one
assistant message), rendered with the model's chat template as ``arlm.train.chat`` renders
conversations. Only the answers' tokens count.

The loss of a pair, with ``log p`` an answer's summed token log-probabilities under the model
being trained and ``log q`` under the reference (the model as training began):

    -log sigmoid(beta * ((log p(chosen) - log q(chosen)) - (log p(rejected) - log q(rejected))))

It starts at log 2 (the model is its reference) and falls as the model raises the chosen
answer's likelihood relative to the rejected one's, each measured against the reference, so it
cannot drift far from the reference. With LoRA the reference is the frozen model itself, its
adapters switched off (no second copy); a full fine-tune keeps a frozen copy of the start.

Other losses of the same margin ``m`` (TRL's ``loss_type`` names, ``DPO_LOSSES``):

- ``sigmoid`` with label smoothing ``eps`` (conservative DPO, Mitchell 2023: each label
  wrong with probability ``eps``): ``-(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)``;
- ``hinge`` (SLiC, Zhao et al. 2023): ``max(0, 1 - beta m)``;
- ``ipo`` (Azar et al. 2023): ``(m - 1 / (2 beta))^2``, with each answer's log-probability the
  mean over its tokens, as TRL computes it: a squared loss that pulls the margin to a target
  rather than to infinity.

The rewards DPO implies, ``beta (log p - log q)`` per answer, give what TRL logs: the share of
pairs whose chosen answer's reward beats the rejected one's (reward accuracy) and the mean
difference (reward margin); the trainer reports them on the validation pairs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from arlm.model.lora import adapters_disabled, lora_modules
from arlm.model.transformer import Transformer
from arlm.tokenizer import Tokenizer
from arlm.train.chat import (
    IGNORE,
    ChatSplit,
    CorpusError,
    Example,
    check_messages,
    conversation_pieces,
    encode_pieces,
    read_examples,
)

DPO_LOSSES = ("sigmoid", "hinge", "ipo")
SHAPE = (
    'each line must be one JSON object {"prompt": ..., "chosen": ..., "rejected": ...}: a '
    "string prompt with string answers, or a list of messages with answers that are lists of "
    "messages or strings"
)


def encode_pair(tokenizer: Tokenizer, row: dict, where: str) -> list[Example]:
    """The chosen and the rejected answer of ``row``, each with its prompt, as examples."""
    if not isinstance(row, dict) or not {"prompt", "chosen", "rejected"} <= row.keys():
        raise CorpusError(f"{where}: {SHAPE}")
    prompt, pair = row["prompt"], []
    for key in ("chosen", "rejected"):
        answer = row[key]
        templated = isinstance(prompt, list)
        if isinstance(prompt, str) and isinstance(answer, str) and answer:
            pieces = [(prompt, False), (answer, True)]
        elif templated and isinstance(answer, (str, list)) and answer:
            if isinstance(answer, str):  # one assistant message
                answer = [{"role": "assistant", "content": answer}]
            messages = check_messages(prompt + answer, where)
            pieces = conversation_pieces(tokenizer, messages, where, first=len(prompt))
        else:
            raise CorpusError(f"{where}: {key!r} does not fit the prompt; {SHAPE}")
        pair.append(encode_pieces(tokenizer, pieces, templated))
    return pair


class PreferenceSplit:
    """The pairs of one split. A batch of n pairs is 2n rows: the chosen answers, then the
    rejected ones in the same order."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = ChatSplit(examples)  # chosen, rejected, chosen, rejected, ...

    def __len__(self) -> int:
        return len(self.examples) // 2

    @property
    def tokens(self) -> int:
        return self.examples.tokens

    def sample(self, n: int, generator: torch.Generator) -> list[int]:
        """``n`` pair indices drawn uniformly, with one draw from ``generator``."""
        return torch.randint(len(self), (n,), generator=generator).tolist()

    def batch(self, indices: list[int], window: int, pad_id: int) -> tuple[torch.Tensor, ...]:
        rows = [2 * i for i in indices] + [2 * i + 1 for i in indices]
        return self.examples.batch(rows, window, pad_id)


@dataclass
class PreferenceCorpus:
    """A preference corpus encoded: train and validation pairs, and the tokenizer."""

    train: PreferenceSplit
    val: PreferenceSplit
    tokenizer: Tokenizer


def load_preferences(path: str, tokenizer: Tokenizer) -> PreferenceCorpus:
    """Encode the preference corpus at ``path``; pairs are held out as ``load_chat`` holds out
    examples."""
    train, val = read_examples(path, lambda row, where: encode_pair(tokenizer, row, where))
    return PreferenceCorpus(PreferenceSplit(train), PreferenceSplit(val), tokenizer)


def sequence_logps(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mean: bool = False
) -> torch.Tensor:
    """Each row's summed log-probability (float32) of its targets ``y`` (``IGNORE``: none) after
    the inputs ``x``, or with ``mean`` its mean over the targets; one row's log-softmax at a
    time, so only the logits are held whole."""
    logits, _ = model(x)
    sums = []
    for row, targets in zip(logits, y, strict=True):
        logp = torch.log_softmax(row.float(), dim=-1)
        taken = logp.gather(-1, targets.clamp(min=0)[:, None])[:, 0]
        counted = targets != IGNORE
        total = torch.where(counted, taken, 0.0).sum()
        sums.append(total / counted.sum().clamp(min=1) if mean else total)
    return torch.stack(sums)


def dpo_loss(
    policy: torch.Tensor,
    reference: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The mean loss ``kind`` (one of ``DPO_LOSSES``, see the module's docstring) of pairs whose
    chosen answers' log-probabilities are the first half of ``policy`` and ``reference`` (2n,)
    and the rejected answers' the second."""
    n = policy.numel() // 2
    margin = (policy[:n] - reference[:n]) - (policy[n:] - reference[n:])
    if kind == "hinge":
        return F.relu(1 - beta * margin).mean()
    if kind == "ipo":
        return ((margin - 1 / (2 * beta)) ** 2).mean()
    wrong = F.logsigmoid(-beta * margin) * label_smoothing if label_smoothing else 0.0
    return -(F.logsigmoid(beta * margin) * (1 - label_smoothing) + wrong).mean()


class PairRewards(NamedTuple):
    """A batch's loss, and per pair the chosen and the rejected answer's implied reward
    ``beta (log p - log q)`` (detached)."""

    loss: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor


class PreferenceLoss:
    """The preference loss (``kind``, one of ``DPO_LOSSES``) of a batch
    (``PreferenceSplit.batch``) for the model being trained, against ``reference`` or, with
    None, the same model with its LoRA adapters off."""

    def __init__(
        self,
        beta: float,
        model: Transformer,
        reference: Transformer | None,
        kind: str = "sigmoid",
        label_smoothing: float = 0.0,
    ) -> None:
        if reference is None and not lora_modules(model):
            raise ValueError("a reference model is needed where the model has no adapters")
        if kind not in DPO_LOSSES:
            raise ValueError(f"dpo_loss={kind!r} is not allowed; choose one of {DPO_LOSSES}")
        self.beta, self.model, self.reference = beta, model, reference
        self.kind, self.label_smoothing = kind, label_smoothing

    @property
    def start(self) -> float:
        """The loss where training begins, the model its own reference (every margin 0)."""
        zero = torch.zeros(2)
        return dpo_loss(zero, zero, self.beta, self.kind, self.label_smoothing).item()

    @torch.no_grad()
    def reference_logps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The reference's log-probabilities of the rows, without dropout."""
        model = self.reference if self.reference is not None else self.model
        training = model.training
        model.eval()
        try:
            with adapters_disabled(model) if self.reference is None else nullcontext():
                return sequence_logps(model, x, y, mean=self.kind == "ipo")
        finally:
            model.train(training)

    def rewards(self, forward: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> PairRewards:
        """The batch's loss and its pairs' rewards. ``forward``: the model as the step calls
        it (wrapped for data parallelism)."""
        policy = sequence_logps(forward, x, y, mean=self.kind == "ipo")
        reference = self.reference_logps(x, y)
        loss = dpo_loss(policy, reference, self.beta, self.kind, self.label_smoothing)
        reward = self.beta * (policy.detach() - reference)
        n = reward.numel() // 2
        return PairRewards(loss, reward[:n], reward[n:])

    def loss(self, forward: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's loss (``rewards``' first part)."""
        return self.rewards(forward, x, y).loss

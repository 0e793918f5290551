"""The logits processors of the sampling chain: each maps logits (B, vocab) to new logits,
given each row's token history.

Processors that depend on the history update their state one appended token at a time (counts
go up for the new token and down for the one leaving a ``penalty_last_n`` window), so a step
does not rescan the history. DRY, the one that must look at its whole window, is in
``arlm.sampling.dry``.

On a GPU none of them makes the host wait: what they take from the history reaches the device
in pinned, asynchronous copies (``arlm.devices``), masks are applied with ``index_fill`` and
``torch.where`` rather than data-dependent indexing, and nothing is read back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from arlm.devices import pinned_to, to_device


@dataclass
class History:
    """Token ids per row of a batch: the prompt, then the generated tokens."""

    rows: list[list[int]]
    prompt_lens: list[int]

    def generated(self, row: int) -> int:
        return len(self.rows[row]) - self.prompt_lens[row]


class Processor:
    """One link of the chain: logits (B, vocab) -> logits, given each row's history.

    ``reset`` rebuilds any state from the whole history (at the start and after a rewind);
    ``append`` updates it after one id was appended to every row. Both do nothing by default.
    """

    def reset(self, history: History) -> None:
        pass

    def append(self, history: History) -> None:
        pass

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        raise NotImplementedError


class _WindowCounts:
    """How often each token occurs in each row's last ``last_n`` ids (0: all of them), counting
    only generated ids when ``generated_only``. Kept current one append at a time."""

    def __init__(self, vocab_size: int, last_n: int, generated_only: bool) -> None:
        self.vocab_size, self.last_n, self.generated_only = vocab_size, last_n, generated_only
        self.counts = torch.zeros(0)

    def _first_counted(self, history: History, row: int) -> int:
        return history.prompt_lens[row] if self.generated_only else 0

    def reset(self, history: History, device: torch.device) -> None:
        self.counts = torch.zeros(len(history.rows), self.vocab_size, device=device)
        for b, ids in enumerate(history.rows):
            lo = self._first_counted(history, b)
            if self.last_n:
                lo = max(lo, len(ids) - self.last_n)
            if lo < len(ids):
                index = to_device(ids[lo:], torch.long, device)
                self.counts[b].index_add_(0, index, torch.ones(len(index), device=device))

    def append(self, history: History) -> None:
        rows, tokens, deltas = [], [], []
        for b, ids in enumerate(history.rows):
            lo, new = self._first_counted(history, b), len(ids) - 1
            if new >= lo:
                rows.append(b), tokens.append(ids[new]), deltas.append(1)
            leaving = new - self.last_n
            if self.last_n and leaving >= lo:
                rows.append(b), tokens.append(ids[leaving]), deltas.append(-1)
        if rows:
            # one copy for all three: the deltas travel as integers
            rows_t, tokens_t, deltas_t = to_device(
                [rows, tokens, deltas], torch.long, self.counts.device
            )
            self.counts.index_put_(
                (rows_t, tokens_t), deltas_t.to(self.counts.dtype), accumulate=True
            )


class RepetitionPenalty(Processor):
    """CTRL's penalty, as transformers applies it: for every token in the history (or its last
    ``last_n``), a positive logit is divided by ``penalty`` and a negative one multiplied."""

    def __init__(self, penalty: float, vocab_size: int, last_n: int, device: torch.device):
        self.penalty, self.device = penalty, device
        self.window = _WindowCounts(vocab_size, last_n, generated_only=False)

    def reset(self, history: History) -> None:
        self.window.reset(history, self.device)

    def append(self, history: History) -> None:
        self.window.append(history)

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        penalized = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return torch.where(self.window.counts > 0, penalized, logits)


class OpenAIPenalty(Processor):
    """OpenAI's presence and frequency penalties over the generated tokens:
    ``logit[j] - count[j] * frequency - (count[j] > 0) * presence``."""

    def __init__(
        self,
        presence: float,
        frequency: float,
        vocab_size: int,
        last_n: int,
        device: torch.device,
    ) -> None:
        self.presence, self.frequency, self.device = presence, frequency, device
        self.window = _WindowCounts(vocab_size, last_n, generated_only=True)

    def reset(self, history: History) -> None:
        self.window.reset(history, self.device)

    def append(self, history: History) -> None:
        self.window.append(history)

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        counts = self.window.counts
        return logits - counts * self.frequency - (counts > 0).float() * self.presence


class NoRepeatNGram(Processor):
    """Ban every token that would complete an n-gram already in the history (transformers'
    ``no_repeat_ngram_size``). Each row keeps a map from (n-1)-gram to the tokens seen after it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.seen: list[dict[tuple[int, ...], set[int]]] = []

    def _add_last(self, table: dict, ids: list[int]) -> None:
        gram = ids[len(ids) - self.n :]
        table.setdefault(tuple(gram[:-1]), set()).add(gram[-1])

    def reset(self, history: History) -> None:
        self.seen = []
        for ids in history.rows:
            table: dict[tuple[int, ...], set[int]] = {}
            for end in range(self.n, len(ids) + 1):
                self._add_last(table, ids[:end])
            self.seen.append(table)

    def append(self, history: History) -> None:
        for table, ids in zip(self.seen, history.rows, strict=True):
            if len(ids) >= self.n:
                self._add_last(table, ids)

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        rows, tokens = [], []
        for b, (table, ids) in enumerate(zip(self.seen, history.rows, strict=True)):
            banned = table.get(tuple(ids[len(ids) - self.n + 1 :]), ())
            rows += [b] * len(banned)
            tokens += banned
        if rows:
            index = to_device([rows, tokens], torch.long, logits.device)
            logits = logits.index_put(index.unbind(), logits.new_full((), float("-inf")))
        return logits


class LogitBias(Processor):
    """Add a fixed value to chosen tokens' logits (OpenAI's ``logit_bias``)."""

    def __init__(self, bias: dict[int, float], vocab_size: int, device: torch.device) -> None:
        bad = sorted(t for t in bias if t >= vocab_size)
        if bad:
            raise ValueError(
                f"logit_bias names token ids {bad}; this vocabulary's ids are 0..{vocab_size - 1}"
            )
        host = torch.zeros(vocab_size)
        host[list(bias)] = torch.tensor(list(bias.values()))
        self.bias = pinned_to(host, device)

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        return logits + self.bias


class MinTokens(Processor):
    """Mask the ids that would end generation until a row has generated ``min_tokens``."""

    def __init__(self, min_tokens: int, end_ids: Iterable[int]) -> None:
        self.min_tokens, self.end_ids = min_tokens, sorted(end_ids)
        self._ends: torch.Tensor | None = None  # the end ids on the logits' device

    def __call__(self, logits: torch.Tensor, history: History) -> torch.Tensor:
        early = [history.generated(b) < self.min_tokens for b in range(len(history.rows))]
        if not any(early) or not self.end_ids:
            return logits
        if self._ends is None or self._ends.device != logits.device:
            self._ends = to_device(self.end_ids, torch.long, logits.device)
        masked = logits.index_fill(1, self._ends, float("-inf"))
        if all(early):
            return masked
        return torch.where(to_device(early, torch.bool, logits.device)[:, None], masked, logits)


# The filters take one value for all rows or a column (B, 1) of per-row values; a row whose
# value means "off" (top_k 0, top_p or typical_p 1, min_p 0) keeps its logits.
Value = float | torch.Tensor


def top_k_filter(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    vocab = logits.size(-1)
    k = torch.as_tensor(k, device=logits.device).reshape(-1, 1).long()
    k = torch.where((k <= 0) | (k > vocab), vocab, k)
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1).expand(len(logits), 1))
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: Value) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=logits.dtype, device=logits.device).reshape(-1, 1)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the tokens before it already reach p; the most likely one always stays
    drop_sorted = ((probs.cumsum(dim=-1) - probs) >= p) & (p < 1)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: Value) -> torch.Tensor:
    min_p = torch.as_tensor(min_p, dtype=logits.dtype, device=logits.device).reshape(-1, 1)
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def typical_filter(logits: torch.Tensor, mass: Value) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022): rank tokens by how far their surprise
    ``-log p`` is from the entropy, and keep the closest ones until their mass reaches ``mass``
    (the one closest always stays)."""
    mass = torch.as_tensor(mass, dtype=logits.dtype, device=logits.device).reshape(-1, 1)
    logp = logits.log_softmax(dim=-1)
    entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)  # 0 * -inf is nan: skip it
    distance = (-logp - entropy).abs()
    sorted_distance, order = torch.sort(distance, dim=-1)
    cum = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    # the last kept rank is the first whose cumulative mass reaches `mass`
    last = (cum < mass).sum(dim=-1, keepdim=True).clamp(max=logits.size(-1) - 1)
    drop_sorted = (sorted_distance > sorted_distance.gather(-1, last)) & (mass < 1)
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))

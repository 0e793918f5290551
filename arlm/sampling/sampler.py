"""From next-token logits to tokens, for a batch of rows that each have their own parameters.

Each sequence keeps its own ``SequenceSampler``: its processors (penalty counts, n-gram table,
DRY) over its one list of token ids, updated one appended token at a time. A step runs

    logit_bias, min_tokens, repetition_penalty, presence/frequency_penalty, DRY,
    no_repeat_ngram_size                         (per row, only rows that ask; these change
                                                  greedy choices too)
    temperature, top_k, top_p, min_p, typical_p  (vectorised: one tensor op per step for all
                                                  rows, each row's value in a column; skipped
                                                  at temperature 0, or below 1e-5, which
                                                  take the argmax)

and then one draw per row: the argmax at temperature 0, else a sample by one uniform number:
a seeded row's from its own generator, so a seeded request draws the same tokens alone or in
any batch, and all unseeded rows' from one draw of the device's default generator (one launch
for them all, and ``torch.manual_seed`` makes unseeded runs repeat).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from arlm.devices import to_device
from arlm.sampling.dry import Dry, DryBreakers
from arlm.sampling.params import MIN_SAMPLING_TEMPERATURE, SamplingParams, TokenLogprob
from arlm.sampling.processors import (
    History,
    LogitBias,
    MinTokens,
    NoRepeatNGram,
    OpenAIPenalty,
    Processor,
    RepetitionPenalty,
    min_p_filter,
    top_k_filter,
    top_p_filter,
    typical_filter,
)


class SequenceSampler:
    """One sequence's processors over its token ids ``token_ids`` (the prompt's
    ``prompt_len`` ids, then the generated ones), a list the sequence owns and appends to.

    end_ids: the ids that end a generation (masked until ``min_tokens``). dry_breakers: from
    ``dry_sequence_breakers``, needed when DRY is on. grammar: the structured-output mask
    (``arlm.sampling.structured.GrammarMask``), needed with ``structured_outputs``.
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        token_ids: list[int],
        prompt_len: int,
        *,
        end_ids: Iterable[int] = (),
        dry_breakers: DryBreakers | None = None,
        device: torch.device | str = "cpu",
        grammar: Processor | None = None,
    ) -> None:
        self.params = params
        self.history = History([token_ids], [prompt_len])
        device = torch.device(device)
        p = params
        self.processors: list[Processor] = []
        if p.logit_bias:
            self.processors.append(LogitBias(p.logit_bias, vocab_size, device))
        if p.min_tokens:
            self.processors.append(MinTokens(p.min_tokens, end_ids))
        if p.repetition_penalty != 1.0:
            self.processors.append(
                RepetitionPenalty(p.repetition_penalty, vocab_size, p.penalty_last_n, device)
            )
        if p.presence_penalty or p.frequency_penalty:
            self.processors.append(
                OpenAIPenalty(
                    p.presence_penalty, p.frequency_penalty, vocab_size, p.penalty_last_n, device
                )
            )
        if p.dry_multiplier > 0:
            if dry_breakers is None:
                raise ValueError("DRY is on (dry_multiplier > 0) but no dry_breakers were given")
            self.processors.append(
                Dry(
                    p.dry_multiplier,
                    p.dry_base,
                    p.dry_allowed_length,
                    p.dry_penalty_last_n,
                    dry_breakers,
                )
            )
        if p.no_repeat_ngram_size:
            self.processors.append(NoRepeatNGram(p.no_repeat_ngram_size))
        if grammar is not None:  # last: whatever the others did, it rules tokens out
            self.processors.append(grammar)
        self.reset()

    def reset(self) -> None:
        """Rebuild every processor's state from the token ids (at the start, after a rewind)."""
        for proc in self.processors:
            proc.reset(self.history)

    def appended(self) -> None:
        """Update the processors after one id was appended to the token ids."""
        for proc in self.processors:
            proc.append(self.history)

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The row's logits (1, vocab) after its processors. Whether they left any token
        possible is for the caller to check (``ALL_BANNED``), after its one wait for the device."""
        for proc in self.processors:
            logits = proc(logits, self.history)
        return logits

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """One token for this sequence alone (``sample`` over a batch of one)."""
        logits = self.process(logits.float())
        if not torch.isfinite(logits).any():
            raise ValueError(ALL_BANNED)
        return int(sample(logits, [self.params], [generator])[0])


ALL_BANNED = (
    "every token is banned at this step; loosen logit_bias, no_repeat_ngram_size, min_tokens "
    "or the stop ids"
)


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return to_device(values, like.dtype, like.device)[:, None]


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """One token per row of ``logits`` (B, vocab), already processed, each row with its own
    ``params`` and generator (None: the device's default one, which the rows without one
    share) -> (B,)."""
    # a temperature this small is greedy in effect, and dividing by it would overflow float32
    drawn = [b for b, p in enumerate(params) if p.temperature >= MIN_SAMPLING_TEMPERATURE]
    if not drawn:
        return logits.argmax(dim=-1)
    every = len(drawn) == len(params)  # then no argmax, and no copy of the drawn rows
    rows = None if every else to_device(drawn, torch.long, logits.device)
    x = _filtered(logits if every else logits.index_select(0, rows), [params[b] for b in drawn])
    # inverse transform sampling: one uniform number per row, located in the row's cumulative
    # distribution (torch.multinomial draws a whole vocabulary of exponentials per row: 0.8 ms
    # a row for GPT-2's 50k tokens here)
    cdf = x.softmax(dim=-1).cumsum(dim=-1)
    u = _uniforms([generators[b] for b in drawn], x.device, cdf.dtype)
    # right=True skips tokens of probability 0, whose interval of the cdf is empty
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    picked = picked.clamp_(max=x.size(-1) - 1)
    return picked if every else logits.argmax(dim=-1).index_copy_(0, rows, picked)


def _uniforms(
    generators: list[torch.Generator | None], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """One uniform number in [0, 1) per row (B,): row b's from ``generators[b]``, the rows
    whose generator is None from one draw of the device's default generator. A seeded row
    needs a launch of its own; the others take one between them, where a launch each was most
    of a large step's sampling on a GPU (256 launches at 256 rows)."""
    own = [b for b, g in enumerate(generators) if g is not None]
    drawn = [torch.rand(1, generator=generators[b], device=device, dtype=dtype) for b in own]
    if len(own) == len(generators):
        return torch.cat(drawn)
    u = torch.rand(len(generators), device=device, dtype=dtype)
    if own:
        u.index_copy_(0, to_device(own, torch.long, device), torch.cat(drawn))
    return u


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution ``sample`` draws one row's token from: (vocab,) probabilities of
    ``logits`` (1, vocab), already processed, after temperature and the filters (one-hot at the
    argmax for greedy decoding)."""
    if params.temperature < MIN_SAMPLING_TEMPERATURE:
        return torch.nn.functional.one_hot(logits[0].argmax(), logits.size(-1)).to(logits.dtype)
    return _filtered(logits, [params]).softmax(dim=-1)[0]


def _filtered(x: torch.Tensor, ps: list[SamplingParams]) -> torch.Tensor:
    """Rows ``x`` (B, vocab) divided by their temperature, then each filter a row asks for."""
    x = x / _column([p.temperature for p in ps], x)
    # each filter runs once for all rows when any row asks for it
    if any(p.top_k for p in ps):
        # above the vocabulary, k keeps everything (and could overflow a long)
        top_k = [min(p.top_k, x.size(-1)) for p in ps]
        x = top_k_filter(x, to_device(top_k, torch.long, x.device))
    if any(p.top_p < 1 for p in ps):
        x = top_p_filter(x, _column([p.top_p for p in ps], x))
    if any(p.min_p > 0 for p in ps):
        x = min_p_filter(x, _column([p.min_p for p in ps], x))
    if any(p.typical_p < 1 for p in ps):
        x = typical_filter(x, _column([p.typical_p for p in ps], x))
    return x


def logprob_tensors(
    logits: torch.Tensor, tokens: torch.Tensor, top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """On the logits' device: per row, the log-probability of ``tokens`` (B,) under ``logits``
    (B, vocab), and the ``top`` likeliest alternatives' log-probabilities and ids (B, top)."""
    logp = logits.float().log_softmax(dim=-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    values, ids = logp.topk(min(top, logp.size(-1)), dim=-1)
    return chosen, values, ids


def as_token_logprobs(
    tokens: list[int],
    chosen: list[float],
    values: list[list[float]],
    ids: list[list[int]],
    tops: list[int],
) -> list[TokenLogprob]:
    """``logprob_tensors``' results read back, each row keeping its own ``tops[i]``
    alternatives."""
    return [
        TokenLogprob(t, lp, tuple(zip(i[:k], v[:k], strict=True)))
        for t, lp, v, i, k in zip(tokens, chosen, values, ids, tops, strict=True)
    ]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Per row, the log-probability of ``tokens`` (B,) under ``logits`` (B, vocab) and the
    ``top`` likeliest alternatives."""
    chosen, values, ids = logprob_tensors(logits, tokens, top)
    return as_token_logprobs(
        tokens.tolist(), chosen.tolist(), values.tolist(), ids.tolist(), [top] * len(tokens)
    )

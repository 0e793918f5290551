"""Speculative decoding inside the engine's step: propose, schedule, verify, roll back.

Before the scheduler runs, the proposer (``arlm.speculative``) guesses up to k next tokens for
each decoding sequence. The scheduler turns a decode row with guesses into a *verify* row: its
pending token and its k guesses, k + 1 positions in the step's flat batch beside the ordinary
decode rows and prefill chunks, with blocks for all of them (``Scheduler.schedule``). The
forward gives logits at every one of those positions (``ModelRunner``).

``verify`` then walks each verify row's positions in order, each through the engine's whole
per-token chain (``TokenChain.run``: bans, processors, sampling, append, loop policy, stop
strings, length), so position j is processed only after the token of position j - 1 was
appended, as penalties and DRY require. After each position the walk goes on only if the token
the chain appended is the guess for that position; the first mismatch, finish or rollback ends
it, and the token appended there is the target's own (at the end of a fully accepted row, the
"bonus" token). The rejected positions' keys and values are dropped exactly as a loop break
drops them: ``num_cached`` goes back to the kept tokens and the blocks past them are released.

Why this is exact. Greedy: every appended token is the target's processed argmax, so the output
is token for token what decoding without speculation gives. Sampling: the chain draws each
position's token from the target's processed distribution p with one uniform from the
sequence's own generator, as without speculation, and keeps the guess d only if the draw is d.
For a guess that is a point mass (prompt lookup, a greedy draft) this *is* the rejection rule of
Leviathan et al. / Chen et al.: d is kept with probability p(d) = min(1, p(d) / q(d)), and a
rejection yields a draw from p without d, which is max(0, p - q) normalised. Each token is
distributed exactly as the target's, and a seeded sequence draws its uniforms in the same order
with or without speculation, alone or batched, so it gives the same tokens. A draft that samples
returns the distribution q of each guess; for those positions the chain's draw is the general
rule (``arlm.speculative.rejection``: keep d with probability min(1, p(d)/q(d)), else draw from
max(0, p - q) normalised), with the sequence's own generator: the same distribution, and the
same tokens alone or batched.

How many to guess. Each sequence keeps an average of how often its guesses were accepted, a;
the i-th guess is reached and accepted with chance a^i, so k guesses make 1 + a + ... + a^k
tokens in one verify row, for 1 + k * c of a decode step's work, where c is one more verified
position (``POSITION_COST``) plus the proposer's measured seconds per guessed position over a
step's measured seconds. The k (up to ``num_speculative_tokens``) with the most tokens per
work is taken, none when no k beats one token per step, with one guess every ``PROBE_EVERY``
steps (more for a costly proposer) to see the acceptance again. Past
``SpeculativeConfig.max_batch`` decode rows in a step nobody speculates: with many rows the
forward is bound by compute, and verified positions cost more of a step.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from arlm.config import ModelConfig
from arlm.devices import to_device
from arlm.engine.sequence import Sequence, Status
from arlm.engine.token_chain import Draw, TokenChain, draw_samples
from arlm.model.transformer import Transformer
from arlm.sampling.sampler import probabilities
from arlm.speculative.config import SpeculativeConfig
from arlm.speculative.draft import DraftProposer
from arlm.speculative.ngram import NgramProposer
from arlm.speculative.proposer import Proposer
from arlm.speculative.rejection import accept_or_resample

if TYPE_CHECKING:
    from arlm.engine.engine import Engine

# One more position of a verify row, relative to the cost of a decode step (measured on a CPU
# by benchmarks/speculative.py, "verify rows of 4 wrong guesses": 0.008 to 0.033 at batch 1
# over runs on a loaded machine).
POSITION_COST = 0.025
# The weight of the latest verification in a sequence's acceptance average, and of the latest
# step in the average step and proposer times.
ACCEPTANCE_DECAY = 0.3
TIME_DECAY = 0.1
# A sequence whose guesses do not pay tries one again after PROBE_EVERY steps (its acceptance
# may have changed), or later for a costly proposer: probes take at most PROBE_BUDGET of the
# work (an int4 self-draft's guess can cost more than a step).
PROBE_EVERY = 16
PROBE_BUDGET = 0.02


def check(
    config: SpeculativeConfig,
    target: ModelConfig,
    max_len: int,
    *,
    windowed: bool,
    tensor_parallel: bool,
    draft: ModelConfig | None,
) -> None:
    """A ValueError naming what cannot speculate with this model and engine: the windowed
    cache (it cannot rewind rejected positions), tensor parallelism (its step messages carry no
    verify rows), k that leaves no room in ``max_len``, a draft with another vocabulary or a
    shorter context."""
    if windowed:
        raise ValueError(
            "speculative decoding rolls rejected guesses out of the KV cache, which the "
            "windowed cache (kv_window) cannot rewind; load without kv_window"
        )
    if tensor_parallel:
        raise ValueError(
            "speculative decoding does not run with tensor parallelism yet (the other ranks' "
            "step messages carry no verify rows); load with tensor_parallel_size=1"
        )
    k = config.num_speculative_tokens
    if k >= max_len:
        raise ValueError(
            f"num_speculative_tokens={k} guesses as many positions as a sequence may hold "
            f"(max_model_len {max_len}); use fewer than {max_len}"
        )
    if config.method != "draft":
        return
    if draft is None:
        raise ValueError("speculative method 'draft' needs a draft model")
    if draft.vocab_size != target.vocab_size:
        raise ValueError(
            f"the draft model's vocabulary has {draft.vocab_size} ids, the target's "
            f"{target.vocab_size}: a draft must share the target's tokenizer"
        )
    if draft.block_size < max_len:
        raise ValueError(
            f"the draft model's context of {draft.block_size} tokens is shorter than the "
            f"target's max_model_len {max_len}: it could not guess for longer sequences; lower "
            "max_model_len or use a draft with a longer context"
        )


def make_proposer(
    config: SpeculativeConfig,
    draft: Transformer | None,
    max_num_seqs: int,
    max_len: int,
    block_size: int,
) -> Proposer:
    """The proposer ``config`` names (``check`` has passed)."""
    if config.method == "ngram":
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    return DraftProposer(draft, max_num_seqs, max_len + config.num_speculative_tokens, block_size)


def speculator_for(
    config: SpeculativeConfig,
    engine: Engine,
    draft: Transformer | None,
    max_num_seqs: int,
    tensor_parallel: bool,
) -> Speculator:
    """``engine``'s speculator: ``config`` checked against its model and cache (``check``),
    its proposer made, verification through its token chain."""
    check(
        config,
        engine.model.config,
        engine.max_len or engine.context,
        windowed=not engine.runner.rewindable,
        tensor_parallel=tensor_parallel,
        draft=draft.config if draft is not None else None,
    )
    chain = engine.chain
    proposer = make_proposer(config, draft, max_num_seqs, chain.limit, engine.block_size)
    return Speculator(config, proposer, chain, chain.rollback, chain.limit)


@dataclass
class SpecStats:
    """Counters since the engine started (vLLM's ``spec_decode`` metrics)."""

    drafts: int = 0  # verify rows
    draft_tokens: int = 0  # guesses verified
    accepted_tokens: int = 0  # guesses accepted
    accepted_per_pos: list[int] = field(default_factory=list)  # accepted at guess i
    draft_seconds: float = 0.0  # in the proposer


@dataclass
class _Tracking:
    """One sequence's acceptance average (it starts from the engine's), and the steps it has
    gone without guessing because guesses would not pay."""

    rate: float
    idle: int = 0


class Speculator:
    """The engine's speculation: ``propose`` before scheduling, ``verify`` after the forward.
    ``rollback(seq)`` makes the cache go on from ``seq.num_cached`` (the engine's, as after a
    loop break); ``limit``: the most tokens a sequence may hold."""

    def __init__(
        self,
        config: SpeculativeConfig,
        proposer: Proposer,
        chain: TokenChain,
        rollback: Callable[[Sequence], None],
        limit: int,
    ) -> None:
        self.config, self.proposer, self.chain = config, proposer, chain
        self.rollback, self.limit = rollback, limit
        self.stats = SpecStats(accepted_per_pos=[0] * config.num_speculative_tokens)
        self._tracking: weakref.WeakKeyDictionary[Sequence, _Tracking] = weakref.WeakKeyDictionary()
        self._probs: dict[Sequence, torch.Tensor] = {}
        # the acceptance average over all sequences: where a new one starts (1 at first: guess
        # fully until something is known)
        self._rate = 1.0
        # averages of a step's seconds outside the proposer, and of the proposer's seconds per
        # guessed position (a draft model's forward), measured between consecutive proposals
        self._step_seconds: float | None = None
        self._guess_seconds = 0.0
        self._last: tuple[float, float] | None = None  # the last proposal: (start, its seconds)

    def use_decode_graphs(self, capture: bool) -> None:
        """A draft model's steps through CUDA graphs too (``capture``; else their padded
        forward eagerly), for the most rows that speculate at once (``DraftProposer``)."""
        if isinstance(self.proposer, DraftProposer):
            spec = self.config
            self.proposer.use_decode_graphs(capture, spec.max_batch, spec.num_speculative_tokens)

    def _track(self, seq: Sequence) -> _Tracking:
        track = self._tracking.get(seq)
        if track is None:
            track = self._tracking[seq] = _Tracking(self._rate)
        return track

    def _k(self, seq: Sequence) -> int:
        """How many guesses ``seq`` gets now (0: none): the k that makes the most tokens per
        unit of work, within what it may still add."""
        most = self.config.num_speculative_tokens
        # a verify row appends at most k + 1 tokens and feeds positions up to len + k - 1
        room = min(seq.params.max_tokens - seq.num_generated - 1, self.limit - len(seq.token_ids))
        if not self.config.adaptive:
            return min(most, room)
        track = self._track(seq)
        # each guess costs a verified position and its share of the proposer's time
        cost = POSITION_COST
        if self._step_seconds:
            cost += self._guess_seconds / self._step_seconds
        best_k, best, tokens, reach = 0, 1.0, 1.0, 1.0
        for k in range(1, most + 1):
            reach *= track.rate  # the chance that guess k is reached and accepted
            tokens += reach
            if tokens / (1 + k * cost) > best:
                best_k, best = k, tokens / (1 + k * cost)
        if best_k == 0:  # guessing would cost more than it saves; try one now and then
            track.idle += 1
            if track.idle < max(PROBE_EVERY, math.ceil(cost / PROBE_BUDGET)):
                return 0
            track.idle, best_k = 0, 1
        return min(best_k, room)

    def _timed(self, start: float, seconds: float, rounds: int) -> None:
        """Average in the step that ended at ``start`` and this proposal's ``seconds`` for
        ``rounds`` guessed positions."""
        per_guess = seconds / rounds
        self._guess_seconds += TIME_DECAY * (per_guess - self._guess_seconds)
        if self._last is not None:
            step = start - self._last[0] - self._last[1]
            # a gap with no steps (an idle server) is no step's time
            if self._step_seconds is None:
                self._step_seconds = step
            elif step < 10 * self._step_seconds:
                self._step_seconds += TIME_DECAY * (step - self._step_seconds)
        self._last = (start, seconds)

    def propose(self, running: list[Sequence]) -> dict[Sequence, list[int]]:
        """Guesses for the running sequences that decode next, none when there are more of
        them than ``max_batch``."""
        decoding = [s for s in running if s.status is Status.RUNNING and s.num_pending == 1]
        seqs, ks = [], []
        if decoding and len(decoding) <= self.config.max_batch:
            for seq in decoding:
                k = self._k(seq)
                if k >= 1:
                    seqs.append(seq)
                    ks.append(k)
        if not seqs:
            self._last = None  # the next step's time is not a proposal's
            return {}
        start = time.perf_counter()
        guesses = self.proposer.propose(seqs, ks)
        seconds = time.perf_counter() - start
        self.stats.draft_seconds += seconds
        self._timed(start, seconds, max(ks))
        # a sampling draft's distributions, for ``verify``'s rejection rule (a step that
        # verifies nothing drops them with the next proposal)
        self._probs = {
            s: g.probs for s, g in zip(seqs, guesses, strict=True) if g.probs is not None
        }
        return {s: g.tokens for s, g in zip(seqs, guesses, strict=True) if g.tokens}

    def verify(
        self, logits: torch.Tensor, rows: list[tuple[Sequence, list[int]]]
    ) -> list[tuple[Sequence, list]]:
        """Walk the verify ``rows`` (sequence, guesses) through the token chain, position by
        position; ``logits`` holds len(guesses) + 1 rows for each, in order. (sequence, the
        chunks it made final) for each row."""
        first = []  # each row's first logits row
        at = 0
        for _, guesses in rows:
            first.append(at)
            at += len(guesses) + 1
        chunks: dict[int, list] = {id(seq): [] for seq, _ in rows}
        active = list(range(len(rows)))
        accepted = [0] * len(rows)
        for j in range(max(len(g) for _, g in rows) + 1):
            seqs = [rows[i][0] for i in active]
            before = [len(s.token_ids) for s in seqs]
            index = to_device([first[i] + j for i in active], torch.long, logits.device)
            draw = self._drawer(j, {seq: rows[i][1] for i, seq in zip(active, seqs, strict=True)})
            for seq, made in self.chain.run(logits.index_select(0, index), seqs, draw):
                chunks[id(seq)].extend(made)
            still = []
            for i, seq, length in zip(active, seqs, before, strict=True):
                guesses = rows[i][1]
                # a loop break or close_thinking rolled the ids back: num_cached, which the
                # forward took past every guess, then falls to the kept ids
                kept = not seq.finished and seq.num_cached > length
                grew = len(seq.token_ids) == length + 1
                if j < len(guesses) and kept and grew and seq.token_ids[-1] == guesses[j]:
                    accepted[i] += 1
                    still.append(i)
            active = still
            if not active:
                break
        self._probs = {}
        out = []
        for i, (seq, guesses) in enumerate(rows):
            self._record(seq, len(guesses), accepted[i])
            if not seq.finished:  # the rejected positions leave the cache
                seq.num_cached = min(seq.num_cached, len(seq.token_ids) - 1)
                self.rollback(seq)
            out.append((seq, chunks[id(seq)]))
        return out

    def _drawer(self, j: int, guesses: dict[Sequence, list[int]]) -> Draw:
        """How the chain draws position ``j``'s tokens: by the sampler, as without speculation,
        except for a guess with a distribution (a sampling draft), which the rejection rule
        keeps or replaces."""
        ruled = {
            s: (q[j], g[j])
            for s, g in guesses.items()
            if (q := self._probs.get(s)) is not None and j < len(g)
        }
        if not ruled:
            return draw_samples

        def draw(processed: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
            tokens = processed.argmax(dim=-1)
            plain = [b for b, s in enumerate(seqs) if s not in ruled]
            if plain:
                at = to_device(plain, torch.long, processed.device)
                drawn = draw_samples(processed.index_select(0, at), [seqs[b] for b in plain])
                tokens.index_copy_(0, at, drawn)
            for b, seq in enumerate(seqs):
                if seq in ruled:
                    q, guess = ruled[seq]
                    p = probabilities(processed[b : b + 1], seq.params)
                    tokens[b] = accept_or_resample(p, q.to(p.dtype), guess, seq.generator)[0]
            return tokens

        return draw

    def _record(self, seq: Sequence, proposed: int, accepted: int) -> None:
        s = self.stats
        s.drafts += 1
        s.draft_tokens += proposed
        s.accepted_tokens += accepted
        for i in range(accepted):
            s.accepted_per_pos[i] += 1
        seq.spec_draft_tokens += proposed
        seq.spec_accepted_tokens += accepted
        # the guesses judged: up to the first rejection
        judged = accepted if accepted == proposed else accepted + 1
        track = self._track(seq)
        track.rate += ACCEPTANCE_DECAY * (accepted / judged - track.rate)
        self._rate += ACCEPTANCE_DECAY * (accepted / judged - self._rate)

    def release(self, seq: Sequence) -> None:
        """``seq`` finished: the proposer forgets it."""
        self.proposer.release(seq)

    def metrics(self) -> dict[str, float]:
        s = self.stats
        return {
            "spec_decode_num_drafts": s.drafts,
            "spec_decode_num_draft_tokens": s.draft_tokens,
            "spec_decode_num_accepted_tokens": s.accepted_tokens,
            "spec_decode_draft_seconds": s.draft_seconds,
            **{
                f"spec_decode_num_accepted_tokens_pos_{i}": n
                for i, n in enumerate(s.accepted_per_pos)
            },
        }


def summary(stats: dict) -> str:
    """One line of an engine's speculation counters (``Engine.stats``), for ``--stats``: the
    acceptance rate, the mean accepted length (tokens a verify row adds: its accepted guesses
    and the target's own token), acceptance by guess position, and time in the proposer."""
    drafts, guessed = stats["spec_decode_num_drafts"], stats["spec_decode_num_draft_tokens"]
    accepted = stats["spec_decode_num_accepted_tokens"]
    if not drafts:
        return "speculation: no guesses verified"
    by_pos, i = [], 0
    while (n := stats.get(f"spec_decode_num_accepted_tokens_pos_{i}")) is not None:
        by_pos.append(f"{n / drafts:.0%}")
        i += 1
    return (
        f"speculation: {accepted} of {guessed} guesses accepted ({accepted / guessed:.1%}), "
        f"mean accepted length {1 + accepted / drafts:.2f} tokens per verify row, accepted by "
        f"position {' '.join(by_pos)}, proposer {stats['spec_decode_draft_seconds']:.3f} s"
    )

"""What happens to each sequence between one forward's logits and the next forward.

For every row that samples: n-gram bans (a broken loop's) -> logits processors (penalties, DRY,
bias, a structured output's grammar mask) -> the batched sampler -> append the token -> loop
policy (report; stop; break: roll back and go on; close_thinking: close a looping thinking
section and go on) -> stop strings -> length -> finish. Whatever one sequence raises in that
chain, of any exception type, finishes that sequence alone with finish_reason "error", logged
once; the others go on.

The sampled ids, and all else the host needs of the logits, come back in one device-to-host
copy (``arlm.devices.HostCopy``). ``launch`` and ``land`` split a step of rows with no
host-side state in two: sampled and on its way to the host, then applied, so that the next
step can be launched in between (``arlm.engine.overlap``).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

import torch

from arlm.devices import HostCopy, to_device
from arlm.engine.outputs import Chunk
from arlm.engine.sequence import Sequence
from arlm.loops.policy import LoopAction
from arlm.loops.thinking import ThinkMarkers
from arlm.sampling.breakers import BreakerIndex
from arlm.sampling.params import MAX_DRY_MULTIPLIER, SamplingParams, TokenLogprob
from arlm.sampling.sampler import (
    ALL_BANNED,
    SequenceSampler,
    as_token_logprobs,
    logprob_tensors,
    sample,
    token_logprobs,
)
from arlm.sampling.structured import GrammarCompiler
from arlm.tokenizer import Tokenizer

log = logging.getLogger("arlm.engine")

# finish(seq, reason, error): end a sequence (the engine's scheduler frees its blocks)
Finish = Callable[[Sequence, str, str | None], None]
# draw(processed logits (B, vocab), their sequences) -> one token per row (B,)
Draw = Callable[[torch.Tensor, list[Sequence]], torch.Tensor]


def draw_samples(processed: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Each row's token by its own settings (``arlm.sampling.sampler.sample``): a seeded
    row's from its own generator, the unseeded rows' from one draw between them."""
    generators = [s.generator if s.params.seed is not None else None for s in seqs]
    return sample(processed, [s.params for s in seqs], generators)


class DrawnTokens:
    """One batch's sampled ids, their copy to the host started: ``tokens`` (B,) stays on the
    device, where the next step can feed it on before the host has seen it
    (``arlm.engine.overlap``); ``results`` waits for the copy."""

    def __init__(
        self,
        seqs: list[Sequence],
        tokens: torch.Tensor,
        copy: HostCopy,
        checked: list[int],
        wants: list[int],
    ) -> None:
        self.seqs, self.tokens, self._copy = seqs, tokens, copy
        self._checked, self._wants = checked, wants  # rows checked for a possible token; logprobs
        # rows whose processing failed, with why: they fail when this batch lands, their last
        # output going out with the others' (``TokenChain.land``)
        self.failed: list[tuple[Sequence, Exception]] = []

    def results(self) -> list[tuple[Sequence, int, bool, TokenLogprob | None]]:
        """(sequence, token, any token possible, logprob or None) per row."""
        seqs, checked, wants = self.seqs, self._checked, self._wants
        host = [t.tolist() for t in self._copy.wait()]
        possible = [True] * len(seqs)
        for j, ok in zip(checked, host[1] if checked else [], strict=True):
            possible[j] = ok
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if wants:
            tops = [seqs[j].params.logprobs for j in wants]
            picked = [host[0][j] for j in wants]
            for j, lp in zip(wants, as_token_logprobs(picked, *host[-3:], tops), strict=True):
                logprobs[j] = lp
        return list(zip(seqs, host[0], possible, logprobs, strict=True))


class TokenChain:
    """The per-token chain of one engine; see the module docstring. ``limit`` is the most
    tokens a sequence may hold (None: no limit, the windowed cache); ``rollback(seq)`` makes
    the cache go on from ``seq.num_cached`` after a loop break."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        device: torch.device,
        limit: int | None,
        finish: Finish,
        rollback: Callable[[Sequence], None],
    ) -> None:
        self.tokenizer, self.vocab_size, self.device = tokenizer, vocab_size, device
        self.limit, self.finish, self.rollback = limit, finish, rollback
        self._breakers: BreakerIndex | None = None  # built at the first request with DRY
        self._grammars: GrammarCompiler | None = None  # structured outputs, at first use
        self._think_markers: ThinkMarkers | None = None  # close_thinking, at first use
        self.loops_detected = self.loops_broken = 0

    @property
    def grammars(self) -> GrammarCompiler:
        """The structured-output compiler and its cache (``arlm.sampling.structured``)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size)
        return self._grammars

    def sampler(
        self,
        params: SamplingParams,
        token_ids: list[int],
        prompt_len: int,
        end_ids: Iterable[int],
        dry_multiplier: float | None = None,
    ) -> SequenceSampler:
        """The request's processors, with DRY at ``dry_multiplier`` (None: as requested)."""
        effective = params
        if dry_multiplier is not None:
            effective = replace(params, dry_multiplier=dry_multiplier)
        breakers = None
        if effective.dry_multiplier > 0:
            if self._breakers is None:
                tk = self.tokenizer
                encode = functools.partial(tk.encode, add_special_tokens=False)
                self._breakers = BreakerIndex(tk.token_texts, encode)
            breakers = self._breakers.table(params.dry_sequence_breakers)
        grammar = None
        if params.structured_outputs is not None:  # a fresh matcher, replayed on a rollback
            grammar = self.grammars.mask(params.structured_outputs, end_ids)
        return SequenceSampler(
            effective,
            self.vocab_size,
            token_ids,
            prompt_len,
            end_ids=end_ids,
            dry_breakers=breakers,
            device=self.device,
            grammar=grammar,
        )

    def run(
        self, logits: torch.Tensor, rows: list[Sequence], draw: Draw = draw_samples
    ) -> list[tuple[Sequence, list]]:
        """Sample and apply one token to each row; (sequence, the chunks it made final) for
        every row, including those that failed (no chunks). ``draw`` picks the tokens from the
        processed logits (speculative decoding's rejection rule replaces it)."""
        out = self._apply(self._sample(logits, rows, draw))
        done = {id(seq) for seq, _ in out}
        out += [(seq, []) for seq in rows if id(seq) not in done]  # their sampling failed
        return out

    def launch(self, logits: torch.Tensor, rows: list[Sequence]) -> DrawnTokens:
        """Sample one token per row on the device (bans and processors applied as ``run``
        applies them) and start their copy to the host, without waiting for it; ``land``
        applies them."""
        processed, kept, checked, failed = self._process(logits, rows)
        seqs = [rows[i] for i in kept]
        drawn = self._launch(logits, processed, kept, seqs, checked, draw_samples)
        drawn.failed = failed
        return drawn

    def land(self, drawn: DrawnTokens) -> list[tuple[Sequence, list]]:
        """Apply the tokens ``launch`` drew, to the rows that have not finished since (aborted,
        or ended by the token before); (sequence, the chunks it made final) for each, and for
        each row that failed in it."""
        sampled, failed = [], list(drawn.failed)
        for seq, token, possible, logprob in drawn.results():
            if seq.finished:
                continue
            if possible:
                sampled.append((seq, token, logprob))
            else:
                failed.append((seq, ValueError(ALL_BANNED)))
        out = self._apply(sampled)
        for seq, error in failed:
            if not seq.finished:
                self.fail(seq, error)
                out.append((seq, []))
        return out

    def _apply(self, sampled: Iterable[tuple]) -> list[tuple[Sequence, list]]:
        """Append each (sequence, token, logprob); (sequence, the chunks it made final)."""
        out, now = [], time.perf_counter()
        for seq, token, logprob in sampled:
            if seq.first_token_time is None:
                seq.first_token_time = now
            try:
                chunks = self._append(seq, token, logprob)
            except Exception as e:  # one sequence's failure is its own
                self.fail(seq, e)
                chunks = []
            out.append((seq, chunks))
        return out

    def _sample(self, logits: torch.Tensor, rows: list[Sequence], draw: Draw):
        """(sequence, token, logprob or None) per row; a row whose processing, sampling or
        logprobs fail, or that leaves no token possible, finishes with finish_reason "error" and
        gets no token."""
        processed, kept, checked, failed = self._process(logits, rows)
        for seq, error in failed:
            self.fail(seq, error)
        if not kept:
            return []
        seqs = [rows[i] for i in kept]
        try:
            drawn = self._draw(logits, processed, kept, seqs, checked, draw)
        except Exception:
            # find the row at fault: draw each alone (the rare path; the rows' generators may
            # have moved on in the failed batch)
            drawn = [
                self._draw_row(logits[i : i + 1], processed[j : j + 1], seq, j in checked, draw)
                for j, (i, seq) in enumerate(zip(kept, seqs, strict=True))
            ]
        out = []
        for seq, token, possible, logprob in drawn:
            if token is None:
                continue  # failed in _draw_row
            if not possible:
                self.fail(seq, ValueError(ALL_BANNED))
                continue
            out.append((seq, token, logprob))
        return out

    def _process(self, logits: torch.Tensor, rows: list[Sequence]):
        """Each row's bans and processors applied: (the processed logits of the rows kept,
        their indices in ``rows``, the positions among them to check for a possible token, and
        (sequence, exception) for each row whose processing failed, not kept)."""
        processed, kept, checked, failed = logits, [], [], []  # copied only if a row processes
        for i, seq in enumerate(rows):
            banned = seq.guard.banned(seq.num_generated) if seq.guard is not None else ()
            if banned or seq.sampler.processors:
                if processed is logits:
                    processed = logits.clone()
                row = processed[i : i + 1]  # processors may write into it in place
                try:
                    if banned:
                        index = to_device(sorted(banned), torch.long, row.device)
                        row.index_fill_(1, index, float("-inf"))
                    out = seq.sampler.process(row)
                except Exception as e:  # one sequence's failure is its own (its row is dropped)
                    failed.append((seq, e))
                    continue
                if out.data_ptr() != row.data_ptr():
                    row.copy_(out)
                checked.append(len(kept))
            kept.append(i)
        if len(kept) < len(rows):
            processed = processed.index_select(0, to_device(kept, torch.long, logits.device))
        return processed, kept, checked, failed

    def _draw(
        self, logits, processed, kept: list[int], seqs: list[Sequence], checked: list[int], draw
    ):
        """(sequence, token, any token possible, logprob or None) for the rows ``kept`` of
        ``logits`` (raw) and ``processed`` (one row each), in one batch and one host copy."""
        return self._launch(logits, processed, kept, seqs, checked, draw).results()

    def _launch(
        self, logits, processed, kept: list[int], seqs: list[Sequence], checked: list[int], draw
    ) -> DrawnTokens:
        """``_draw`` up to the copy to the host, which is started and not waited for."""
        device = logits.device
        tokens = draw(processed, seqs)
        fetch = [tokens]
        if checked:  # a row whose largest logit is -inf (or NaN) has no token to draw
            some = processed.index_select(0, to_device(checked, torch.long, device))
            fetch.append(some.amax(dim=-1) > float("-inf"))
        wants = [j for j, s in enumerate(seqs) if s.params.logprobs is not None]
        if wants:
            raw = logits.index_select(0, to_device([kept[j] for j in wants], torch.long, device))
            chosen = tokens.index_select(0, to_device(wants, torch.long, device))
            top = max(seqs[j].params.logprobs for j in wants)
            fetch += logprob_tensors(raw, chosen, top)
        return DrawnTokens(seqs, tokens, HostCopy(fetch), checked, wants)

    def _draw_row(self, raw: torch.Tensor, row: torch.Tensor, seq: Sequence, check: bool, draw):
        """``_draw`` of one row (1, vocab) alone; its token is None when that fails (and the
        sequence has failed)."""
        try:
            token = int(draw(row, [seq])[0])
            possible = not check or bool(row.amax() > float("-inf"))
            logprob = None
            if seq.params.logprobs is not None:
                chosen = torch.tensor([token], device=raw.device)
                logprob = token_logprobs(raw, chosen, seq.params.logprobs)[0]
            return seq, token, possible, logprob
        except Exception as e:
            self.fail(seq, e)
            return seq, None, False, None

    def _append(self, seq: Sequence, token: int, logprob) -> list[Chunk]:
        """Apply one sampled token to ``seq``; the chunks it makes final."""
        if token in seq.end_ids:
            self.finish(seq, "stop", None)
            return []
        seq.token_ids.append(token)
        seq.sampler.appended()
        if logprob is not None:
            seq.logprobs.append(logprob)
        seq.text.push(token)
        guard = seq.guard
        action = guard.push(token) if guard is not None else None
        if action is not None:
            self.loops_detected += 1
        if action is not None and action.kind == "close_thinking":
            if self._close_thinking(seq, action.keep):
                return []
            action = LoopAction("stop", action.report, action.keep)  # not thinking: stop
        if action is not None and action.kind != "report":
            seq.truncate(action.keep)  # keep the ids up to the end of the loop's first copy
            seq.text.truncate(action.keep)
            if action.kind == "stop":
                seq.loop = action.report
                self.finish(seq, "repetition", None)
                return []
            self._break(seq)
            return []
        if action is not None:
            seq.reported[seq.num_generated - 1] = action.report
        if seq.text.find_stop():
            self.finish(seq, "stop", None)
            return []
        settled = guard.settled if guard is not None else seq.num_generated
        chunks = seq.chunks(settled)
        if self.at_length(seq):
            seq.text.flush()
            self.finish(seq, "length", None)
        return chunks

    def at_length(self, seq: Sequence, ahead: int = 0) -> bool:
        """Whether ``seq``, with ``ahead`` more tokens than it holds, ends by length: its
        ``max_tokens``, or more tokens than ``limit``."""
        full = self.limit is not None and len(seq.token_ids) + ahead > self.limit
        return seq.num_generated + ahead >= seq.params.max_tokens or full

    def _break(self, seq: Sequence) -> None:
        """Go on from the kept ids after a loop break: the guard, the text and the processors
        restart from them (DRY escalated), and the cache rolls back to them."""
        self.loops_broken += 1
        kept = seq.generated
        seq.guard.rewind(kept)
        seq.text.restart(kept)
        p = seq.params
        dry = seq.guard.dry_multiplier(p.dry_multiplier, MAX_DRY_MULTIPLIER)
        seq.sampler = self.sampler(p, seq.token_ids, seq.prompt_len, seq.end_ids, dry)
        self.rollback(seq)

    def _close_thinking(self, seq: Sequence, keep: int) -> bool:
        """The close_thinking loop policy: if ``seq``'s first ``keep`` generated ids end inside
        a thinking section (``arlm.loops.thinking``), cut it there, write the section's closing
        marker and go on from it (True); else do nothing (False: the caller stops). The cache
        and the processors roll back as after a break."""
        if self._think_markers is None:
            encode = functools.partial(self.tokenizer.encode, add_special_tokens=False)
            self._think_markers = ThinkMarkers.of(encode)
        close = self._think_markers.close_ids
        inside = self._think_markers.inside(seq.token_ids[: seq.prompt_len + keep])
        if not inside or keep + len(close) >= seq.params.max_tokens:
            return False
        seq.truncate(keep)
        seq.text.truncate(keep)
        seq.text.restart(seq.generated)
        for token in close:
            seq.token_ids.append(token)
            seq.text.push(token)
        seq.guard.rewind(seq.generated)
        seq.sampler = self.sampler(seq.params, seq.token_ids, seq.prompt_len, seq.end_ids)
        self.rollback(seq)
        return True

    def fail(self, seq: Sequence, error: Exception) -> None:
        """Finish ``seq`` alone with finish_reason "error" after ``error``, logged once. A
        ``ValueError`` is the request's own doing (every token banned) and says so; anything
        else is a bug met by this request, logged with its traceback."""
        if isinstance(error, ValueError):
            message = str(error)
            log.warning("request %s sample %d failed: %s", seq.request_id, seq.index, message)
        else:
            message = f"internal error while generating: {error!r}"
            log.exception("request %s sample %d failed", seq.request_id, seq.index)
        # a failure half-way through a token leaves ids the text never took in: drop them, so
        # the sequence's ids, text and logprobs agree when its last output is made
        if len(seq.text.ends) < seq.num_generated:
            seq.truncate(len(seq.text.ends))
        self.finish(seq, "error", message)

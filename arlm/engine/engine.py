"""The engine: many sequences, one forward per step, joining and leaving between steps.

``add_request`` queues a prompt; each ``step`` schedules (``Scheduler``), runs one forward over
every scheduled row (``ModelRunner``), samples each row with its own parameters, and applies
what follows a token (end ids, loop policy, stop strings, length) to each sequence on its own.
A request is checked against the model when it is added (``check_prompt``, ``check_params``),
so a step has nothing left to refuse. Whatever one sequence still raises while its token is
processed, sampled or applied (say every token is banned), of any exception type, finishes that
sequence alone with finish_reason "error", logged once; the others go on. Only a failure of the
forward itself stops the engine. This is arlm's one decode loop: ``lm.generate``,
``lm.stream``, the CLI and the server all run through ``Engine.step``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from arlm.config import option
from arlm.devices import to_device, to_host
from arlm.engine.block_manager import BlockManager, block_hashes
from arlm.engine.memory import fit_slots
from arlm.engine.outputs import Completion, RequestOutput
from arlm.engine.prompt_logprobs import scoring_only
from arlm.engine.runner import ModelRunner
from arlm.engine.scheduler import Scheduler
from arlm.engine.sequence import Sequence, Status
from arlm.engine.text import TextState
from arlm.kv_cache.base import layer_lengths
from arlm.kv_cache.codec import make_codec
from arlm.kv_cache.config import CacheConfig
from arlm.loops.policy import LoopAction, LoopGuard
from arlm.loops.thinking import ThinkMarkers
from arlm.model.transformer import Transformer
from arlm.sampling.breakers import BreakerIndex
from arlm.sampling.params import MAX_DRY_MULTIPLIER, SamplingParams
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
from arlm.validate import check_float, check_int

DEFAULT_MAX_NUM_SEQS = 16
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512
# The windowed cache has no slot length to bound a sequence; without this one request could
# hold its only slot for ever (max_tokens 10**15).
DEFAULT_WINDOW_MAX_MODEL_LEN = 2**20

log = logging.getLogger("arlm.engine")


class InvalidRequest(ValueError):
    """A request the engine cannot run as given; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class EngineConfig:
    """The engine's limits. None picks a default sized from the model and the machine.

    max_num_seqs: sequences running at once (default 16, fewer if their slots would not fit the
    KV memory budget). max_num_batched_tokens: positions per forward (default 512): larger
    prefill chunks finish prompts sooner and delay the running sequences' next token longer.
    max_model_len: the longest prompt + generation a sequence may reach, the size of its slot
    (default: the model's context; with the windowed cache, which runs past the context,
    ``DEFAULT_WINDOW_MAX_MODEL_LEN``, 1,048,576). kv_cache_memory_gib: the KV cache's budget
    (default: on a CPU a quarter of the machine's memory; on a GPU what gpu_memory_utilization
    leaves, see ``arlm.engine.memory``). gpu_memory_utilization: the share of the GPU's memory
    the engine may fill with weights, activations and KV cache (default 0.9). kv_block_size:
    positions per block (the prefix cache's unit; default 16). enable_prefix_caching: reuse
    computed prompt blocks (default on). enforce_eager: no CUDA graphs (default off: on CUDA,
    decode steps replay graphs captured at start-up for batch-size buckets where the model and
    cache allow it; see ``arlm.engine.cuda_graphs``).
    """

    max_num_seqs: int | None = option(None, help="sequences running at once (default: 16)")
    max_num_batched_tokens: int | None = option(
        None, help="positions per forward; longer prompts prefill in chunks (default: 512)"
    )
    max_model_len: int | None = option(
        None, help="longest prompt + generation of a sequence (default: the context)"
    )
    kv_cache_memory_gib: float | None = option(
        None,
        help="the KV cache's memory budget (default: on CPU a quarter of the machine's memory; "
        "on a GPU what --gpu-memory-utilization leaves after the weights and activations)",
    )
    gpu_memory_utilization: float = option(
        0.9, help="share of the GPU's memory for weights, activations and KV cache"
    )
    kv_block_size: int = option(16, help="positions per KV block, the prefix cache's unit")
    enable_prefix_caching: bool = option(
        True, help="reuse computed prompt blocks", flag="--prefix-caching"
    )
    enforce_eager: bool = option(
        False,
        help="on CUDA, launch every step's kernels from Python instead of replaying decode "
        "steps from CUDA graphs",
    )

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.kv_cache_memory_gib is not None:
            check_float("kv_cache_memory_gib", self.kv_cache_memory_gib, lambda v: v > 0, "> 0")
        check_float(
            "gpu_memory_utilization", self.gpu_memory_utilization, lambda v: 0 < v <= 1, "in (0, 1]"
        )
        check_int("kv_block_size", self.kv_block_size, 1)


class Engine:
    """Continuous batching over ``model``; see the module docstring."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        cache_config: CacheConfig | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.device = model.wte.weight.device
        self.cache_config = cache_config or CacheConfig()
        self.cache_config.check(model.config)
        config = config or EngineConfig()
        self.context = model.config.block_size
        bs = config.kv_block_size
        if self.cache_config.window is not None:
            if config.max_num_seqs not in (None, 1):
                raise ValueError(
                    f"max_num_seqs={config.max_num_seqs}: the windowed KV cache (kv_window) runs "
                    "one sequence at a time; use max_num_seqs=1, or a cache without a window"
                )
            num_slots, slot_len, prefix = 1, bs, False
            self.max_len = None  # a window runs past the context
            self.window_max_len = config.max_model_len or DEFAULT_WINDOW_MAX_MODEL_LEN
        else:
            max_len = config.max_model_len or self.context
            if max_len > self.context:
                raise ValueError(
                    f"max_model_len={max_len} is longer than the model's context of "
                    f"{self.context} tokens"
                )
            slot_len = math.ceil(max_len / bs) * bs
            self.max_len = max_len
            self.window_max_len = None
            num_slots = config.max_num_seqs or DEFAULT_MAX_NUM_SEQS
            prefix = config.enable_prefix_caching
            # one position in one layer, k and v; a sliding-window layer stores at most its window
            per_position = 2 * model.config.n_kv_head
            per_position *= make_codec(
                self.cache_config.dtype, model.wte.weight.dtype
            ).bytes_per_vector(model.config.head_dim)
            positions = sum(layer_lengths(model.config.layer_windows, slot_len))
            profile = config.max_num_batched_tokens or max(
                DEFAULT_MAX_NUM_BATCHED_TOKENS, num_slots
            )
            num_slots = fit_slots(config, model, num_slots, positions * per_position, profile)
        self.runner = ModelRunner(model, self.cache_config, num_slots, slot_len)
        # why decode steps run eagerly here, or None when they replay CUDA graphs
        self.eager_reason: str | None = "not a CUDA device"
        if self.device.type == "cuda":
            self.eager_reason = "enforce_eager" if config.enforce_eager else None
            self.eager_reason = self.eager_reason or self.runner.decode_graphs_unsupported()
            if self.eager_reason is None:
                self.runner.use_decode_graphs(capture=True)
        self.block_manager = BlockManager(self.runner.cache, bs, prefix)
        tokens = config.max_num_batched_tokens or max(DEFAULT_MAX_NUM_BATCHED_TOKENS, num_slots)
        self.scheduler = Scheduler(self.block_manager, num_slots, tokens)
        self.sequences: dict[tuple[str, int], Sequence] = {}
        # outputs kept for whoever reads that request (``next_output``), while others step
        self._mailbox: dict[str, deque[RequestOutput]] = defaultdict(deque)
        self._aborts: list[str] = []
        self._ids = itertools.count()
        self._breakers: BreakerIndex | None = None  # built at the first request with DRY
        self._grammars: GrammarCompiler | None = None  # hook (issue 25): structured outputs
        self._think_markers: ThinkMarkers | None = None  # hook (issue 25): close_thinking
        vocab = model.config.vocab_size
        # an end id outside the vocabulary is never sampled: it ends nothing, and a processor
        # that indexed logits by it would fail
        self.end_ids = frozenset(t for t in tokenizer.eos_token_ids if 0 <= t < vocab)
        self.steps = 0
        self.loops_detected = self.loops_broken = 0

    def preallocate(self) -> None:
        """Allocate every slot's KV memory now rather than as concurrency first needs it: a
        server's memory is then flat from the start and no request waits while new memory is
        touched."""
        self.runner.cache.reserve(self.runner.cache.num_slots)

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        """Queue ``prompt`` (text or token ids); its request id. Refuses, with the reason, a
        prompt the engine cannot run (empty without a start token, longer than the context)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._ids))
        if any(key[0] == request_id for key in self.sequences):
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = self.check_prompt(prompt)
        self.check_params(params, len(prompt_ids))
        seqs = [self._new_sequence(request_id, i, prompt_ids, params) for i in range(params.n)]
        for seq in seqs:
            self.sequences[(request_id, seq.index)] = seq
            # done before it starts, its output at the next step; unless it came for its prompt
            # log-probabilities (hook, issue 25): then it finishes once its prompt is in
            if params.max_tokens == 0 and params.prompt_logprobs is None:
                seq.status, seq.finish_reason = Status.FINISHED, "length"
                seq.finish_time = time.perf_counter()
            else:
                self.scheduler.add(seq)
        return request_id

    def check_prompt(self, prompt: str | list[int]) -> list[int]:
        """The token ids of ``prompt``, or a ValueError saying why the engine cannot run it."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            if self.tokenizer.bos_token_id is None:
                raise ValueError("the prompt is empty and the tokenizer has no start token to use")
            ids = [self.tokenizer.bos_token_id]
        vocab = self.model.config.vocab_size
        # a bool is an int to Python, not a token id
        bad = [t for t in ids if isinstance(t, bool) or not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise ValueError(
                f"prompt token ids {bad[:5]} are not in this vocabulary (ids 0..{vocab - 1})"
            )
        limit = self.context if self.max_len is None else self.max_len
        if len(ids) > limit:
            what = f"the model's context of {self.context} tokens"
            if limit < self.context:
                what = f"max_model_len={limit} (the model's context is {self.context} tokens)"
            raise ValueError(
                f"the prompt is {len(ids)} tokens, longer than {what}; shorten it to at most "
                f"{limit}"
            )
        return ids

    def check_params(self, params: SamplingParams, prompt_len: int) -> None:
        """Raise ``InvalidRequest`` for what ``params`` ask that this model cannot do: token ids
        outside its vocabulary, or, with the windowed cache, more positions than
        ``max_model_len``. (``SamplingParams`` checked the rest when they were made.)"""
        vocab = self.model.config.vocab_size
        for name, ids in (
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", params.logit_bias),
        ):
            bad = sorted(t for t in ids if t >= vocab)
            if bad:
                raise InvalidRequest(
                    f"{name} names token ids {bad[:5]} that are not in this vocabulary "
                    f"(ids 0..{vocab - 1})",
                    name,
                )
        if params.structured_outputs is not None:  # hook (issue 25): compiled once, and kept
            try:
                self.grammars.compile(params.structured_outputs)
            except ValueError as e:
                raise InvalidRequest(str(e), "structured_outputs") from None
        if params.prompt_logprobs is not None and not self.runner.rewindable:  # hook (issue 25)
            raise InvalidRequest(
                "prompt_logprobs needs every prompt position's logits, which the windowed KV "
                "cache (kv_window) does not compute; load without kv_window",
                "prompt_logprobs",
            )
        limit = self.window_max_len
        if limit is not None and prompt_len + params.max_tokens > limit:
            raise InvalidRequest(
                f"max_tokens={params.max_tokens} with a prompt of {prompt_len} tokens is more "
                f"than the {limit} positions a sequence may reach (max_model_len); lower "
                "max_tokens",
                "max_tokens",
            )

    def _new_sequence(
        self, request_id: str, index: int, prompt_ids: list[int], params: SamplingParams
    ) -> Sequence:
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed + index)
        end_ids = set() if params.ignore_eos else set(self.end_ids)
        end_ids |= set(params.stop_token_ids)
        token_ids = list(prompt_ids)
        guard = None
        if params.loop_policy is not None:
            guard = LoopGuard(params.loop_policy, params.detector_config, params.max_loop_breaks)
        seq = Sequence(
            request_id=request_id,
            index=index,
            token_ids=token_ids,
            prompt_len=len(prompt_ids),
            params=params,
            generator=generator,
            sampler=self._sampler(params, token_ids, len(prompt_ids), end_ids),
            text=TextState(self.tokenizer, params.stop, params.min_tokens),
            end_ids=frozenset(end_ids),
            guard=guard,
            # hook (issue 25): prompt log-probabilities need every prompt position computed,
            # so such a sequence neither takes nor offers prefix-cache hits
            block_hashes=block_hashes(prompt_ids, self.block_manager.block_size)
            if params.prompt_logprobs is None
            else [],
        )
        return seq

    def _sampler(
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
        if params.structured_outputs is not None:  # hook (issue 25): a fresh matcher, replayed
            grammar = self.grammars.mask(params.structured_outputs, end_ids)
        return SequenceSampler(
            effective,
            self.model.config.vocab_size,
            token_ids,
            prompt_len,
            end_ids=end_ids,
            dry_breakers=breakers,
            device=self.device,
            grammar=grammar,
        )

    @property
    def grammars(self) -> GrammarCompiler:
        """Hook (issue 25): the structured-output compiler and its cache, built at first use."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size)
        return self._grammars

    def abort(self, request_id: str) -> None:
        """End every sample of ``request_id`` at the next step, freeing its slots then."""
        self._aborts.append(request_id)

    def has_unfinished(self) -> bool:
        """Whether a step still has work: sequences to run, or outputs not yet handed out."""
        return bool(self.sequences) or bool(self._aborts)

    # -- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward over the scheduled rows; what each sequence produced in it."""
        outputs: dict[int, RequestOutput] = {}
        for request_id in self._aborts:
            for seq in [s for key, s in self.sequences.items() if key[0] == request_id]:
                if not seq.finished:
                    self._finish(seq, "abort")
                    self._emit(outputs, seq, [])
        self._aborts.clear()
        for seq in [s for s in self.sequences.values() if s.finished]:
            self._emit(outputs, seq, [])  # finished before running (max_tokens 0)
        batch = self.scheduler.schedule()
        if batch:
            self.steps += 1
            logits, rows, scored = self.runner.run(batch)
            if scored is not None:  # hook (issue 25): see arlm.engine.prompt_logprobs
                scored.record()
            for seq in batch.decode:
                seq.num_cached += 1
            for seq, n in batch.prefill:
                seq.num_cached += n
            for seq in [*batch.decode, *(s for s, _ in batch.prefill)]:
                self.block_manager.computed(seq)
            if done := scoring_only(rows):  # hook (issue 25): max_tokens 0, its prompt now in
                for i in done:
                    self._finish(rows[i], "length")
                    self._emit(outputs, rows[i], [])
                keep = [i for i in range(len(rows)) if i not in set(done)]
                logits, rows = logits[keep], [rows[i] for i in keep]
            now = time.perf_counter()
            for seq, token, logprob in self._sample(logits, rows):
                if seq.first_token_time is None:
                    seq.first_token_time = now
                try:
                    chunks = self._append(seq, token, logprob)
                except Exception as e:  # one sequence's failure is its own
                    self._fail(seq, e)
                    chunks = []
                self._emit(outputs, seq, chunks)
            for seq in rows:  # the ones whose sampling failed
                if seq.finished:
                    self._emit(outputs, seq, [])
        return list(outputs.values())

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]):
        """(sequence, token, logprob or None) per row; a row whose processing, sampling or
        logprobs fail, or that leaves no token possible, finishes with finish_reason "error" and
        gets no token. The sampled ids, and all else the host needs of the logits, come back in
        one copy (``to_host``)."""
        processed, kept, checked = logits, [], []  # copied only when a row has bans or processors
        for i, seq in enumerate(rows):
            banned = seq.guard.banned(seq.num_generated) if seq.guard is not None else ()
            if banned or seq.sampler.processors:
                try:
                    row = logits[i : i + 1].clone()
                    row[:, sorted(banned)] = float("-inf")
                    row = seq.sampler.process(row)
                except Exception as e:  # one sequence's failure is its own
                    self._fail(seq, e)
                    continue
                if processed is logits:
                    processed = logits.clone()
                processed[i] = row[0]
                checked.append(len(kept))
            kept.append(i)
        if not kept:
            return []
        if len(kept) < len(rows):
            processed = processed.index_select(0, to_device(kept, torch.long, logits.device))
        seqs = [rows[i] for i in kept]
        try:
            drawn = self._draw(logits, processed, kept, seqs, checked)
        except Exception:
            # find the row at fault: draw each alone (the rare path; the rows' generators may
            # have moved on in the failed batch)
            drawn = [
                self._draw_row(logits[i : i + 1], processed[j : j + 1], seq, j in checked)
                for j, (i, seq) in enumerate(zip(kept, seqs, strict=True))
            ]
        out = []
        for seq, token, possible, logprob in drawn:
            if token is None:
                continue  # failed in _draw_row
            if not possible:
                self._fail(seq, ValueError(ALL_BANNED))
                continue
            out.append((seq, token, logprob))
        return out

    def _draw(self, logits, processed, kept: list[int], seqs: list[Sequence], checked: list[int]):
        """(sequence, token, any token possible, logprob or None) for the rows ``kept`` of
        ``logits`` (raw) and ``processed`` (one row each), in one batch and one host copy."""
        device = logits.device
        tokens = sample(processed, [s.params for s in seqs], [s.generator for s in seqs])
        fetch = [tokens]
        if checked:
            some = processed.index_select(0, to_device(checked, torch.long, device))
            fetch.append(torch.isfinite(some).any(dim=-1))
        wants = [j for j, s in enumerate(seqs) if s.params.logprobs is not None]
        if wants:
            raw = logits.index_select(0, to_device([kept[j] for j in wants], torch.long, device))
            chosen = tokens.index_select(0, to_device(wants, torch.long, device))
            top = max(seqs[j].params.logprobs for j in wants)
            fetch += logprob_tensors(raw, chosen, top)
        host = [t.tolist() for t in to_host(fetch)]
        possible = [True] * len(seqs)
        for j, ok in zip(checked, host[1] if checked else [], strict=True):
            possible[j] = ok
        logprobs = [None] * len(seqs)
        if wants:
            tops = [seqs[j].params.logprobs for j in wants]
            picked = [host[0][j] for j in wants]
            for j, lp in zip(wants, as_token_logprobs(picked, *host[-3:], tops), strict=True):
                logprobs[j] = lp
        return list(zip(seqs, host[0], possible, logprobs, strict=True))

    def _draw_row(self, raw: torch.Tensor, row: torch.Tensor, seq: Sequence, check: bool):
        """``_draw`` of one row (1, vocab) alone; its token is None when that fails (and the
        sequence has failed)."""
        try:
            token = int(sample(row, [seq.params], [seq.generator])[0])
            possible = not check or bool(torch.isfinite(row).any())
            logprob = None
            if seq.params.logprobs is not None:
                chosen = torch.tensor([token], device=raw.device)
                logprob = token_logprobs(raw, chosen, seq.params.logprobs)[0]
            return seq, token, possible, logprob
        except Exception as e:
            self._fail(seq, e)
            return seq, None, False, None

    def _append(self, seq: Sequence, token: int, logprob) -> list:
        """Apply one sampled token to ``seq``; the chunks it makes final."""
        if token in seq.end_ids:
            self._finish(seq, "stop")
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
        if action is not None and action.kind == "close_thinking":  # hook (issue 25)
            if self._close_thinking(seq, action.keep):
                return []
            action = LoopAction("stop", action.report, action.keep)  # not thinking: stop
        if action is not None and action.kind != "report":
            seq.truncate(action.keep)  # keep the ids up to the end of the loop's first copy
            seq.text.truncate(action.keep)
            if action.kind == "stop":
                seq.loop = action.report
                self._finish(seq, "repetition")
                return []
            self._break(seq)
            return []
        if action is not None:
            seq.reported[seq.num_generated - 1] = action.report
        if seq.text.find_stop():
            self._finish(seq, "stop")
            return []
        settled = guard.settled if guard is not None else seq.num_generated
        chunks = seq.chunks(settled)
        limit = None if self.max_len is None else min(self.max_len, self.context)
        full = limit is not None and len(seq.token_ids) > limit
        if seq.num_generated == seq.params.max_tokens or full:
            seq.text.flush()
            self._finish(seq, "length")
            return chunks
        return chunks

    def _break(self, seq: Sequence) -> None:
        """Go on from the kept ids after a loop break: the guard, the text and the processors
        restart from them (DRY escalated), and the cache rolls back to them."""
        self.loops_broken += 1
        kept = seq.generated
        seq.guard.rewind(kept)
        seq.text.restart(kept)
        p = seq.params
        dry = seq.guard.dry_multiplier(p.dry_multiplier, MAX_DRY_MULTIPLIER)
        seq.sampler = self._sampler(p, seq.token_ids, seq.prompt_len, seq.end_ids, dry)
        if self.runner.rewindable:
            self.block_manager.truncate(seq)
        else:
            self.runner.restart(seq)

    def _close_thinking(self, seq: Sequence, keep: int) -> bool:
        """Hook (issue 25), the close_thinking loop policy: if ``seq``'s first ``keep``
        generated ids end inside a thinking section (``arlm.loops.thinking``), cut it there,
        write the section's closing marker and go on from it (True); else do nothing (False:
        the caller stops). The cache and the processors roll back as after a break."""
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
        seq.sampler = self._sampler(seq.params, seq.token_ids, seq.prompt_len, seq.end_ids)
        if self.runner.rewindable:
            self.block_manager.truncate(seq)
        else:
            self.runner.restart(seq)
        return True

    def _fail(self, seq: Sequence, error: Exception) -> None:
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
        self._finish(seq, "error", error=message)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finish_reason, seq.error = reason, error
        seq.finish_time = time.perf_counter()
        self.scheduler.finish(seq)

    def _emit(self, outputs: dict[int, RequestOutput], seq: Sequence, chunks: list) -> None:
        key = id(seq)
        out = outputs.get(key)
        if out is None:
            out = outputs[key] = RequestOutput(seq.request_id, seq.index, [])
        out.chunks.extend(chunks)
        if seq.finished and not out.finished:
            out.chunks.extend(seq.chunks(seq.num_generated, final=True))
            usage = seq.usage(*self.runner.kv_bytes(seq, self.block_manager.block_size))
            out.chunks.append(seq.closing_chunk(usage))
            out.finished, out.completion = True, seq.completion(usage)
            del self.sequences[(seq.request_id, seq.index)]

    def next_output(self, request_id: str) -> RequestOutput:
        """The next output of ``request_id``, stepping as needed; what the steps produce for
        other requests is kept for their own readers (several streams can interleave)."""
        while not self._mailbox[request_id]:
            if not any(key[0] == request_id for key in self.sequences):
                del self._mailbox[request_id]
                raise KeyError(f"request {request_id!r} has no more outputs")
            for out in self.step():
                if out.completion is None or out.completion.finish_reason != "abort":
                    self._mailbox[out.request_id].append(out)  # an aborted one has no reader
        out = self._mailbox[request_id].popleft()
        if not self._mailbox[request_id]:
            del self._mailbox[request_id]
        return out

    # -- offline batches --------------------------------------------------------------------

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        progress: bool = True,
    ) -> list[Completion] | list[list[Completion]]:
        """Run ``prompts`` to completion, with one ``params`` for all or one each; one
        completion per prompt in order (a list of ``n`` per prompt when ``n`` > 1)."""
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} params for {len(prompts)} prompts; give one each")
        else:
            params = [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        done: dict[tuple[str, int], Completion] = {}
        total = sum(sp.n for sp in params)
        with tqdm(total=total, desc="generating", unit="seq", disable=not progress) as bar:
            for rid, sp in zip(ids, params, strict=True):
                finished = 0
                while finished < sp.n:
                    out = self.next_output(rid)
                    if out.finished:
                        finished += 1
                        done[(rid, out.index)] = out.completion
                        bar.update(1)
        grouped = [
            [done[(rid, i)] for i in range(sp.n)] for rid, sp in zip(ids, params, strict=True)
        ]
        if all(sp.n == 1 for sp in params):
            return [g[0] for g in grouped]
        return grouped

    def stats(self) -> dict[str, float]:
        """Gauges and counters of the engine now."""
        bm = self.block_manager
        running = self.scheduler.running
        return {
            "running": len(running),
            "waiting": len(self.scheduler.waiting),
            "blocks_in_use": sum(len(s.block_table) for s in running),
            "num_blocks": bm.num_blocks,
            "prefix_cache_hit_tokens": bm.hit_tokens,
            "prefix_cache_queried_tokens": bm.queried_tokens,
            "loops_detected": self.loops_detected,
            "loops_broken": self.loops_broken,
            "steps": self.steps,
            "graph_steps": graphs.steps if (graphs := self.runner.decode_graphs) else 0,
        }

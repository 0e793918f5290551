"""The engine: many sequences, one forward per step, joining and leaving between steps.

``add_request`` queues a prompt; each ``step`` schedules (``Scheduler``: who runs, with what KV
blocks), runs one forward over every scheduled row (``ModelRunner``), and hands each row's
logits to the per-token chain (``TokenChain``: sample, append, loop policy, stop strings,
length). A request is checked against the model when it is added (``check_prompt``,
``check_params``), so a step has nothing left to refuse; a sequence that still fails in the
chain finishes alone. Only a failure of the forward itself stops the engine. This is arlm's one
decode loop: ``lm.generate``, ``lm.stream``, the CLI and the server all run through
``Engine.step``.
"""

from __future__ import annotations

import itertools
import time
from collections import defaultdict, deque

import torch

from arlm.engine import offline
from arlm.engine.block_manager import BlockManager, Orders
from arlm.engine.config import (
    DEFAULT_CUDAGRAPH_CAPTURE_SIZE,
    DEFAULT_WINDOW_MAX_MODEL_LEN,
    EngineConfig,
    plan,
)
from arlm.engine.outputs import Completion, RequestOutput
from arlm.engine.overlap import Overlap, overlap_for
from arlm.engine.prompt_logprobs import PromptRows, scoring_only
from arlm.engine.requests import InvalidRequest, check_params, check_prompt, new_sequences
from arlm.engine.runner import ModelRunner
from arlm.engine.scheduler import ScheduledBatch, Scheduler
from arlm.engine.sequence import Sequence, Status
from arlm.engine.speculation import Speculator, speculator_for
from arlm.engine.stats import engine_stats
from arlm.engine.tensor_parallel import TensorParallelGroup, TensorParallelRunner
from arlm.engine.token_chain import TokenChain
from arlm.kv_cache.config import CacheConfig
from arlm.model.adapter_store import AdapterStore
from arlm.model.transformer import Transformer
from arlm.sampling.params import SamplingParams
from arlm.speculative.config import SpeculativeConfig
from arlm.tokenizer import Tokenizer

__all__ = ["AdapterBusy", "Engine", "EngineConfig", "InvalidRequest"]


class AdapterBusy(ValueError):
    """A LoRA adapter cannot be unloaded while sequences run on it."""


class Engine:
    """Continuous batching over ``model``; see the module docstring. ``tensor_parallel``: the
    ranks ``model`` is split over, this one rank 0 (``arlm.engine.tensor_parallel``); None: the
    model is whole here. ``speculative``: speculative decoding (``arlm.engine.speculation``),
    with ``draft`` the draft model for its method "draft". ``adapters``: the LoRA adapters
    served beside ``model`` (``arlm.formats.read.load_lora_modules``), which a request names
    (``add_request``'s ``adapter``): the scheduler admits a sequence once its adapter is in one
    of ``model``'s slots (``arlm.model.adapter_store``)."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        cache_config: CacheConfig | None = None,
        config: EngineConfig | None = None,
        tensor_parallel: TensorParallelGroup | None = None,
        speculative: SpeculativeConfig | None = None,
        draft: Transformer | None = None,
        adapters: AdapterStore | None = None,
    ) -> None:
        if adapters is not None and tensor_parallel is not None:
            raise ValueError(
                "LoRA adapters are not served with tensor parallelism: their layers are not "
                "split over ranks; load them with tensor_parallel_size=1, or merge one adapter "
                "into the model (arlm export)"
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        self.adapters = adapters
        self.device = model.wte.weight.device
        self.cache_config = cache_config or CacheConfig()
        self.cache_config.check(model.config)
        config = config or EngineConfig()
        self.context = model.config.block_size
        sizes = plan(config, model, self.cache_config)
        self.max_len = sizes.max_len  # None: the windowed cache runs past the context
        self.window_max_len = None
        if sizes.max_len is None:
            self.window_max_len = config.max_model_len or DEFAULT_WINDOW_MAX_MODEL_LEN
        bs = config.kv_block_size
        runner_args = (
            model,
            self.cache_config,
            sizes.num_blocks,
            bs,
            sizes.host_blocks,
            sizes.held_blocks,
        )
        if tensor_parallel is None:
            rows = None if adapters is None else adapters.rows
            self.runner = ModelRunner(*runner_args, adapters=rows)
        else:  # the other ranks run each step too (arlm.engine.tensor_parallel)
            self.runner = TensorParallelRunner(*runner_args, group=tensor_parallel)
        self.block_manager: BlockManager | None = None
        if self.runner.cache is not None:
            self.block_manager = BlockManager(
                sizes.num_blocks,
                bs,
                prefix_caching=config.enable_prefix_caching,
                host_blocks=sizes.host_blocks,
            )
        self.block_size = bs
        # why decode steps run eagerly here, or None when they replay CUDA graphs
        self.eager_reason: str | None = "not a CUDA device"
        if self.device.type == "cuda":
            self.eager_reason = "enforce_eager" if config.enforce_eager else None
            self.eager_reason = self.eager_reason or self.runner.decode_graphs_unsupported()
        if config.enable_torch_compile and self.eager_reason is not None:
            raise ValueError(
                "enable_torch_compile compiles the decode step that CUDA graphs replay, and "
                f"none runs here: {self.eager_reason}"
            )
        self.scheduler = Scheduler(
            self.block_manager,
            sizes.max_num_seqs,
            sizes.max_num_batched_tokens,
            config.preemption_mode,
            adapters,
        )
        # an end id outside the vocabulary is never sampled: it ends nothing, and a processor
        # that indexed logits by it would fail
        vocab = model.config.vocab_size
        self.end_ids = frozenset(t for t in tokenizer.eos_token_ids if 0 <= t < vocab)
        limit = None if self.max_len is None else min(self.max_len, self.context)
        self.chain = TokenChain(tokenizer, vocab, self.device, limit, self._finish, self._rollback)
        self.speculator: Speculator | None = None  # arlm.engine.speculation
        if speculative is not None:
            tp = tensor_parallel is not None
            self.speculator = speculator_for(speculative, self, draft, sizes.max_num_seqs, tp)
        self.capture_size = config.max_cudagraph_capture_size
        if self.eager_reason is None:
            self.use_decode_graphs(capture=True, compile=config.enable_torch_compile)
        # the step in flight while the next is scheduled (arlm.engine.overlap), or None
        tp = tensor_parallel is not None
        self.overlap: Overlap | None = overlap_for(self, config.async_scheduling, tp)
        self.requests: dict[str, list[Sequence]] = {}  # request id -> its unfinished samples
        # outputs kept for whoever reads that request (``next_output``), while others step
        self._mailbox: dict[str, deque[RequestOutput]] = defaultdict(deque)
        self._aborts: list[str] = []
        self._ids = itertools.count()
        self.steps = 0

    def use_decode_graphs(self, capture: bool, compile: bool = False) -> None:
        """Run steps of up to ``max_cudagraph_capture_size`` positions through CUDA graphs
        (``capture``; else the same padded forward eagerly, as the CPU tests do), the head at
        up to ``max_num_seqs`` rows, or as many positions as the rows that speculate verify
        together; ``compile``: that forward through ``torch.compile`` first. Steps with
        running rows then take prompt tokens only as far as that size (the rest in later
        chunks); steps of prompts alone keep ``max_num_batched_tokens`` (eagerly)."""
        max_blocks = -(-(self.max_len or 0) // self.block_size)
        rows = self.scheduler.max_num_seqs
        if self.speculator is not None:
            spec = self.speculator.config
            rows = max(rows, min(rows, spec.max_batch) * (1 + spec.num_speculative_tokens))
            self.speculator.use_decode_graphs(capture)
        size = self.capture_size or max(rows, DEFAULT_CUDAGRAPH_CAPTURE_SIZE)
        size = min(size, max(rows, self.scheduler.max_num_batched_tokens))  # no step has more
        self.runner.use_decode_graphs(capture, size, max_blocks, compile, max_logits=rows)
        self.scheduler.mixed_step_tokens = size

    def preallocate(self) -> None:
        """Give the KV pool its memory now (``ModelRunner.preallocate``): a server's memory is
        then flat from the start."""
        self.runner.preallocate(self.scheduler.max_num_seqs, self.max_len)

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> str:
        """Queue ``prompt`` (text or token ids), run with the LoRA adapter called ``adapter``
        (None: the base model); its request id. Refuses, with the reason, a prompt the engine
        cannot run (``arlm.engine.requests``)."""
        params = params or SamplingParams()
        self.check_adapter(adapter)
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_ids = self.check_prompt(prompt)
        self.check_params(params, len(prompt_ids))
        seqs = new_sequences(
            request_id,
            prompt_ids,
            params,
            tokenizer=self.tokenizer,
            chain=self.chain,
            end_ids=self.end_ids,
            block_size=self.block_size,
            device=self.device,
            adapter=adapter,
            salt=b"" if adapter is None else self.adapters.key(adapter),
        )
        self.requests[request_id] = seqs
        for seq in seqs:
            # done before it starts, its output at the next step; unless it came for its prompt
            # log-probabilities: then it finishes once its prompt is in
            if params.max_tokens == 0 and params.prompt_logprobs is None:
                seq.status, seq.finish_reason = Status.FINISHED, "length"
                seq.finish_time = time.perf_counter()
            else:
                self.scheduler.add(seq)
        return request_id

    def check_adapter(self, adapter: str | None) -> None:
        """An ``InvalidRequest`` naming the LoRA adapters served where none is called
        ``adapter`` (None: the base model, always served)."""
        if adapter is None:
            return
        if self.adapters is None:
            raise InvalidRequest(
                f"no LoRA adapters are loaded, so none called {adapter!r}; load them with "
                "lora_modules (arlm serve --lora-modules NAME=PATH)",
                "model",
            )
        try:
            self.adapters.check_known(adapter)
        except ValueError as e:
            raise InvalidRequest(str(e), "model") from None

    def unload_adapter(self, name: str) -> None:
        """Stop serving the LoRA adapter called ``name`` (``AdapterBusy`` while requests run
        on it; an ``InvalidRequest`` if none is loaded by that name)."""
        self.check_adapter(name)
        running = sum(
            s.adapter == name and not s.finished for seqs in self.requests.values() for s in seqs
        )
        if running:
            raise AdapterBusy(
                f"{running} sequences still run on LoRA adapter {name!r}; unload it once they "
                "finish"
            )
        self.adapters.remove(name)

    def place_adapter(self, name: str) -> int:
        """The slot of the LoRA adapter called ``name`` for a forward outside the engine's
        steps (``LM.score``), written there if it is in none; a ValueError when every slot
        holds an adapter that running sequences use."""
        self.check_adapter(name)
        slot = self.scheduler.place_adapter(name)
        if slot is None:
            raise ValueError(
                f"every LoRA slot holds an adapter that running sequences use, so {name!r} has "
                "none now; score once they finish, or start with more slots (max_loras)"
            )
        return slot

    def check_prompt(self, prompt: str | list[int]) -> list[int]:
        """The token ids of ``prompt``, or a ValueError saying why the engine cannot run it."""
        vocab = self.model.config.vocab_size
        return check_prompt(self.tokenizer, vocab, self.context, self.max_len, prompt)

    def check_params(self, params: SamplingParams, prompt_len: int) -> None:
        """Raise ``InvalidRequest`` for what ``params`` ask that this model cannot do."""
        vocab, window_max_len = self.model.config.vocab_size, self.window_max_len
        check_params(
            params,
            vocab,
            window_max_len,
            prompt_len,
            grammars=lambda: self.chain.grammars,
            rewindable=self.runner.rewindable,
        )

    def abort(self, request_id: str) -> None:
        """End every sample of ``request_id`` at the next step, freeing its blocks then."""
        self._aborts.append(request_id)

    def has_unfinished(self) -> bool:
        """Whether a step still has work: sequences to run, or outputs not yet handed out."""
        return bool(self.requests) or bool(self._aborts)

    # -- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One forward over the scheduled rows; what each sequence produced in it."""
        outputs: dict[int, RequestOutput] = {}
        for request_id in self._aborts:
            for seq in list(self.requests.get(request_id, ())):
                if not seq.finished:
                    self._finish(seq, "abort")
                    self._emit(outputs, seq, [])
        self._aborts.clear()
        for seqs in list(self.requests.values()):
            for seq in [s for s in seqs if s.finished]:
                self._emit(outputs, seq, [])  # finished before running (max_tokens 0)
        overlap = self.overlap  # a step in flight lands, the next launched before it
        if overlap is not None and overlap.follow(lambda s, chunks: self._emit(outputs, s, chunks)):
            return list(outputs.values())  # (or, where the next could not go, a plain step)
        guesses = self.speculator.propose(self.scheduler.running) if self.speculator else None
        batch = self.scheduler.schedule(guesses)
        if batch:
            self.steps += 1
            orders = self.block_manager.take_orders() if self.block_manager else None
            if overlap is not None and overlap.launch(batch, orders):
                return list(outputs.values())  # its tokens come at the next step
            logits, rows, scored = self.forward(batch, orders)
            logits, verify_logits = logits[: len(rows)], logits[len(rows) :]
            if scored is not None:  # prompt log-probabilities (arlm.engine.prompt_logprobs)
                scored.record()
            if done := scoring_only(rows):  # max_tokens 0: its prompt is in, it is done
                for i in done:
                    self._finish(rows[i], "length")
                    self._emit(outputs, rows[i], [])
                keep = [i for i in range(len(rows)) if i not in set(done)]
                logits, rows = logits[keep], [rows[i] for i in keep]
            for seq, chunks in self.chain.run(logits, rows):
                self._emit(outputs, seq, chunks)
            if batch.verify:
                for seq, chunks in self.speculator.verify(verify_logits, batch.verify):
                    self._emit(outputs, seq, chunks)
        return list(outputs.values())

    def forward(
        self, batch: ScheduledBatch, orders: Orders | None, fed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[Sequence], PromptRows | None]:
        """``ModelRunner.run`` of ``batch`` (see there, ``fed`` too), then the prompt blocks its
        prefill chunks complete registered for the prefix cache."""
        # ids from the device only in overlapped steps, which the tensor-parallel runner never runs
        out = self.runner.run(batch, orders) if fed is None else self.runner.run(batch, orders, fed)
        if self.block_manager is not None:  # only a prefill completes prompt blocks
            for seq, _ in batch.prefill:
                self.block_manager.computed(seq)
        return out

    def _rollback(self, seq: Sequence) -> None:
        """Go on from ``seq.num_cached`` after a loop break rolled its tokens back."""
        if self.block_manager is not None:
            self.block_manager.truncate(seq)
        else:  # the windowed cache cannot rewind: it refills from the start
            self.runner.restart(seq)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finish_reason, seq.error = reason, error
        seq.finish_time = time.perf_counter()
        self.scheduler.finish(seq)
        if self.speculator is not None:  # a draft model's cache lets it go
            self.speculator.release(seq)

    def _emit(self, outputs: dict[int, RequestOutput], seq: Sequence, chunks: list) -> None:
        key = id(seq)
        out = outputs.get(key)
        if out is None:
            out = outputs[key] = RequestOutput(seq.request_id, seq.index, [])
        out.chunks.extend(chunks)
        if seq.finished and not out.finished:
            out.chunks.extend(seq.chunks(seq.num_generated, final=True))
            usage = seq.usage(*self.runner.kv_bytes(seq))
            out.chunks.append(seq.closing_chunk(usage))
            out.finished, out.completion = True, seq.completion(usage)
            seqs = self.requests[seq.request_id]
            seqs.remove(seq)
            if not seqs:
                del self.requests[seq.request_id]

    def next_output(self, request_id: str) -> RequestOutput:
        """The next output of ``request_id``, stepping as needed; what the steps produce for
        other requests is kept for their own readers (several streams can interleave)."""
        while not self._mailbox[request_id]:
            if request_id not in self.requests:
                del self._mailbox[request_id]
                raise KeyError(f"request {request_id!r} has no more outputs")
            for out in self.step():
                if out.completion is None or out.completion.finish_reason != "abort":
                    self._mailbox[out.request_id].append(out)  # an aborted one has no reader
        out = self._mailbox[request_id].popleft()
        if not self._mailbox[request_id]:
            del self._mailbox[request_id]
        return out

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        progress: bool = True,
        adapter: str | list[str | None] | None = None,
    ) -> list[Completion] | list[list[Completion]]:
        """Run ``prompts`` to completion (``arlm.engine.offline.generate``)."""
        return offline.generate(self, prompts, params, progress=progress, adapter=adapter)

    def stats(self) -> dict[str, float | str]:
        """Gauges and counters of the engine now (``arlm.engine.stats``)."""
        return engine_stats(self)

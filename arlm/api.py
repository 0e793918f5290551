"""The Python API: ``arlm.load(path)`` returns an ``LM`` that generates, streams and scores."""

from __future__ import annotations

import atexit
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from arlm.config import resolve_dtype
from arlm.engine import Chunk, Completion, Engine, EngineConfig
from arlm.engine.contrastive import contrastive_generate
from arlm.engine.memory import check_weights_fit
from arlm.engine.speculation import check as check_speculation
from arlm.engine.tensor_parallel import TensorParallelGroup
from arlm.formats.generation_config import sampling_defaults
from arlm.formats.stored import stored_weights
from arlm.kv_cache import CacheConfig
from arlm.model.adapter_store import AdapterStore
from arlm.model.packing import pack
from arlm.model.quantize import quantize as quantize_weights
from arlm.model.transformer import Transformer
from arlm.placement import auto_dtype, resolve_device
from arlm.sampling import SamplingParams
from arlm.speculative import SpeculativeConfig
from arlm.tokenizer import Tokenizer
from arlm.validate import check_int

GENERATION_CONFIGS = ("auto", "arlm")  # whose sampling defaults: the model's, or arlm's


@dataclass
class Score:
    """How likely a text is under the model, by the chain rule.

    ``token_logprobs[i]`` is log p(token_ids[i] | everything before it); their sum is
    ``total_logprob``, the log-probability of the whole text; ``perplexity`` is
    exp(-total_logprob / number of scored tokens).
    """

    token_ids: list[int]
    token_logprobs: list[float]

    @property
    def total_logprob(self) -> float:
        return math.fsum(self.token_logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.total_logprob / len(self.token_logprobs))


class LM:
    """A loaded model with its tokenizer, and the engine it generates through.

    ``cache_config``: the KV cache kind (None: floats in the model's dtype); ``engine_config``:
    the engine's limits (``EngineConfig``; None: defaults sized from the model and the machine).
    ``sampling_defaults``: ``SamplingParams`` fields that a request given as keywords (here, on
    the command line, or to the server) takes when it does not set them; ``arlm.load`` fills
    them from the model's generation_config.json. ``speculative``: speculative decoding
    (``arlm.speculative.SpeculativeConfig``), ``draft`` the draft model of its method "draft";
    a setting that cannot work is refused here. ``adapters``: the LoRA adapters served beside
    ``model`` (``arlm.formats.read.load_lora_modules``), which ``generate`` and ``stream``
    name. The engine is built at the first generation.
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        cache_config: CacheConfig | None = None,
        engine_config: EngineConfig | None = None,
        sampling_defaults: dict | None = None,
        tensor_parallel: TensorParallelGroup | None = None,
        speculative: SpeculativeConfig | None = None,
        draft: Transformer | None = None,
        adapters: AdapterStore | None = None,
    ) -> None:
        self.model = model.eval()
        self.adapters = adapters
        self.tokenizer = tokenizer
        self.cache_config = cache_config or CacheConfig()
        self.cache_config.check(model.config)
        self.engine_config = engine_config or EngineConfig()
        self.sampling_defaults = dict(sampling_defaults or {})
        SamplingParams.from_kwargs(**self.sampling_defaults)  # names and ranges checked now
        # this rank 0's split of the model over tensor-parallel ranks (``arlm.launch``); None:
        # the model is whole here
        self.tensor_parallel = tensor_parallel
        self._workers: list = []  # the processes of the other ranks, when this one started them
        self.speculative, self.draft = speculative, draft
        if speculative is not None:  # at load, not at the first generation
            check_speculation(
                speculative,
                model.config,
                self.engine_config.max_model_len or model.config.block_size,
                windowed=self.cache_config.window is not None,
                tensor_parallel=tensor_parallel is not None,
                draft=draft.config if draft is not None else None,
            )
        self._engine: Engine | None = None

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(
                self.model,
                self.tokenizer,
                self.cache_config,
                self.engine_config,
                tensor_parallel=self.tensor_parallel,
                speculative=self.speculative,
                draft=self.draft,
                adapters=self.adapters,
            )
        return self._engine

    def close(self) -> None:
        """Release the other tensor-parallel ranks: they stop, and the process group closes
        (nothing to do for a whole model). The LM cannot generate after."""
        group, self.tensor_parallel = self.tensor_parallel, None
        if group is None:
            return
        from arlm import launch

        group.broadcast(("stop",))
        launch.leave(self._workers)
        self._engine = None

    def _whole_model(self, what: str) -> None:
        # the other ranks run only the engine's steps; a forward of rank 0's alone would wait
        # for them for ever
        if self.tensor_parallel is not None:
            raise ValueError(
                f"{what} runs the model outside the engine, which a model split over "
                f"{self.tensor_parallel.size} tensor-parallel ranks does not; load it with "
                "tensor_parallel_size=1"
            )

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def sampling_params(self, **kwargs) -> SamplingParams:
        """``SamplingParams`` from keywords; a field not given takes the model's default
        (``sampling_defaults``), else ``SamplingParams``' own. A ``SamplingParams`` passed as
        ``params=`` is used as it is: every field of it counts as set."""
        return SamplingParams.from_kwargs(**{**self.sampling_defaults, **kwargs})

    def _params(self, params: SamplingParams | None, kwargs: dict) -> SamplingParams:
        if params is not None and kwargs:
            raise TypeError("pass sampling settings either as params= or as keywords, not both")
        return params if params is not None else self.sampling_params(**kwargs)

    def generate(
        self,
        prompt: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        progress: bool | None = None,
        adapter: str | list[str | None] | None = None,
        **kwargs,
    ) -> Completion | list:
        """Continue ``prompt`` (text or token ids); keywords are ``SamplingParams`` fields.

        A list of prompts runs as one batch through the engine and returns one completion
        each, in order; ``params`` may then be a list, one per prompt (as vLLM's
        ``LLM.generate``). With ``n`` > 1 each prompt gives a list of ``n`` completions.
        ``progress``: a progress bar (None: for a list of more than one prompt).
        ``adapter``: the name of a LoRA adapter loaded with ``lora_modules`` to generate with
        (None: the base model); for a list of prompts, one name for all or one each.
        A single prompt whose generation fails raises ``ValueError``; in a list, a failed
        prompt's completion has finish_reason "error" and the others complete.
        """
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if isinstance(params, list):
                if kwargs:
                    raise TypeError("pass sampling settings either as params= or as keywords")
                batch_params = params
            else:
                batch_params = self._params(params, kwargs)
            show = len(prompt) > 1 if progress is None else progress
            if isinstance(batch_params, SamplingParams) and batch_params.penalty_alpha > 0:
                self._base_only(adapter, "contrastive search (penalty_alpha)")
                return [self._contrastive(p, batch_params) for p in prompt]
            return self.engine.generate(prompt, batch_params, progress=show, adapter=adapter)
        if isinstance(adapter, list):
            raise TypeError("adapter is a list for a list of prompts; give one prompt one name")
        params = self._params(params, kwargs)
        if params.penalty_alpha > 0:  # until the engine runs it per row
            self._base_only(adapter, "contrastive search (penalty_alpha)")
            return self._contrastive(prompt, params)
        (result,) = self.engine.generate([prompt], params, progress=bool(progress), adapter=adapter)
        for completion in result if isinstance(result, list) else [result]:
            if completion.finish_reason == "error":
                raise ValueError(completion.error)
        return result

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Serve the LoRA adapter in ``path`` (a PEFT folder or Hub id) as ``name``, for
        requests to name (see ``arlm.load``'s ``max_cpu_loras``)."""
        from arlm.formats.read import read_lora_module

        store = self._store()
        store.add(name, read_lora_module(self.model, name, path))

    def unload_adapter(self, name: str) -> None:
        """Stop serving the LoRA adapter called ``name``; refused while requests run on it."""
        self._store()
        self.engine.unload_adapter(name)

    def _store(self) -> AdapterStore:
        if self.adapters is None:
            raise ValueError(
                "this model has no LoRA slots; load it with lora_modules, max_loras or "
                "max_cpu_loras"
            )
        return self.adapters

    def _base_only(self, adapter: str | list[str | None] | None, what: str) -> None:
        """Refuse a LoRA adapter for ``what``, which runs the model outside the engine."""
        names = adapter if isinstance(adapter, list) else [adapter]
        if any(name is not None for name in names):
            raise ValueError(
                f"{what} runs the base model outside the engine, without LoRA adapters; "
                "ask without adapter, or merge the adapter into the model (arlm.load its folder)"
            )

    def _contrastive(self, prompt: str | list[int], params: SamplingParams) -> Completion:
        """Contrastive search for one prompt (``arlm.engine.contrastive``)."""
        engine = self.engine  # its checks and end ids, so the request means what it would there
        ids = engine.check_prompt(prompt)
        return contrastive_generate(self.model, self.tokenizer, ids, params, engine.end_ids)

    def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        adapter: str | None = None,
        **kwargs,
    ) -> Iterator[Chunk]:
        """Like ``generate``, yielding text pieces as they are decoded (``Chunk``, a ``str``).
        The last chunk carries the finish reason and usage."""
        params = self._params(params, kwargs)
        if params.n != 1:
            raise ValueError(f"n={params.n}: stream one sample at a time (n=1)")
        if params.penalty_alpha > 0:  # not in the engine yet, so one piece
            self._base_only(adapter, "contrastive search (penalty_alpha)")
            done = self._contrastive(prompt, params)
            yield Chunk(done.text, finish_reason=done.finish_reason, usage=done.usage)
            return
        engine = self.engine
        request_id = engine.add_request(prompt, params, adapter=adapter)
        finished = False
        try:
            while not finished:
                out = engine.next_output(request_id)
                yield from out.chunks
                finished = out.finished
            if out.completion.finish_reason == "error":
                raise ValueError(out.completion.error)
        finally:  # a consumer that stops early frees the sequence at the next step
            if not finished:
                engine.abort(request_id)

    @torch.inference_mode()
    def logits(self, token_ids: list[int], adapter: str | None = None) -> torch.Tensor:
        """(T, vocab) logits of one teacher-forced forward over ``token_ids``, with the LoRA
        adapter called ``adapter`` (None: the base model)."""
        self._whole_model("logits")
        if len(token_ids) > self.config.block_size:
            raise ValueError(
                f"{len(token_ids)} tokens exceed the model's context of {self.config.block_size}"
            )
        idx = torch.tensor([token_ids], device=self.device)
        return self._forward(idx, adapter)[0][0].float()

    def _forward(self, idx: torch.Tensor, adapter: str | None, **kwargs) -> tuple:
        """``self.model(idx, **kwargs)`` outside the engine, every position with the LoRA
        adapter called ``adapter`` (None: the base model)."""
        if adapter is None:
            return self.model(idx, **kwargs)
        self._store()
        slot = self.engine.place_adapter(adapter)
        with self.adapters.rows.using(torch.full((idx.numel(),), slot, device=self.device)):
            return self.model(idx, **kwargs)

    @torch.inference_mode()
    def score(
        self, text: str | list[int], chunk_size: int | None = None, adapter: str | None = None
    ) -> Score:
        """Per-token log-probabilities of ``text`` (or token ids), with the LoRA adapter called
        ``adapter`` (None: the base model).

        The text is scored after the tokenizer's start token when it has one, so the first token
        is scored too. Texts longer than the context are scored in overlapping windows, each new
        token seeing at least half a context of the tokens before it.

        With ``chunk_size``, the text goes through the KV cache this LM was loaded with, that
        many tokens per forward, each chunk attending to the cached keys and values of the
        chunks before: how the quality of a quantized or windowed cache is measured. The text
        must then fit the context, unless the cache is windowed.
        """
        self._whole_model("score")
        ids = self._prompt_ids(text)
        start = self.tokenizer.bos_token_id
        if start is not None and (not ids or ids[0] != start):
            ids = [start, *ids]
        if len(ids) < 2:
            raise ValueError("nothing to score: the text has no tokens after the start token")
        if chunk_size is not None:
            logprobs = self._chunked_logprobs(ids, chunk_size, adapter)
            return Score(token_ids=ids[1:], token_logprobs=logprobs)
        block = self.config.block_size
        stride = max(block // 2, 1)
        logprobs: list[float] = []
        scored = 1  # ids[:scored] are context or already scored
        while scored < len(ids):
            end = min(len(ids), block if scored == 1 else scored + stride)
            begin = max(0, end - block)
            window = torch.tensor([ids[begin:end]], device=self.device)
            logits = self._forward(window, adapter)[0][0, :-1].float()
            lp = F.log_softmax(logits, dim=-1).gather(-1, window[0, 1:, None])[:, 0]
            logprobs.extend(lp[-(end - scored) :].tolist())
            scored = end
        return Score(token_ids=ids[1:], token_logprobs=logprobs)

    def _chunked_logprobs(
        self, ids: list[int], chunk_size: int, adapter: str | None
    ) -> list[float]:
        if chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be a positive integer")
        n = len(ids) - 1  # the last token is only predicted, never fed
        if n > self.config.block_size and not self.cache_config.unbounded:
            raise ValueError(
                f"chunked scoring runs one KV cache over the whole text: {n} positions exceed "
                f"the context of {self.config.block_size}; load with kv_window for longer texts, "
                "or score without chunk_size (overlapping windows)"
            )
        cache = self.cache_config.build(
            self.config, 1, n, device=self.device, dtype=self.model.wte.weight.dtype
        )
        logprobs: list[float] = []
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            chunk = torch.tensor([ids[start:end]], device=self.device)
            logits = self._forward(chunk, adapter, kv_cache=cache, start_pos=start)[0][0].float()
            targets = torch.tensor(ids[start + 1 : end + 1], device=self.device)
            lp = F.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0]
            logprobs.extend(lp.tolist())
        return logprobs


def load(
    path: str | os.PathLike,
    device: str | torch.device = "auto",
    dtype: torch.dtype | str | None = "auto",
    allow_pickle: bool = False,
    *,
    revision: str | None = None,
    generation_config: str = "auto",
    kv_cache_dtype: str = "auto",
    kv_block_size: int | None = None,
    kv_window: int | None = None,
    kv_sink_tokens: int = 4,
    quantize: str | None = None,
    group_size: int = 32,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    max_model_len: int | None = None,
    kv_cache_memory_gib: float | None = None,
    gpu_memory_utilization: float | None = None,
    enable_prefix_caching: bool = True,
    kv_offload_gib: float = 0.0,
    preemption_mode: str = "auto",
    enforce_eager: bool = False,
    enable_torch_compile: bool = False,
    async_scheduling: bool | None = None,
    tensor_parallel_size: int = 1,
    speculative: SpeculativeConfig | dict | str | None = None,
    lora_modules: dict[str, str | os.PathLike] | None = None,
    max_loras: int | None = None,
    max_lora_rank: int | None = None,
    max_cpu_loras: int | None = None,
) -> LM | None:
    """Load an arlm checkpoint directory, a Hugging Face model folder, or a Hugging Face Hub
    model by id (``"org/name"``; a local path of that name wins).

    A Hub id resolves through huggingface_hub's cache (``HF_HOME``, ``HF_HUB_CACHE``), downloading
    the files arlm reads where missing (``HF_TOKEN`` for gated repos; ``HF_HUB_OFFLINE=1``: the
    cache only); see ``arlm.formats.hub``. revision: the id's branch, tag or commit (None: main).

    device: ``auto`` (the default) is CUDA when there is a GPU, else the CPU; or ``cpu``,
    ``cuda``, ``cuda:1``, ...
    dtype: ``auto`` (the default) is the dtype the checkpoint stores on CUDA, and on a CPU
    float32 unless the CPU computes the checkpoint's half type natively (AVX512-BF16/AMX) and
    it measures faster there (see ``arlm.device``); None is float32; ``bfloat16``/``float16``
    halve the memory of a float32 checkpoint.
    allow_pickle: let a Hugging Face folder with only ``pytorch_model.bin`` load (with
    ``weights_only=True``); off by default because a pickle can run code.
    generation_config: ``auto`` takes the sampling defaults of the model's generation_config.json
    (temperature, top_p, top_k, min_p, repetition_penalty) for requests that do not set them, as
    vLLM does; ``arlm`` ignores them (``SamplingParams``' own defaults).

    The KV cache that generation and chunked scoring use (see ``arlm.kv_cache``):
    kv_cache_dtype: ``auto`` (the model's dtype), ``float32``, ``bfloat16``, ``float16``, or
    ``int8`` / ``int4`` (quantized with a scale per position and head: about 1/4 and 1/7 of
    float32).
    kv_block_size: the engine's block of positions, the prefix cache's unit (None: 16).
    kv_window: keep only the first ``kv_sink_tokens`` positions and the last ``kv_window``
    (StreamingLLM): bounded memory, and generation past the context. Rotary models only.

    quantize: ``int8`` or ``int4`` quantizes the linear layers' weights as they load (see
    ``arlm.model.quantize``; ``group_size`` inputs share an int4 scale). A checkpoint saved
    quantized loads quantized without this. On CPU the linear layers then get their fast kernels
    (``arlm.model.packing``).

    The engine that every generation runs through (see ``arlm.engine.EngineConfig``):
    max_num_seqs: sequences decoded together (None: 64 on a CPU, 256 on a GPU, at most one per
    KV block); max_num_batched_tokens: positions per forward, so prompts prefill in chunks of at
    most this (None: 8,192 on a GPU, 512 on a CPU); max_model_len: the longest prompt +
    generation (None: the context, or what the KV pool holds where that is less);
    kv_cache_memory_gib: the KV pool's budget (None: on a CPU a quarter of the machine's
    memory; on a GPU what ``gpu_memory_utilization`` leaves, see ``arlm.engine.memory``);
    gpu_memory_utilization: the share of the GPU's memory the weights, activations and KV
    cache may fill (None: 0.9);
    enable_prefix_caching: prompts that start alike share the computed head's KV blocks;
    kv_offload_gib: host memory for KV blocks the pool evicts or swaps out (0: none);
    preemption_mode: ``auto``, ``recompute`` or ``swap``, how a sequence gives its blocks up
    when the pool runs out; enforce_eager: no CUDA graphs for decode steps (see
    ``arlm.engine.cuda_graphs``); enable_torch_compile: compile the decode step with
    ``torch.compile`` before its graphs are captured (CUDA only; slower start-up);
    async_scheduling: launch each step before the host has seen the one before's tokens
    (None: on CUDA wherever it can; see ``arlm.engine.overlap``).

    tensor_parallel_size: split the model over this many processes (``arlm.launch``), each
    holding its share of every layer's heads and MLP columns and its heads' KV cache. Under
    ``torchrun --nproc-per-node N`` it must be N, and only rank 0 gets the LM: ``load`` on the
    other ranks runs rank 0's engine steps until rank 0 closes it (``LM.close``, or its exit),
    then returns None. In a plain process it starts the other N - 1 processes itself. Only
    generation runs split (not ``score`` or ``logits``), eagerly (no CUDA graphs).

    speculative: speculative decoding, a ``SpeculativeConfig`` or its JSON or dict (vLLM's
    names): prompt lookup (``{"method": "ngram", "num_speculative_tokens": 4}``) or a draft
    model (``{"method": "draft", "draft_model": PATH}``, loaded here on the same device and
    dtype; ``"quantization": "int4"`` with the target's own path is a self-draft). See
    ``arlm.engine.speculation`` and docs/speculative.md.

    lora_modules: LoRA adapters (PEFT's folders, or Hub ids) of this base model, by the name a
    request gives them (``{"sql": "runs/sql-lora"}``, vLLM's ``--lora-modules``): each held
    beside the base's weights, unmerged, so that every request of a batch may run with its own
    (``generate(..., adapter="sql")``) or none. See ``arlm.model.multi_lora``.
    max_loras: the slots, adapters that one step may mix (None: one per entry of
    ``lora_modules``); with fewer slots than adapters, each waits in host memory until a
    request names it, then takes the slot no running request holds that was used longest ago
    (``arlm.model.adapter_store``). max_cpu_loras: the adapters held in host memory, those in
    slots among them (None: the more of ``lora_modules`` and ``max_loras``); with room beyond
    those given, every adaptable layer gets slots and ``LM.load_adapter`` adds adapters while
    the model serves. max_lora_rank: the largest rank a slot takes (None: the largest given,
    else 16).
    """
    # every argument, for workers that load the same model (arlm.launch)
    arguments = dict(locals())
    cache_config = CacheConfig(dtype=kv_cache_dtype, window=kv_window, sink_tokens=kv_sink_tokens)
    engine_config = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        kv_cache_memory_gib=kv_cache_memory_gib,
        gpu_memory_utilization=EngineConfig.gpu_memory_utilization
        if gpu_memory_utilization is None
        else gpu_memory_utilization,
        kv_block_size=EngineConfig.kv_block_size if kv_block_size is None else kv_block_size,
        enable_prefix_caching=enable_prefix_caching,
        kv_offload_gib=kv_offload_gib,
        preemption_mode=preemption_mode,
        enforce_eager=enforce_eager,
        enable_torch_compile=enable_torch_compile,
        async_scheduling=async_scheduling,
    )
    if speculative is not None and not isinstance(speculative, SpeculativeConfig):
        speculative = SpeculativeConfig.from_json(speculative)
    serving_adapters = any(x is not None for x in (lora_modules, max_loras, max_cpu_loras))
    if max_lora_rank is not None and not serving_adapters:
        raise ValueError(
            "max_lora_rank sizes the slots of LoRA adapters served beside the model; give "
            "lora_modules, max_loras or max_cpu_loras with it"
        )
    if serving_adapters and tensor_parallel_size != 1:
        raise ValueError(
            "LoRA adapters are not served with tensor parallelism yet; load with "
            "tensor_parallel_size=1, or merge one adapter into the model (arlm.load its folder)"
        )
    if speculative is not None and tensor_parallel_size != 1:
        raise ValueError(
            "speculative decoding does not run with tensor parallelism yet; load with "
            "tensor_parallel_size=1 or without speculative"
        )
    if generation_config not in GENERATION_CONFIGS:
        raise ValueError(
            f"generation_config={generation_config!r} is not allowed; it must be one of "
            f"{', '.join(GENERATION_CONFIGS)}"
        )
    from arlm.formats.hub import resolve
    from arlm.formats.read import adapter_chain, load_lora_modules, read_chain

    path = resolve(path, revision, allow_pickle)
    device = resolve_device(device)
    if tensor_parallel_size != 1:
        from arlm.launch import rank_device

        check_int("tensor_parallel_size", tensor_parallel_size, 1)
        device = rank_device(device)
    adapters, base = adapter_chain(path)  # an adapter's weights are its base model's
    stored = stored_weights(base)
    if isinstance(dtype, str) and dtype == "auto":
        dtype = auto_dtype(stored.dtype or torch.float32, device)
    dtype = resolve_dtype(dtype)
    # split over GPUs, the model is read into host memory and each rank moves only its share to
    # its GPU (``_split``): a model larger than one GPU loads where its shares fit
    check_weights_fit(stored.nbytes(dtype), device, dtype, tensor_parallel_size)
    read_to = torch.device("cpu") if tensor_parallel_size != 1 else device
    defaults = {}
    if generation_config == "auto":  # before the weights: a bad file fails fast
        defaults = sampling_defaults(base)
    model, tokenizer = read_chain(
        adapters, base, device=read_to, dtype=dtype, allow_pickle=allow_pickle
    )
    served = None  # before quantizing: the slots wrap the float layers, which quantize then
    if serving_adapters:
        served = load_lora_modules(
            model, lora_modules or {}, max_loras, max_lora_rank, max_cpu_loras
        )
    if quantize is not None:
        quantize_weights(model, quantize, group_size)
    draft = None
    if speculative is not None and speculative.method == "draft":
        draft = _load_draft(speculative, tokenizer, device, model.wte.weight.dtype, group_size)
    if tensor_parallel_size != 1:
        return _split(model, tokenizer, device, cache_config, engine_config, defaults, arguments)
    return LM(
        pack(model),
        tokenizer,
        cache_config,
        engine_config,
        defaults,
        speculative=speculative,
        draft=draft,
        adapters=served,
    )


def _load_draft(
    config: SpeculativeConfig,
    tokenizer: Tokenizer,
    device: torch.device,
    dtype: torch.dtype,
    group_size: int,
) -> Transformer:
    """The draft model of ``config``, on the target's device and dtype, refused unless its
    tokenizer is the target's."""
    from arlm.formats.read import read_model

    path = config.draft_model
    draft, draft_tokenizer = read_model(path, device=device, dtype=dtype)
    same = draft_tokenizer.vocab_size == tokenizer.vocab_size and all(
        draft_tokenizer.id_to_token(i) == tokenizer.id_to_token(i)
        for i in range(tokenizer.vocab_size)
    )
    if not same:
        raise ValueError(
            f"the draft model at {path} has another tokenizer ({draft_tokenizer.vocab_size} ids, "
            f"the target's {tokenizer.vocab_size}, or other tokens): a draft's guesses are "
            "token ids, so it must share the target's tokenizer"
        )
    if config.quantization is not None:
        quantize_weights(draft, config.quantization, group_size)
    return pack(draft)


def _split(model, tokenizer, device, cache_config, engine_config, defaults, arguments) -> LM | None:
    """``model`` (in host memory) split over ``tensor_parallel_size`` ranks (see ``load``), each
    rank's share on its ``device``: rank 0's LM, or None on the other ranks once rank 0 has
    closed."""
    from arlm import launch
    from arlm.engine.tensor_parallel import run_worker
    from arlm.model.tensor_parallel import head_split, parallelize

    size = arguments["tensor_parallel_size"]
    head_split(model.config, size)  # a size the model cannot take is refused before any start
    store, workers = None, []
    if not launch.under_torchrun():
        store, workers = launch.spawn_workers(size, load, arguments)
    group, mesh = launch.join(size, device, store)
    # the linear layers become DTensors (no packed CPU kernels for them), each rank's shard
    # moved to the mesh's device one matrix at a time; then the rest (norms, buffers) follows
    parallelize(model, mesh)
    model.to(device)
    if group.rank != 0:
        run_worker(model, group)
        launch.leave([])
        return None
    lm = LM(model, tokenizer, cache_config, engine_config, defaults, tensor_parallel=group)
    lm._workers = workers
    atexit.register(lm.close)  # workers left waiting would hold the process group open
    return lm

"""Training by teacher forcing: each window is one parallel forward, its targets shifted by one.

A run lives in one folder: the checkpoint (model, config, tokenizer), the training state beside
it (optimizer moments, step, random-generator states), ``metrics.jsonl`` and ``loss.png``.
``resume`` continues from the last checkpoint and reaches the same weights as a run that was
never stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from arlm.atomic import atomic_path
from arlm.config import INT4_GROUP_SIZES, PRESETS, QUANT_METHODS, ModelConfig, option
from arlm.formats.checkpoint import (
    CheckpointError,
    load_model,
    read_json,
    read_tensors,
    recover,
    save_model,
    tensors_to_bytes,
    write_files,
)
from arlm.formats.hub import resolve
from arlm.formats.peft import (
    ALL_LINEAR,
    Adapter,
    adapter_files,
    load_adapter_weights,
    lora_targets,
)
from arlm.formats.read import read_model
from arlm.model.lora import LoRAConfig, add_lora
from arlm.model.quantize import quantize, require_float
from arlm.model.transformer import Transformer
from arlm.tokenizer import Tokenizer
from arlm.train.chat import ChatCorpus, ChatSplit, PackedSplit, corpus_kind, load_chat
from arlm.train.data import Shards, TokenSplit, default_cache_dir, sample_starts
from arlm.train.distributed import barrier, init_world, sum_over_ranks
from arlm.train.flops import model_flops_per_token, peak_flops
from arlm.train.preference import (
    DPO_LOSSES,
    PreferenceCorpus,
    PreferenceLoss,
    PreferenceSplit,
    load_preferences,
)
from arlm.train.prepare import load_or_prepare
from arlm.train.readback import Readback
from arlm.train.remedies import UNLIKELIHOOD_KINDS, RemedyLoss, RemedySettings
from arlm.train.sharding import (
    SHARDINGS,
    checkpoint_activations,
    gather_full,
    is_sharded,
    no_gradient_sync,
    shard_model,
    shard_optimizer_state,
)
from arlm.validate import check_float, check_int

# what training batches are drawn from
Split = TokenSplit | ChatSplit | PackedSplit | PreferenceSplit
LORA_TARGETS = ALL_LINEAR  # every projection in the blocks, as QLoRA found best
DPO_BETA = 0.1  # TRL's default
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
# TrainConfig fields that reshape the preset's model (vocab_size is the tokenizer's, set apart)
MODEL_OVERRIDES = (
    "n_layer",
    "n_head",
    "n_kv_head",
    "n_embd",
    "block_size",
    "n_experts",
    "n_experts_per_tok",
)


@dataclass
class TrainConfig:
    """Everything a run needs; saved in the run folder so ``resume`` needs only the folder."""

    corpus: str = option(
        "builtin",
        help="'builtin', a text file, a .jsonl file (a \"text\" per line), a folder of "
        ".txt/.md/.jsonl files, a glob, or a folder written by arlm prepare; with --init-from "
        'also a .jsonl file of conversations ("messages", or "prompt" and "completion"), '
        'trained on the assistant\'s turns, or of preferences ("prompt", "chosen", '
        '"rejected"), trained by DPO',
    )
    init_from: str | None = option(
        None,
        help="fine-tune: start from this model (an arlm checkpoint, a Hugging Face model folder "
        "or Hub id) and its tokenizer, rather than a new model",
    )
    preset: str | None = option(
        None, help=f"model size, one of {', '.join(sorted(PRESETS))} (default: small)"
    )
    # the model's shape on top of the preset; None keeps the preset's value
    n_layer: int | None = option(None, help="transformer blocks (default: the preset's)")
    n_head: int | None = option(None, help="attention heads (default: the preset's)")
    n_kv_head: int | None = option(
        None, help="key/value heads, for GQA (default: the preset's; n_head with --n-head)"
    )
    n_embd: int | None = option(None, help="residual width (default: the preset's)")
    block_size: int | None = option(
        None,
        help="context length (default: the preset's); with --init-from, the training windows' "
        "(default: the model's context, at most 1024)",
    )
    vocab_size: int | None = option(None, help="tokenizer vocabulary (default: the preset's)")
    n_experts: int | None = option(
        None, help="a mixture of this many experts in place of each block's MLP (default: none)"
    )
    n_experts_per_tok: int | None = option(
        None, help="experts each token runs through, with --n-experts (default: 2)"
    )
    out: str = option("runs/small", help="run folder")
    steps: int = option(300, help="optimizer steps to train to")  # small: ~5 min on 2 cores
    batch_size: int = option(16, help="sequences per micro-batch, per process")
    grad_accum: int = option(1, help="micro-batches per optimizer step")
    lr: float | None = option(
        None, help="peak learning rate (default: 2e-3; 3e-5 with --init-from, 2e-4 with LoRA)"
    )
    min_lr: float | None = option(None, help="learning rate at the last step (default: lr / 10)")
    warmup_steps: int = option(30, help="linear warm-up steps")
    weight_decay: float = option(0.1, help="AdamW weight decay (not on norms and biases)")
    grad_clip: float = option(1.0, help="gradient norm clip")
    beta1: float = option(0.9, help="AdamW beta1")
    beta2: float = option(0.95, help="AdamW beta2")
    dropout: float = option(0.0, help="dropout probability")
    eval_interval: int = option(50, help="steps between evaluations")
    eval_iters: int = option(20, help="batches per evaluation")
    log_interval: int = option(10, help="steps between log lines")
    ckpt_interval: int = option(100, help="steps between checkpoints")
    seed: int = option(1337, help="seed of the model's initialization and the batches")
    device: str = option(
        "auto",
        help="auto (CUDA when there is a GPU), cpu, cuda, cuda:1, ...; under torchrun "
        "'cuda' is each process's own GPU",
    )
    bf16: bool = option(False, help="bfloat16 autocast (matmuls in bfloat16, master weights f32)")
    compile: bool = option(False, help="torch.compile the model (slow first steps, faster after)")
    sharding: str = option(
        "ddp",
        help="under torchrun: ddp (a whole copy of the model per process) or fsdp (parameters, "
        "gradients and optimizer state sharded over the processes, per transformer block)",
        choices=SHARDINGS,
    )
    activation_checkpointing: bool = option(
        False, help="recompute each block's activations in the backward pass (less memory)"
    )
    packing: bool = option(
        False,
        help="with a conversations corpus: pack several examples into each row of the window, "
        "each attending only to itself (no padding between short examples)",
    )
    cache_dir: str | None = option(
        None, help="where encoded corpora are cached (default: ~/.cache/arlm)"
    )
    # loop remedies (arlm.train.remedies): off by default
    unlikelihood: str | None = option(
        None,
        help="unlikelihood training (Welleck et al. 2020): token (earlier tokens are negative "
        "candidates), sequence (repeated n-grams of the model's greedy continuations) or both",
        choices=UNLIKELIHOOD_KINDS,
    )
    unlikelihood_weight: float = option(1.0, help="weight of the unlikelihood terms (alpha)")
    unlikelihood_every: int = option(
        4, help="steps between sequence-level unlikelihood batches (its greedy continuations)"
    )
    ditto: bool = option(
        False, help="DITTO (Xu et al. 2022): also train on sentences repeated back to back"
    )
    ditto_weight: float = option(1.0, help="weight of the DITTO loss")
    ditto_lambda: float = option(0.5, help="DITTO's lambda: a copy's target, x the last copy's p")
    ditto_rows: int = option(4, help="repeated-sentence windows per micro-batch and process")
    # low-rank adapters (arlm.model.lora) on a frozen --init-from model: off by default
    lora_rank: int | None = option(
        None,
        help="with --init-from: train low-rank adapters (LoRA) of this rank on the frozen model; "
        "the run folder holds the adapter in PEFT's format",
    )
    lora_alpha: float | None = option(
        None, help="LoRA's alpha: the updates are scaled by alpha / rank (default: 2 x rank)"
    )
    lora_dropout: float = option(0.0, help="dropout on the LoRA updates' inputs")
    lora_targets: str = option(
        LORA_TARGETS,
        help="the projections LoRA adapts, by their Hugging Face names, comma-separated "
        "(q_proj,v_proj,...; c_attn,c_fc,... for GPT-2), or all-linear",
    )
    quantize: str | None = option(
        None,
        help="with --lora-rank: hold the frozen model's linear layers in int8 or int4 (QLoRA), "
        "the adapters training in float32 over them (default: float32)",
        choices=QUANT_METHODS,
    )
    group_size: int = option(
        32, help=f"with --quantize int4, inputs per group, one of {INT4_GROUP_SIZES}"
    )
    dpo_beta: float = option(
        DPO_BETA,
        help="with a preference corpus: DPO's beta, how strongly the loss holds the model to its "
        "reference (the model as training began)",
    )
    dpo_loss: str = option(
        "sigmoid",
        help="with a preference corpus: the loss of each pair's margin, TRL's names: sigmoid "
        "(DPO), hinge (SLiC) or ipo (IPO)",
        choices=DPO_LOSSES,
    )
    dpo_label_smoothing: float = option(
        0.0,
        help="with --dpo-loss sigmoid: the chance that a pair's labels are swapped (conservative "
        "DPO), in [0, 0.5)",
    )

    def __post_init__(self) -> None:
        if self.sharding not in SHARDINGS:
            raise ValueError(
                f"sharding={self.sharding!r} is not allowed; choose one of {SHARDINGS}"
            )
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_interval",
            "eval_iters",
            "log_interval",
            "ckpt_interval",
        ):
            check_int(name, getattr(self, name), 1)
        for name in MODEL_OVERRIDES:
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        if self.n_experts_per_tok is not None and self.n_experts is None:
            raise ValueError(
                f"n_experts_per_tok={self.n_experts_per_tok} chooses among experts, but "
                "n_experts is not set; set both for a mixture of experts"
            )
        if self.init_from is None:
            # the model's shape is checked now, before a corpus is read for it
            self.model_config(self.vocab_size or PRESETS[self.preset_name]["vocab_size"])
        else:
            self._check_fine_tuning()
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size={self.block_size} must be at least 2")
        if not self.peak_lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")
        check_float("dpo_beta", self.dpo_beta, lambda b: b > 0, "> 0")
        if self.dpo_loss not in DPO_LOSSES:
            raise ValueError(
                f"dpo_loss={self.dpo_loss!r} is not allowed; choose one of {DPO_LOSSES}"
            )
        check_float(
            "dpo_label_smoothing", self.dpo_label_smoothing, lambda e: 0 <= e < 0.5, "in [0, 0.5)"
        )
        if self.dpo_label_smoothing and self.dpo_loss != "sigmoid":
            raise ValueError(
                f"dpo_label_smoothing={self.dpo_label_smoothing} smooths the sigmoid loss, and "
                f"dpo_loss is {self.dpo_loss!r}; drop one of them"
            )
        self.remedies  # noqa: B018 (checks the remedy options now)
        self.lora  # noqa: B018 (and the LoRA options)

    def _check_fine_tuning(self) -> None:
        """The model comes whole from ``init_from``: options that would reshape it are refused,
        and LoRA's sharding."""
        for name in ("preset", "vocab_size", *MODEL_OVERRIDES):
            if name != "block_size" and getattr(self, name) is not None:
                raise ValueError(
                    f"{name}={getattr(self, name)}: with --init-from the model, its shape and "
                    f"its tokenizer come from {self.init_from}; drop --{name.replace('_', '-')}"
                )
        if self.lora_rank is not None and self.sharding == "fsdp":
            raise ValueError(
                "LoRA trains with --sharding ddp (its adapters are small; the frozen model is "
                "held whole by each process); fsdp is not supported with --lora-rank"
            )

    @property
    def preset_name(self) -> str:
        """The preset a new model is made from (``preset``, or small)."""
        return self.preset or "small"

    @property
    def peak_lr(self) -> float:
        """``lr``, or the default for the run's kind: a new model, fine-tuning or LoRA."""
        if self.lr is not None:
            return self.lr
        if self.init_from is None:
            return 2e-3
        return 2e-4 if self.lora_rank is not None else 3e-5

    @property
    def lora_target_modules(self) -> tuple[str, ...] | str:
        """``lora_targets`` as PEFT's ``target_modules``: names, or the string all-linear."""
        if self.lora_targets == LORA_TARGETS:
            return LORA_TARGETS
        return tuple(name.strip() for name in self.lora_targets.split(","))

    @property
    def lora(self) -> LoRAConfig | None:
        """The LoRA settings, checked; None without ``lora_rank``."""
        if self.lora_rank is None:
            given = {
                "lora_alpha": self.lora_alpha is not None,
                "lora_dropout": self.lora_dropout != 0.0,
                "lora_targets": self.lora_targets != LORA_TARGETS,
                "quantize": self.quantize is not None,
            }
            for name, set_ in given.items():
                if set_:
                    raise ValueError(
                        f"{name}={getattr(self, name)} is a LoRA option, but lora_rank is not "
                        "set; pass --lora-rank to train low-rank adapters"
                    )
            return None
        if self.init_from is None:
            raise ValueError(
                f"lora_rank={self.lora_rank}: LoRA adapts a trained model, so it needs "
                "--init-from (a checkpoint to adapt); a new model trains whole"
            )
        check_int("lora_rank", self.lora_rank, 1)
        if self.quantize is not None and self.quantize not in QUANT_METHODS:
            raise ValueError(
                f"quantize={self.quantize!r} is not allowed; choose one of {QUANT_METHODS}"
            )
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"group_size={self.group_size} is not allowed; choose one of {INT4_GROUP_SIZES}"
            )
        alpha = 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha
        return LoRAConfig(self.lora_rank, alpha, self.lora_dropout)

    @property
    def remedies(self) -> RemedySettings:
        """The loop-remedy options, checked."""
        return RemedySettings(
            self.unlikelihood,
            self.unlikelihood_weight,
            self.unlikelihood_every,
            self.ditto,
            self.ditto_weight,
            self.ditto_lambda,
            self.ditto_rows,
        )

    def model_config(self, vocab_size: int) -> ModelConfig:
        """The preset with this run's overrides; ``vocab_size`` is the tokenizer's."""
        overrides = {n: getattr(self, n) for n in MODEL_OVERRIDES if getattr(self, n) is not None}
        if self.n_head is not None and self.n_kv_head is None:
            overrides["n_kv_head"] = self.n_head  # a preset's GQA ratio does not survive new heads
        return ModelConfig.preset(
            self.preset_name, **overrides, vocab_size=vocab_size, dropout=self.dropout
        )

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at the last step."""
        lr = self.peak_lr
        min_lr = lr / 10 if self.min_lr is None else self.min_lr
        if step < self.warmup_steps:
            return lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (lr - min_lr)


class TrainingError(RuntimeError):
    """Training cannot go on (for example the loss is no longer finite)."""


@dataclass
class TrainResult:
    out: Path
    step: int
    val_loss: float
    seconds: float


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    # weight decay on matrices only: decaying biases, norms' gains (1-D) would fight their role
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # the fused kernel updates every tensor in one pass (on CPU several times faster than the
    # per-tensor loops); it takes floating-point tensors on CPU or CUDA
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.peak_lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The optimizer's state as flat tensors (for safetensors) and JSON (the rest)."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, slots in sd["state"].items():
        for slot, value in slots.items():
            tensors[f"optimizer.{index}.{slot}"] = value
    return tensors, {"param_groups": sd["param_groups"]}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    # saved whole; a sharded model's optimizer takes this rank's shards of it
    optimizer.load_state_dict(
        {"state": shard_optimizer_state(state, optimizer), "param_groups": groups}
    )


def saved_train_config(out: str | Path) -> TrainConfig:
    """The settings of the run in ``out``, finishing an interrupted checkpoint write first."""
    out = Path(out)
    recover(out)
    if not (out / STATE_JSON).is_file():
        raise CheckpointError(f"nothing to resume: {out} has no {STATE_JSON}")
    return TrainConfig(**read_json(out / STATE_JSON)["train_config"])


class Trainer:
    """One training run. ``fit`` trains to ``cfg.steps``; ``request_stop`` (also bound to
    Ctrl-C) ends it at the next step boundary with a checkpoint, ready to resume.

    With ``resume=True`` the run in ``cfg.out`` continues with its saved settings; only
    ``cfg.steps`` (the step to train to) is taken from ``cfg``.

    Under ``torchrun`` each process is one rank of a data-parallel run: every optimizer step
    draws one global batch of ``batch_size * grad_accum * world_size`` windows from a generator
    all ranks share, and each rank trains on its own slice of it, so the run follows the same
    schedule as one process holding the whole batch.
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.out = Path(cfg.out)
        saved = saved_train_config(self.out) if resume else None
        self.world, self.device = init_world(saved.device if saved else cfg.device)
        if saved:
            cfg = self._resumed_config(saved, cfg)
        elif (self.out / STATE_JSON).exists():
            raise ValueError(
                f"{self.out} already holds a training run; pass --resume to continue it "
                "or choose another --out"
            )
        self.cfg = cfg
        self.progress = progress and self.world.is_main
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        torch.manual_seed(cfg.seed)
        if not self.world.is_main:  # rank 0 encodes the corpus first; the others then read it
            barrier(self.world)
        # a fine-tuned model comes with its tokenizer, which encodes the corpus
        pretrained = self._pretrained(resume) if cfg.init_from is not None else None
        self.shards: Shards | ChatCorpus | PreferenceCorpus
        kind = corpus_kind(cfg.corpus)
        if kind != "text":  # conversations or preferences: each example whole, in memory
            self.shards = self._examples(kind, pretrained)
        else:
            self.shards = load_or_prepare(
                cfg.corpus,
                self.cache_dir,
                vocab_size=cfg.vocab_size or PRESETS[cfg.preset_name]["vocab_size"],
                tokenizer=pretrained[1] if pretrained else self._tokenizer(),
                progress=self.progress,
            )
        self.tokenizer = self.shards.tokenizer
        if self.world.is_main:
            barrier(self.world)
        if pretrained is None:
            self.model = Transformer(cfg.model_config(self.tokenizer.vocab_size)).to(self.device)
        else:
            self.model = pretrained[0]
        # the windows trained on: a new model's context, a fine-tuned one's up to 1024 positions
        context = self.model.config.block_size
        self.window = cfg.block_size or (context if pretrained is None else min(context, 1024))
        if self.window > context:
            raise ValueError(
                f"block_size={cfg.block_size} is longer than the context of {cfg.init_from} "
                f"({context} positions); choose at most that"
            )
        if cfg.packing:  # rows of several conversations, laid out once for the window
            if not isinstance(self.shards, ChatCorpus):
                what = "preference pairs" if kind == "preference" else "text"
                raise ValueError(
                    f"packing packs conversations, and {cfg.corpus} holds {what}: text windows "
                    "are full already, and DPO compares each pair's answers row by row; drop "
                    "--packing"
                )
            train, val = (PackedSplit(s, self.window) for s in (self.shards.train, self.shards.val))
            self.shards = ChatCorpus(train, val, self.tokenizer)
        if cfg.lora is not None:  # a frozen model and its adapters, which alone train
            add_lora(self.model, cfg.lora, lora_targets(self.model, cfg.lora_target_modules))
            if resume:
                load_adapter_weights(self.model, self.out)
            if cfg.quantize is not None:  # QLoRA: the frozen layers quantized, the adapters not
                quantize(self.model, cfg.quantize, cfg.group_size, head=False)
                self.model.to(self.device)  # the device holds the quantized model only
        elif resume and pretrained is None:  # the whole weights, before a sharding cuts them up
            self._load_weights()
        if cfg.activation_checkpointing:
            checkpoint_activations(self.model)
        # DDP wraps the model (and averages the gradients over ranks in the backward pass);
        # FSDP shards it in place, so the optimizer is made after, over the shards
        self.ddp_model = shard_model(self.model, self.world, self.device, cfg.sharding, cfg.bf16)
        self.optimizer = make_optimizer(self.model, cfg)
        # the same seed on every rank: all draw the same global batches, each keeps its slice
        self.batch_generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.last_val_loss = float("nan")
        self.val_rewards: dict[str, float] = {}  # preference pairs' (``evaluate``)
        self.last_loss = float("nan")  # of the last step whose loss the host has read
        self.positions = 0  # input positions this process has trained on (for tokens/s)
        self._stop_requested = False  # asked of this process (Ctrl-C, request_stop)
        self._stop_agreed = False  # asked of any rank, as every rank reads it at the same step
        # each step's loss (and, under torchrun, its stop votes), read a step late in ``fit``
        self._readback = Readback()
        if resume:
            self._load_state()
        self._saved_step = self.step
        if self.world.distributed:
            torch.manual_seed(cfg.seed + self.step + self.world.rank)  # dropout differs by rank
        self.forward_model = torch.compile(self.ddp_model) if cfg.compile else self.ddp_model
        # unlikelihood and DITTO change the step's loss when asked for
        self.remedies: RemedyLoss | None = None
        if cfg.remedies.active:
            self.remedies = RemedyLoss(
                cfg.remedies, self.model, self.shards.train, self.tokenizer, self.world, cfg.seed
            )
        # preference pairs train by DPO, against the model as it began
        self.preference: PreferenceLoss | None = None
        given = {
            "dpo_beta": cfg.dpo_beta != DPO_BETA,
            "dpo_loss": cfg.dpo_loss != "sigmoid",
            "dpo_label_smoothing": cfg.dpo_label_smoothing != 0.0,
        }
        for name, set_ in given.items():
            if set_ and not isinstance(self.shards, PreferenceCorpus):
                raise ValueError(
                    f"{name}={getattr(cfg, name)} applies to preference pairs, and {cfg.corpus} "
                    f"holds none; drop --{name.replace('_', '-')} or train on a .jsonl of "
                    "prompt, chosen and rejected"
                )
        if isinstance(self.shards, PreferenceCorpus):
            reference = None if cfg.lora is not None else self._reference()
            self.preference = PreferenceLoss(
                cfg.dpo_beta, self.model, reference, cfg.dpo_loss, cfg.dpo_label_smoothing
            )
        adapters = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.flops_per_token = model_flops_per_token(
            self.model.config, self.window, adapters if cfg.lora is not None else None
        )
        self.peak_flops: float | None = None  # measured when fit starts

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step, over every rank."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.world.size

    def _resumed_config(self, saved: TrainConfig, cfg: TrainConfig) -> TrainConfig:
        """The saved settings, except where the run lives and how long it runs; with another
        number of processes, the per-process batch that keeps the global batch."""
        state = read_json(self.out / STATE_JSON)
        saved_world = state.get("world_size", 1)
        resumed = dataclasses.replace(saved, out=cfg.out, steps=cfg.steps)
        if saved_world == self.world.size:
            return resumed
        global_batch = saved.batch_size * saved.grad_accum * saved_world
        per_rank, rest = divmod(global_batch, saved.grad_accum * self.world.size)
        if rest or per_rank < 1:
            raise ValueError(
                f"cannot resume a run of {saved_world} process(es) with {self.world.size}: its "
                f"global batch of {global_batch} sequences (batch_size {saved.batch_size} x "
                f"grad_accum {saved.grad_accum} x {saved_world}) does not divide into "
                f"grad_accum {saved.grad_accum} x {self.world.size} processes; resume with a "
                f"number of processes that divides {global_batch // saved.grad_accum}"
            )
        return dataclasses.replace(resumed, batch_size=per_rank)

    def _pretrained(self, resume: bool) -> tuple[Transformer, Tokenizer]:
        """The model and tokenizer of ``init_from``, in float32 on the training device, with
        this run's dropout (QLoRA's in host memory: it moves once quantized). A resumed full
        fine-tune reads its model from its own folder."""
        cfg = self.cfg
        source = self.out if resume and cfg.lora is None else resolve(cfg.init_from)
        device = "cpu" if cfg.quantize is not None else self.device
        model, tokenizer = read_model(source, device=device)
        require_float(model.config, f"fine-tuning {cfg.init_from}")
        model.float().set_dropout(cfg.dropout)
        model.requires_grad_(True)  # an adapter folder's merged model comes frozen
        return model, tokenizer

    def _examples(
        self, kind: str, pretrained: tuple[Transformer, Tokenizer] | None
    ) -> ChatCorpus | PreferenceCorpus:
        """The conversations or preference pairs of the corpus, encoded with the fine-tuned
        model's tokenizer and chat template."""
        cfg = self.cfg
        what = "conversations" if kind == "chat" else "preference pairs"
        if pretrained is None:
            raise ValueError(
                f"{cfg.corpus} holds {what}, which fine-tune a model that has a tokenizer and "
                "chat template: pass --init-from (a new model trains on text)"
            )
        if cfg.remedies.active:
            raise ValueError(
                "the loop remedies (--unlikelihood, --ditto) train on windows of text, and "
                f"{cfg.corpus} holds {what}; train them on a text corpus"
            )
        if kind == "chat":
            return load_chat(cfg.corpus, pretrained[1])
        return load_preferences(cfg.corpus, pretrained[1])

    def _reference(self) -> Transformer:
        """DPO's reference for a full fine-tune: the model ``init_from`` holds, frozen."""
        model, _ = read_model(resolve(self.cfg.init_from), device=self.device)
        return model.float().eval().requires_grad_(False)

    def _tokenizer(self) -> Tokenizer | None:
        """A resumed run's own tokenizer; None for a new run, which takes its corpus's."""
        if (self.out / "tokenizer.json").is_file() and (self.out / STATE_JSON).is_file():
            return Tokenizer.from_file(self.out / "tokenizer.json")
        return None

    # --- state -----------------------------------------------------------------------------

    def save(self) -> None:
        """Write the checkpoint and the training state as one atomic unit. Rank 0 writes: under
        DDP the ranks' weights and optimizer states are equal; under FSDP every rank first
        gives its shards to rank 0's whole copy, one tensor at a time."""
        if not self.world.is_main and not is_sharded(self.model):
            return
        opt_tensors, opt_json = _optimizer_tensors(self.optimizer)
        lora = self.cfg.lora
        weights = None if lora else gather_full(self.model.state_dict(), self.world)
        opt_tensors = gather_full(opt_tensors, self.world)
        if not self.world.is_main:
            return
        tensors = {
            **opt_tensors,
            "rng.torch": torch.get_rng_state(),
            "rng.batches": self.batch_generator.get_state(),
        }
        if self.device.type == "cuda":  # dropout on the GPU draws from the device's generator
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        state = {
            "step": self.step,
            "val_loss": self.last_val_loss,
            "world_size": self.world.size,
            "train_config": dataclasses.asdict(self.cfg),
            **opt_json,
        }
        train_state = {
            STATE_TENSORS: tensors_to_bytes(tensors),
            STATE_JSON: json.dumps(state, indent=2).encode(),
        }
        if lora is None:
            save_model(self.out, self.model, self.tokenizer, extra_files=train_state, state=weights)
            return
        # only the adapters: the frozen model stays where --init-from found it
        base = self.cfg.init_from
        if Path(base).exists():  # a folder: absolute, so the adapter loads from anywhere
            base = str(Path(base).resolve())
        adapter = Adapter(lora, self.cfg.lora_target_modules, base)
        tokenizer = {"tokenizer.json": self.tokenizer.to_json().encode()}  # resume reads it
        write_files(self.out, {**adapter_files(self.model, adapter), **tokenizer, **train_state})

    def _load_weights(self) -> None:
        model, _ = load_model(self.out, device=self.device)
        self.model.load_state_dict(model.state_dict())

    def _load_state(self) -> None:
        """The optimizer, the random generators and the step of the saved run (the weights are
        loaded before the model is sharded, by ``_load_weights``)."""
        state = read_json(self.out / STATE_JSON)
        tensors = read_tensors(self.out / STATE_TENSORS)
        _load_optimizer(self.optimizer, tensors, state["param_groups"])
        torch.set_rng_state(tensors["rng.torch"])
        self.batch_generator.set_state(tensors["rng.batches"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.step = state["step"]
        self.last_val_loss = state["val_loss"]
        self._trim_metrics()

    def _trim_metrics(self) -> None:
        # steps logged after the checkpoint are redone by this run; drop their old lines
        path = self.out / "metrics.jsonl"
        if path.is_file() and self.world.is_main:
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in kept))

    # --- the loop --------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop_requested = True

    def _autocast(self):
        enabled = self.cfg.bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _draw(self, split: Split, n: int, block: int, generator: torch.Generator) -> list[int]:
        """What ``n`` rows of a batch are: windows' starts, or whole examples' (pairs') indices."""
        if isinstance(split, TokenSplit):
            return sample_starts(split, n, block, generator)
        return split.sample(n, generator)

    def _batch(
        self, split: Split, picks: list[int], block: int
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Inputs (B, T) and their targets on the training device: windows of ``block`` tokens
        and the same shifted by one, or whole examples (``ChatSplit.batch``; a preference
        batch's rows are each pair's chosen answers, then its rejected ones); and for packed
        examples the model's ``positions`` and ``segments`` (``PackedSplit.batch``)."""
        if isinstance(split, TokenSplit):
            windows = split.windows(picks, block)  # (B, block + 1)
            tensors = (windows[:, :-1], windows[:, 1:])
        else:
            pad = self.tokenizer.eos_token_ids[0] if self.tokenizer.eos_token_ids else 0
            tensors = split.batch(picks, block, pad)
        if self.device.type == "cuda":
            tensors = tuple(t.pin_memory() for t in tensors)
        x, y, *packed = (t.to(self.device, non_blocking=True) for t in tensors)
        return x, y, dict(zip(("positions", "segments"), packed, strict=True)) if packed else {}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``eval_iters`` batches (the same batches every time),
        shared out among the ranks. With preference pairs, ``val_rewards`` then holds their
        reward accuracy and mean reward margin."""
        self.model.eval()
        generator = torch.Generator().manual_seed(self.cfg.seed + 1)
        b, world = self.cfg.batch_size, self.world
        # a validation split shorter than the context is read in shorter windows
        block = self.window
        if isinstance(self.shards.val, TokenSplit):
            block = min(block, len(self.shards.val) - 1)
        starts = self._draw(self.shards.val, self.cfg.eval_iters * b, block, generator)
        # the loss summed over batches; with pairs, those whose chosen answer's reward won,
        # their reward margins summed, and the pairs
        total = torch.zeros(4, dtype=torch.float64, device=self.device)
        # a sharded model's forward is a collective (each block all-gathers its weights), so
        # there every rank runs the same number of batches; a rank past the last one reruns its
        # first and does not count it
        rounds = math.ceil(self.cfg.eval_iters / world.size)
        for r in range(rounds):
            i = r * world.size + world.rank
            if i >= self.cfg.eval_iters and not is_sharded(self.model):
                break
            j = i if i < self.cfg.eval_iters else 0
            x, y, packed = self._batch(self.shards.val, starts[j * b : (j + 1) * b], block)
            with self._autocast():
                pairs = total.new_zeros(3)
                if self.preference is not None:
                    loss, chosen, rejected = self.preference.rewards(self.model, x, y)
                    pairs[0] = (chosen > rejected).sum()
                    pairs[1] = (chosen - rejected).sum()
                    pairs[2] = chosen.numel()
                else:
                    _, loss = self.model(x, y, return_logits=False, **packed)
            if i < self.cfg.eval_iters:
                total[0] += loss.double()
                total[1:] += pairs
        self.model.train()
        loss, won, margin, pairs = sum_over_ranks(total, world).tolist()
        if self.preference is not None:
            self.val_rewards = {
                "val_reward_accuracy": won / pairs,
                "val_reward_margin": margin / pairs,
            }
        return loss / self.cfg.eval_iters

    def _log(self, record: dict) -> None:
        if self.world.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def train_step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches on every rank; the mean loss
        over the global batch, a 0-d tensor on the device.

        The step's global batch is drawn at once; micro-step k of rank r trains on its slice
        ``k * world_size + r``, so any split of the same global batch over processes and
        micro-steps sees the same windows. Nothing here waits for the device's current work:
        a step's loss is read (and checked to be finite) at the end of the next step, or when
        ``fit`` logs, evaluates or saves, so the GPU never idles while the host prepares the
        next step.
        """
        cfg, world = self.cfg, self.world
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        b, block = cfg.batch_size, self.window
        starts = self._draw(self.shards.train, self.global_batch, block, self.batch_generator)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for k in range(cfg.grad_accum):
            first = (k * world.size + world.rank) * b
            x, y, packed = self._batch(self.shards.train, starts[first : first + b], block)
            self.positions += x.numel()  # of this rank, padding included
            # the gradients are averaged over ranks once, in the last micro-step's backward
            last = k == cfg.grad_accum - 1
            with nullcontext() if last else no_gradient_sync(self.ddp_model):
                with self._autocast():
                    if self.remedies is not None:
                        loss = self.remedies.loss(self.forward_model, x, y, self.step, k)
                    elif self.preference is not None:
                        loss = self.preference.loss(self.forward_model, x, y)
                    else:
                        _, loss = self.forward_model(x, y, return_logits=False, **packed)
                (loss / cfg.grad_accum).backward()
            total += loss.detach().double() / cfg.grad_accum
        values = total[None]
        if world.distributed:
            # one collective for the logged loss and for a stop asked of any rank (Ctrl-C
            # reaches every process; they must all stop after the same step); a fill on the
            # device, as a tensor made from a host number would wait for the device
            stop = torch.full(
                (), float(self._stop_requested), dtype=total.dtype, device=total.device
            )
            shared = sum_over_ranks(torch.stack((total, stop)), world)
            values = torch.stack((shared[0] / world.size, shared[1]))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._readback.push(self.step, values)
        self._settle(self.step - 1)  # the step before this one is done on the device (or nearly)
        return values[0]

    def _settle(self, through: int) -> None:
        """Read the losses (and stop votes) of the steps up to ``through``: the last one read
        becomes ``last_loss``; a non-finite one ends the run before anything saves its
        weights."""
        for step, values in self._readback.pop(through):
            if not math.isfinite(values[0]):
                raise TrainingError(
                    f"the loss became {values[0]} at step {step}; the last good checkpoint is "
                    f"kept in {self.out} (step {self._saved_step}). Lower --lr and resume."
                )
            self.last_loss = values[0]
            if len(values) > 1 and values[1] > 0:
                self._stop_agreed = True

    def _stopping(self) -> bool:
        # a lone process stops when asked; ranks stop together, when the vote is read
        return self._stop_agreed if self.world.distributed else self._stop_requested

    def fit(self, on_step: Callable[[Trainer], None] | None = None) -> TrainResult:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        tokens_per_step = self.global_batch * self.window
        if self.peak_flops is None:
            dtype = torch.bfloat16 if cfg.bf16 else torch.float32
            self.peak_flops = peak_flops(self.device, dtype)
        if self.world.is_main and self.progress:
            rows = f"{self.global_batch} sequences x {self.window} = {tokens_per_step:,} tokens"
            if isinstance(self.shards.train, ChatSplit):
                rows = f"{self.global_batch} examples of up to {self.window} tokens"
            elif isinstance(self.shards.train, PackedSplit):
                rows = f"{self.global_batch} rows of packed examples, up to {self.window} tokens"
            elif isinstance(self.shards.train, PreferenceSplit):
                rows = f"{self.global_batch} pairs of answers of up to {self.window} tokens"
            print(
                f"global batch: {rows} ({cfg.batch_size} per micro-batch x "
                f"{cfg.grad_accum} micro-batches x {self.world.size} process(es)); "
                f"matmul peak {self.peak_flops / 1e9:,.0f} GFLOP/s per process"
            )
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_interrupt)
        started = time.perf_counter()
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not self.progress,
            unit="step",
            dynamic_ncols=True,
        )
        try:
            t_last, positions_last = time.perf_counter(), self.positions
            while self.step < cfg.steps and not self._stopping():
                self.train_step()
                bar.update(1)
                log = self.step % cfg.log_interval == 0 or self.step == cfg.steps
                evaluate = self.step % cfg.eval_interval == 0 or self.step == cfg.steps
                checkpoint = self.step % cfg.ckpt_interval == 0 or self.step == cfg.steps
                if log or evaluate or checkpoint:
                    self._settle(self.step)
                loss = self.last_loss
                if log:
                    now = time.perf_counter()
                    # every rank trains on as many rows; the padding of whole examples varies
                    rate = (self.positions - positions_last) * self.world.size / (now - t_last)
                    t_last, positions_last = now, self.positions
                    mfu = rate / self.world.size * self.flops_per_token / self.peak_flops
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}", mfu=f"{mfu:.1%}")
                    self._log(
                        {
                            "step": self.step,
                            "loss": loss,
                            "lr": cfg.lr_at(self.step - 1),
                            "tokens_per_sec": rate,
                            "mfu": mfu,
                        }
                    )
                if evaluate:
                    self.last_val_loss = self.evaluate()
                    record = {"step": self.step, "val_loss": self.last_val_loss}
                    line = f"step {self.step}: val loss {self.last_val_loss:.4f}"
                    if self.preference is None:  # a DPO loss is no cross-entropy
                        record["val_ppl"] = math.exp(self.last_val_loss)
                        line += f", perplexity {record['val_ppl']:.2f}"
                    else:
                        record |= self.val_rewards
                        line += (
                            f", reward accuracy {self.val_rewards['val_reward_accuracy']:.0%}, "
                            f"margin {self.val_rewards['val_reward_margin']:.3f}"
                        )
                    self._log(record)
                    if self.world.is_main:
                        bar.write(line)
                        plot_losses(self.out)
                if checkpoint:
                    self.save()
                    self._saved_step = self.step
                if on_step is not None:
                    on_step(self)
            if self._saved_step != self.step:  # stopped early: keep what was done
                self._settle(self.step)
                self.save()
                if self.world.is_main:
                    bar.write(f"stopped at step {self.step}; continue with --resume")
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous)
        # the others wait for rank 0's last checkpoint, so a finished run's folder is complete
        barrier(self.world)
        return TrainResult(self.out, self.step, self.last_val_loss, time.perf_counter() - started)

    def _on_interrupt(self, signum, frame) -> None:
        if self._stop_requested:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        self._stop_requested = True


def plot_losses(out: Path) -> None:
    """Draw ``loss.png`` from ``metrics.jsonl``: training loss and validation loss by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=False), label="train", alpha=0.7)
    if val:
        ax.plot(*zip(*val, strict=False), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out / "loss.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

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
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from arlm.atomic import atomic_path
from arlm.config import PRESETS, ModelConfig, option
from arlm.formats.checkpoint import (
    CheckpointError,
    load_model,
    read_json,
    read_tensors,
    recover,
    save_model,
    tensors_to_bytes,
)
from arlm.model.transformer import Transformer
from arlm.tokenizer import Tokenizer
from arlm.train.data import Shards, default_cache_dir, get_batch
from arlm.train.prepare import load_or_prepare
from arlm.validate import check_int

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


@dataclass
class TrainConfig:
    """Everything a run needs; saved in the run folder so ``resume`` needs only the folder."""

    corpus: str = option(
        "builtin", help="'builtin', a text file, a folder of .txt/.md files or a glob"
    )
    preset: str = option("small", help=f"model size, one of {', '.join(sorted(PRESETS))}")
    out: str = option("runs/small", help="run folder")
    steps: int = option(300, help="optimizer steps to train to")  # small: ~5 min on 2 cores
    batch_size: int = option(16, help="sequences per micro-batch")
    block_size: int | None = option(None, help="context length (default: the preset's)")
    grad_accum: int = option(1, help="micro-batches per optimizer step")
    lr: float = option(2e-3, help="peak learning rate")
    min_lr: float | None = option(None, help="learning rate at the last step (default: lr / 10)")
    warmup_steps: int = option(30, help="linear warm-up steps")
    weight_decay: float = option(0.1, help="AdamW weight decay (not on norms and biases)")
    grad_clip: float = option(1.0, help="gradient norm clip")
    beta1: float = option(0.9, help="AdamW beta1")
    beta2: float = option(0.95, help="AdamW beta2")
    dropout: float = option(0.0, help="dropout probability")
    vocab_size: int | None = option(None, help="tokenizer vocabulary (default: the preset's)")
    eval_interval: int = option(50, help="steps between evaluations")
    eval_iters: int = option(20, help="batches per evaluation")
    log_interval: int = option(10, help="steps between log lines")
    ckpt_interval: int = option(100, help="steps between checkpoints")
    seed: int = option(1337, help="seed of the model's initialization and the batches")
    device: str = option("cpu", help="cpu, cuda, cuda:1, ...")
    # off by default on CPU, where it is rarely faster
    bf16: bool = option(False, help="bfloat16 autocast")
    cache_dir: str | None = option(
        None, help="where encoded corpora are cached (default: ~/.cache/arlm)"
    )

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
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
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size={self.block_size} must be at least 2")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")

    def model_config(self, vocab_size: int) -> ModelConfig:
        overrides = {"vocab_size": vocab_size, "dropout": self.dropout}
        if self.block_size is not None:
            overrides["block_size"] = self.block_size
        return ModelConfig.preset(self.preset, **overrides)

    def lr_at(self, step: int) -> float:
        """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at the last step."""
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (self.lr - min_lr)


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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


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
    optimizer.load_state_dict({"state": state, "param_groups": groups})


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
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.out = Path(cfg.out)
        if resume:
            cfg = self._resumed_config(cfg)
        elif (self.out / STATE_JSON).exists():
            raise ValueError(
                f"{self.out} already holds a training run; pass --resume to continue it "
                "or choose another --out"
            )
        self.cfg = cfg
        self.progress = progress
        self.device = torch.device(cfg.device)
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        torch.manual_seed(cfg.seed)
        self.shards: Shards = load_or_prepare(
            cfg.corpus,
            self.cache_dir,
            vocab_size=cfg.vocab_size or PRESETS[cfg.preset]["vocab_size"],
            tokenizer=self._tokenizer(),
            progress=self.progress,
        )
        self.tokenizer = self.shards.tokenizer
        self.model = Transformer(cfg.model_config(self.tokenizer.vocab_size)).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg)
        self.batch_generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.last_val_loss = float("nan")
        self._stop_requested = False
        if resume:
            self._load_state()
        self._saved_step = self.step

    def _resumed_config(self, cfg: TrainConfig) -> TrainConfig:
        # a resumed run keeps its saved settings, except where it lives and how long it runs
        return dataclasses.replace(saved_train_config(self.out), out=cfg.out, steps=cfg.steps)

    def _tokenizer(self) -> Tokenizer | None:
        """A resumed run's own tokenizer; None for a new run, which takes its corpus's."""
        if (self.out / "tokenizer.json").is_file() and (self.out / STATE_JSON).is_file():
            return Tokenizer.from_file(self.out / "tokenizer.json")
        return None

    # --- state -----------------------------------------------------------------------------

    def save(self) -> None:
        """Write the checkpoint and the training state as one atomic unit."""
        opt_tensors, opt_json = _optimizer_tensors(self.optimizer)
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
            "train_config": dataclasses.asdict(self.cfg),
            **opt_json,
        }
        save_model(
            self.out,
            self.model,
            self.tokenizer,
            extra_files={
                STATE_TENSORS: tensors_to_bytes(tensors),
                STATE_JSON: json.dumps(state, indent=2).encode(),
            },
        )

    def _load_state(self) -> None:
        model, _ = load_model(self.out, device=self.device)
        self.model.load_state_dict(model.state_dict())
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
        if path.is_file():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln)["step"] <= self.step]
            path.write_text("".join(ln + "\n" for ln in kept))

    # --- the loop --------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop_requested = True

    def _autocast(self):
        enabled = self.cfg.bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over ``eval_iters`` batches (the same batches every time)."""
        self.model.eval()
        generator = torch.Generator().manual_seed(self.cfg.seed + 1)
        block = self.model.config.block_size
        block = min(block, len(self.shards.val) - 1)
        losses = []
        for _ in range(self.cfg.eval_iters):
            x, y = get_batch(self.shards.val, self.cfg.batch_size, block, generator, self.device)
            with self._autocast():
                _, loss = self.model(x, y)
            losses.append(loss.item())
        self.model.train()
        return sum(losses) / len(losses)

    def _log(self, record: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def train_step(self) -> float:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        total = 0.0
        for _ in range(cfg.grad_accum):
            x, y = get_batch(
                self.shards.train,
                cfg.batch_size,
                self.model.config.block_size,
                self.batch_generator,
                self.device,
            )
            with self._autocast():
                _, loss = self.model(x, y)
            (loss / cfg.grad_accum).backward()
            total += loss.item() / cfg.grad_accum
        if not math.isfinite(total):
            raise TrainingError(
                f"the loss became {total} at step {self.step + 1}; the last good checkpoint is "
                f"kept in {self.out} (step {self._saved_step}). Lower --lr and resume."
            )
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return total

    def fit(self, on_step: Callable[[Trainer], None] | None = None) -> TrainResult:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.model.config.block_size
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
            t_last, step_last = time.perf_counter(), self.step
            while self.step < cfg.steps and not self._stop_requested:
                loss = self.train_step()
                bar.update(1)
                if self.step % cfg.log_interval == 0 or self.step == cfg.steps:
                    now = time.perf_counter()
                    rate = (self.step - step_last) * tokens_per_step / (now - t_last)
                    t_last, step_last = now, self.step
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
                    self._log(
                        {
                            "step": self.step,
                            "loss": loss,
                            "lr": cfg.lr_at(self.step - 1),
                            "tokens_per_sec": rate,
                        }
                    )
                if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                    self.last_val_loss = self.evaluate()
                    self._log(
                        {
                            "step": self.step,
                            "val_loss": self.last_val_loss,
                            "val_ppl": math.exp(self.last_val_loss),
                        }
                    )
                    bar.write(
                        f"step {self.step}: val loss {self.last_val_loss:.4f}, "
                        f"perplexity {math.exp(self.last_val_loss):.2f}"
                    )
                    plot_losses(self.out)
                if self.step % cfg.ckpt_interval == 0 or self.step == cfg.steps:
                    self.save()
                    self._saved_step = self.step
                if on_step is not None:
                    on_step(self)
            if self._saved_step != self.step:  # stopped early: keep what was done
                self.save()
                bar.write(f"stopped at step {self.step}; continue with --resume")
        finally:
            bar.close()
            signal.signal(signal.SIGINT, previous)
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

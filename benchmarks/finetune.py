"""Fine-tuning a Hugging Face model: arlm's trainer (``arlm train --init-from``, whole and with
``--lora-rank``) beside transformers with a plain AdamW loop and PEFT's LoRA on it.

The model: a random-weight Llama saved by transformers (``--shape``; the default ``llama-30m``
is 8 layers x 512 wide, 8 heads, 4 key/value heads, MLP 1,536, a 4,096-id vocabulary trained
on the built-in corpus), float32, dropout 0. All four sides read that folder and train on
windows of the same prepared corpus (``--block`` tokens, ``--batch`` windows a step):

- arlm full: ``Trainer.train_step`` with ``init_from`` (every weight trains, fused AdamW, the
  chunked loss), as ``arlm train --init-from`` runs it;
- transformers full: ``AutoModelForCausalLM`` (SDPA attention), ``torch.optim.AdamW``,
  ``model(input_ids=x, labels=x)``, backward, step;
- arlm LoRA: the same trainer with ``lora_rank`` (rank ``--rank``, alpha 2 x rank, on every
  attention and MLP projection: all-linear);
- PEFT LoRA: ``peft.get_peft_model`` with the same rank, alpha and ``target_modules="all-linear"``
  on transformers' model, AdamW over its trainable parameters;
- arlm QLoRA: arlm LoRA with ``quantize="int4"`` (``arlm train --quantize int4``): the frozen
  layers int4 (groups of 32 inputs, a bfloat16 scale and minimum each: 5 bits a weight), the
  output head float;
- PEFT QLoRA: PEFT's LoRA on transformers' model loaded with bitsandbytes' ``load_in_4bit``
  (NF4, blocks of 64 with a float32 absmax: 4.5 bits a weight, float32 compute) and
  ``prepare_model_for_kbit_training`` without gradient checkpointing (arlm runs none here).
  Skipped, saying so, where bitsandbytes is not installed (``pip install bitsandbytes``; its
  CPU path is torch code, no download needed).

Each side runs in its own worker process (its peak memory is its own), in turns, ``--steps``
steps per turn for ``--rounds`` rounds after ``--warmup`` steps, one side at a time on every
core. Per side: median ms/step, tokens/s, trainable parameters, the worker's peak RSS above what
it held before loading the model and its RSS above that after the steps, freed memory given back
to the system first (``malloc_trim``): what training holds (both quantized sides read the float
model first, so their peaks include it), and for arlm the
size of the checkpoint it writes (the whole model, or the adapter). Ratios: transformers' median
step time over arlm's, PEFT's over arlm's for LoRA and QLoRA, and what QLoRA saves arlm.

Run: ``python benchmarks/finetune.py`` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# benchmarks/train.py, beside this script: its workers' step loop and turn-taking
from train import current_rss_mb, peak_rss_mb, serve_steps, take_turns

OUT = Path(__file__).parent / "out"
SHAPES = {
    "llama-30m": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1536,
        vocab_size=4096,
    ),
    "llama-tiny": dict(  # a quick check that the script runs
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=1024,
    ),
}
SIDES = ("arlm full", "transformers full", "arlm LoRA", "PEFT LoRA", "arlm QLoRA", "PEFT QLoRA")
LR = 1e-4


def make_model(folder: Path, shape: dict, block: int) -> None:
    """A random-weight Llama folder as transformers saves it, with a tokenizer of the built-in
    corpus."""
    import torch
    import transformers

    from arlm.tokenizer import EOT, Tokenizer
    from arlm.train.corpus import builtin_documents

    tokenizer = Tokenizer.train(builtin_documents(), vocab_size=shape["vocab_size"])
    eot = tokenizer.token_to_id(EOT)
    config = transformers.LlamaConfig(
        **shape, max_position_embeddings=max(block, 512), bos_token_id=eot, eos_token_id=eot
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT})
    )


@dataclass
class Job:
    side: str
    model: str
    shards: str
    workdir: str
    block: int
    batch: int
    rank: int
    threads: int


def _arlm_stepper(job: Job):
    from arlm.train import TrainConfig, Trainer

    lora = {"lora_rank": job.rank} if "LoRA" in job.side else {}
    if job.side == "arlm QLoRA":
        lora["quantize"] = "int4"
    cfg = TrainConfig(
        init_from=job.model,
        corpus=job.shards,
        out=str(Path(job.workdir) / job.side.replace(" ", "-")),
        steps=10**9,  # never reached: the parent decides how many steps run
        batch_size=job.batch,
        block_size=job.block,
        lr=LR,
        warmup_steps=0,
        **lora,
    )
    trainer = Trainer(cfg, progress=False)
    trainer.model.train()

    def saved_mb() -> float:
        trainer.save()
        files = [p for p in trainer.out.iterdir() if not p.name.startswith("train_state")]
        return sum(p.stat().st_size for p in files) / 2**20

    return trainer.train_step, trainer.model, saved_mb


def _hf_stepper(job: Job):
    import torch
    import transformers

    from arlm.train.data import get_batch, open_shards

    shards = open_shards(Path(job.shards))
    quantized = {}
    if job.side == "PEFT QLoRA":
        quantized["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
        quantized["device_map"] = "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        job.model, dtype=torch.float32, **quantized
    )
    if "LoRA" in job.side:
        import peft

        if quantized:
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)

        lora = peft.LoraConfig(
            r=job.rank, lora_alpha=2 * job.rank, target_modules="all-linear", task_type="CAUSAL_LM"
        )
        model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        x, _ = get_batch(shards.train, job.batch, job.block, generator)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return step, model, None


def worker(job: Job, conn) -> None:
    """Builds one side, then runs ``n`` steps whenever the parent asks, returning their times."""
    import torch

    torch.set_num_threads(job.threads)
    baseline = current_rss_mb()
    arlm = job.side.startswith("arlm")
    step, model, saved_mb = (_arlm_stepper if arlm else _hf_stepper)(job)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    conn.send({"trainable": trainable})
    serve_steps(step, conn)
    # memory freed since loading (a quantized side's float weights) back to the system, so
    # that the RSS counts what is held, not what malloc keeps for reuse
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    held = current_rss_mb() - baseline
    saved = saved_mb() if saved_mb else None
    conn.send({"peak_rss_mb": peak_rss_mb() - baseline, "held_mb": held, "saved_mb": saved})


def compare(args, model: Path, shards: Path, workdir: Path) -> dict:
    sides = list(SIDES)
    if importlib.util.find_spec("bitsandbytes") is None:
        sides.remove("PEFT QLoRA")
        print("PEFT QLoRA skipped: bitsandbytes is not installed (pip install bitsandbytes)")
    jobs = {
        side: Job(
            side,
            str(model),
            str(shards),
            str(workdir),
            args.block,
            args.batch,
            args.rank,
            args.threads,
        )  # fmt: skip
        for side in sides
    }
    times, info = take_turns(worker, jobs, args)
    tokens = args.batch * args.block
    rows = {}
    for side in sides:
        median = statistics.median(times[side])
        rows[side] = {
            "ms_per_step": median * 1e3,
            "tokens_per_s": tokens / median,
            **info[side],
        }

    def ratio(top: str, bottom: str, key: str = "ms_per_step") -> float | None:
        if top not in rows or bottom not in rows:
            return None
        return rows[top][key] / rows[bottom][key]

    ratios = {
        "full: transformers / arlm step time": ratio("transformers full", "arlm full"),
        "LoRA: PEFT / arlm step time": ratio("PEFT LoRA", "arlm LoRA"),
        "QLoRA: PEFT / arlm step time": ratio("PEFT QLoRA", "arlm QLoRA"),
        "arlm: full / LoRA step time": ratio("arlm full", "arlm LoRA"),
        "arlm: QLoRA / LoRA step time": ratio("arlm QLoRA", "arlm LoRA"),
        "arlm: QLoRA / LoRA memory held": ratio("arlm QLoRA", "arlm LoRA", "held_mb"),
        "QLoRA: PEFT / arlm memory held": ratio("PEFT QLoRA", "arlm QLoRA", "held_mb"),
    }
    ratios = {name: value for name, value in ratios.items() if value is not None}
    print(f"\n{args.shape}, windows of {args.block} x {args.batch}, LoRA rank {args.rank}, "
          f"medians of {args.rounds} x {args.steps} steps")  # fmt: skip
    print(f"{'side':<18} {'ms/step':>9} {'tokens/s':>9} {'trainable':>11} {'peak MB':>8} "
          f"{'held MB':>8} {'saved MB':>9}")  # fmt: skip
    for side, r in rows.items():
        saved = "" if r["saved_mb"] is None else f"{r['saved_mb']:.2f}"
        print(
            f"{side:<18} {r['ms_per_step']:>9.1f} {r['tokens_per_s']:>9,.0f} "
            f"{r['trainable']:>11,} {r['peak_rss_mb']:>8.0f} {r['held_mb']:>8.0f} {saved:>9}"
        )
    for name, value in ratios.items():
        print(f"  {name}: {value:.2f}x")
    return {"rows": rows, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama-30m", choices=sorted(SHAPES))
    parser.add_argument("--block", type=int, default=256, help="tokens per window")
    parser.add_argument("--batch", type=int, default=4, help="windows per step")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--steps", type=int, default=3, help="steps per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    from arlm.formats.read import read_model
    from arlm.train.prepare import load_or_prepare

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = workdir / "model"
        make_model(model, SHAPES[args.shape], args.block)
        tokenizer = read_model(model)[1]  # the tokenizer arlm reads from the folder
        shards = load_or_prepare("builtin", workdir / "cache", tokenizer=tokenizer, progress=False)
        result = compare(args, model, shards.directory, workdir)
    OUT.mkdir(exist_ok=True)
    path = OUT / "finetune.json"
    path.write_text(json.dumps({"args": vars(args), **result}, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

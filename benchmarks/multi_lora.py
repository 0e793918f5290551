"""Serving many LoRA adapters at once: arlm's engine with adapters in slots beside the base model
(each request of a batch with its own, or none) beside vLLM's CPU build doing the same, and
PEFT's mixed-adapter batch on transformers, on the same model, adapters and requests.

The model: the random-weight Llama of ``benchmarks/finetune.py`` (``--shape``; the default
``llama-30m`` is 8 layers x 512 wide, 8 heads, 4 key/value heads, MLP 1,536, a 4,096-id
vocabulary), saved by transformers, float32. ``--adapters`` PEFT LoRA adapters of it (rank
``--rank``, alpha 2 x rank, on q/k/v/o and gate/up/down: all-linear), each made by
``peft.get_peft_model`` under its own seed and written by ``save_pretrained``, with
``base_model_name_or_path`` the base folder. PEFT starts ``lora_B`` at zero (an adapter that
changes nothing), so ``lora_B`` is drawn from N(0, 0.02), the base weights' own spread: each
adapter's update is about a fifth of its projection's output and really changes the tokens.

Requests: ``--requests`` prompts of 64 to 128 random token ids (seeded), ``--max-tokens`` new
tokens each, greedy, end-of-text ignored. In the mixed workload request i uses adapter
i % (K + 1), the last of those K + 1 being the base model (so K/(K+1) of the requests run with an
adapter, the others without); the base-only workload runs every request on the base model.

Sides, each timed over the same requests, only the generate call after a warm-up (which runs
every adapter once), the median of ``--rounds``:

- arlm base: ``arlm.load(base)``, ``lm.generate(prompts)``;
- arlm LoRA: ``arlm.load(base, lora_modules={...})``, ``lm.generate(prompts, adapter=[...])``,
  the mixed workload, a slot per adapter;
- arlm LoRA S slots (with ``--max-loras S`` below K): the same with ``max_loras=S``, the
  adapters taking turns in the slots (``arlm.model.adapter_store``). The arlm sides are loaded
  in this process and run in alternating rounds, so drift in the machine's speed falls on all
  alike;
- vLLM base and vLLM LoRA: vLLM's CPU build (``enforce_eager``, in its own virtual environment:
  ``benchmarks/peers/vllm_offline.py``, how to install it is in its docstring), each in a
  process of its own; LoRA with ``enable_lora=True, max_loras=S`` (default K),
  ``max_lora_rank=rank`` and a ``LoRARequest`` per request. Skipped, saying so, when that
  environment is missing. vLLM 0.32's CPU build serves LoRA (its ``PunicaWrapperCPU``, torch
  ops; LoRA turns its compilation off, which ``enforce_eager`` does anyway);
- transformers base and PEFT LoRA: ``PeftModel`` with every adapter loaded (``load_adapter``),
  ``model.generate(..., adapter_names=[...])``, PEFT's mixed-adapter batch, and the same model
  under ``disable_adapter()`` for the base. ``generate`` is one static batch: all requests run
  as one left-padded batch (no ``max_num_seqs``, no continuous batching), so this column is a
  different kind of serving, listed for scale. ``--no-peft`` skips them.

peft writes the adapters every side loads, so without it the script stops, saying so.

arlm and vLLM take the same ``--max-num-seqs`` (16), float32, prefix caching off (the rounds
repeat the prompts). Threads: arlm and transformers use torch's default (every core); vLLM's
CPU build picks its own binding (on 2 cores: 1 compute thread, the other core for its busy
engine process; see ``vllm_offline.py``), as in ``benchmarks/engine.py``.

It prints a table (output tokens/s, the median round's seconds, each round's, and the seconds
arlm and vLLM took to load), arlm's engine steps per round (and with fewer slots, the slot
writes per round and what one costs, every adapter then placed in turn) and the ratios: arlm
LoRA over vLLM LoRA, arlm base over vLLM base, and each engine's LoRA over its base (what
serving adapters costs). Correctness, in the same run: how many requests give the same greedy tokens
in arlm's mixed batch as in vLLM's (and PEFT's), and as arlm's base-only run for the requests
on the base; how many adapter requests differ from the base's tokens (that adapters apply).
Random models have near-ties, so these are counts, not assertions. vLLM 0.32's CPU build gives
a base request batched beside LoRA requests the last slot's adapter (its torch LoRA ops gather
``weights[-1]`` for the no-LoRA index -1; vllm-project/vllm pull request #48421, open), so its
mixed batch's base requests are compared with its base-only run too, and the script says so
when they differ.

``--written-by arlm``: the adapters are written by arlm (``add_lora``, ``adapter_files``: what
``arlm train --lora-rank`` saves) instead of PEFT, so the token checks show vLLM and PEFT
reading arlm's adapters.

Run: ``python benchmarks/multi_lora.py`` (about 4 minutes on 2 cores with vLLM installed);
``--shape llama-tiny`` for a quick check that it runs; ``--vllm-python PATH`` for another vLLM
environment. Writes ``benchmarks/out/multi_lora.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import arlm

sys.path.insert(0, str(Path(__file__).parent / "peers"))  # the peers are scripts, not a package
from engine import DEFAULT_VLLM  # noqa: E402
from finetune import SHAPES, make_model  # noqa: E402

OUT = Path(__file__).parent / "out"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = (64, 128)  # prompt lengths, inclusive
POSITIONS = 512  # the model's max_position_embeddings


def build(
    root: Path, shape: dict, adapters: int, rank: int, written_by: str = "peft"
) -> tuple[Path, dict[str, Path]]:
    """The base model folder and ``adapters`` LoRA adapter folders of it in PEFT's format, by
    name, written by PEFT or (``written_by`` "arlm") by arlm's trainer's writer."""
    folder = root / "model"
    make_model(folder, shape, POSITIONS)
    if written_by == "arlm":
        return folder, _arlm_adapters(root, folder, adapters, rank)
    try:
        import peft
        import transformers
    except ImportError:
        raise SystemExit(
            "peft is not installed: it writes the LoRA adapters every side loads (pip install peft)"
        ) from None
    paths = {}
    for k in range(adapters):
        torch.manual_seed(1000 + k)
        base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        config = peft.LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=TARGETS,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(base, config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.02)
        name = f"lora{k}"
        paths[name] = root / name
        model.save_pretrained(paths[name])
        config_path = paths[name] / "adapter_config.json"
        saved = json.loads(config_path.read_text())
        saved["base_model_name_or_path"] = str(folder)
        config_path.write_text(json.dumps(saved, indent=2))
    return folder, paths


def _arlm_adapters(root: Path, folder: Path, adapters: int, rank: int) -> dict[str, Path]:
    """``adapters`` adapters of ``folder`` as ``arlm train --lora-rank`` writes them: arlm's
    ``add_lora`` on the model arlm reads, ``lora_B`` drawn from N(0, 0.02) as for PEFT's."""
    from arlm.formats.hf import load_hf
    from arlm.formats.peft import Adapter, adapter_files, lora_targets
    from arlm.model.lora import LoRAConfig, add_lora, lora_modules

    paths = {}
    for k in range(adapters):
        torch.manual_seed(1000 + k)
        model, _ = load_hf(folder)
        lora = LoRAConfig(rank=rank, alpha=2 * rank)
        add_lora(model, lora, lora_targets(model, tuple(TARGETS)))
        with torch.no_grad():
            for wrapper in lora_modules(model).values():
                for b in wrapper.lora_B:
                    b.normal_(0.0, 0.02)
        paths[f"lora{k}"] = root / f"lora{k}"
        paths[f"lora{k}"].mkdir()
        for name, data in adapter_files(model, Adapter(lora, tuple(TARGETS), str(folder))).items():
            (paths[f"lora{k}"] / name).write_bytes(data)
    return paths


def make_requests(
    vocab: int, n: int, names: list[str], max_tokens: int, seed: int = 0
) -> list[dict]:
    """``n`` greedy requests of random prompts; request i names adapter i % (K + 1), the last
    of those being None (the base model)."""
    rng = random.Random(seed)
    slots = [*names, None]
    return [
        {
            "prompt_token_ids": [rng.randrange(vocab) for _ in range(rng.randint(*PROMPT))],
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": None,
            "lora": slots[i % len(slots)],
        }
        for i in range(n)
    ]


def result(outputs: list[list[int]], times: list[float], **extra) -> dict:
    seconds = statistics.median(times)
    tokens = sum(len(o) for o in outputs)
    return {
        "seconds": seconds,
        "round_seconds": times,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / seconds,
        "outputs": outputs,
        **extra,
    }


def run_arlm(folder: Path, adapters: dict[str, Path], requests: list[dict], args) -> dict:
    """arlm base (every request on the base) and arlm LoRA (the mixed workload), loaded side by
    side and run in alternating rounds."""
    common = dict(
        dtype="float32",  # "auto" may pick bfloat16 on a CPU with AVX512-BF16
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=False,
        kv_cache_memory_gib=1.0,
    )
    prompts = [r["prompt_token_ids"] for r in requests]
    names = [r["lora"] for r in requests]
    loads = {}
    start = time.perf_counter()
    base = arlm.load(folder, **common)
    loads["arlm base"] = time.perf_counter() - start
    start = time.perf_counter()
    modules = {k: str(v) for k, v in adapters.items()}
    lora = arlm.load(folder, lora_modules=modules, **common)
    loads["arlm LoRA"] = time.perf_counter() - start
    sides = {"arlm base": (base, None), "arlm LoRA": (lora, names)}
    if args.max_loras < len(adapters):  # the same adapters taking turns in fewer slots
        side = f"arlm LoRA {args.max_loras} slots"
        start = time.perf_counter()
        fewer = arlm.load(folder, lora_modules=modules, max_loras=args.max_loras, **common)
        loads[side] = time.perf_counter() - start
        sides[side] = (fewer, names)

    settings = dict(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, progress=False)
    warm = [list(range(1, 17))] * (len(adapters) + 1)
    warm_settings = dict(settings, max_tokens=4)
    for lm, adapter in sides.values():
        lm.generate(warm, adapter=adapter and [*adapters, None], **warm_settings)
    times = {side: [] for side in sides}
    outputs, steps, writes = {}, {}, {}
    for _ in range(args.rounds):
        for side, (lm, adapter) in sides.items():
            before = lm.engine.stats()
            start = time.perf_counter()
            completions = lm.generate(prompts, adapter=adapter, **settings)
            times[side].append(time.perf_counter() - start)
            outputs[side] = [c.token_ids for c in completions]
            after = lm.engine.stats()
            steps[side] = after["steps"] - before["steps"]
            writes[side] = after.get("lora_slot_writes", 0) - before.get("lora_slot_writes", 0)
    results = {
        side: result(
            outputs[side],
            times[side],
            load_seconds=loads[side],
            steps=steps[side],
            slot_writes=writes[side],
        )
        for side in sides
    }
    fewer = f"arlm LoRA {args.max_loras} slots"
    if fewer in sides:  # what one slot write costs: every adapter placed in turn
        store = sides[fewer][0].adapters
        first = store.slot_writes
        start = time.perf_counter()
        for name in adapters:
            store.place(name, pinned=())
        seconds = time.perf_counter() - start
        results[fewer]["ms_per_slot_write"] = 1000 * seconds / max(store.slot_writes - first, 1)
    return results


def run_vllm(
    python: str, folder: Path, adapters: dict[str, Path] | None, requests: list[dict], args
) -> dict | str:
    """vLLM's CPU build over ``requests`` in a process of its own: with ``adapters``, LoRA
    enabled and each request's named adapter; without, the base model and no LoRA."""
    path = Path(args.workdir) / ("requests-lora.json" if adapters else "requests-base.json")
    path.write_text(json.dumps(requests))
    script = Path(__file__).parent / "peers" / "vllm_offline.py"
    cmd = [python, str(script), "--model", str(folder), "--requests", str(path)]
    cmd += ["--max-num-seqs", str(args.max_num_seqs), "--dtype", "float32"]
    cmd += ["--rounds", str(args.rounds)]
    if adapters:
        for name, adapter in adapters.items():
            cmd += ["--lora", f"{name}={adapter}"]
        cmd += ["--max-lora-rank", str(args.rank), "--max-loras", str(args.max_loras)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        errors = [line for line in run.stderr.splitlines() if "Error" in line] or [run.stderr]
        return f"vLLM failed (exit {run.returncode}): {errors[-1].strip()[-400:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def run_peft(folder: Path, adapters: dict[str, Path], requests: list[dict], args) -> dict:
    """transformers base and PEFT's mixed-adapter batch: all requests as one left-padded
    ``generate``, in alternating rounds."""
    import peft  # build() has checked that it is installed
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    items = list(adapters.items())
    model = peft.PeftModel.from_pretrained(model, str(items[0][1]), adapter_name=items[0][0])
    for name, path in items[1:]:
        model.load_adapter(str(path), adapter_name=name)
    model.eval()

    pad = 0
    width = max(len(r["prompt_token_ids"]) for r in requests)
    ids = torch.full((len(requests), width), pad)
    mask = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        prompt = r["prompt_token_ids"]
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    names = [r["lora"] or "__base__" for r in requests]
    settings = dict(
        max_new_tokens=args.max_tokens,
        min_new_tokens=args.max_tokens,  # end-of-text ignored: every row gets all its tokens
        do_sample=False,
        pad_token_id=pad,
    )

    def generate(lora: bool, rows: slice = slice(None), **overrides) -> list[list[int]]:
        kwargs = dict(settings, **overrides)
        with torch.inference_mode():
            if lora:
                out = model.generate(
                    input_ids=ids[rows], attention_mask=mask[rows], adapter_names=names[rows],
                    **kwargs,
                )  # fmt: skip
            else:
                with model.disable_adapter():
                    out = model.generate(input_ids=ids[rows], attention_mask=mask[rows], **kwargs)
        return out[:, width:].tolist()

    warm = slice(0, len(adapters) + 1)  # one request of each adapter and one of the base
    generate(False, warm, max_new_tokens=4, min_new_tokens=4)
    generate(True, warm, max_new_tokens=4, min_new_tokens=4)
    sides = {"transformers base": False, "PEFT LoRA": True}
    times = {side: [] for side in sides}
    outputs = {}
    for _ in range(args.rounds):
        for side, lora in sides.items():
            start = time.perf_counter()
            outputs[side] = generate(lora)
            times[side].append(time.perf_counter() - start)
    return {side: result(outputs[side], times[side]) for side in sides}


def same(a: list[list[int]], b: list[list[int]], rows: list[int]) -> str:
    """How many of ``rows`` give identical tokens in ``a`` and ``b``, and the mean share of
    tokens before their first difference."""
    prefix = []
    for i in rows:
        n = next((j for j, (x, y) in enumerate(zip(a[i], b[i], strict=False)) if x != y), len(a[i]))
        prefix.append(n / max(len(a[i]), 1))
    identical = sum(a[i] == b[i] for i in rows)
    share = statistics.mean(prefix) if prefix else float("nan")
    return f"{identical}/{len(rows)} identical, {share:.0%} of tokens before the first difference"


def token_checks(
    results: dict, on_adapters: list[int], on_base: list[int], fewer: str
) -> dict[str, str]:
    """Prints and returns how the sides' greedy tokens agree: arlm's mixed batch against its
    base-only run, against the adapters taking turns in ``fewer`` slots, and against each
    peer's; each peer's against its own base-only run."""

    def outputs(side: str) -> list[list[int]] | None:
        r = results.get(side)
        return None if r is None or isinstance(r, str) else r["outputs"]

    every = sorted(on_adapters + on_base)
    arlm_lora, arlm_base = outputs("arlm LoRA"), outputs("arlm base")
    checks = [
        ("arlm mixed batch, base requests vs arlm base-only", arlm_lora, arlm_base, on_base),
        ("arlm mixed batch, adapter requests vs arlm base-only", arlm_lora, arlm_base, on_adapters),
        (f"{fewer} vs a slot each", outputs(fewer), arlm_lora, every),
    ]
    for peer, base in (("vLLM", "vLLM base"), ("PEFT", "transformers base")):
        peer_lora, peer_base = outputs(f"{peer} LoRA"), outputs(base)
        checks += [
            (f"arlm vs {peer}, mixed batch, adapter requests", arlm_lora, peer_lora, on_adapters),
            (f"arlm vs {peer}, mixed batch, base requests", arlm_lora, peer_lora, on_base),
            (f"arlm vs {peer}, base only", arlm_base, peer_base, every),
            (f"{peer} mixed batch, base requests vs its base-only", peer_lora, peer_base, on_base),
        ]
    agreement = {}
    for name, a, b, rows in checks:
        if a is not None and b is not None and rows:
            agreement[name] = same(a, b, rows)
            print(f"  {name}: {agreement[name]}")
    print("  (adapter requests vs base-only should differ: the adapters change the tokens)")
    vllm_lora, vllm_base = outputs("vLLM LoRA"), outputs("vLLM base")
    if vllm_lora and vllm_base and any(vllm_lora[i] != vllm_base[i] for i in on_base):
        print(
            "  vLLM's base requests in the mixed batch differ from its base-only run: its CPU\n"
            "  LoRA ops (vllm/lora/ops/torch_ops) gather weights[-1] for a no-LoRA token, the\n"
            "  last slot's adapter, where the GPU kernels skip the token (vllm-project/vllm\n"
            "  pull request #48421, open). The gather and einsum run for every row either way, so\n"
            "  its throughput stands; only its base requests' tokens are wrong."
        )
    return agreement


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-30m", choices=sorted(SHAPES))
    p.add_argument("--requests", type=int, default=32, help="requests in each run")
    p.add_argument("--adapters", type=int, default=4, help="LoRA adapters served (K)")
    p.add_argument("--rank", type=int, default=16, help="the adapters' LoRA rank")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each side (median)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--max-num-seqs", type=int, default=16, help="arlm's and vLLM's")
    p.add_argument("--vllm-python", default=os.environ.get("ARLM_VLLM_PYTHON", DEFAULT_VLLM))
    p.add_argument("--no-vllm", action="store_true", help="skip the vLLM columns")
    p.add_argument("--no-peft", action="store_true", help="skip the transformers/PEFT columns")
    p.add_argument(
        "--written-by",
        choices=["peft", "arlm"],
        default="peft",
        help="who writes the adapters every side loads: PEFT, or arlm as its trainer does "
        "(then the token checks show vLLM and PEFT reading arlm's adapters)",
    )
    p.add_argument(
        "--max-loras",
        type=int,
        help="slots of arlm's and vLLM's LoRA sides (default: one per adapter); fewer than "
        "--adapters adds an arlm side with that many, the adapters taking turns in them",
    )
    args = p.parse_args()
    if args.adapters < 1 or args.requests < 1 or args.rounds < 1:
        p.error("--adapters, --requests and --rounds must be at least 1")
    args.max_loras = args.max_loras or args.adapters
    if not 1 <= args.max_loras <= args.adapters:
        p.error("--max-loras must be between 1 and --adapters")

    began = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = tmp
        shape = SHAPES[args.shape]
        folder, adapters = build(Path(tmp), shape, args.adapters, args.rank, args.written_by)
        names = list(adapters)
        mixed = make_requests(shape["vocab_size"], args.requests, names, args.max_tokens)
        base_only = [dict(r, lora=None) for r in mixed]
        prompt_tokens = sum(len(r["prompt_token_ids"]) for r in mixed)
        on_adapters = [i for i, r in enumerate(mixed) if r["lora"] is not None]
        on_base = [i for i, r in enumerate(mixed) if r["lora"] is None]
        print(
            f"{args.shape}: {shape['num_hidden_layers']} layers x {shape['hidden_size']}, "
            f"vocab {shape['vocab_size']}, random weights, float32; {args.adapters} LoRA "
            f"adapters of rank {args.rank} on {', '.join(TARGETS)}, written by {args.written_by}"
        )
        print(
            f"{args.requests} requests ({len(on_adapters)} on adapters, {len(on_base)} on the "
            f"base in the mixed workload), {prompt_tokens} prompt tokens, {args.max_tokens} new "
            f"tokens each, greedy; max_num_seqs {args.max_num_seqs}; median of {args.rounds} "
            "rounds"
        )

        results: dict[str, dict | str] = {}
        results.update(run_arlm(folder, adapters, mixed, args))
        if args.no_peft:
            results["PEFT"] = "PEFT columns skipped (--no-peft)"
        else:
            results.update(run_peft(folder, adapters, mixed, args))
        if args.no_vllm:
            results["vLLM"] = "vLLM columns skipped (--no-vllm)"
        elif not Path(args.vllm_python).exists():
            results["vLLM"] = (
                f"vLLM columns skipped: no {args.vllm_python}; install it as "
                "benchmarks/peers/vllm_offline.py says, or pass --vllm-python"
            )
        else:
            results["vLLM base"] = run_vllm(args.vllm_python, folder, None, base_only, args)
            results["vLLM LoRA"] = run_vllm(args.vllm_python, folder, adapters, mixed, args)

    print()
    print(f"  {'side':<20}{'out tok/s':>10}{'median s':>10}{'rounds (s)':>24}{'load s':>8}")
    for side, r in results.items():
        if isinstance(r, str):
            continue
        rounds = " ".join(f"{t:.2f}" for t in r["round_seconds"])
        load = f"{r['load_seconds']:8.1f}" if "load_seconds" in r else ""
        print(f"  {side:<20}{r['output_tokens_per_s']:10.1f}{r['seconds']:10.2f}{rounds:>24}{load}")
    if "PEFT LoRA" in results:
        print("  (transformers base / PEFT LoRA: all requests as one left-padded static batch)")
    arlm_sides = [side for side, r in results.items() if "steps" in r]
    print(
        "  arlm engine steps per round: "
        + ", ".join(f"{results[s]['steps']} ({s})" for s in arlm_sides)
    )
    fewer = f"arlm LoRA {args.max_loras} slots"
    if fewer in results:
        r = results[fewer]
        print(
            f"  {fewer}: {r['slot_writes']} slot writes per round, "
            f"{r['ms_per_slot_write']:.1f} ms each"
        )
    for r in results.values():
        if isinstance(r, str):
            print(r)

    def rate(side: str) -> float | None:
        r = results.get(side)
        return None if r is None or isinstance(r, str) else r["output_tokens_per_s"]

    print("ratios (output tok/s):")
    ratios = {}
    # vLLM's LoRA side has --max-loras slots too
    for name, top, bottom in (
        ("arlm LoRA / vLLM LoRA", fewer if fewer in results else "arlm LoRA", "vLLM LoRA"),
        ("arlm base / vLLM base", "arlm base", "vLLM base"),
        ("arlm LoRA / arlm base (the adapters' cost)", "arlm LoRA", "arlm base"),
        (f"{fewer} / arlm LoRA (a slot each: the turns' cost)", fewer, "arlm LoRA"),
        ("vLLM LoRA / vLLM base (the adapters' cost)", "vLLM LoRA", "vLLM base"),
        ("PEFT LoRA / transformers base (the adapters' cost)", "PEFT LoRA", "transformers base"),
        ("arlm LoRA / PEFT LoRA", "arlm LoRA", "PEFT LoRA"),
    ):
        a, b = rate(top), rate(bottom)
        if a is not None and b is not None:
            ratios[name] = a / b
            print(f"  {name}: {a / b:.2f}x")

    print("greedy tokens:")
    agreement = token_checks(results, on_adapters, on_base, fewer)

    OUT.mkdir(exist_ok=True)
    path = OUT / "multi_lora.json"
    saved = {
        "args": {k: v for k, v in vars(args).items() if k != "workdir"},
        "results": {
            side: r if isinstance(r, str) else {k: v for k, v in r.items() if k != "outputs"}
            for side, r in results.items()
        },
        "ratios": ratios,
        "agreement": agreement,
    }
    path.write_text(json.dumps(saved, indent=2))
    print(f"wrote {path}; {time.perf_counter() - began:.0f} s in all", file=sys.stderr)


if __name__ == "__main__":
    main()

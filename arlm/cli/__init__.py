"""The ``arlm`` command: train, generate, score."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from arlm.config import INT4_GROUP_SIZES, QUANT_METHODS
from arlm.kv_cache import KV_DTYPES, CacheConfig
from arlm.loops import LoopDetectorConfig
from arlm.loops.bench import BenchConfig
from arlm.loops.probe import ProbeConfig
from arlm.loops.scan import UNITS
from arlm.sampling import SamplingParams
from arlm.train.trainer import TrainConfig, TrainingError

TRAIN_DEFAULTS = TrainConfig()
SAMPLING_DEFAULTS = SamplingParams()
CACHE_DEFAULTS = CacheConfig()
PROBE_DEFAULTS = ProbeConfig()
BENCH_DEFAULTS = BenchConfig()
LOOP_DETECTOR_FIELDS = [f.name for f in dataclasses.fields(LoopDetectorConfig)]


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an arlm checkpoint directory or a Hugging Face model folder")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="weights' dtype (default: float32)",
    )
    p.add_argument(
        "--quantize",
        choices=QUANT_METHODS,
        help="quantize the linear layers' weights as they load: int8 (a scale per output "
        "channel) or int4 (a scale and minimum per group of inputs); a quantized checkpoint "
        "needs no flag",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=32,
        help=f"with --quantize int4, inputs per group, one of {INT4_GROUP_SIZES} (default: 32)",
    )


def _model_kwargs(args: argparse.Namespace) -> dict:
    return {
        "device": args.device,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "group_size": args.group_size,
    }


def _add_cache_options(p: argparse.ArgumentParser) -> None:
    d = CACHE_DEFAULTS
    p.add_argument(
        "--kv-cache-dtype",
        default=d.dtype,
        choices=KV_DTYPES,
        help="KV cache storage; int8/int4 are quantized (default: auto, the model's dtype)",
    )
    p.add_argument(
        "--kv-block-size", type=int, help="a paged KV cache with blocks of N positions (e.g. 16)"
    )
    p.add_argument(
        "--kv-window",
        type=int,
        help="keep only the sink tokens and the last N positions: bounded memory, generation "
        "past the context (rotary models)",
    )
    p.add_argument(
        "--kv-sink-tokens",
        type=int,
        default=d.sink_tokens,
        help=f"with --kv-window, the first positions always kept (default: {d.sink_tokens})",
    )


def _cache_kwargs(args: argparse.Namespace) -> dict:
    return {
        "kv_cache_dtype": args.kv_cache_dtype,
        "kv_block_size": args.kv_block_size,
        "kv_window": args.kv_window,
        "kv_sink_tokens": args.kv_sink_tokens,
    }


def _add_sampling_options(p: argparse.ArgumentParser) -> None:
    d = SAMPLING_DEFAULTS
    p.add_argument("--max-tokens", type=int, help=f"tokens to generate (default: {d.max_tokens})")
    p.add_argument("--temperature", type=float, help=f"0 is greedy (default: {d.temperature})")
    p.add_argument(
        "--top-k", type=int, help=f"keep the k likeliest tokens, 0 = off (default: {d.top_k})"
    )
    p.add_argument("--top-p", type=float, help=f"nucleus sampling mass (default: {d.top_p})")
    p.add_argument(
        "--min-p", type=float, help=f"drop tokens below min-p x the top one (default: {d.min_p})"
    )
    p.add_argument("--stop", action="append", help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        default=None,
        help="keep generating past the end-of-text token",
    )
    p.add_argument(
        "--typical-p", type=float, help=f"typical sampling mass (default: {d.typical_p})"
    )
    p.add_argument(
        "--min-tokens", type=int, help=f"no stopping before N tokens (default: {d.min_tokens})"
    )
    p.add_argument(
        "--stop-token-id", dest="stop_token_ids", type=int, action="append", help="(repeatable)"
    )
    p.add_argument(
        "--logit-bias",
        type=_token_bias,
        action="append",
        metavar="ID=BIAS",
        help="add BIAS (-100..100) to token ID's logit (repeatable)",
    )
    p.add_argument(
        "--logprobs", type=int, metavar="N", help="print each token's logprob and N alternatives"
    )
    g = p.add_argument_group("repetition penalties")
    g.add_argument(
        "--repetition-penalty",
        type=float,
        help=f"CTRL's penalty on seen tokens, 1 = off (default: {d.repetition_penalty})",
    )
    g.add_argument(
        "--presence-penalty", type=float, help=f"OpenAI's (default: {d.presence_penalty})"
    )
    g.add_argument(
        "--frequency-penalty", type=float, help=f"OpenAI's (default: {d.frequency_penalty})"
    )
    g.add_argument(
        "--penalty-last-n",
        type=int,
        help=f"the penalties see the last N tokens, 0 = all (default: {d.penalty_last_n})",
    )
    g.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        help=f"ban repeating any N-gram, 0 = off (default: {d.no_repeat_ngram_size})",
    )
    g.add_argument(
        "--dry-multiplier",
        type=float,
        help=f"DRY's strength, 0 = off (default: {d.dry_multiplier})",
    )
    g.add_argument("--dry-base", type=float, help=f"(default: {d.dry_base})")
    g.add_argument("--dry-allowed-length", type=int, help=f"(default: {d.dry_allowed_length})")
    g.add_argument(
        "--dry-penalty-last-n", type=int, help=f"0 = all (default: {d.dry_penalty_last_n})"
    )
    g.add_argument(
        "--dry-sequence-breaker",
        dest="dry_sequence_breakers",
        action="append",
        help=f"replaces the defaults {d.dry_sequence_breakers!r} (repeatable)",
    )
    g = p.add_argument_group("loop detection")
    g.add_argument(
        "--loop-policy",
        choices=["stop", "break", "report"],
        help="stop at a loop, break it and go on, or report it (default: no detection)",
    )
    g.add_argument(
        "--max-loop-breaks", type=int, help=f"(default: {d.max_loop_breaks})", metavar="N"
    )
    _add_detector_options(g, LoopDetectorConfig())


def _add_detector_options(g, defaults: LoopDetectorConfig) -> None:
    for name in LOOP_DETECTOR_FIELDS:
        g.add_argument(
            f"--loop-{name.replace('_', '-')}",
            dest=f"loop_{name}",
            type=int,
            metavar="N",
            help=f"loop detector threshold (default: {getattr(defaults, name)})",
        )


def _detector_kwargs(args: argparse.Namespace) -> dict:
    return {
        name: getattr(args, f"loop_{name}")
        for name in LOOP_DETECTOR_FIELDS
        if getattr(args, f"loop_{name}", None) is not None
    }


def _token_bias(text: str) -> tuple[int, float]:
    token, sep, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ID=BIAS, e.g. 50256=-100") from None


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    names = [f.name for f in dataclasses.fields(SamplingParams)]
    kwargs = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if "logit_bias" in kwargs:
        kwargs["logit_bias"] = dict(kwargs["logit_bias"])
    detection = _detector_kwargs(args)
    if detection:
        kwargs["repetition_detection"] = detection
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arlm", description="A complete autoregressive language-model stack."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = TRAIN_DEFAULTS
    p = sub.add_parser(
        "train",
        help="train a model by teacher forcing",
        description="Train a model on a corpus; progress, eval and checkpoints go to --out.",
    )
    p.add_argument(
        "--corpus",
        help=f"'builtin', a text file, a folder of .txt/.md files or a glob (default: {d.corpus})",
    )
    p.add_argument("--preset", help=f"model size (default: {d.preset})")
    p.add_argument("--steps", type=int, help=f"optimizer steps to train to (default: {d.steps})")
    p.add_argument("--out", help=f"run folder (default: {d.out})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, help=f"(default: {d.seed})")
    p.add_argument("--batch-size", type=int, help=f"(default: {d.batch_size})")
    p.add_argument("--block-size", type=int, help="context length (default: the preset's)")
    p.add_argument(
        "--grad-accum", type=int, help=f"micro-batches per step (default: {d.grad_accum})"
    )
    p.add_argument("--lr", type=float, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--warmup-steps", type=int, help=f"(default: {d.warmup_steps})")
    p.add_argument("--vocab-size", type=int, help="tokenizer vocabulary (default: the preset's)")
    p.add_argument("--eval-interval", type=int, help=f"(default: {d.eval_interval})")
    p.add_argument("--ckpt-interval", type=int, help=f"(default: {d.ckpt_interval})")
    p.add_argument("--device", help=f"(default: {d.device})")
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    p.add_argument("--cache-dir", help="where encoded corpora are cached (default: ~/.cache/arlm)")
    p.add_argument("--sample", default="The", help="prompt for a sample after training")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("generate", help="generate text from a prompt (streams to the terminal)")
    _add_model_options(p)
    p.add_argument("prompt", help="the text to continue")
    _add_sampling_options(p)
    _add_cache_options(p)
    p.add_argument("--stats", action="store_true", help="print token counts and speeds")
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser("score", help="log-probability and perplexity of a text file")
    _add_model_options(p)
    p.add_argument("file", help="a UTF-8 text file ('-' for standard input)")
    p.add_argument("--per-token", action="store_true", help="print each token's log-probability")
    p.add_argument(
        "--chunk-size",
        type=int,
        help="feed N tokens per forward through the KV cache (to measure a cache kind's quality)",
    )
    _add_cache_options(p)
    p.set_defaults(run=cmd_score)

    p = sub.add_parser("export", help="write a model in another format")
    _add_model_options(p)
    p.add_argument(
        "out",
        help="the folder (hf, arlm; must not exist or be empty) or file (gguf; must not exist) "
        "to write",
    )
    p.add_argument(
        "--format",
        default="hf",
        choices=["hf", "gguf", "arlm"],
        help="hf: a Hugging Face folder that transformers loads; gguf: one file that llama.cpp "
        "loads; arlm: an arlm checkpoint, e.g. quantized with --quantize (default: hf)",
    )
    p.add_argument(
        "--type",
        default="f32",
        choices=["f32", "f16", "q8_0"],
        help="gguf only: how the weight matrices are stored; q8_0 is 8-bit (default: f32)",
    )
    p.set_defaults(run=cmd_export)

    p = sub.add_parser(
        "bench",
        help="prefill and decode speed, time to first token, peak memory",
        description="Greedy generation after a random prompt, through the same decode loop as "
        "generate; one warm-up run, then the median of the timed runs.",
    )
    _add_model_options(p)
    _add_cache_options(p)
    p.add_argument("--prompt-tokens", type=int, help="prompt length (default: 64)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per run (default: 128)")
    p.add_argument("--runs", type=int, help="timed runs (default: 3)")
    p.set_defaults(run=cmd_bench)
    _add_loops_parser(sub)
    return parser


def _add_loops_parser(sub) -> None:
    p = sub.add_parser(
        "loops",
        help="measure loop traps: probe, bench, scan",
        description="Measure repetition loops: why models fall in (probe), how often each "
        "decoding setup does (bench), and where a file has them (scan).",
    )
    loops = p.add_subparsers(dest="loops_command", required=True, metavar="SUBCOMMAND")

    d = PROBE_DEFAULTS
    q = loops.add_parser(
        "probe",
        help="the self-reinforcement probe of Xu et al. 2022",
        description="Teacher-force a prefix and one sentence repeated N times; print TP(n), "
        "IP(n) and WR(n) for held-out sentences and random-token sentences, and plot them.",
    )
    _add_model_options(q)
    q.add_argument("--repeats", type=int, help=f"N, copies of each sentence (default: {d.repeats})")
    q.add_argument(
        "--sentences", type=int, help=f"held-out sentences, as many random (default: {d.sentences})"
    )
    q.add_argument("--max-sentence-tokens", type=int, help=f"(default: {d.max_sentence_tokens})")
    _add_held_out_options(q, d.corpus, d.seed, "loops-probe.png")
    q.set_defaults(run=cmd_loops_probe)

    d = BENCH_DEFAULTS
    q = loops.add_parser(
        "bench",
        help="loop rate of decoding setups on held-out prompts",
        description="Continue held-out prompts with greedy, temperature, top-p, repetition "
        "penalty, DRY and the break policy; print repetition metrics, detector firing and "
        "perplexity per setup beside human text and the published anchors, and plot them.",
    )
    _add_model_options(q)
    q.add_argument("--prompts", type=int, help=f"held-out prompts (default: {d.prompts})")
    q.add_argument("--prompt-tokens", type=int, help=f"(default: {d.prompt_tokens})")
    q.add_argument(
        "--max-tokens", type=int, help=f"tokens per continuation (default: {d.max_tokens})"
    )
    _add_held_out_options(q, d.corpus, d.seed, "loops-bench.png")
    _add_detector_options(q, d.detector)
    q.set_defaults(run=cmd_loops_bench)

    q = loops.add_parser(
        "scan",
        help="report every loop in a text or JSON-lines file",
        description="Run the loop detector over a file's tokens, words or lines, or over the "
        "steps of a JSON-lines file (an agent's actions), and print each loop with its lines.",
    )
    q.add_argument("file", help="a UTF-8 text file, or a .jsonl file of steps")
    q.add_argument(
        "--unit", choices=UNITS, help="default: steps for .jsonl, tokens with --model, else lines"
    )
    q.add_argument("--model", help="a model whose tokenizer splits the text into tokens")
    q.add_argument("--key", help="steps: compare this field of each JSON object, not all of it")
    _add_detector_options(q, LoopDetectorConfig())
    q.set_defaults(run=cmd_loops_scan)


def _add_held_out_options(q, corpus: str, seed: int, plot: str) -> None:
    q.add_argument("--corpus", help=f"the held-out text's corpus (default: {corpus})")
    q.add_argument("--seed", type=int, help=f"(default: {seed})")
    q.add_argument("--cache-dir", help="where encoded corpora are cached (default: ~/.cache/arlm)")
    q.add_argument("--plot", default=plot, help=f"the PNG to write (default: {plot})")


def _given(args: argparse.Namespace, config_class) -> dict:
    names = {f.name for f in dataclasses.fields(config_class)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def cmd_train(args: argparse.Namespace) -> None:
    from arlm.api import LM
    from arlm.train.trainer import Trainer, saved_train_config

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if args.resume:
        out = given.get("out", TRAIN_DEFAULTS.out)
        steps = given.get("steps", saved_train_config(out).steps)
        cfg = dataclasses.replace(TRAIN_DEFAULTS, out=out, steps=steps)
    else:
        cfg = TrainConfig(**given)
    trainer = Trainer(cfg, resume=args.resume)
    n_params = trainer.model.num_params()
    print(
        f"model: {trainer.cfg.preset}, {n_params / 1e6:.2f}M parameters, "
        f"vocabulary {trainer.tokenizer.vocab_size}; "
        f"corpus: {len(trainer.shards.train):,} train / {len(trainer.shards.val):,} val tokens"
    )
    result = trainer.fit()
    print(
        f"trained to step {result.step} in {result.seconds:.0f}s; "
        f"final validation loss {result.val_loss:.4f} "
        f"(perplexity {math.exp(result.val_loss):.2f}); checkpoint in {result.out}"
    )
    if result.step == trainer.cfg.steps and args.sample:
        lm = LM(trainer.model, trainer.tokenizer)
        print(f"sample (temperature 0.8, seed 0):\n{args.sample}", end="")
        for piece in lm.stream(args.sample, max_tokens=120, temperature=0.8, top_k=50, seed=0):
            print(piece, end="", flush=True)
        print()


def cmd_generate(args: argparse.Namespace) -> None:
    import arlm

    params = SamplingParams(**_sampling_kwargs(args))
    lm = arlm.load(args.model, **_model_kwargs(args), **_cache_kwargs(args))
    started = time.perf_counter()
    tokens = []
    for piece in lm.stream(args.prompt, params=params):
        print(piece, end="", flush=True)
        if piece.token_id is not None:
            tokens.append(piece)
    print()
    for lp in (t.logprob for t in tokens if t.logprob is not None):
        alternatives = "  ".join(f"{lm.tokenizer.decode([i])!r} {v:.3f}" for i, v in lp.top)
        print(f"{lp.logprob:9.4f}  {lm.tokenizer.decode([lp.token_id])!r:16} {alternatives}")
    for report in piece.loop_reports:
        print(
            f"[loop: a block of {report.pattern_size} tokens repeated {report.count} times "
            f"from generated token {report.start}]",
            file=sys.stderr,
        )
    if piece.loops_broken:
        print(f"[loops broken: {piece.loops_broken}]", file=sys.stderr)
    if args.stats:
        u = piece.usage
        print(
            f"[{u.prompt_tokens} prompt tokens, {u.completion_tokens} generated, finish: "
            f"{piece.finish_reason}; time to first token {u.prefill_seconds * 1e3:.1f} ms, "
            f"prefill {u.prefill_tokens_per_second:.1f} tok/s, "
            f"decode {u.decode_tokens_per_second:.1f} tok/s, "
            f"KV cache ({lm.cache_config.kind}, {lm.cache_config.dtype}) "
            f"{u.kv_cache_bytes / 2**20:.2f} MiB allocated, "
            f"peak {u.kv_cache_peak_bytes / 2**20:.2f} MiB in use, "
            f"total {time.perf_counter() - started:.2f} s]",
            file=sys.stderr,
        )


def cmd_score(args: argparse.Namespace) -> None:
    import arlm

    if args.file == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise FileNotFoundError(f"cannot read {args.file}: {e.strerror}") from e
    lm = arlm.load(args.model, **_model_kwargs(args), **_cache_kwargs(args))
    score = lm.score(text, chunk_size=args.chunk_size)
    if args.per_token:
        for token_id, lp in zip(score.token_ids, score.token_logprobs, strict=False):
            print(f"{lp:10.4f}  {lm.tokenizer.decode([token_id])!r}")
    n = len(score.token_logprobs)
    print(
        f"tokens: {n}  total logprob: {score.total_logprob:.4f}  "
        f"mean: {score.total_logprob / n:.4f}  perplexity: {score.perplexity:.4f}"
    )


def cmd_export(args: argparse.Namespace) -> None:
    import arlm

    if args.format != "gguf" and args.type != "f32":
        raise ValueError(f"--type {args.type}: --type applies to --format gguf only")
    out = Path(args.out)
    if args.format == "arlm" and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new path")
    lm = arlm.load(args.model, **_model_kwargs(args))
    if args.format == "gguf":
        from arlm.formats.gguf import export_gguf

        export_gguf(lm.model, lm.tokenizer, args.out, type=args.type)
    elif args.format == "arlm":
        from arlm.formats.checkpoint import save_model

        save_model(out, lm.model, lm.tokenizer)
    else:
        from arlm.formats.hf import export_hf

        export_hf(lm.model, lm.tokenizer, args.out)
    print(f"wrote {args.out} ({args.format})")


def cmd_bench(args: argparse.Namespace) -> None:
    import arlm
    from arlm.bench import bench

    lm = arlm.load(args.model, **_model_kwargs(args), **_cache_kwargs(args))
    given = {k: getattr(args, k) for k in ("prompt_tokens", "new_tokens", "runs")}
    r = bench(lm, **{k: v for k, v in given.items() if v is not None})
    n_params = lm.model.num_params()
    dtype = lm.config.quantization or str(lm.model.wte.weight.dtype).removeprefix("torch.")
    print(
        f"model: {args.model} ({n_params / 1e6:.1f}M parameters, {dtype}, {lm.device}); "
        f"{r.prompt_tokens} prompt + {r.new_tokens} new tokens, median of {r.runs} runs"
    )
    print(f"prefill      {r.prefill_tokens_per_second:10.1f} tokens/s")
    print(f"decode       {r.decode_tokens_per_second:10.1f} tokens/s")
    print(f"first token  {r.time_to_first_token_ms:10.1f} ms")
    print(
        f"KV cache     {r.kv_cache_peak_bytes / 2**20:10.2f} MiB in use "
        f"({r.kv_cache_bytes / 2**20:.2f} MiB allocated for the sequence)"
    )
    print(f"peak memory  {r.peak_memory_bytes / 2**20:10.1f} MiB")
    print(
        f"weights      {r.weight_bytes / 2**20:10.1f} MiB read per decode step "
        f"({r.weight_bytes * r.decode_tokens_per_second / 1e9:.1f} GB/s at that speed)"
    )


def cmd_loops_probe(args: argparse.Namespace) -> None:
    import arlm
    from arlm.loops import probe

    config = ProbeConfig(**_given(args, ProbeConfig))
    lm = arlm.load(args.model, **_model_kwargs(args))
    curves = probe.self_reinforcement_probe(lm, config, cache_dir=args.cache_dir)
    print(
        f"self-reinforcement probe (Xu et al. 2022): {curves[0].sentences} held-out sentences "
        f"and as many random-token ones, each after a prefix sentence and repeated "
        f"{config.repeats} times, teacher-forced. TP: mean probability of the sentence's "
        "tokens; IP: share more probable than at the first copy; WR: share that are the argmax."
    )
    print(probe.format_table(curves))
    for c in curves:
        print(
            f"{c.kind}: TP {c.tp[0]:.4f} -> {c.tp[-1]:.4f}, WR {c.wr[0]:.3f} -> {c.wr[-1]:.3f} "
            f"from the first copy to the last"
        )
    probe.plot(curves, args.plot, title=f"self-reinforcement probe: {args.model}")
    print(f"wrote {args.plot}")


def cmd_loops_bench(args: argparse.Namespace) -> None:
    import arlm
    from arlm.loops import bench as loop_bench

    given = _given(args, BenchConfig)
    detection = _detector_kwargs(args)
    if detection:
        given["detector"] = LoopDetectorConfig(**detection)
    config = BenchConfig(**given)
    lm = arlm.load(args.model, **_model_kwargs(args))
    rows = loop_bench.loop_bench(lm, config, cache_dir=args.cache_dir)
    print(
        f"loop bench: {config.prompts} held-out prompts of {config.prompt_tokens} tokens, "
        f"{config.max_tokens} tokens each, end-of-text ignored"
    )
    print(loop_bench.format_table(rows))
    print(loop_bench.ordering(rows))
    print("Published: " + loop_bench.ANCHORS)
    loop_bench.plot(rows, args.plot, title=f"loop bench: {args.model}")
    print(f"wrote {args.plot}")


def cmd_loops_scan(args: argparse.Namespace) -> None:
    from arlm.loops.scan import scan_file

    tokenizer = None
    if args.model is not None:
        import arlm

        tokenizer = arlm.load(args.model).tokenizer
    hits = scan_file(
        args.file, args.unit, tokenizer=tokenizer, key=args.key, **_detector_kwargs(args)
    )
    for hit in hits:
        r = hit.report
        print(
            f"{args.file}:{hit.first_line}-{hit.last_line}: a block of {r.pattern_size} "
            f"repeated {r.count} times (items {r.start}..{r.position}): {hit.preview!r}"
        )
    print(f"{len(hits)} loop{'s' if len(hits) != 1 else ''} found")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, TrainingError) as e:
        print(f"arlm {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"arlm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

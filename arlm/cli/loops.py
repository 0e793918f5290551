"""``arlm loops``: measure loop traps: probe, bench, scan, guard, compound."""

from __future__ import annotations

import argparse
from pathlib import Path

from arlm.cli.common import add_detector_options, add_model_options, detector_kwargs, model_kwargs
from arlm.cli.options import add_options, given
from arlm.loops import GuardConfig, LoopDetectorConfig
from arlm.loops.scan import UNITS
from arlm.loops.step_guard import PRESETS, RULES
from arlm.measure.compound import CompoundConfig
from arlm.measure.loop_bench import BenchConfig
from arlm.measure.probe import ProbeConfig


def add_parser(sub) -> None:
    p = sub.add_parser(
        "loops",
        help="measure loop traps: probe, bench, scan, guard, compound",
        description="Measure repetition loops: why models fall in (probe), how often each "
        "decoding setup does (bench), where a file has them (scan), what the step guard says "
        "about agent traces (guard), and how one wrong token compounds (compound).",
    )
    loops = p.add_subparsers(dest="loops_command", required=True, metavar="SUBCOMMAND")

    q = loops.add_parser(
        "probe",
        help="the self-reinforcement probe of Xu et al. 2022",
        description="Teacher-force a prefix and one sentence repeated N times; print TP(n), "
        "IP(n) and WR(n) for held-out sentences and random-token sentences, and plot them.",
    )
    add_model_options(q)
    add_options(q, ProbeConfig)
    add_held_out_options(q, "loops-probe.png")
    q.set_defaults(run=run_probe)

    q = loops.add_parser(
        "bench",
        help="loop rate of decoding setups on held-out prompts",
        description="Continue held-out prompts with greedy, temperature, top-p, repetition "
        "penalty, DRY, the break policies (old and holding) and contrastive search; print "
        "repetition metrics, detector firing, perplexity and the model's validation loss per "
        "setup beside human text and the published anchors, and plot them. With --models, the "
        "same held-out prompts also go to each other model (trained with unlikelihood or "
        "DITTO, say) under greedy, top-p, the holding break and contrastive search.",
    )
    add_model_options(q)
    q.add_argument(
        "--models",
        nargs="+",
        default=[],
        metavar="MODEL",
        help="more models to compare with the first, loaded as it is",
    )
    add_options(q, BenchConfig)
    add_held_out_options(q, "loops-bench.png")
    add_detector_options(q)
    q.set_defaults(run=run_bench)

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
    add_detector_options(q)
    q.set_defaults(run=run_scan)

    q = loops.add_parser(
        "guard",
        help="replay agent traces through the step guard",
        description="Replay JSON-lines agent traces (OpenAI chat messages or plain steps, one "
        "per line) through the step guard as their runs would have gone: each trace's warn "
        "and stop verdicts with their lines, then how often each rule fired over all traces.",
    )
    q.add_argument("paths", nargs="+", metavar="PATH", help="a .jsonl trace, or a folder of them")
    q.add_argument(
        "--preset",
        default="strict",
        choices=sorted(PRESETS),
        help="the rules and thresholds to start from; options below override them "
        "(default: strict)",
    )
    rules = q.add_argument_group(
        "guard rules",
        "Thresholds count repetitions; 0 turns a rule off. The defaults shown are the strict "
        "preset's; --preset starts from another.",
    )
    add_options(rules, GuardConfig)
    q.set_defaults(run=run_guard)

    q = loops.add_parser(
        "compound",
        help="how far one wrong token carries through the predictions",
        description="On held-out passages put one wrong token (random, the model's second "
        "choice, or copied from the passage) after --prefix-tokens clean ones; print the KL "
        "divergence, top-1 agreement and change in log p of the true text at distances 1 to "
        "--max-distance, a control past the context, and how soon greedy continuations of the "
        "clean and corrupted contexts part and how often each loops; plot against distance.",
    )
    add_model_options(q)
    add_options(q, CompoundConfig)
    add_held_out_options(q, "loops-compound.png")
    add_detector_options(q)
    q.set_defaults(run=run_compound)


def add_held_out_options(q, plot: str) -> None:
    q.add_argument("--cache-dir", help="where encoded corpora are cached (default: ~/.cache/arlm)")
    q.add_argument("--plot", default=plot, help=f"the PNG to write (default: {plot})")


def run_probe(args: argparse.Namespace) -> None:
    import arlm
    from arlm.measure import probe

    config = ProbeConfig(**given(args, ProbeConfig))
    lm = arlm.load(args.model, **model_kwargs(args))
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


def run_bench(args: argparse.Namespace) -> None:
    import arlm
    from arlm.measure import loop_bench

    options = given(args, BenchConfig)
    detection = detector_kwargs(args)
    if detection:
        options["detector"] = LoopDetectorConfig(**detection)
    config = BenchConfig(**options)
    paths = [args.model, *args.models]
    names = [Path(p).name or p for p in paths]
    if len(set(names)) < len(names):
        names = paths  # two folders of one name: tell them apart by their paths
    models = {
        name: arlm.load(path, **model_kwargs(args)) for name, path in zip(names, paths, strict=True)
    }
    rows = loop_bench.compare_models(models, config, cache_dir=args.cache_dir)
    print(
        f"loop bench: {config.prompts} held-out prompts of {config.prompt_tokens} tokens, "
        f"{config.max_tokens} tokens each, end-of-text ignored"
    )
    print(loop_bench.format_table(rows))
    print(loop_bench.ordering(rows))
    print(loop_bench.targets(rows, config))
    print("Published: " + loop_bench.ANCHORS)
    loop_bench.plot(rows, args.plot, title=f"loop bench: {', '.join(names)}")
    print(f"wrote {args.plot}")


def run_compound(args: argparse.Namespace) -> None:
    import arlm
    from arlm.measure import compound

    options = given(args, CompoundConfig)
    detection = detector_kwargs(args)
    if detection:
        options["detector"] = LoopDetectorConfig(**detection)
    config = CompoundConfig(**options)
    lm = arlm.load(args.model, **model_kwargs(args))
    result = compound.compounding_probe(lm, config, cache_dir=args.cache_dir)
    n = result.curves[0].passages
    print(
        f"compounding errors: {n} held-out passages, one wrong token after "
        f"{config.prefix_tokens} clean ones, the true text after it; per distance d the "
        "prediction of the token d after it: KL(clean || corrupted) in nats, top-1 agreement, "
        "change in log p of the true token. Control: distances past the context of "
        f"{result.context}. Then greedy continuations of {config.continuation_tokens} tokens "
        "from the clean and the corrupted context."
    )
    print(compound.format_table(result))
    compound.plot(result, args.plot, title=f"compounding errors: {args.model}")
    print(f"wrote {args.plot}")


def run_scan(args: argparse.Namespace) -> None:
    from arlm.loops.scan import scan_file

    tokenizer = None
    if args.model is not None:
        import arlm

        tokenizer = arlm.load(args.model, device="cpu", dtype=None).tokenizer  # only its tokenizer
    hits = scan_file(
        args.file, args.unit, tokenizer=tokenizer, key=args.key, **detector_kwargs(args)
    )
    for hit in hits:
        r = hit.report
        print(
            f"{args.file}:{hit.first_line}-{hit.last_line}: a block of {r.pattern_size} "
            f"repeated {r.count} times (items {r.start}..{r.position}): {hit.preview!r}"
        )
    print(f"{len(hits)} loop{'s' if len(hits) != 1 else ''} found")


def trace_files(paths: list[str]) -> list[Path]:
    """The traces named: files as given, folders by their ``.jsonl`` files (recursively)."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(path.rglob("*.jsonl"))
            if not found:
                raise FileNotFoundError(f"folder {path} has no .jsonl traces")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no trace file or folder at {path}")
    return files


def run_guard(args: argparse.Namespace) -> None:
    from arlm.loops.step_guard import guard_trace

    config = GuardConfig.preset(args.preset, **given(args, GuardConfig))
    replays = [guard_trace(path, config) for path in trace_files(args.paths)]
    for r in replays:
        if r.stopped:
            line = r.verdicts[-1][0]
            status = f"stopped at line {line}, {r.after_stop} steps after it"
        else:
            status = "warned, not stopped" if r.verdicts else "no verdict"
        print(f"{r.path}: {r.steps} steps, {status}")
        for line, v in r.verdicts:
            also = f" [also {', '.join(v.also)}]" if v.also else ""
            print(f"  line {line}: {v.message}{also}")
    stopped = sum(r.stopped for r in replays)
    warned = sum(bool(r.verdicts) and not r.stopped for r in replays)
    print(
        f"{len(replays)} trace{'s' if len(replays) != 1 else ''}: {stopped} stopped, {warned} "
        f"warned only, {len(replays) - stopped - warned} clean; "
        f"{sum(r.after_stop for r in replays)} steps after the stops"
    )
    fired = [rule for rule in RULES if any(r.episodes[rule] for r in replays)]
    if fired:
        print("| rule | traces | times fired |\n|---|---:|---:|")
        for rule in fired:
            traces = sum(bool(r.episodes[rule]) for r in replays)
            print(f"| {rule} | {traces} | {sum(r.episodes[rule] for r in replays)} |")

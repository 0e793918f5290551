"""``arlm loops``: measure loop traps: probe, bench, scan."""

from __future__ import annotations

import argparse

from arlm.cli.common import add_detector_options, add_model_options, detector_kwargs, model_kwargs
from arlm.cli.options import add_options, given
from arlm.loops import LoopDetectorConfig
from arlm.loops.scan import UNITS
from arlm.measure.loop_bench import BenchConfig
from arlm.measure.probe import ProbeConfig


def add_parser(sub) -> None:
    p = sub.add_parser(
        "loops",
        help="measure loop traps: probe, bench, scan",
        description="Measure repetition loops: why models fall in (probe), how often each "
        "decoding setup does (bench), and where a file has them (scan).",
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
        "penalty, DRY and the break policy; print repetition metrics, detector firing and "
        "perplexity per setup beside human text and the published anchors, and plot them.",
    )
    add_model_options(q)
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
    lm = arlm.load(args.model, **model_kwargs(args))
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


def run_scan(args: argparse.Namespace) -> None:
    from arlm.loops.scan import scan_file

    tokenizer = None
    if args.model is not None:
        import arlm

        tokenizer = arlm.load(args.model).tokenizer
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

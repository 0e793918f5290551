"""``arlm generate``: continue a prompt, streaming to the terminal, or a file of prompts as one
batch through the engine, one JSON line per prompt."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from arlm.atomic import write_atomic
from arlm.cli.common import (
    add_cache_options,
    add_generation_config_option,
    add_model_options,
    add_sampling_options,
    add_tensor_parallel_option,
    describe_defaults,
    load_kwargs,
    sampling_kwargs,
)
from arlm.engine.speculation import summary as speculation_line
from arlm.formats.prompts import read_prompts


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a prompt (streams to the terminal) or a file of prompts",
        description="Continue PROMPT, streaming the text; or, with --prompts-file, run every "
        "prompt of a file as one batch through the engine and write one JSON line each.",
    )
    add_model_options(p)
    p.add_argument("prompt", nargs="?", help="the text to continue")
    p.add_argument(
        "--prompts-file",
        help='a file of prompts: one per line, or JSON lines with a "prompt" field (text or '
        "token ids); '-' for standard input",
    )
    p.add_argument(
        "--output", help="with --prompts-file, where to write the JSON lines (default: stdout)"
    )
    add_sampling_options(p)
    p.add_argument(
        "--json-schema",
        metavar="FILE",
        help="constrain the output to the JSON schema in FILE (structured outputs, strict: "
        "compact JSON that ends when the value is complete)",
    )
    add_generation_config_option(p)
    add_cache_options(p)
    add_tensor_parallel_option(p)
    p.add_argument("--stats", action="store_true", help="print token counts and speeds")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import arlm

    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give either a PROMPT or --prompts-file, not both or neither")
    given = sampling_kwargs(args)
    if args.json_schema is not None:
        given["structured_outputs"] = {"json": read_schema(args.json_schema)}
    prompts = read_prompts(args.prompts_file) if args.prompts_file else None
    lm = arlm.load(args.model, **load_kwargs(args))
    if lm is None:  # a tensor-parallel rank other than 0: it ran rank 0's steps
        return
    note = describe_defaults(lm, given)
    if note:
        print(note, file=sys.stderr)
    params = lm.sampling_params(**given)
    if prompts is not None:
        write_batch(lm, prompts, params, args.output)
    else:
        stream(lm, args, params)


def read_schema(path: str) -> dict:
    """The JSON schema in ``path``, or a ValueError naming the file and what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            schema = json.load(f)
    except OSError as e:
        raise ValueError(f"--json-schema {path}: cannot read it: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--json-schema {path} is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise ValueError(f"--json-schema {path} must hold a JSON object (a schema)")
    return schema


def write_batch(lm, prompts, params, output: str | None) -> None:
    started = time.perf_counter()
    results = lm.generate(prompts, params)
    lines = []
    for i, result in enumerate(results):
        for c in result if isinstance(result, list) else [result]:
            record = {
                "index": i,
                "text": c.text,
                "token_ids": c.token_ids,
                "finish_reason": c.finish_reason,
                "usage": {
                    "prompt_tokens": c.usage.prompt_tokens,
                    "completion_tokens": c.usage.completion_tokens,
                },
            }
            if c.error:
                record["error"] = c.error
            if c.loop is not None:
                record["loop"] = asdict(c.loop)
            lines.append(json.dumps(record) + "\n")
    if output:
        write_atomic(output, "".join(lines).encode())
    else:
        sys.stdout.writelines(lines)
    flat = [c for r in results for c in (r if isinstance(r, list) else [r])]
    tokens = sum(len(c.token_ids) for c in flat)
    seconds = time.perf_counter() - started
    print(
        f"[{len(prompts)} prompts, {tokens} tokens generated in {seconds:.2f} s: "
        f"{tokens / seconds:.1f} tok/s]",
        file=sys.stderr,
    )


def stream(lm, args: argparse.Namespace, params) -> None:
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
        u, engine = piece.usage, lm.engine.stats()
        print(
            f"[{u.prompt_tokens} prompt tokens, {u.completion_tokens} generated, finish: "
            f"{piece.finish_reason}; time to first token {u.prefill_seconds * 1e3:.1f} ms, "
            f"prefill {u.prefill_tokens_per_second:.1f} tok/s, "
            f"decode {u.decode_tokens_per_second:.1f} tok/s, "
            f"KV cache ({lm.cache_config.kind}, {lm.cache_config.dtype}) "
            f"{u.kv_cache_bytes / 2**20:.2f} MiB in blocks at the peak "
            f"({u.kv_cache_peak_bytes / 2**20:.2f} MiB of positions); engine: "
            f"{engine['blocks_in_use']} blocks held now, peak {engine['blocks_peak']} of "
            f"{engine['num_blocks']}, {engine['preemptions']} preemptions, "
            f"total {time.perf_counter() - started:.2f} s]",
            file=sys.stderr,
        )
        if lm.speculative is not None:
            print(f"[{speculation_line(engine)}]", file=sys.stderr)

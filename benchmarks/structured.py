"""Grammar libraries for structured outputs: xgrammar (arlm's) beside llguidance, on
tokenizers trained here (512 and 4,096 tokens) and one nested JSON schema.

Per library: the tokenizer table (once per model), compiling the schema (once per distinct
schema, then cached), and the per-step mask: fill the bitmask and apply it to a row of logits,
at each of up to 200 steps of a random walk through the grammar (the cost every constrained
row pays at every token). Medians. llguidance is not a dependency: install it to compare.

Run: ``python benchmarks/structured.py`` (seconds).
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from arlm.tokenizer import Tokenizer
from arlm.train.corpus import builtin_documents

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"pattern": "[0-9]{5}"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "tags", "address"],
    "additionalProperties": False,
}
STEPS = 200


def walk(fill_and_apply, accept, done, vocab: int) -> list[float]:
    """Seconds per step of filling and applying the mask, along a random walk."""
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(STEPS):
        if done():
            break
        logits = torch.randn(1, vocab, generator=gen)
        t = time.perf_counter()
        fill_and_apply(logits)
        times.append(time.perf_counter() - t)
        accept(int(torch.multinomial(logits.softmax(-1), 1, generator=gen)))
    return times


def xgrammar_row(tk: Tokenizer) -> tuple[float, float, float]:
    from arlm.sampling.structured import GrammarCompiler, StructuredOutputs

    t = time.perf_counter()
    compiler = GrammarCompiler(tk, tk.vocab_size)
    table = time.perf_counter() - t
    spec = StructuredOutputs(json=SCHEMA)
    t = time.perf_counter()
    compiler.compile(spec)
    compile_s = time.perf_counter() - t
    mask = compiler.mask(spec, tk.eos_token_ids)
    from arlm.sampling.processors import History

    history = History([[0]], [1])
    mask.reset(history)

    def accept(token):
        history.rows[0].append(token)
        mask.append(history)

    times = walk(lambda x: mask(x, history), accept, mask.matcher.is_terminated, tk.vocab_size)
    return table, compile_s, statistics.median(times)


def llguidance_row(tk: Tokenizer) -> tuple[float, float, float]:
    import llguidance
    import llguidance.torch as lt

    t = time.perf_counter()
    ltk = llguidance.LLTokenizer(tk.to_json(), n_vocab=tk.vocab_size, eos_token=tk.eos_token_ids[0])
    table = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        json.dumps(SCHEMA), defaults={"whitespace_flexible": False}
    )
    matcher = llguidance.LLMatcher(ltk, grammar)
    compile_s = time.perf_counter() - t
    bitmask = lt.allocate_token_bitmask(1, tk.vocab_size)

    def fill_and_apply(logits):
        lt.fill_next_token_bitmask(matcher, bitmask, 0)
        lt.apply_token_bitmask_inplace(logits, bitmask)

    times = walk(fill_and_apply, matcher.consume_token, matcher.is_stopped, tk.vocab_size)
    return table, compile_s, statistics.median(times)


def main() -> None:
    docs = list(builtin_documents())
    print("library     vocab  tokenizer ms  compile ms  mask us/step")
    for vocab in (512, 4096):
        tk = Tokenizer.train(docs, vocab_size=vocab)
        for name, row in (("xgrammar", xgrammar_row), ("llguidance", llguidance_row)):
            try:
                table, compile_s, step = row(tk)
            except ImportError:
                print(f"{name:10} {vocab:6}  not installed (pip install {name})")
                continue
            print(
                f"{name:10} {vocab:6}  {table * 1e3:12.1f}  {compile_s * 1e3:10.1f}  "
                f"{step * 1e6:12.0f}"
            )


if __name__ == "__main__":
    main()

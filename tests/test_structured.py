"""Structured outputs (``arlm.sampling.structured``): sampled generations from a random-weight
model at temperature 1.0, constrained by JSON schemas of a small family (objects, arrays, enums,
nesting), a regex and a choice, all parse and validate and all finish; constrained and free rows
share steps; a loop break rolls the grammar back; bad constraints are refused by name."""

from __future__ import annotations

import json
import random
import re

import pytest

from arlm.api import LM
from arlm.engine import EngineConfig
from arlm.sampling.params import SamplingParams
from arlm.sampling.structured import StructuredOutputs
from tests.conftest import make_model

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

MAX_TOKENS = 120  # every schema below fits well within this; a run-on would hit it


@pytest.fixture(scope="module")
def lm(tokenizer):
    # every generation of a test in one wave: the steps are as many as the longest answer's tokens
    engine = EngineConfig(kv_cache_memory_gib=0.5, max_num_seqs=200, max_num_batched_tokens=1024)
    return LM(make_model(), tokenizer, engine_config=engine)


def leaf(rng: random.Random) -> dict:
    kind = rng.choice(["string", "integer", "number", "boolean", "enum", "null"])
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 4)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 100)}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "a b", 'q"t', "é", 3, None], 3)}
    return {"type": kind}


def schema(rng: random.Random, depth: int = 0) -> dict:
    """One schema of the family: an object of leaves, arrays and (once) nested objects."""
    properties = {}
    for i in range(rng.randint(1, 3 - depth)):
        roll = rng.random()
        if roll < 0.2 and depth == 0:
            properties[f"child{i}"] = schema(rng, depth + 1)
        elif roll < 0.4:
            properties[f"list{i}"] = {
                "type": "array",
                "items": leaf(rng),
                "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 2),
            }
        else:
            properties[f"f{i}"] = leaf(rng)
    required = [k for k in properties if rng.random() < 0.7]
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def test_200_sampled_generations_over_a_family_of_schemas_parse_and_validate(lm):
    rng = random.Random(0)
    schemas = [schema(rng) for _ in range(200)]
    params = [
        SamplingParams(
            max_tokens=MAX_TOKENS, temperature=1.0, seed=i, structured_outputs={"json": s}
        )
        for i, s in enumerate(schemas)
    ]
    outs = lm.generate(["Data:"] * len(schemas), params, progress=False)
    for s, out in zip(schemas, outs, strict=True):
        assert out.finish_reason == "stop", (s, out.text)
        jsonschema.validate(json.loads(out.text), s)
    # strict: outside strings no whitespace but the one space after ',' and ':'
    between = [re.sub(r'"(?:[^"\\]|\\.)*"', '""', o.text) for o in outs]
    assert not any(re.search(r"\s{2,}|\n|\t", b) for b in between)
    # random weights, sampled: the outputs really differ
    assert len({o.text for o in outs}) > 150


def test_regex_choice_grammar_and_json_object(lm):
    pattern = r"[a-z]{1,6}@[a-z]{2,5}\.(com|org)"
    choices = ["yes", "no way", 'say "hi"', "naïve"]
    n = 20
    batch = (
        [
            SamplingParams(max_tokens=40, seed=i, structured_outputs={"regex": pattern})
            for i in range(n)
        ]
        + [
            SamplingParams(max_tokens=40, seed=i, structured_outputs={"choice": choices})
            for i in range(n)
        ]
        + [
            SamplingParams(max_tokens=80, seed=i, structured_outputs={"json_object": True})
            for i in range(n)
        ]
        + [
            SamplingParams(
                max_tokens=40,
                seed=i,
                structured_outputs={"grammar": 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'},
            )
            for i in range(n)
        ]
    )
    outs = lm.generate(["Go:"] * len(batch), batch, progress=False)
    regex, choice, objects, sums = (outs[i * n : (i + 1) * n] for i in range(4))
    assert all(re.fullmatch(pattern, o.text) for o in regex), [o.text for o in regex]
    assert all(o.text in choices for o in choice) and len({o.text for o in choice}) > 1
    # any object has unbounded strings and nesting: a random model may not close it within
    # max_tokens (a bounded schema does, above); what closes is an object
    for o in objects:
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
    assert any(o.finish_reason == "stop" for o in objects)
    assert all(re.fullmatch(r"\(\d+(\+\d+)*\)", o.text) for o in sums if o.finish_reason == "stop")


def test_free_requests_never_build_the_grammar_compiler(tokenizer):
    # building it loads xgrammar and reads the whole vocabulary: only a constrained request may
    # pay that (a GPU machine's image may lack the library altogether)
    lm = LM(make_model(), tokenizer, engine_config=EngineConfig(kv_cache_memory_gib=0.1))
    lm.generate(["Once upon", "a"], SamplingParams(max_tokens=4), progress=False)
    assert lm.engine.chain._grammars is None
    lm.generate("Pick:", SamplingParams(max_tokens=8, structured_outputs={"choice": ["a", "b"]}))
    assert lm.engine.chain._grammars is not None


def test_constrained_and_free_rows_share_steps_and_free_rows_are_unchanged(lm):
    free = SamplingParams(max_tokens=12, temperature=0)
    alone = lm.generate("Once upon", free)
    constrained = SamplingParams(max_tokens=30, seed=3, structured_outputs={"choice": ["a", "b"]})
    steps = lm.engine.steps
    outs = lm.generate(["Once upon", "Pick:"], [free, constrained], progress=False)
    assert outs[0].token_ids == alone.token_ids
    assert outs[1].text in ("a", "b")
    # both rows ran in the same steps: no more steps than the longer of the two
    assert lm.engine.steps - steps <= len(alone.token_ids) + 1


def test_a_loop_break_rolls_the_grammar_back(lm):
    # digits only, long: a random model repeats itself; "break" truncates and bans, and the
    # grammar replays the kept ids, so the output still matches
    params = SamplingParams(
        max_tokens=60,
        temperature=0,
        structured_outputs={"regex": "[0-9]{40}"},
        loop_policy="break",
        repetition_detection={"min_count": 3, "min_span": 6},
    )
    out = lm.generate("Count:", params)
    assert re.fullmatch("[0-9]{40}", out.text), out.text
    assert out.loops_broken >= 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"json": {"type": "nope"}}, "structured_outputs.json is not a JSON schema"),
        ({"regex": "(ab"}, "structured_outputs.regex is not a regular expression"),
        ({"grammar": "root ::= foo"}, "structured_outputs.grammar is not an EBNF grammar"),
        ({"regex": "a", "choice": ["a"]}, "give exactly one of"),
        ({"choice": []}, "choice must be a list"),
        ({"jsonn": {}}, "unknown fields ['jsonn']"),
    ],
)
def test_bad_constraints_are_refused_by_name(lm, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        lm.generate("x", max_tokens=4, structured_outputs=spec)


def test_refused_combinations():
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured_outputs={"regex": "a"})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured_outputs={"regex": "a"})
    assert StructuredOutputs.from_value({"regex": "a"}).kind == "regex"


def test_cli_generate_with_a_json_schema_file(tokenizer, tmp_path, capsys):
    from arlm.cli import main
    from arlm.formats.checkpoint import save_model

    save_model(tmp_path / "ckpt", make_model(), tokenizer)
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
            "ok": {"type": "boolean"},
        },
        "required": ["n", "ok"],
        "additionalProperties": False,
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    args = ["generate", str(tmp_path / "ckpt"), "Data:", "--max-tokens", "40", "--seed", "1"]
    assert main([*args, "--json-schema", str(tmp_path / "schema.json")]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), schema)
    (tmp_path / "bad.json").write_text("{nope")
    assert main([*args, "--json-schema", str(tmp_path / "bad.json")]) == 1
    assert "bad.json is not JSON" in capsys.readouterr().err

"""lm-evaluation-harness (``lm_eval``, a client nobody here wrote) scores a multiple-choice
task against a live ``arlm serve`` on the loopback, as its users run it: the
``local-completions`` model with tokenized requests (``echo``, ``logprobs=1``, ``max_tokens=1``,
token-id prompts) and the server's own tokenizer through ``/tokenizer_info`` and ``/tokenize``.
Its log-likelihoods must equal ``lm.score`` of the same tokens and its accuracy the accuracy
those scores give."""

from __future__ import annotations

import json
import math

import pytest

from arlm.api import LM
from arlm.engine import EngineConfig
from tests.conftest import make_model
from tests.serving import LiveServer

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The cat sat on the", ["mat", "moon", "river", "idea"], 0),
    ("Water boils at one hundred", ["degrees", "apples", "kings", "songs"], 0),
    ("The sun rises in the", ["east", "west", "north", "south"], 0),
    ("A week has seven", ["days", "years", "cats", "hours"], 0),
    ("Birds can", ["fly", "read", "swim far", "sing loudly at night"], 3),
    ("The capital of France is", ["Paris", "Rome", "Berlin", "Madrid"], 0),
]

# the context opens with the end-of-text token's text, which encodes to that id: lm.score
# then scores exactly the ids the server scores (it would otherwise put the start token first)
TASK = """\
task: arlm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "<|endoftext|>Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def test_lm_eval_loglikelihoods_equal_lm_score(tokenizer, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "test.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "arlm_tiny_mc.yaml").write_text(TASK.format(data=data))
    # small prefill chunks: the prompts' log-probabilities come from chunked prefills
    engine = EngineConfig(kv_cache_memory_gib=0.25, max_num_seqs=4, max_num_batched_tokens=8)
    lm = LM(make_model(), tokenizer, engine_config=engine)
    with LiveServer(lm) as live:
        results = simple_evaluate(
            model="local-completions",
            model_args={
                "base_url": f"{live.url}/v1/completions",
                "model": "tiny",
                "tokenizer_backend": "remote",
                "tokenized_requests": True,
                "max_length": 128,
                "num_concurrent": 2,
                "max_retries": 1,
            },
            tasks=["arlm_tiny_mc"],
            task_manager=TaskManager(include_path=str(tasks)),
            log_samples=True,
            cache_requests=False,
        )
    samples = results["samples"]["arlm_tiny_mc"]
    assert len(samples) == len(QUESTIONS)
    correct = 0
    for sample in samples:
        served = [resp[0][0] for resp in sample["resps"]]
        scored = []
        for context, continuation in sample["arguments"]:
            ids = tokenizer.encode(context + continuation)
            context_ids = tokenizer.encode(context)
            assert ids[: len(context_ids)] == context_ids  # lm_eval splits the ids here too
            score = lm.score(ids)
            scored.append(math.fsum(score.token_logprobs[len(context_ids) - 1 :]))
        # float32 log-softmax over a 512-token vocabulary, summed over a few tokens
        assert served == pytest.approx(scored, abs=1e-4)
        correct += max(range(len(scored)), key=scored.__getitem__) == sample["target"]
    accuracy = results["results"]["arlm_tiny_mc"]["acc,none"]
    assert accuracy == correct / len(QUESTIONS)

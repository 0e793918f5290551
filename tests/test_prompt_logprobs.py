"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``; ``echo`` with ``logprobs`` and
vLLM's ``prompt_logprobs`` on ``/v1/completions``) against a teacher-forced forward of the same
ids, and the tokenizer endpoints (``/tokenize``, ``/detokenize``, ``/tokenizer_info``)."""

from __future__ import annotations

import httpx
import pytest
import torch

from arlm.api import LM
from arlm.engine import EngineConfig
from tests.conftest import make_model
from tests.serving import LiveServer

# float32 log-softmax of logits from two kernel paths (chunked cached prefill vs one forward):
# a few ulps of values of size ~10
TOL = 1e-4


@pytest.fixture(scope="module")
def lm(tokenizer):
    # chunks of 8 positions: a prompt's log-probabilities span several prefill steps
    engine = EngineConfig(kv_cache_memory_gib=0.25, max_num_seqs=4, max_num_batched_tokens=8)
    return LM(make_model(), tokenizer, engine_config=engine)


@pytest.fixture(scope="module")
def live(lm):
    with LiveServer(lm) as s:
        yield s


def reference(lm, ids: list[int]) -> torch.Tensor:
    """(T - 1,) log-probability of each id after the first, from one teacher-forced forward."""
    logp = lm.logits(ids).log_softmax(dim=-1)
    return logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs far away."


def test_prompt_logprobs_match_a_teacher_forced_forward_across_chunks(lm):
    ids = lm.tokenizer.encode(PROMPT)
    assert len(ids) > 16  # three prefill chunks at least
    c = lm.generate(ids, max_tokens=0, prompt_logprobs=3)
    assert c.token_ids == [] and c.finish_reason == "length"
    assert c.prompt_logprobs[0] is None and len(c.prompt_logprobs) == len(ids)
    got = torch.tensor([p.logprob for p in c.prompt_logprobs[1:]])
    torch.testing.assert_close(got, reference(lm, ids), atol=TOL, rtol=0)
    logp = lm.logits(ids).log_softmax(dim=-1)
    for pos, p in enumerate(c.prompt_logprobs[1:]):
        assert p.token_id == ids[pos + 1]
        assert [t for t, _ in p.top] == logp[pos].topk(3).indices.tolist()
        assert p.rank == int((logp[pos] > logp[pos, ids[pos + 1]]).sum()) + 1


def test_prompt_logprobs_with_generation_and_samples(lm):
    ids = lm.tokenizer.encode(PROMPT)
    alone = lm.generate(ids, max_tokens=4, temperature=0)
    both = lm.generate(ids, max_tokens=4, temperature=0, prompt_logprobs=0, n=2)
    for c in both:
        assert c.token_ids == alone.token_ids  # scoring does not change what is generated
        got = torch.tensor([p.logprob for p in c.prompt_logprobs[1:]])
        torch.testing.assert_close(got, reference(lm, ids), atol=TOL, rtol=0)
        assert all(p.top == () for p in c.prompt_logprobs[1:])


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(live.url + path, json=body, timeout=60)


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_with_logprobs_in_openai_shape(live, lm, max_tokens):
    ids = lm.tokenizer.encode(PROMPT)
    for prompt in (PROMPT, ids):
        r = post(
            live,
            "/v1/completions",
            {
                "prompt": prompt,
                "echo": True,
                "logprobs": 2,
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(ids) + max_tokens
        assert choice["text"].startswith(lm.tokenizer.decode(ids))
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        got = torch.tensor(lp["token_logprobs"][1 : len(ids)])
        torch.testing.assert_close(got, reference(lm, ids), atol=TOL, rtol=0)
        assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
        assert lp["text_offset"][: len(ids)] == sorted(lp["text_offset"][: len(ids)])


def test_vllm_prompt_logprobs_field(live, lm):
    ids = lm.tokenizer.encode(PROMPT)
    r = post(live, "/v1/completions", {"prompt": ids, "prompt_logprobs": 1, "max_tokens": 1})
    assert r.status_code == 200, r.text
    scored = r.json()["choices"][0]["prompt_logprobs"]
    assert scored[0] is None and len(scored) == len(ids)
    want = reference(lm, ids)
    for pos, entry in enumerate(scored[1:]):
        own = entry[str(ids[pos + 1])]
        assert own["logprob"] == pytest.approx(float(want[pos]), abs=TOL)
        assert own["decoded_token"] == lm.tokenizer.token_texts[ids[pos + 1]]
        assert min(e["rank"] for e in entry.values()) == 1


def test_prompt_logprobs_bad_input_is_a_400(live, lm):
    cases = [
        ({"prompt": "x" * 5000, "echo": True, "logprobs": 1, "max_tokens": 1}, "context"),
        ({"prompt": "hi", "echo": True, "logprobs": 1, "stream": True}, "stream"),
        ({"prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs"),
    ]
    for body, word in cases:
        r = post(live, "/v1/completions", body)
        assert r.status_code == 400, r.text
        assert word in r.json()["error"]["message"]


def test_tokenizer_endpoints_in_vllm_shapes(live, lm):
    tk = lm.tokenizer
    r = post(live, "/tokenize", {"prompt": "Hello there", "return_token_strs": True})
    body = r.json()
    assert body["tokens"] == tk.encode("Hello there") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == lm.engine.max_len
    assert body["token_strs"] == [tk.token_texts[t] for t in body["tokens"]]
    chat = post(live, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]}).json()
    rendered = tk.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat["tokens"] == tk.encode(rendered, add_special_tokens=False)
    back = post(live, "/detokenize", {"tokens": body["tokens"]}).json()
    assert back == {"prompt": "Hello there"}
    info = httpx.get(live.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>"
    assert (
        post(live, "/tokenize", {"prompt": info["eos_token"], "add_special_tokens": False}).json()[
            "tokens"
        ]
        == tk.eos_token_ids
    )
    bad = post(live, "/detokenize", {"tokens": [10**6]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    neither = post(live, "/tokenize", {})
    assert neither.status_code == 400 and "prompt" in neither.json()["error"]["message"]

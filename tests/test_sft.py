"""Supervised fine-tuning on conversations: the chat template renders them, only the assistant's
turns are targets, and a model tuned on them answers as taught and stops."""

import dataclasses
import json

import pytest
import torch

import arlm
from arlm.config import ModelConfig
from arlm.model.transformer import Transformer
from arlm.tokenizer import EOT, Tokenizer
from arlm.train import TrainConfig, Trainer
from arlm.train.chat import (
    IGNORE,
    ChatSplit,
    PackedSplit,
    corpus_kind,
    encode_example,
    load_chat,
    pack_examples,
)
from arlm.train.corpus import CorpusError, builtin_documents
from tests.conftest import fine_tune_config
from tests.numerics import assert_close

# ChatML, as Qwen's templates write it; <|im_end|> ends a turn and a generation
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Green."},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(builtin_documents()[:40], vocab_size=400)


def _chatml(tokenizer: Tokenizer) -> Tokenizer:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Tk

    tk = Tk.from_str(tokenizer.to_json())
    tk.add_special_tokens([AddedToken("<|im_start|>"), AddedToken("<|im_end|>")])
    end = tk.token_to_id("<|im_end|>")
    return Tokenizer(tk, eos_token_ids=[end, tk.token_to_id(EOT)], chat_template=CHATML)


def _split(tokenizer, example):
    """(target text, context text) of an encoded example."""
    ids, trained = example.ids.tolist(), example.trained.tolist()
    target = [i for i, t in zip(ids, trained, strict=True) if t]
    context = [i for i, t in zip(ids, trained, strict=True) if not t]
    return tokenizer.decode(target), tokenizer.decode(context)


def test_the_assistants_turns_are_the_targets_with_an_end_added(tokenizer):
    example = encode_example(tokenizer, {"messages": CONVERSATION}, "x")
    target, context = _split(tokenizer, example)
    # the default template ends a turn with a line break and no end token: one is added
    assert target == f" Blue.\n{EOT} Green.\n{EOT}"
    assert context == (
        "system: Be brief.\nuser: Name a colour.\nassistant:user: Another?\nassistant:"
    )


def test_a_template_that_ends_its_turns_keeps_its_own_end(tokenizer):
    chatml = _chatml(tokenizer)
    target, context = _split(chatml, encode_example(chatml, {"messages": CONVERSATION}, "x"))
    assert target == "Blue.<|im_end|>\nGreen.<|im_end|>\n"
    assert context.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert context.endswith("<|im_start|>user\nAnother?<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_and_completion(tokenizer):
    example = encode_example(tokenizer, {"prompt": "2 + 2 =", "completion": " 4"}, "x")
    assert _split(tokenizer, example) == (f" 4{EOT}", "2 + 2 =")


def test_a_plain_prompt_is_encoded_as_generation_encodes_it(tokenizer):
    """A tokenizer that adds a beginning-of-sequence token adds it before a plain prompt, as
    ``lm.generate(prompt)`` encodes one; a chat template writes its own markers."""
    from tokenizers import Tokenizer as Tk
    from tokenizers.processors import TemplateProcessing

    tk = Tk.from_str(tokenizer.to_json())
    tk.add_special_tokens(["<bos>"])
    bos = tk.token_to_id("<bos>")
    tk.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    with_bos = Tokenizer(tk, bos_token_id=bos)
    plain = encode_example(with_bos, {"prompt": "2 + 2 =", "completion": " 4"}, "x")
    prompt = with_bos.encode("2 + 2 =")
    assert prompt[0] == bos and plain.ids[: len(prompt)].tolist() == prompt
    chat = encode_example(with_bos, {"messages": CONVERSATION}, "x")
    assert bos not in chat.ids.tolist()


def test_a_batch_is_whole_examples_padded_and_cut(tokenizer):
    a = encode_example(tokenizer, {"prompt": "a b c d e f", "completion": " g h"}, "a")
    b = encode_example(tokenizer, {"prompt": "x", "completion": " y"}, "b")
    split = ChatSplit([a, b])
    x, y = split.batch([0, 1], window=64, pad_id=7)
    n = len(a.ids) - 1
    assert x.shape == y.shape == (2, n)
    assert x[0].tolist() == a.ids[:-1].tolist()
    expected = [int(t) if on else IGNORE for t, on in zip(a.ids[1:], a.trained[1:], strict=True)]
    assert y[0].tolist() == expected
    m = len(b.ids) - 1
    assert x[1, m:].eq(7).all() and y[1, m:].eq(IGNORE).all()
    x, y = split.batch([0], window=3, pad_id=7)
    assert x.tolist() == [a.ids[:3].tolist()]


def test_packing_lays_every_example_once_into_rows_of_the_window():
    lengths = [7, 3, 9, 2, 5, 5, 1, 9, 4]
    rows = pack_examples(lengths, window=10)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert len(rows) == 5  # 45 positions: 5 rows of 10 is the least
    assert pack_examples(lengths, window=10) == rows  # the same layout every time


def test_a_packed_row_computes_each_example_as_alone(tokenizer):
    """Packed examples attend only to themselves from position 0: each one's logits equal
    its own forward, for rotary, sliding-window, score-capped (Gemma 2's attention, formed
    whole) and learned-position models; the packed batch's loss is the padded batch's."""
    texts = [("a b c d e f", " g h"), ("x", " y"), ("one two three", " four five"), ("p q", " r")]
    examples = [encode_example(tokenizer, {"prompt": p, "completion": c}, "t") for p, c in texts]
    packed = PackedSplit(ChatSplit(examples), window=32)
    assert len(packed) == 1 and packed.rows == [[0, 1, 2, 3]]
    x, y, positions, segments = packed.batch([0], window=32, pad_id=7)
    px, py = ChatSplit(examples).batch([0, 1, 2, 3], window=32, pad_id=7)
    cases = [("llama", {}), ("llama", {"sliding_window": 4}), ("llama", {"attn_softcap": 5.0})]
    for family, extra in [*cases, ("gpt2", {})]:
        torch.manual_seed(0)
        config = ModelConfig.preset(family + "-tiny" if family == "llama" else "tiny")
        config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size, **extra)
        model = Transformer(config).eval()
        with torch.no_grad():
            together = model(x, positions=positions, segments=segments)[0][0]
            at = 0
            for e in examples:
                n = len(e.ids) - 1
                alone = model(torch.from_numpy(e.ids[:n])[None])[0][0]
                assert_close(together[at : at + n], alone, scale=alone.abs().max().item())
                at += n
            loss = model(x, y, positions=positions, segments=segments)[1]
            padded = model(px, py)[1]
        assert_close(loss, padded, scale=padded.item())


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    # shows only the last assistant turn, as templates that drop earlier reasoning do
    rewriting = Tokenizer(  # the same vocabulary, another template
        tokenizer._tk,
        chat_template="{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}",
    )
    with pytest.raises(CorpusError, match="cannot be cut into turns"):
        encode_example(rewriting, {"messages": CONVERSATION}, "chats.jsonl:3")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"messages": [{"role": "king", "content": "hi"}]}', "chats.jsonl:2: each message needs"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
        ('{"messages": []}', "must be a non-empty list"),
        ('{"prompt": "a"}', 'chats.jsonl:2: each line must be one JSON object: {"messages"'),
        ("{oops", "chats.jsonl:2: not JSON"),
    ],
)
def test_bad_examples_are_named_by_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n" + line + "\n")
    with pytest.raises(CorpusError, match=message):
        load_chat(str(path), tokenizer)


def test_too_few_examples_to_hold_some_out(tmp_path, tokenizer):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": " b"}) + "\n")
    with pytest.raises(CorpusError, match="too few to hold out"):
        load_chat(str(path), tokenizer)


def test_a_chat_corpus_is_told_from_a_text_one(tmp_path):
    chats, texts = tmp_path / "chats.jsonl", tmp_path / "texts.jsonl"
    chats.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    texts.write_text(json.dumps({"text": "plain"}) + "\n")
    assert corpus_kind(str(chats)) == "chat" and corpus_kind(str(texts)) == "text"
    assert corpus_kind(str(tmp_path)) == "text"


# --- fine-tuning on conversations ----------------------------------------------------------


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """Questions about many things, always answered the same way."""
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Tell me about topic {i}."},
                {"role": "assistant", "content": "Noted."},
            ]
        }
        for i in range(80)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _sft(tmp_path, base, chats, cache_dir, **overrides):
    settings = dict(steps=30, batch_size=8, lr=3e-3, eval_interval=10)
    return fine_tune_config(base, chats, tmp_path / "sft", cache_dir, **settings | overrides)


def test_a_model_tuned_on_conversations_answers_as_taught_and_stops(
    tmp_path, base, chats, cache_dir
):
    trainer = Trainer(_sft(tmp_path, base, chats, cache_dir), progress=False)
    assert len(trainer.shards.train) + len(trainer.shards.val) == 80
    _learns_to_answer_as_taught(trainer)


def _learns_to_answer_as_taught(trainer: Trainer) -> None:
    """The run's loss falls to a quarter, and the tuned model answers as the corpus does and
    stops."""
    before = trainer.evaluate()
    result = trainer.fit()
    assert result.val_loss < before / 4, (before, result.val_loss)
    lm = arlm.load(result.out)
    prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about owls."}])
    out = lm.generate(prompt, max_tokens=20, temperature=0)
    assert (out.text, out.finish_reason) == (" Noted.\n", "stop")


def test_lora_on_conversations_resumes_exactly(tmp_path, base, chats, cache_dir):
    lora = dict(lora_rank=4, steps=8, eval_interval=4)
    straight = Trainer(_sft(tmp_path / "a", base, chats, cache_dir, **lora), progress=False)
    straight.fit()

    def stop_at_3(trainer):
        if trainer.step == 3:
            trainer.request_stop()

    cfg = _sft(tmp_path / "b", base, chats, cache_dir, **lora)
    Trainer(cfg, progress=False).fit(on_step=stop_at_3)
    resumed = Trainer(cfg, resume=True, progress=False)
    resumed.fit()
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_packed_conversations_train_as_taught(tmp_path, base, chats, cache_dir):
    """--packing: rows of several conversations; the model learns them as unpacked, in fewer
    rows a step."""
    trainer = Trainer(_sft(tmp_path, base, chats, cache_dir, packing=True), progress=False)
    train = trainer.shards.train
    assert isinstance(train, PackedSplit) and len(train) <= len(train.split) / 2
    _learns_to_answer_as_taught(trainer)
    text = tmp_path / "text.txt"
    text.write_text("plain text. " * 300)
    with pytest.raises(ValueError, match="packing packs conversations, and .* holds text"):
        Trainer(_sft(tmp_path / "t", base, text, cache_dir, packing=True), progress=False)


def test_conversations_need_a_model_and_no_remedies(tmp_path, base, chats, cache_dir):
    with pytest.raises(ValueError, match="--init-from"):
        Trainer(
            TrainConfig(corpus=str(chats), out=str(tmp_path / "a"), cache_dir=str(cache_dir)),
            progress=False,
        )
    with pytest.raises(ValueError, match="unlikelihood"):
        Trainer(_sft(tmp_path / "b", base, chats, cache_dir, unlikelihood="token"), progress=False)

"""arlm prepare: a corpus streamed into token shards, split by document, resumable, read back
as one token stream per split; the command end to end, then training on what it wrote."""

import functools
import json
import random
import re

import numpy as np
import pytest
import torch

import arlm.train.prepare as prepare_module
from arlm.cli import main
from arlm.tokenizer import Tokenizer
from arlm.train.corpus import START, CorpusError, builtin_documents, read_pieces, resolve
from arlm.train.data import META, get_batch, is_validation
from arlm.train.prepare import load_or_prepare, prepare

WORDS = ["the", "a", "river", "stone", "lantern", "carries", "over", "old", "city", "finds"]


def _texts(n: int) -> list[str]:
    r = random.Random(0)
    texts = []
    for i in range(n):
        sentences = [
            " ".join(r.choice(WORDS) for _ in range(r.randint(3, 12))).capitalize() + "."
            for _ in range(r.randint(1, 9))
        ]
        texts.append(f"Document {i}.\n" + " ".join(sentences))
    return texts


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, its documents in order): 150 in a JSON-lines file (with a blank line and a
    record of whitespace, which are no documents), then 150 text files."""
    folder = tmp_path_factory.mktemp("corpus")
    texts = _texts(300)
    lines = [json.dumps({"text": text, "id": i}) for i, text in enumerate(texts[:150])]
    lines[10:10] = ["", json.dumps({"text": " \n "})]
    (folder / "part1.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "part2").mkdir()
    for i, text in enumerate(texts[150:], start=150):
        (folder / "part2" / f"doc{i:04d}.txt").write_text(text)
    return folder, texts


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "shards"
    shards = prepare(str(corpus[0]), out, tokenizer=tokenizer, shard_tokens=1000, progress=False)
    return shards


def _by_split(texts: list[str], tokenizer: Tokenizer) -> dict[str, list[int]]:
    eot = tokenizer.eos_token_ids[0]
    expected = {"train": [], "val": []}
    for i, ids in enumerate(tokenizer.encode_batch(texts)):
        expected["val" if is_validation(i, 0.1) else "train"] += ids + [eot]
    return expected


def test_every_token_is_in_exactly_one_shard_position(corpus, tokenizer, prepared):
    folder, texts = corpus
    expected = _by_split(texts, tokenizer)
    assert prepared.meta["split"] == "document" and prepared.meta["documents"] == len(texts)
    assert prepared.train.tolist() == expected["train"]
    assert prepared.val.tolist() == expected["val"]
    for name in ("train", "val"):
        files = sorted(prepared.directory.glob(f"{name}_*.bin"))
        assert [f.name for f in files] == prepared.meta[name]["shards"]
        sizes = [f.stat().st_size for f in files]
        assert len(files) >= 2 and set(sizes[:-1]) == {2000} and 0 < sizes[-1] <= 2000
        stream = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in files])
        assert stream.tolist() == expected[name]
    # validation is whole documents, about a tenth of them, the same ones each time
    held_out = [i for i in range(len(texts)) if is_validation(i, 0.1)]
    assert 0.05 < len(held_out) / len(texts) < 0.15
    decoded = tokenizer.decode(prepared.val.tolist()).split("<|endoftext|>")[:-1]
    assert decoded == [texts[i] for i in held_out]


def test_a_single_text_file_holds_out_the_tail_of_its_tokens(tmp_path, tokenizer):
    text = "\n".join(builtin_documents()[:6])
    (tmp_path / "input.txt").write_text(text)
    shards = prepare(
        str(tmp_path / "input.txt"),
        tmp_path / "out",
        tokenizer=tokenizer,
        shard_tokens=3000,
        progress=False,
    )
    ids = tokenizer.encode(text, add_special_tokens=False) + tokenizer.eos_token_ids[:1]
    n_val = int(len(ids) * 0.1)
    assert shards.meta["split"] == "tail" and shards.meta["documents"] == 1
    assert len(shards.meta["train"]["shards"]) > 2
    assert shards.train.tolist() == ids[:-n_val]
    assert shards.val.tolist() == ids[-n_val:]


def _contents(folder) -> dict:
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != META}
    meta = json.loads((folder / META).read_text())
    del meta["seconds"]  # the one thing that differs between runs
    return {**files, META: meta}


@pytest.mark.parametrize("stop_at", [3, 9])
def test_an_interrupted_prepare_resumes_to_the_same_bytes(
    corpus, tokenizer, tmp_path, monkeypatch, stop_at
):
    folder, _ = corpus
    # documents come in pieces of 300 characters, so shards end inside documents and pieces
    monkeypatch.setattr(
        prepare_module, "read_pieces", functools.partial(read_pieces, piece_chars=300)
    )
    pieces = len(list(read_pieces(resolve(str(folder)), START, piece_chars=300)))
    settings = dict(tokenizer=tokenizer, shard_tokens=700, progress=False)
    prepare(str(folder), tmp_path / "straight", **settings)

    save = prepare_module._save_progress
    saves = []

    def save_then_stop(out, state):
        saves.append(state)
        if len(saves) == stop_at:  # as Ctrl-C would, after a shard and before its checkpoint
            raise KeyboardInterrupt
        save(out, state)

    monkeypatch.setattr(prepare_module, "_save_progress", save_then_stop)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prepare(str(folder), out, **settings)
    monkeypatch.setattr(prepare_module, "_save_progress", save)
    assert not (out / META).exists() and (out / "progress.json").is_file()
    assert len(list(out.glob("*_*.bin"))) >= stop_at - 1
    assert not list(out.glob(".*.tmp"))  # an interrupted write leaves no temporary behind
    (out / ".val_000001.bin.x1y2.tmp").write_bytes(b"\0")  # as a killed process would

    encoded = []
    encode = tokenizer.encode_batch
    monkeypatch.setattr(
        tokenizer, "encode_batch", lambda texts: encoded.extend(texts) or encode(texts)
    )
    resumed = prepare(str(folder), out, **settings)
    assert _contents(out) == _contents(tmp_path / "straight")
    assert not (out / "progress.json").exists() and not list(out.glob(".*.tmp"))
    assert 0 < len(encoded) < pieces  # it went on from the checkpoint, not from the start
    assert resumed.meta["documents"] == 300


@pytest.mark.parametrize("bad_line", [4, 160])  # found before encoding starts, and during it
@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "cut off', "not valid JSON"),
        ('{"content": "no text field"}', 'no "text" string'),
        ('{"text": ["a", "list"]}', 'no "text" string'),
        ('"just a string"', 'no "text" string'),
    ],
)
def test_a_bad_json_line_is_named_by_file_and_line(tmp_path, tokenizer, bad_line, line, message):
    lines = [json.dumps({"text": text}) for text in _texts(200)]
    lines[1] = ""  # blank lines count as lines
    lines[bad_line - 1] = line
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    rule = 'each line of a .jsonl file must be one JSON object with a "text" string'
    pattern = f"{re.escape(str(path))}:{bad_line}: {re.escape(message)}.*{re.escape(rule)}"
    with pytest.raises(CorpusError, match=pattern):
        prepare(str(path), tmp_path / "out", tokenizer=tokenizer, shard_tokens=500, progress=False)
    assert not list((tmp_path / "out").glob(".*.tmp"))


@pytest.mark.parametrize(
    "name, content", [("e.txt", " \n\t\n"), ("e.jsonl", '\n{"text": "  "}\n{"text": ""}\n')]
)
def test_a_corpus_without_text_is_explained(tmp_path, tokenizer, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(CorpusError, match="is empty: its files hold no text"):
        prepare(str(tmp_path / name), tmp_path / "out", tokenizer=tokenizer, progress=False)
    assert not (tmp_path / "out").exists()


def test_windows_straddle_shard_boundaries(prepared):
    split = prepared.train
    files = [prepared.directory / name for name in prepared.meta["train"]["shards"]]
    stream = np.concatenate([np.fromfile(f, dtype=np.uint16) for f in files])
    starts = [0, 980, 999, 1000, 1990, len(stream) - 41]  # shards hold 1000 tokens each
    windows = split.windows(starts, block_size=40)
    assert windows.dtype == torch.int64
    assert windows.tolist() == [stream[s : s + 41].tolist() for s in starts]
    x, y = get_batch(split, 64, 40, torch.Generator().manual_seed(0))
    starts = torch.randint(len(stream) - 40, (64,), generator=torch.Generator().manual_seed(0))
    assert x.tolist() == [stream[s : s + 40].tolist() for s in starts]
    assert y.tolist() == [stream[s + 1 : s + 41].tolist() for s in starts]


def test_load_or_prepare_prepares_once_then_reuses(corpus, tokenizer, tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "docs.jsonl").write_text(
        "".join(json.dumps({"text": text}) + "\n" for text in corpus[1])
    )
    first = load_or_prepare(str(folder), tmp_path / "cache", vocab_size=300, progress=False)
    assert first.directory.parent == tmp_path / "cache" / "shards"
    assert first.tokenizer.vocab_size == 300

    def prepare_again(*args):
        raise AssertionError("prepared again")

    monkeypatch.setattr(prepare_module, "_encode", prepare_again)
    again = load_or_prepare(str(folder), tmp_path / "cache", vocab_size=300, progress=False)
    assert again.directory == first.directory and again.val.tolist() == first.val.tolist()
    # a resumed run brings the tokenizer it was trained with: the same shards
    resumed = load_or_prepare(
        str(folder), tmp_path / "cache", vocab_size=300, tokenizer=first.tokenizer, progress=False
    )
    assert resumed.directory == first.directory
    # a prepared folder is a corpus of its own, with its own tokenizer
    direct = load_or_prepare(str(first.directory), tmp_path / "elsewhere", progress=False)
    assert direct.directory == first.directory
    with pytest.raises(ValueError, match="prepared with another tokenizer"):
        load_or_prepare(str(first.directory), tmp_path, tokenizer=tokenizer, progress=False)
    # another vocabulary, or a corpus file that changed, is another key
    with pytest.raises(AssertionError, match="prepared again"):
        load_or_prepare(str(folder), tmp_path / "cache", vocab_size=301, progress=False)
    with open(folder / "docs.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(AssertionError, match="prepared again"):
        load_or_prepare(str(folder), tmp_path / "cache", vocab_size=300, progress=False)


def test_a_folder_of_other_settings_or_other_files_is_refused(
    corpus, prepared, tokenizer, tmp_path
):
    folder, _ = corpus
    with pytest.raises(ValueError, match=r"other settings \(differing: shard_tokens\)"):
        prepare(str(folder), prepared.directory, tokenizer=tokenizer, shard_tokens=999)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        prepare(str(folder), tmp_path, tokenizer=tokenizer, progress=False)
    with pytest.raises(ValueError, match="val_fraction=1.5 is not allowed"):
        prepare(str(folder), tmp_path / "x", val_fraction=1.5)


def test_cli_prepare_then_train_on_it(corpus, tmp_path, capsys):
    folder, texts = corpus
    out = tmp_path / "shards"
    argv = ["prepare", str(folder), "--out", str(out), "--vocab-size", "300"]
    assert main([*argv, "--shard-tokens", "2000"]) == 0
    printed = capsys.readouterr().out
    assert f"documents: {len(texts)} (" in printed and "validation: by document" in printed
    assert re.search(r"tokens: [\d,]+ train / [\d,]+ val in \d+ \+ \d+ shards of uint16", printed)
    assert "tokens/s" in printed and f"arlm train --corpus {out}" in printed

    run, cache = tmp_path / "run", tmp_path / "cache"
    train = ["train", "--corpus", str(out), "--preset", "tiny", "--batch-size", "4"]
    train += ["--eval-iters", "2", "--out", str(run), "--sample", "", "--cache-dir", str(cache)]
    assert main([*train, "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    shards = load_or_prepare(str(out), cache, progress=False)
    corpus_line = f"corpus: {len(shards.train):,} train / {len(shards.val):,} val tokens"
    assert "vocabulary 300" in printed and corpus_line in printed
    assert not (cache / "shards").exists()  # read where it was prepared, not copied
    resume = ["train", "--out", str(run), "--resume", "--steps", "3", "--sample", ""]
    assert main(resume) == 0
    assert "trained to step 3" in capsys.readouterr().out

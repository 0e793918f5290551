"""Corpus reading, the token-shard reader and teacher-forcing batches."""

import json

import numpy as np
import pytest
import torch

from arlm.train.corpus import (
    START,
    CorpusError,
    builtin_documents,
    count_documents,
    read_pieces,
    resolve,
    sample_texts,
)
from arlm.train.data import TokenSplit, get_batch, is_validation, sample_starts
from arlm.train.prepare import prepare


def documents(spec: str) -> list[str]:
    """The corpus's documents, whole, as the reader streams them in pieces."""
    whole: dict[int, str] = {}
    for piece in read_pieces(resolve(spec)):
        whole[piece.document] = whole.get(piece.document, "") + piece.text
    return list(whole.values())


def test_builtin_corpus_is_the_python_reference():
    docs = builtin_documents()
    assert len(docs) > 50
    assert 400_000 < sum(map(len, docs)) < 600_000
    assert docs == builtin_documents()  # a fixed order, so splits are deterministic
    assert documents("builtin") == docs


def test_file_folder_glob_and_json_lines(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "c.py").write_text("ignored")
    records = [{"text": "gamma", "id": 1}, {"text": "  "}, {"text": "delta"}]
    lines = [json.dumps(r) for r in records]
    (tmp_path / "sub" / "d.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    assert documents(str(tmp_path / "a.txt")) == ["alpha"]
    # sorted paths; blank lines and records of whitespace are no documents
    assert documents(str(tmp_path)) == ["alpha", "beta", "gamma", "delta"]
    assert documents(str(tmp_path / "**" / "*.md")) == ["beta"]
    assert count_documents(resolve(str(tmp_path)), at_most=100) == 4
    assert count_documents(resolve(str(tmp_path)), at_most=2) == 2


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing.txt", "not found; give 'builtin', a text file, a JSON-lines"),
        (lambda p: (p / "e.txt").write_text("  \n") and p / "e.txt", "is empty"),
        (lambda p: p, "has no .txt/.md/.jsonl files"),
        (lambda p: p / "*.txt", "no files match"),
        (lambda p: (p / "b.txt").write_bytes(b"ok\n\xff\xfe") and p / "b.txt", "not UTF-8"),
    ],
)
def test_bad_corpora_are_explained(tmp_path, setup, message, tokenizer):
    with pytest.raises(CorpusError, match=message):
        prepare(str(setup(tmp_path)), tmp_path / "out", tokenizer=tokenizer, progress=False)


def test_a_long_document_is_read_in_pieces_that_encode_as_the_whole(tmp_path, tokenizer):
    text = "".join(builtin_documents()[:20])  # prose, tables, indented code
    (tmp_path / "long.txt").write_text(text)
    pieces = list(read_pieces(resolve(str(tmp_path / "long.txt")), START, piece_chars=2000))
    assert len(pieces) > 20 and all(len(p.text) <= 2000 for p in pieces)
    assert "".join(p.text for p in pieces) == text
    assert [p.end for p in pieces] == [False] * (len(pieces) - 1) + [True]
    assert {p.document for p in pieces} == {0}
    ids = [i for p in pieces for i in tokenizer.encode(p.text, add_special_tokens=False)]
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    # reading again from any piece's position yields the same pieces from there on
    again = list(read_pieces(resolve(str(tmp_path / "long.txt")), pieces[7].position, 2000))
    assert again == pieces[7:]


def test_the_tokenizer_sample_is_spread_over_a_large_corpus(tmp_path):
    lines = [json.dumps({"text": f"document {i:04d} " + "x" * 80}) + "\n" for i in range(2000)]
    (tmp_path / "c.jsonl").write_text("".join(lines))
    sample = list(sample_texts(resolve(str(tmp_path)), max_bytes=20_000))
    numbers = [int(text.split()[1]) for text in sample]
    per_line = len(lines[0])
    assert 0.8 * 20_000 < len(sample) * per_line < 1.5 * 20_000  # about max_bytes, whole lines
    assert min(numbers) < 100 and max(numbers) > 1900  # from the start to the end
    assert list(sample_texts(resolve("builtin"), 10**9)) == builtin_documents()


def test_held_out_documents_are_a_fixed_tenth():
    held_out = [i for i in range(10_000) if is_validation(i, 0.1)]
    assert 900 < len(held_out) < 1100
    assert held_out == [i for i in range(10_000) if is_validation(i, 0.1)]


def _split(*lengths, start=0, stop=None):
    """A split over shards holding 0, 1, 2, ... in order, of the given lengths."""
    bounds = np.cumsum((0, *lengths))
    pairs = zip(bounds[:-1], bounds[1:], strict=True)
    shards = [np.arange(a, b, dtype=np.uint16) for a, b in pairs]
    return TokenSplit(shards, start, stop)


def test_a_split_reads_its_shards_as_one_stream():
    split = _split(7, 5, 11, start=3, stop=20)
    assert len(split) == 17
    assert split.tolist() == list(range(3, 20))
    assert split[2:13].tolist() == list(range(5, 16))  # across all three shards
    assert split[15:40].tolist() == [18, 19]
    windows = split.windows([0, 3, 9, 13], block_size=3)
    assert windows.dtype == torch.int64 and windows.shape == (4, 4)
    assert windows.tolist() == [[s + 3 + k for k in range(4)] for s in (0, 3, 9, 13)]


def test_batches_are_windows_and_targets_are_shifted_by_one():
    split = _split(300, 200, 500)
    x, y = get_batch(split, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(y, x + 1)  # consecutive tokens: the target is the next one
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # each row is one contiguous window
    # the draw is one randint over the window starts, so seeded runs see the same windows
    expected = torch.randint(1000 - 16, (8,), generator=torch.Generator().manual_seed(0))
    assert x[:, 0].tolist() == expected.tolist()
    assert sample_starts(split, 8, 16, torch.Generator().manual_seed(0)) == expected.tolist()


def test_too_short_split_is_explained():
    with pytest.raises(ValueError, match="too few for windows"):
        get_batch(_split(4, 6), 2, 16, torch.Generator())

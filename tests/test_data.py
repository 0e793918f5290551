"""Corpus loading, cached token shards and teacher-forcing batches."""

import numpy as np
import pytest
import torch

from arlm.train.corpus import CorpusError, builtin_documents, load_documents
from arlm.train.data import get_batch, prepare_shards


def test_builtin_corpus_is_the_python_reference():
    docs = builtin_documents()
    assert len(docs) > 50
    assert 400_000 < sum(map(len, docs)) < 600_000
    assert docs == builtin_documents()  # a fixed order, so splits are deterministic


def test_file_folder_and_glob(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "sub" / "c.py").write_text("ignored")
    assert load_documents(str(tmp_path / "a.txt")) == ["alpha"]
    assert load_documents(str(tmp_path)) == ["alpha", "beta"]
    assert load_documents(str(tmp_path / "**" / "*.md")) == ["beta"]


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing.txt", "not found"),
        (lambda p: (p / "e.txt").write_text("  \n") and p / "e.txt", "is empty"),
        (lambda p: p, "has no .txt/.md files"),
        (lambda p: p / "*.txt", "no files match"),
    ],
)
def test_bad_corpora_are_explained(tmp_path, setup, message):
    with pytest.raises(CorpusError, match=message):
        load_documents(str(setup(tmp_path)))


def test_shards_are_cached_by_corpus_and_tokenizer(tmp_path, tokenizer, monkeypatch):
    docs = builtin_documents()[:10]
    first = prepare_shards(docs, tokenizer, tmp_path)
    assert first.train.dtype == np.uint16
    n = len(first.train) + len(first.val)
    assert len(first.val) == int(n * 0.1)

    def no_encoding(*args):
        raise AssertionError("re-encoded a cached corpus")

    monkeypatch.setattr(tokenizer, "encode_batch", no_encoding)
    second = prepare_shards(docs, tokenizer, tmp_path)
    assert second.directory == first.directory
    assert np.array_equal(second.train, first.train)
    with pytest.raises(AssertionError, match="re-encoded"):
        prepare_shards(docs[:5], tokenizer, tmp_path)  # another corpus: another key


def test_batches_are_windows_and_targets_are_shifted_by_one():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, 8, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (8, 16)
    assert torch.equal(y, x + 1)  # consecutive tokens: the target is the next one
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # each row is one contiguous window


def test_too_short_split_is_explained():
    with pytest.raises(ValueError, match="too few for windows"):
        get_batch(np.arange(10, dtype=np.uint16), 2, 16, torch.Generator())

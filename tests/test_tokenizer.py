"""Byte-level BPE: any text round-trips; streaming never splits a character."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arlm.tokenizer import EOT, Tokenizer

TRICKY = [
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\n\n",
    "emoji 🎉👩‍👩‍👧 flags 🇫🇷",
    "CJK 世界 日本語 한국어",
    "combining e\u0301 a\u0308 \u0301 alone",
    "control \x00\x01\x07\x1b[31m",
    "surrogate-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    f"a special token {EOT} inside",
    "\ufffd replacement char",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_on_tricky_strings(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_on_any_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_incremental_decoder_never_yields_a_broken_character(tokenizer, text):
    decoder = tokenizer.decoder()
    pieces = [decoder.push(i) for i in tokenizer.encode(text)]
    pieces.append(decoder.flush())
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_a_multibyte_character_is_released_only_when_complete(tokenizer):
    ids = tokenizer.encode("🎉")
    assert len(ids) > 1  # the emoji is split across byte tokens in a 512-token vocabulary
    decoder = tokenizer.decoder()
    assert [decoder.push(i) for i in ids] == [""] * (len(ids) - 1) + ["🎉"]


def test_special_token_has_one_id_and_ends_generation(tokenizer):
    ids = tokenizer.encode(EOT)
    assert ids == tokenizer.eos_token_ids
    assert tokenizer.bos_token_id == ids[0]


def test_save_and_load_give_the_same_ids(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    text = "def f(x):\n    return x ** 2  # 世界"
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.vocab_size == tokenizer.vocab_size == 512


def test_bad_files_and_sizes_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="at least 257"):
        Tokenizer.train(["abc"], vocab_size=100)

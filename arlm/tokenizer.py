"""Byte-level BPE on Hugging Face ``tokenizers``: train, save, load, encode, decode, stream."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from arlm.atomic import write_atomic
from arlm.chat_template import render_chat

EOT = "<|endoftext|>"

# For models without a template of their own (arlm-trained ones): one "role: content" line
# per message, then "assistant:" for the model to continue.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
# the most characters a chat template may write or build when the caller sets no limit
DEFAULT_MAX_TEMPLATE_CHARS = 16 * 2**20


class Tokenizer:
    """Text to token ids and back; wraps a ``tokenizers.Tokenizer``.

    ``eos_token_ids`` are the ids that end a generation; ``bos_token_id`` is the id that starts a
    text when there is no other context; ``chat_template`` is the Jinja template of a Hugging Face
    model folder, when it has one.
    """

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        eos_token_ids: Iterable[int] | None = None,
        chat_template: str | None = None,
        bos_token_id: int | None = None,
    ) -> None:
        self._tk = tokenizer
        eot = tokenizer.token_to_id(EOT)
        if eos_token_ids is None:
            eos_token_ids = [] if eot is None else [eot]
        self.eos_token_ids = list(eos_token_ids)
        # the token that starts a text when there is no other context (GPT-2 uses end-of-text)
        self.bos_token_id = eot if bos_token_id is None else bos_token_id
        self.chat_template = chat_template

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """Learn a byte-level BPE of ``vocab_size`` ids (256 bytes, merges, and ``EOT``)."""
        if vocab_size < 257:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                "and the end-of-text token, so at least 257"
            )
        tk = _HFTokenizer(models.BPE())
        # every byte maps to a printable symbol first, so any UTF-8 text encodes and round-trips
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        try:
            tk = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
        return cls(tk)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` atomically (temporary file, then rename)."""
        write_atomic(path, self.to_json().encode())

    def to_json(self) -> str:
        return self._tk.to_str()

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Special tokens written in the text map to their ids;
        ``add_special_tokens`` lets a model's post-processor add its markers (e.g. Llama's BOS)."""
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's own string for ``token_id`` (byte-level stand-ins and all), or
        None for an id it does not have."""
        return self._tk.id_to_token(token_id)

    @functools.cached_property
    def token_texts(self) -> list[str]:
        """Each id's text on its own, by id (a byte that is part of a longer character decodes
        to U+FFFD); computed once per tokenizer."""
        ids = [[i] for i in range(self.vocab_size)]
        return self._tk.decode_batch(ids, skip_special_tokens=False)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        max_chars: int = DEFAULT_MAX_TEMPLATE_CHARS,
        tools: list[dict] | None = None,
    ) -> str:
        """The prompt text of a conversation (``{"role", "content"}`` dicts), rendered with the
        model's Jinja chat template as Hugging Face's ``apply_chat_template`` does, or with
        ``DEFAULT_CHAT_TEMPLATE`` when the model has none. Encode the result with
        ``add_special_tokens=False``: the template writes its own markers. A template that
        refuses the conversation (``raise_exception``), fails on it, or writes or builds more
        than ``max_chars`` characters raises ``ValueError`` (see ``arlm.chat_template``).
        ``tools``: tool definitions the template may render, as ``apply_chat_template(tools=)``."""
        return render_chat(
            self.chat_template or DEFAULT_CHAT_TEMPLATE,
            messages,
            add_generation_prompt,
            bos_token=self._token_text(self.bos_token_id),
            eos_token=self._token_text(self.eos_token_ids[0] if self.eos_token_ids else None),
            max_chars=max_chars,
            tools=tools,
        )

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self._tk.id_to_token(token_id) or "")

    def decoder(self) -> IncrementalDecoder:
        """A fresh streaming decoder; see ``IncrementalDecoder``."""
        return IncrementalDecoder(self)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"


class IncrementalDecoder:
    """Turns token ids into text pieces as they arrive, never splitting a character.

    One character may span several tokens (a byte-level BPE can cut an emoji in the middle), so a
    piece is released only when the text decoded so far no longer ends in an incomplete sequence
    (U+FFFD). Decoding a short window (``prefix``) along with the new ids keeps each step cheap and
    lets tokenizers that look at neighbours (leading-space rules) decode as they would in full.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window decoded for context
        self._read = 0  # ids before this index have been released as text

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became complete (possibly empty)."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix : self._read])
        text = decode(self._ids[self._prefix :])
        if len(text) > len(prefix_text) and not text.endswith("\ufffd"):
            piece = text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self._ids)
            return piece
        return ""

    def flush(self) -> str:
        """Release whatever is pending at the end of the stream, complete or not."""
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix : self._read])
        text = decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(prefix_text) :]

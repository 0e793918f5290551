"""Supervised fine-tuning data: conversations rendered with the model's chat template, trained on
what the assistant says and on nothing else.

A chat corpus is a JSON-lines file whose every line is one example, in either of the shapes
Hugging Face's TRL reads:

- ``{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": "..."}, ...]}``:
  the conversation goes through the tokenizer's chat template (``Tokenizer.apply_chat_template``);
  each assistant turn, with the end-of-turn markers the template writes after it, is a target;
- ``{"prompt": "...", "completion": "..."}``: the completion (and an end-of-sequence token) is
  the target, the prompt only its context.

Each turn is encoded as generation would meet it: the text up to the turn, as the template
renders it with the generation prompt, is one piece and the turn another, each encoded alone,
so the model learns the tokens it will be asked to produce after the prompt ``arlm serve``
renders. Where the template writes no end-of-sequence token after an assistant turn, one is
added (as a target), so the model learns to stop.

Examples are held in memory (a conversation is a few thousand tokens at most, a fine-tuning set
thousands of them). A batch is a set of whole examples, each from its first token, cut at the
training window and padded to the longest row; padding and context positions take no loss.
Packed (``PackedSplit``, ``arlm train --packing``), a row holds several examples one after
another, laid out once by best-fit decreasing into rows of the window: each attends only to
itself and its positions start at 0, so it computes what it would alone, without the padding
short examples leave in a batch of long ones.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from arlm.tokenizer import Tokenizer
from arlm.train.corpus import JSONL_SUFFIX, CorpusError
from arlm.train.data import VAL_FRACTION, is_validation

IGNORE = -100  # the loss's ignore index: no target at this position
ROLES = ("system", "user", "assistant", "tool")
SHAPES = (
    'each line must be one JSON object: {"messages": [{"role": ..., "content": ...}, ...]} or '
    '{"prompt": "...", "completion": "..."}'
)


def corpus_kind(corpus: str) -> str:
    """What ``corpus`` holds, by its first example: ``"preference"`` (a JSON-lines file of
    ``prompt``, ``chosen``, ``rejected``), ``"chat"`` (``messages``, or ``prompt`` and
    ``completion``) or ``"text"`` (anything else: a text corpus's lines have ``text``)."""
    path = Path(corpus).expanduser()
    if path.suffix != JSONL_SUFFIX or not path.is_file():
        return "text"
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError:
                    return "text"  # the text reader says what is wrong with the line
                if not isinstance(first, dict):
                    return "text"
                if {"chosen", "rejected"} <= first.keys():
                    return "preference"
                if "messages" in first or {"prompt", "completion"} <= first.keys():
                    return "chat"
                return "text"
    return "text"


@dataclass(frozen=True)
class Example:
    """One example's token ids and, for each, whether it is a target (predicted with a loss)."""

    ids: np.ndarray  # int64 (n,)
    trained: np.ndarray  # bool (n,)


def check_messages(messages, where: str) -> list[dict]:
    """``messages`` as a conversation: a non-empty list of role/content dicts."""
    if not isinstance(messages, list) or not messages:
        raise CorpusError(f"{where}: messages must be a non-empty list; {SHAPES}")
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise CorpusError(
                f"{where}: each message needs a role, one of {', '.join(ROLES)}; got {m!r}"
            )
        if not isinstance(m.get("content"), str):
            raise CorpusError(f"{where}: a {m['role']} message's content must be a string")
    return messages


def _pieces(tokenizer: Tokenizer, row: dict, where: str) -> list[tuple[str, bool]]:
    """The example's text in pieces, each with whether it is a target."""
    if "messages" in row:
        messages = check_messages(row["messages"], where)
        return conversation_pieces(tokenizer, messages, where)
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        raise CorpusError(f"{where}: {SHAPES} (both strings, the completion not empty)")
    return [(prompt, False), (completion, True)]


def conversation_pieces(
    tokenizer: Tokenizer, messages: list[dict], where: str, first: int = 0
) -> list[tuple[str, bool]]:
    """The rendered conversation cut where each assistant turn from message ``first`` on begins
    (the text before it, with the generation prompt) and ends (the text through it); those turns
    are the targets."""
    if not any(m["role"] == "assistant" for m in messages[first:]):
        raise CorpusError(f"{where}: the conversation has no assistant turn to train on")
    render = tokenizer.apply_chat_template
    try:
        whole = render(messages, add_generation_prompt=False)
        cuts = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < first:
                continue
            before = render(messages[:i], add_generation_prompt=True)
            through = render(messages[: i + 1], add_generation_prompt=False)
            for prefix in (before, through):
                if not whole.startswith(prefix):
                    raise ValueError(f"turn {i}'s rendering is not how the whole one begins")
                cuts.append(len(prefix))
    except ValueError as e:
        raise CorpusError(
            f"{where}: the chat template cannot be cut into turns ({e}): each start of the "
            "conversation, rendered alone, must begin its whole rendering (a template that "
            "rewrites earlier turns, such as one that drops their reasoning, cannot mark the "
            "assistant's tokens)"
        ) from e
    bounds = [0, *cuts, len(whole)]
    return [(whole[a:b], k % 2 == 1) for k, (a, b) in enumerate(pairwise(bounds))]


def encode_example(tokenizer: Tokenizer, row: dict, where: str) -> Example:
    """``row`` (one line of a chat corpus) as token ids and targets; ``where`` names it in
    errors."""
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: {SHAPES}")
    return encode_pieces(tokenizer, _pieces(tokenizer, row, where), templated="messages" in row)


def encode_pieces(tokenizer: Tokenizer, pieces: list[tuple[str, bool]], templated: bool) -> Example:
    """Text pieces, each encoded alone, as one example's ids and targets; a target piece with no
    end-of-sequence token gets one. A chat template writes its own special tokens
    (``templated``); a plain prompt is encoded as ``lm.generate`` encodes one, with the
    tokenizer's (a beginning-of-sequence token, where it adds one)."""
    eos = tokenizer.eos_token_ids
    ids: list[int] = []
    trained: list[bool] = []
    for k, (text, target) in enumerate(pieces):
        special = k == 0 and not templated
        piece = tokenizer.encode(text, add_special_tokens=special) if text or special else []
        if target and eos and not set(piece) & set(eos):
            piece.append(eos[0])  # the template ends the turn without it: learn to stop
        ids += piece
        trained += [target] * len(piece)
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool))


class ChatSplit:
    """The examples of one split, drawn whole into padded batches."""

    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)

    def sample(self, n: int, generator: torch.Generator) -> list[int]:
        """``n`` example indices drawn uniformly, with one draw from ``generator``."""
        return torch.randint(len(self.examples), (n,), generator=generator).tolist()

    def batch(self, indices: list[int], window: int, pad_id: int) -> tuple[torch.Tensor, ...]:
        """Inputs (n, T) and targets (n, T) of the examples ``indices``: each row one example
        from its start, cut at ``window`` tokens, padded with ``pad_id`` to the longest row;
        a target is the next token where that token is trained, else ``IGNORE``."""
        rows = [self.examples[i] for i in indices]
        length = min(window, max(len(e.ids) for e in rows) - 1)
        x = np.full((len(rows), length), pad_id, dtype=np.int64)
        y = np.full((len(rows), length), IGNORE, dtype=np.int64)
        for r, e in enumerate(rows):
            n = min(length, len(e.ids) - 1)
            x[r, :n] = e.ids[:n]
            y[r, :n] = np.where(e.trained[1 : n + 1], e.ids[1 : n + 1], IGNORE)
        return torch.from_numpy(x), torch.from_numpy(y)


class PackedSplit:
    """The examples of a ``ChatSplit`` packed into rows of up to ``window`` input positions
    (each example cut at the window, as unpacked): a draw is a row of examples."""

    def __init__(self, split: ChatSplit, window: int) -> None:
        self.split, self.window = split, window
        # each example's input positions, cut at the window as unpacked
        self.lengths = [min(window, len(e.ids) - 1) for e in split.examples]
        self.rows = pack_examples(self.lengths, window)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def tokens(self) -> int:
        return self.split.tokens

    def sample(self, n: int, generator: torch.Generator) -> list[int]:
        """``n`` row indices drawn uniformly, with one draw from ``generator``."""
        return torch.randint(len(self.rows), (n,), generator=generator).tolist()

    def batch(self, indices: list[int], window: int, pad_id: int) -> tuple[torch.Tensor, ...]:
        """Inputs, targets, positions and segments (each (n, T)) of the rows ``indices``:
        each row's examples one after another, the k-th one segment k, its positions from 0;
        padded to the longest row (segment -1, no targets). ``window`` is the split's."""
        if window != self.window:
            raise ValueError(f"the rows were packed for a window of {self.window}, not {window}")
        examples, lengths = self.split.examples, self.lengths
        fills = [sum(lengths[i] for i in self.rows[r]) for r in indices]
        x = np.full((len(indices), max(fills)), pad_id, dtype=np.int64)
        y = np.full_like(x, IGNORE)
        positions, segments = np.zeros_like(x), np.full_like(x, -1)
        for r, row in enumerate(indices):
            at = 0
            for k, i in enumerate(self.rows[row]):
                e, n = examples[i], lengths[i]
                x[r, at : at + n] = e.ids[:n]
                y[r, at : at + n] = np.where(e.trained[1 : n + 1], e.ids[1 : n + 1], IGNORE)
                positions[r, at : at + n] = np.arange(n)
                segments[r, at : at + n] = k
                at += n
        return tuple(torch.from_numpy(a) for a in (x, y, positions, segments))


def pack_examples(lengths: list[int], window: int) -> list[list[int]]:
    """Indices of examples of ``lengths`` (each at most ``window``) grouped into rows of at most
    ``window`` positions, best fit decreasing: the longest first, each into the row it leaves
    the least room in (a new row where none has room). Each row lists its examples in order."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (positions left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([i])
            left, row = window - n, len(rows) - 1
        else:
            left, row = room.pop(at)
            rows[row].append(i)
            left -= n
        if left > 0:
            bisect.insort(room, (left, row))
    return [sorted(row) for row in rows]


@dataclass
class ChatCorpus:
    """A chat corpus encoded: its train and validation examples, and the tokenizer."""

    train: ChatSplit | PackedSplit
    val: ChatSplit | PackedSplit
    tokenizer: Tokenizer


def load_chat(path: str, tokenizer: Tokenizer, val_fraction: float = VAL_FRACTION) -> ChatCorpus:
    """Encode the chat corpus at ``path``; about ``val_fraction`` of its examples, chosen by a
    hash of their index, are held out for validation."""
    train, val = read_examples(path, lambda row, where: [encode_example(tokenizer, row, where)])
    return ChatCorpus(ChatSplit(train), ChatSplit(val), tokenizer)


def read_examples(
    path: str, encode: Callable[[dict, str], list[Example]], val_fraction: float = VAL_FRACTION
) -> tuple[list[Example], list[Example]]:
    """The train and validation examples of the JSON-lines file ``path``: ``encode`` turns each
    line (and where it is, for errors) into its examples, which stay together in one split."""
    splits: dict[str, list[Example]] = {"train": [], "val": []}
    index = 0
    with open(Path(path).expanduser(), encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{where}: not JSON ({e}); {SHAPES}") from e
            examples = encode(row, where)
            for example in examples:
                if len(example.ids) < 2 or not example.trained[1:].any():
                    raise CorpusError(f"{where}: the example has no target after its first token")
            splits["val" if is_validation(index, val_fraction) else "train"] += examples
            index += 1
    if not splits["train"] or not splits["val"]:
        raise CorpusError(
            f"{path} holds {index} examples, too few to hold out a validation share of "
            f"{val_fraction:g} and train on the rest; give at least {int(3 / val_fraction)}"
        )
    return splits["train"], splits["val"]

"""DITTO (Xu et al. 2022, "Learning to Break the Loop"): train on sentences repeated back to
back, with a loss that stops each copy from being likelier than the one before.

A model that has just read a sentence twice gives its tokens a higher probability the third
time (self-reinforcement), and greedy decoding then loops. DITTO builds training sequences that
are one corpus sentence repeated to fill the window, and for every token of the second copy on,
whose same token one copy earlier had probability ``p*`` (held fixed), minimises

    -log(1 - |p(x_t | x_<t) - lambda * p*(x_{t-l} | x_<t-l)|)

so the repeated token's probability is pulled towards ``lambda`` times its previous one: it may
not grow copy after copy. The first copy gets no DITTO loss.

Sentences come from the training split: a random start, moved to just after a sentence end,
running to the next one. Everything random here is drawn from a generator the caller seeds from
(run seed, step), so a resumed run builds the same sequences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arlm.tokenizer import Tokenizer
from arlm.train.data import TokenSplit

# sentence length in tokens: shorter ones are mostly headings or list marks; longer are cut
MIN_SENTENCE = 4
MAX_SENTENCE = 48
# how far past a random start a sentence end is looked for
SEARCH_TOKENS = 256


def sentence_end_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids whose text ends a sentence: ending in ``.``, ``!`` or ``?``, or holding a line break."""
    ends = set()
    for token, text in enumerate(tokenizer.token_texts):
        stripped = text.rstrip(" ")
        if "\n" in text or stripped.endswith((".", "!", "?")):
            ends.add(token)
    return frozenset(ends)


def sample_sentence(
    split: TokenSplit, ends: frozenset[int], generator: torch.Generator
) -> list[int]:
    """One sentence of ``split``: from just after a sentence end at or after a random start to
    the next end (included), ``MIN_SENTENCE`` to ``MAX_SENTENCE`` tokens. Tries again from
    another start when none is found; a corpus without sentence ends gives a plain stretch."""
    for _ in range(64):
        start = int(torch.randint(len(split) - SEARCH_TOKENS, (1,), generator=generator))
        window = split[start : start + SEARCH_TOKENS].tolist()
        marks = [i for i, t in enumerate(window) if t in ends]
        for a, b in zip(marks, marks[1:], strict=False):
            if MIN_SENTENCE <= b - a <= MAX_SENTENCE:
                return window[a + 1 : b + 1]
    start = int(torch.randint(len(split) - MAX_SENTENCE, (1,), generator=generator))
    return split[start : start + MAX_SENTENCE // 2].tolist()


def repetition_batch(
    split: TokenSplit, ends: frozenset[int], rows: int, block: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` windows (rows, block + 1) of one sentence repeated, and each row's sentence
    length (rows,). Inputs are ``windows[:, :-1]``, targets ``windows[:, 1:]``."""
    windows, lengths = [], []
    for _ in range(rows):
        sentence = sample_sentence(split, ends, generator)
        copies = (block + 1) // len(sentence) + 1
        windows.append((sentence * copies)[: block + 1])
        lengths.append(len(sentence))
    return torch.tensor(windows), torch.tensor(lengths)


def ditto_positions(lengths: torch.Tensor, block: int) -> torch.Tensor:
    """(rows, block) bool: target positions in the second copy or later. Target t is token
    t + 1 of the window, which is in a later copy when ``t + 1 >= length``, and its previous
    copy's target is at ``t - length`` (a real position when ``t >= length``)."""
    t = torch.arange(block, device=lengths.device)[None]
    return t >= lengths[:, None]


def ditto_loss(
    logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, lam: float
) -> torch.Tensor:
    """The DITTO term summed over every repeated position: ``logits`` (rows, T, vocab),
    ``targets`` (rows, T), ``lengths`` (rows,) the sentence lengths, ``lam`` in (0, 1]."""
    rows, T, _ = logits.shape
    probs = F.softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]  # (rows, T)
    mask = ditto_positions(lengths, T)
    # the same token one copy back, its probability held fixed (no gradient through it)
    back = (torch.arange(T, device=logits.device)[None] - lengths[:, None]).clamp(min=0)
    previous = probs.detach().gather(1, back)
    gap = (probs - lam * previous).abs()
    return (-torch.log((1.0 - gap).clamp(min=1e-5)) * mask).sum()

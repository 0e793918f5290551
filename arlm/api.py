"""The Python API: ``arlm.load(path)`` returns an ``LM`` that generates, streams and scores."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from arlm.checkpoint import load_model
from arlm.config import resolve_dtype
from arlm.generate import Chunk, Completion, complete, stream
from arlm.model import Transformer
from arlm.sampling import SamplingParams
from arlm.tokenizer import Tokenizer


@dataclass
class Score:
    """How likely a text is under the model, by the chain rule.

    ``token_logprobs[i]`` is log p(token_ids[i] | everything before it); their sum is
    ``total_logprob``, the log-probability of the whole text; ``perplexity`` is
    exp(-total_logprob / number of scored tokens).
    """

    token_ids: list[int]
    token_logprobs: list[float]

    @property
    def total_logprob(self) -> float:
        return math.fsum(self.token_logprobs)

    @property
    def perplexity(self) -> float:
        return math.exp(-self.total_logprob / len(self.token_logprobs))


class LM:
    """A loaded model with its tokenizer."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    @staticmethod
    def _params(params: SamplingParams | None, kwargs: dict) -> SamplingParams:
        if params is not None and kwargs:
            raise TypeError("pass sampling settings either as params= or as keywords, not both")
        return params if params is not None else SamplingParams.from_kwargs(**kwargs)

    def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, **kwargs
    ) -> Completion:
        """Continue ``prompt`` (text or token ids); keywords are ``SamplingParams`` fields."""
        return complete(
            self.model, self.tokenizer, self._prompt_ids(prompt), self._params(params, kwargs)
        )

    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None, **kwargs
    ) -> Iterator[Chunk]:
        """Like ``generate``, yielding text pieces as they are decoded (``Chunk``, a ``str``)."""
        return stream(
            self.model, self.tokenizer, self._prompt_ids(prompt), self._params(params, kwargs)
        )

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """(T, vocab) logits of one teacher-forced forward over ``token_ids``."""
        if len(token_ids) > self.config.block_size:
            raise ValueError(
                f"{len(token_ids)} tokens exceed the model's context of {self.config.block_size}"
            )
        idx = torch.tensor([token_ids], device=self.device)
        return self.model(idx)[0][0].float()

    @torch.inference_mode()
    def score(self, text: str | list[int]) -> Score:
        """Per-token log-probabilities of ``text`` (or token ids).

        The text is scored after the tokenizer's start token when it has one, so the first token
        is scored too. Texts longer than the context are scored in overlapping windows, each new
        token seeing at least half a context of the tokens before it.
        """
        ids = self._prompt_ids(text)
        start = self.tokenizer.bos_token_id
        if start is not None and (not ids or ids[0] != start):
            ids = [start, *ids]
        if len(ids) < 2:
            raise ValueError("nothing to score: the text has no tokens after the start token")
        block = self.config.block_size
        stride = max(block // 2, 1)
        logprobs: list[float] = []
        scored = 1  # ids[:scored] are context or already scored
        while scored < len(ids):
            end = min(len(ids), block if scored == 1 else scored + stride)
            begin = max(0, end - block)
            window = torch.tensor([ids[begin:end]], device=self.device)
            logits = self.model(window)[0][0, :-1].float()
            lp = F.log_softmax(logits, dim=-1).gather(-1, window[0, 1:, None])[:, 0]
            logprobs.extend(lp[-(end - scored) :].tolist())
            scored = end
        return Score(token_ids=ids[1:], token_logprobs=logprobs)


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    allow_pickle: bool = False,
) -> LM:
    """Load an arlm checkpoint directory or a Hugging Face model folder.

    dtype: None keeps float32 (the default on CPU); ``bfloat16``/``float16`` halve the memory.
    allow_pickle: let a Hugging Face folder with only ``pytorch_model.bin`` load (with
    ``weights_only=True``); off by default because a pickle can run code.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}: give an arlm checkpoint or HF model folder")
    dtype = resolve_dtype(dtype)
    from arlm import hf  # the importer is only needed here

    if hf.is_hf_dir(path):
        model, tokenizer = hf.load_hf(path, device=device, dtype=dtype, allow_pickle=allow_pickle)
    else:
        model, tokenizer = load_model(path, device=device, dtype=dtype)
    return LM(model, tokenizer)

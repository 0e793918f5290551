"""``SpeculativeConfig``: which proposer guesses tokens for the engine to verify, and how many.

Field names follow vLLM's ``--speculative-config`` where it has one (``method``,
``num_speculative_tokens``, ``prompt_lookup_min``/``prompt_lookup_max``,
``disable_by_batch_size``, ``quantization``); ``draft_model`` is vLLM's ``model`` (both are
accepted from JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

from arlm.validate import check_int

METHODS = ("ngram", "draft")
DRAFT_QUANTIZATIONS = ("int8", "int4")
# Decode rows in one step above which no row speculates: with many rows the forward is bound by
# compute, not by reading the weights, and a verified position costs more of a step. On a CPU
# (benchmarks/speculative.py, "batch" part) prompt lookup still paid at 32 rows (1.4x to 1.7x),
# the largest size measured, and guesses that never pay cost nothing measurable at 16 rows
# (the adaptive k stops them); past 32 it is unmeasured, so it stops there.
DEFAULT_DISABLE_BY_BATCH_SIZE = 32


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding: a proposer guesses up to ``num_speculative_tokens`` tokens per
    decoding sequence and one forward of the model verifies them (``arlm.engine.speculation``).

    method: ``ngram`` (prompt lookup: the continuation of the latest earlier occurrence of the
    sequence's last ``prompt_lookup_max`` .. ``prompt_lookup_min`` tokens) or ``draft`` (a
    smaller model sharing the tokenizer, ``draft_model``, proposing greedily through its own KV
    cache; ``quantization`` int8/int4 quantizes its weights as they load, so the target's own
    directory becomes an int4 self-draft). adaptive: each sequence's k follows its recent
    acceptance, between 1 and ``num_speculative_tokens``. disable_by_batch_size: no sequence
    speculates in a step with more decode rows than this (None: the default measured on a CPU,
    ``DEFAULT_DISABLE_BY_BATCH_SIZE``).
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    draft_model: str | None = None
    quantization: str | None = None
    adaptive: bool = True
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"speculative method={self.method!r} is not allowed; it must be one of "
                f"{', '.join(METHODS)}"
            )
        check_int("num_speculative_tokens", self.num_speculative_tokens, 1)
        check_int("prompt_lookup_min", self.prompt_lookup_min, 1)
        check_int(
            "prompt_lookup_max",
            self.prompt_lookup_max,
            self.prompt_lookup_min,
            f">= prompt_lookup_min ({self.prompt_lookup_min})",
        )
        if self.disable_by_batch_size is not None:
            check_int("disable_by_batch_size", self.disable_by_batch_size, 1)
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"adaptive={self.adaptive!r} is not allowed; it must be true or false")
        if self.method == "draft" and not self.draft_model:
            raise ValueError(
                "speculative method 'draft' needs draft_model: the path of a model that shares "
                "the target's tokenizer (the target's own path with quantization='int4' for a "
                "self-draft)"
            )
        if self.method == "ngram" and (self.draft_model or self.quantization):
            raise ValueError(
                "draft_model and quantization are for method 'draft'; prompt lookup (ngram) "
                "runs no model"
            )
        if self.quantization is not None and self.quantization not in DRAFT_QUANTIZATIONS:
            raise ValueError(
                f"quantization={self.quantization!r} is not allowed; it must be one of "
                f"{', '.join(DRAFT_QUANTIZATIONS)} (or absent)"
            )

    @property
    def max_batch(self) -> int:
        """Decode rows in a step above which no row speculates."""
        if self.disable_by_batch_size is None:
            return DEFAULT_DISABLE_BY_BATCH_SIZE
        return self.disable_by_batch_size

    @classmethod
    def from_json(cls, text: str | dict) -> SpeculativeConfig:
        """From ``--speculative-config`` JSON (or its dict): vLLM's ``model`` names the draft;
        an unknown key is refused, naming the known ones."""
        try:
            data = json.loads(text) if isinstance(text, str) else dict(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"the speculative config is not valid JSON ({e}): {text!r}") from None
        if not isinstance(data, dict):
            raise ValueError(f"the speculative config must be a JSON object, not {data!r}")
        if "model" in data:
            if "draft_model" in data:
                raise ValueError("give the draft as model or draft_model, not both")
            data["draft_model"] = data.pop("model")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(
                f"unknown speculative config keys {unknown}; the known ones are "
                f"{', '.join(known)} (and model, vLLM's name for draft_model)"
            )
        return cls(**data)

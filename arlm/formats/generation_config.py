"""The sampling defaults a model's authors ship in ``generation_config.json``.

They apply to a request that does not set the field, as vLLM's ``--generation-config auto``
does: ``temperature``, ``top_p``, ``top_k``, ``min_p`` and ``repetition_penalty``. Like vLLM,
``do_sample`` is not read (a temperature above 0 samples), nor are lengths (``max_length``,
``max_new_tokens``: a request's own ``max_tokens`` and the context bound it). The end-of-text ids
(``eos_token_id``) are the tokenizer's business (``arlm.formats.hf``).
"""

from __future__ import annotations

import os
from pathlib import Path

from arlm.formats.checkpoint import CheckpointError, read_json
from arlm.sampling import SamplingParams

GENERATION_CONFIG = "generation_config.json"
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(directory: str | os.PathLike) -> dict[str, float | int]:
    """The ``SamplingParams`` fields a model folder's generation_config.json sets (empty when
    it has none), checked as a request's would be."""
    path = Path(directory) / GENERATION_CONFIG
    if not path.is_file():
        return {}
    config = read_json(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    defaults = {name: config[name] for name in SAMPLING_FIELDS if config.get(name) is not None}
    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return defaults

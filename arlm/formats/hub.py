"""Models named as people name them: a Hugging Face Hub id (``org/name``) resolves to a folder
of the Hub cache, downloaded first when it is not there.

``huggingface_hub`` does the work (imported here only when an id is given) and reads its usual
environment: ``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is), ``HF_TOKEN`` (gated and private
repos), ``HF_HUB_OFFLINE=1`` (the cache only, no network). Only the files arlm reads are
downloaded: the config, generation config, tokenizer and chat template files, and one set of
weights (safetensors, one file or the shards an index lists; pickled weights only with
``allow_pickle``), never a repo's other formats (GGUF, ``original/``, ``consolidated.*``).

A local path always wins: a folder that exists is used as it is, even if it is also an id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from arlm.formats.checkpoint import CheckpointError, read_json
from arlm.formats.hf import PICKLE, PICKLE_INDEX, SAFETENSORS, SAFETENSORS_INDEX

# what arlm.formats.hf and arlm.formats.checkpoint read besides the weights
READ_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
# weight formats in order of preference: (single file, index of shards)
_WEIGHTS = ((SAFETENSORS, SAFETENSORS_INDEX), (PICKLE, PICKLE_INDEX))

# org/name, as the Hub spells ids; a leading dot or a second slash makes it a path
_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")


class HubError(OSError):
    """A Hub id that cannot be resolved (no such repo, no access, not cached offline), with
    what to do about it."""


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub model id, ``org/name``."""
    return _HUB_ID.fullmatch(name) is not None


def resolve(
    model: str | os.PathLike, revision: str | None = None, allow_pickle: bool = False
) -> Path:
    """The local folder of ``model``: itself when the path exists, else the Hub cache's snapshot
    of the id ``model`` at ``revision`` (a branch, tag or commit; None: main), downloaded when
    missing. ``allow_pickle``: a repo with only ``pytorch_model.bin`` weights may be downloaded."""
    path = Path(model)
    if path.exists():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} applies to Hub ids, but {path} is a local folder "
                "(a local path wins over an id); drop the revision or move the folder"
            )
        return path
    if not is_hub_id(str(model)):
        raise FileNotFoundError(
            f"no model at {path}: give an arlm checkpoint folder, a Hugging Face model folder "
            "or a Hub id (org/name)"
        )
    return download(str(model), revision, allow_pickle)


def download(repo_id: str, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """The snapshot folder of Hub repo ``repo_id`` at ``revision`` with the files arlm reads,
    downloaded into the Hub cache where missing (huggingface_hub's progress bars show it)."""
    hub = _import_hub()
    try:
        files, unreachable = _list_files(hub, repo_id, revision)
        if files is None:
            folder = _cached_snapshot(hub, repo_id, revision, unreachable)
        else:
            wanted = _files_to_fetch(hub, repo_id, revision, files, allow_pickle)
            folder = Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=wanted))
    except hub.errors.HfHubHTTPError as e:
        raise _explain(hub, e, repo_id, revision) from e
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{_name(repo_id, revision)} has no config.json ({folder})")
    return folder


def _import_hub():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # submodules the package loads lazily
        import huggingface_hub.errors
    except ImportError as e:
        raise ImportError(
            "a Hub id needs the huggingface_hub package: pip install huggingface_hub"
        ) from e
    return huggingface_hub


def _name(repo_id: str, revision: str | None) -> str:
    return repo_id if revision is None else f"{repo_id} (revision {revision})"


def _list_files(hub, repo_id: str, revision: str | None):
    """(the repo's file names, None), or (None, why the Hub was not asked) when offline or
    unreachable: then the cache answers, as huggingface_hub itself falls back."""
    if hub.constants.HF_HUB_OFFLINE:
        return None, "HF_HUB_OFFLINE is set"
    try:
        return hub.HfApi().list_repo_files(repo_id, revision=revision), None
    except (hub.errors.RepositoryNotFoundError, hub.errors.RevisionNotFoundError):
        raise  # the Hub's answer, explained by the caller
    except hub.errors.HfHubHTTPError as e:
        if getattr(e.response, "status_code", None) in (401, 403):
            raise  # no access: explained by the caller
        return None, f"the Hub answered {e}"  # a server error: the cache may still serve
    except Exception as e:  # the HTTP client's own connection and timeout errors
        return None, f"the Hub could not be reached ({type(e).__name__}: {e})"


def _cached_snapshot(hub, repo_id: str, revision: str | None, why: str) -> Path:
    try:
        return Path(
            hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=list(READ_FILES), local_files_only=True
            )
        )
    except hub.errors.LocalEntryNotFoundError as e:
        if hub.constants.HF_HUB_OFFLINE:
            fix = "set HF_HUB_OFFLINE=0 to download it, or download it first"
        else:
            fix = "check the network, or download it first"
        raise HubError(
            f"{_name(repo_id, revision)} is not a local folder, nor in the Hub cache "
            f"({hub.constants.HF_HUB_CACHE}), and {why}: {fix} where the Hub is reachable "
            f"(hf download {repo_id}). ({e})"
        ) from e


def _files_to_fetch(
    hub, repo_id: str, revision: str | None, files: list[str], allow_pickle: bool
) -> list[str]:
    """The repo files arlm reads: the ones of ``READ_FILES`` it has and one set of weights."""
    present = set(files)
    wanted = [name for name in READ_FILES if name in present]
    for single, index in _WEIGHTS:
        if index in present:
            # the index is small: fetch it first, to fetch exactly the shards it names
            path = hub.hf_hub_download(repo_id, index, revision=revision)
            weight_map = read_json(path).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{repo_id}'s {index} has no weight_map")
            weights = [index, *sorted(set(weight_map.values()))]
        elif single in present:
            weights = [single]
        else:
            continue
        if single == PICKLE and not allow_pickle:
            raise CheckpointError(
                f"{_name(repo_id, revision)} has only pickled weights ({', '.join(weights)}); "
                "loading a pickle can run arbitrary code, so arlm reads safetensors. Look for a "
                "safetensors copy of the model, or pass allow_pickle=True (--allow-pickle) to "
                "load it with torch.load(weights_only=True)"
            )
        return wanted + weights
    raise CheckpointError(
        f"{_name(repo_id, revision)} has no weights arlm reads: looked for {SAFETENSORS}, "
        f"{SAFETENSORS_INDEX} (sharded), {PICKLE} and {PICKLE_INDEX}; the repo holds "
        f"{', '.join(sorted(files)[:12])}"
    )


def _explain(hub, e: Exception, repo_id: str, revision: str | None) -> Exception:
    """The Hub's error as what it means for the user, and what to do."""
    token = "no token is set (HF_TOKEN or `hf auth login`)"
    if hub.get_token() is not None:
        token = "the token given (HF_TOKEN or `hf auth login`) has no access to it"
    if isinstance(e, hub.errors.GatedRepoError):
        return HubError(
            f"{repo_id} is a gated model and {token}: accept its terms at "
            f"https://huggingface.co/{repo_id}, then give a token of that account"
        )
    if isinstance(e, hub.errors.RepositoryNotFoundError):
        return HubError(
            f"no model {repo_id} on the Hub, and no local folder of that name: check the id; "
            f"if the repo is private, {token}"
        )
    if isinstance(e, hub.errors.RevisionNotFoundError):
        return HubError(
            f"{repo_id} has no revision {revision!r}: give a branch, tag or commit it has"
        )
    return HubError(f"{_name(repo_id, revision)}: the Hub refused the download ({e})")

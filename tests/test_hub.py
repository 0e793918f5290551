"""Models named by Hub id: resolved through a Hugging Face Hub cache that each test fills itself
(the real layout: models--org--name/{blobs,snapshots/<commit>,refs}), offline; the online
paths' decisions and errors with huggingface_hub's own exception classes, the network stubbed."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import arlm
from arlm.cli import main
from arlm.formats.checkpoint import CheckpointError
from arlm.formats.hub import HubError, is_hub_id, resolve
from arlm.serve.protocol import CompletionRequest
from arlm.tokenizer import EOT

transformers = pytest.importorskip("transformers")
hub = pytest.importorskip("huggingface_hub")
import huggingface_hub.constants  # noqa: E402  (reloaded when a test changes the environment)
import huggingface_hub.errors  # noqa: E402

REPO = "tiny-org/tiny-llama"
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
GENERATION = {"temperature": 0.6, "top_p": 0.95, "top_k": 1, "repetition_penalty": 1.1}


def _hf_folder(folder: Path, tokenizer, seed: int, **save_kwargs) -> Path:
    """A tiny random-weight Llama in Hugging Face format, with the tokenizer files."""
    eot = tokenizer.token_to_id(EOT)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder, **save_kwargs)
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT})
    )
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    """Source folders: sharded safetensors (seed 0), another model (seed 1), and the first one
    with only pickled weights."""
    root = tmp_path_factory.mktemp("hub-src")
    sharded = _hf_folder(root / "sharded", tokenizer, seed=0, max_shard_size="40KB")
    other = _hf_folder(root / "other", tokenizer, seed=1)
    pickled = root / "pickled"
    shutil.copytree(other, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save(arlm_state(other), pickled / "pytorch_model.bin")
    return SimpleNamespace(sharded=sharded, other=other, pickled=pickled)


def arlm_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def cache_repo(cache: Path, repo_id: str, source: Path, commit: str, refs=("main",)) -> Path:
    """Put ``source``'s files into the Hub cache as huggingface_hub lays them out: contents in
    blobs/ (named by sha256 for LFS files, git's blob sha1 for the rest), the commit's tree in
    snapshots/<commit>/ as links to them, and each ref naming the commit."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for file in sorted(source.iterdir()):
        data = file.read_bytes()
        if file.suffix in (".safetensors", ".bin"):
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (storage / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def _reload_hub_settings() -> None:
    # huggingface_hub reads its environment once, at import; reloading its constants module
    # makes it read the test's (every other module reads them as constants.X when called)
    importlib.reload(huggingface_hub.constants)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HOME in tmp_path, HF_HUB_OFFLINE=1, no token: the Hub cache folder (HF_HOME/hub)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _reload_hub_settings()
    yield tmp_path / "hf" / "hub"
    monkeypatch.undo()
    _reload_hub_settings()


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Online mode with a cache in tmp_path and the Hub at a closed port: a test stubs what it
    asks the Hub, and anything it did not stub fails at once instead of reaching the network."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for name in ("HF_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    _reload_hub_settings()
    yield tmp_path / "cache"
    monkeypatch.undo()
    _reload_hub_settings()


def _weights(lm) -> dict[str, torch.Tensor]:
    return lm.model.state_dict()


def _same_weights(a, b) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------
# offline, from a cache made here


def test_hub_ids_and_paths():
    assert is_hub_id("Qwen/Qwen3-0.6B") and is_hub_id("org_1/name.v2-x")
    for name in ("gpt2", "./org/name", "/abs/path", "a/b/c", "org/", "~/x", "../org"):
        assert not is_hub_id(name), name


def test_sharded_safetensors_from_the_cache(offline, folders):
    assert len(list(folders.sharded.glob("model-*.safetensors"))) > 1
    snapshot = cache_repo(offline, REPO, folders.sharded, COMMIT_A)
    assert resolve(REPO) == snapshot
    lm = arlm.load(REPO)
    assert _same_weights(lm, arlm.load(folders.sharded))
    assert lm.tokenizer.encode("hello") == arlm.load(folders.sharded).tokenizer.encode("hello")


def test_hub_cache_from_hf_hub_cache(monkeypatch, offline, folders, tmp_path):
    # HF_HUB_CACHE names the cache itself, over HF_HOME's
    cache = tmp_path / "elsewhere"
    cache_repo(cache, REPO, folders.other, COMMIT_A)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    _reload_hub_settings()
    assert _same_weights(arlm.load(REPO), arlm.load(folders.other))


def test_a_local_path_wins(offline, folders, tmp_path, monkeypatch):
    cache_repo(offline, REPO, folders.sharded, COMMIT_A)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(folders.other, tmp_path / REPO)  # ./tiny-org/tiny-llama, another model
    assert _same_weights(arlm.load(REPO), arlm.load(folders.other))
    with pytest.raises(ValueError, match="revision='main' applies to Hub ids"):
        arlm.load(REPO, revision="main")


def test_revision_branch_tag_and_commit(offline, folders):
    cache_repo(offline, REPO, folders.sharded, COMMIT_A)
    cache_repo(offline, REPO, folders.other, COMMIT_B, refs=("v1",))
    sharded, other = arlm.load(folders.sharded), arlm.load(folders.other)
    assert _same_weights(arlm.load(REPO), sharded)  # main
    assert _same_weights(arlm.load(REPO, revision="v1"), other)
    assert _same_weights(arlm.load(REPO, revision=COMMIT_A), sharded)
    with pytest.raises(HubError, match=r"tiny-llama \(revision v2\) is not a local folder, nor"):
        arlm.load(REPO, revision="v2")


def test_pickled_weights_refused_unless_allowed(offline, folders):
    cache_repo(offline, REPO, folders.pickled, COMMIT_A)
    with pytest.raises(CheckpointError, match="(?s)pickle can run arbitrary code.*--allow-pickle"):
        arlm.load(REPO)
    assert _same_weights(arlm.load(REPO, allow_pickle=True), arlm.load(folders.other))


def test_missing_id_offline(offline, capsys):
    message = (
        r"tiny-org/nothing is not a local folder, nor in the Hub cache .* set HF_HUB_OFFLINE=0"
    )
    with pytest.raises(HubError, match=message):
        arlm.load("tiny-org/nothing")
    for command in (["generate", "tiny-org/nothing", "x"], ["serve", "tiny-org/nothing"]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert "HF_HUB_OFFLINE=0" in err and "hf download tiny-org/nothing" in err
    assert main(["generate", "not-an-id", "x"]) == 1
    assert "or a Hub id (org/name)" in capsys.readouterr().err


def test_cli_generate_and_export_take_an_id(offline, folders, tmp_path, capsys):
    cache_repo(offline, REPO, folders.sharded, COMMIT_A)
    cache_repo(offline, REPO, folders.other, COMMIT_B, refs=("v1",))
    argv = ["generate", REPO, "hello", "--max-tokens", "5", "--temperature", "0"]
    assert main([*argv, "--revision", "v1"]) == 0
    expected = arlm.load(folders.other).generate("hello", max_tokens=5, temperature=0).text
    assert capsys.readouterr().out == expected + "\n"
    assert main(["export", REPO, str(tmp_path / "out"), "--format", "arlm"]) == 0
    assert _same_weights(arlm.load(tmp_path / "out"), arlm.load(folders.sharded))


# ---------------------------------------------------------------------------------------------
# generation_config.json's sampling defaults


@pytest.fixture
def with_defaults(offline, folders, tokenizer, tmp_path) -> Path:
    source = tmp_path / "with-defaults"
    shutil.copytree(folders.other, source)
    eos = [tokenizer.token_to_id(EOT), 7]
    (source / "generation_config.json").write_text(
        json.dumps({**GENERATION, "do_sample": True, "max_new_tokens": 3, "eos_token_id": eos})
    )
    cache_repo(offline, REPO, source, COMMIT_A)
    return source


def test_generation_config_defaults_apply_where_unset(with_defaults, tokenizer):
    lm = arlm.load(REPO)
    assert lm.sampling_defaults == GENERATION
    assert lm.tokenizer.eos_token_ids == [tokenizer.token_to_id(EOT), 7]
    params = lm.sampling_params(max_tokens=6)
    assert (params.temperature, params.top_p, params.top_k) == (0.6, 0.95, 1)
    assert params.max_tokens == 6  # max_new_tokens is not a default (a request's own bound)
    # set to arlm's own default value is still set: the request wins
    assert lm.sampling_params(temperature=1.0, top_k=0).temperature == 1.0
    assert lm.sampling_params(temperature=1.0, top_k=0).top_k == 0
    # top_k=1 from the file makes every seed's sample the greedy one
    lm_arlm = arlm.load(REPO, generation_config="arlm")
    assert lm_arlm.sampling_defaults == {}
    greedy = lm.generate("the", max_tokens=8, temperature=0, ignore_eos=True).token_ids
    for seed in range(3):
        assert lm.generate("the", max_tokens=8, seed=seed, ignore_eos=True).token_ids == greedy
    # without the file's top_k, arlm's defaults (temperature 1, all tokens) sample otherwise
    sampled = [
        lm_arlm.generate("the", max_tokens=8, seed=seed, ignore_eos=True).token_ids
        for seed in range(3)
    ]
    assert any(ids != greedy for ids in sampled)
    # a SamplingParams object is taken as it is
    explicit = arlm.SamplingParams(max_tokens=8, seed=0, ignore_eos=True)
    assert lm.generate("the", params=explicit).token_ids == sampled[0]


def test_generation_config_in_the_cli_and_the_server(with_defaults, capsys):
    assert main(["generate", REPO, "the", "--max-tokens", "2", "--temperature", "0.5"]) == 0
    err = capsys.readouterr().err
    assert "generation_config.json: top_p=0.95, top_k=1, repetition_penalty=1.1" in err
    assert "temperature=0.6" not in err  # the flag set it
    assert main(["generate", REPO, "the", "--max-tokens", "2", "--generation-config", "arlm"]) == 0
    assert "generation_config" not in capsys.readouterr().err
    lm = arlm.load(REPO)
    request = CompletionRequest(prompt="the", temperature=1.0)
    params = request.sampling_params(16, None, defaults=lm.sampling_defaults)
    assert (params.temperature, params.top_p, params.top_k) == (1.0, 0.95, 1)
    unset = CompletionRequest(prompt="the").sampling_params(16, None, defaults={})
    assert (unset.temperature, unset.top_k) == (1.0, 0)


def test_bad_generation_config_is_named(offline, folders, tmp_path):
    source = tmp_path / "bad"
    shutil.copytree(folders.other, source)
    (source / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(CheckpointError, match=r"generation_config.json: top_p=1.5 is not allowed"):
        arlm.load(source)
    assert arlm.load(source, generation_config="arlm").sampling_defaults == {}
    with pytest.raises(ValueError, match="generation_config='vllm' is not allowed"):
        arlm.load(source, generation_config="vllm")


# ---------------------------------------------------------------------------------------------
# online: what is fetched, and the Hub's errors (huggingface_hub's classes; no network)


def _hub_error(cls, status: int):
    response = SimpleNamespace(status_code=status, headers={}, request=None)
    return cls(f"{status} Client Error.", response=response)


def _listing(files):
    def list_repo_files(self, repo_id, revision=None, **kwargs):
        return list(files)

    return list_repo_files


def test_only_the_files_arlm_reads_are_fetched(online, folders, monkeypatch):
    snapshot = cache_repo(online, REPO, folders.sharded, COMMIT_A)
    shards = sorted(p.name for p in folders.sharded.glob("model-*.safetensors"))
    repo = [
        *(p.name for p in folders.sharded.iterdir()),
        "README.md",
        "consolidated.safetensors",
        "original/params.json",
        "original/consolidated.00.pth",
        "pytorch_model.bin",
        "model-q4.gguf",
    ]
    fetched = {}

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        fetched.update(repo_id=repo_id, revision=revision, files=allow_patterns)
        return str(snapshot)

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        return str(snapshot / filename)

    monkeypatch.setattr(hub.HfApi, "list_repo_files", _listing(repo))
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub, "hf_hub_download", hf_hub_download)
    assert resolve(REPO, revision="v1") == snapshot
    assert fetched == {
        "repo_id": REPO,
        "revision": "v1",
        "files": [
            "config.json",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "model.safetensors.index.json",
            *shards,
        ],
    }


def test_pickled_weights_refused_before_downloading(online, monkeypatch):
    def snapshot_download(*args, **kwargs):
        raise AssertionError("nothing may download before the refusal")

    repo = ["config.json", "tokenizer.json", "pytorch_model.bin", "README.md"]
    monkeypatch.setattr(hub.HfApi, "list_repo_files", _listing(repo))
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    with pytest.raises(CheckpointError, match=r"only pickled weights \(pytorch_model.bin\)"):
        resolve(REPO)
    monkeypatch.setattr(hub.HfApi, "list_repo_files", _listing(["config.json", "x.gguf"]))
    with pytest.raises(CheckpointError, match="no weights arlm reads.*holds config.json, x.gguf"):
        resolve(REPO)


def test_missing_repo_and_revision(online, monkeypatch):
    def missing(self, repo_id, revision=None, **kwargs):
        raise _hub_error(hub.errors.RepositoryNotFoundError, 401)

    monkeypatch.setattr(hub.HfApi, "list_repo_files", missing)
    with pytest.raises(HubError, match="no model tiny-org/nope on the Hub.*no token is set"):
        resolve("tiny-org/nope")

    def no_revision(self, repo_id, revision=None, **kwargs):
        raise _hub_error(hub.errors.RevisionNotFoundError, 404)

    monkeypatch.setattr(hub.HfApi, "list_repo_files", no_revision)
    with pytest.raises(HubError, match="tiny-llama has no revision 'v9'"):
        resolve(REPO, revision="v9")


def test_gated_repo_without_and_with_a_token(online, monkeypatch):
    def gated(*args, **kwargs):
        raise _hub_error(hub.errors.GatedRepoError, 401)

    repo = ["config.json", "model.safetensors"]
    monkeypatch.setattr(hub.HfApi, "list_repo_files", _listing(repo))
    monkeypatch.setattr(hub, "snapshot_download", gated)
    message = "gated model and no token is set .* accept its terms at https://huggingface.co/"
    with pytest.raises(HubError, match=message):
        resolve(REPO)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(HubError, match="gated model and the token given .* has no access"):
        resolve(REPO)


def test_unreachable_hub_falls_back_to_the_cache(online, folders, monkeypatch):
    def unreachable(self, repo_id, revision=None, **kwargs):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(hub.HfApi, "list_repo_files", unreachable)
    message = "the Hub could not be reached .*connection refused.*: check the network"
    with pytest.raises(HubError, match=message):
        resolve(REPO)
    snapshot = cache_repo(online, REPO, folders.other, COMMIT_A)
    assert resolve(REPO) == snapshot

"""No step of the sampling side waits for the device: rows with penalties, DRY, logit bias,
min_tokens, n-gram bans, a grammar and a loop guard are sampled without a host sync (issue 21,
item 3), proven on the CPU.

On the CPU every tensor is in host memory, so nothing can be seen to wait. ``HostDeviceAudit``
models where each tensor would live on CUDA: what a factory makes without a device, what
``.cpu()`` and ``to_host`` return and what is computed from those alone is host memory;
everything else (the model, the logits, whatever is made with ``device=``) is device memory.
It records every call that would make the host wait on CUDA:

- host data put on the device in one call (``torch.tensor(data, device=)``: a pageable copy),
  or a host tensor moved there other than through ``arlm.devices``' pinned copies;
- a device value read on the host (``.item()``, ``.tolist()``, ``bool()``, ``int()``, ``.cpu()``);
- a device tensor indexed with a Python list or a host tensor (copied over first), or a host
  tensor in a device op;
- data-dependent shapes (``nonzero``, a boolean-mask index).

``arlm.devices`` is the one place allowed to move data: its ``to_host`` is the step's one wait.
The CUDA half of the proof (``torch.cuda.set_sync_debug_mode("error")`` over the same requests)
is in ``tests/test_cuda.py``.
"""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from arlm.engine import Engine, EngineConfig
from arlm.engine.overlap import Overlap
from arlm.engine.runner import ModelRunner
from arlm.engine.token_chain import TokenChain
from arlm.sampling import SamplingParams
from tests.conftest import make_model

ROOT = Path(__file__).resolve().parent.parent
DEVICES = str(ROOT / "arlm" / "devices.py")

FACTORIES = {"tensor", "as_tensor", "asarray", "zeros", "ones", "full", "empty", "arange"}
FACTORIES |= {"rand", "randn", "randint", "scalar_tensor", "linspace", "eye"}
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"}
DATA_SHAPED = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}
MOVES = {"to", "cuda", "copy_"}


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _has_list(index) -> bool:
    """Whether an index holds a non-empty Python list (copied to the device before use)."""
    if isinstance(index, list):
        return len(index) > 0
    return isinstance(index, tuple) and any(_has_list(i) for i in index)


def _moves_to_a_device(name: str, args: tuple, kwargs: dict) -> bool:
    if name == "cuda":
        return True
    if name == "copy_":
        return True
    given = [*args[1:], kwargs.get("device")]
    return any(isinstance(a, torch.device | str) for a in given if a is not None)


class HostDeviceAudit(TorchFunctionMode):
    """Records, while ``recording``, each call that would synchronise with a CUDA device; see
    the module docstring for the model of what is where."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = False
        self.sites: list[str] = []
        self._host: dict[int, weakref.ref] = {}

    def is_host(self, t: torch.Tensor) -> bool:
        ref = self._host.get(id(t))
        return ref is not None and ref() is t

    def _mark_host(self, t: torch.Tensor) -> None:
        key = id(t)
        self._host[key] = weakref.ref(t, lambda _, key=key: self._host.pop(key, None))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        out = func(*args, **kwargs)
        inputs = _tensors(args) + _tensors(kwargs)
        if name in FACTORIES:
            host = kwargs.get("device") is None and all(self.is_host(t) for t in inputs)
        elif name in ("cpu", "numpy", "pin_memory"):
            host = True
            if out is args[0]:  # on CUDA a new tensor: the device one stays on the device
                out = out.view_as(out)
        elif name in MOVES and _moves_to_a_device(name, args, kwargs):
            host = name == "copy_" and self.is_host(args[0])
            if out is args[0] and name != "copy_":
                out = out.view_as(out)  # on CUDA a new tensor: the host one stays on the host
        else:
            host = bool(inputs) and all(self.is_host(t) for t in inputs)
        if host:
            for t in _tensors(out):
                self._mark_host(t)
        if self.recording and not self._sanctioned():
            problem = self._problem(name, args, kwargs, inputs)
            if problem:
                self.sites.append(f"{self._site()}: {problem}")
        return out

    def _problem(self, name: str, args: tuple, kwargs: dict, inputs: list) -> str | None:
        device_inputs = [t for t in inputs if not self.is_host(t)]
        given_data = name in ("tensor", "as_tensor", "asarray") and not _tensors(args[:1])
        if given_data and kwargs.get("device") is not None:
            return f"torch.{name}(host data, device=): a pageable host-to-device copy"
        if name in MOVES and _moves_to_a_device(name, args, kwargs):
            source = args[1] if name == "copy_" else args[0]
            if self.is_host(source):
                return f"{name}: a host tensor copied to the device outside arlm.devices"
        if name in READS and device_inputs:
            return f"{name}: a device value read on the host"
        if name in DATA_SHAPED or (name == "where" and len(args) == 1):
            return f"{name}: a shape that depends on device data"
        if name in ("__getitem__", "__setitem__", "index_put", "index_put_") and device_inputs:
            index = args[1]
            if _has_list(index):
                return f"{name} with a Python list index: copied to the device first"
            if any(t.dtype == torch.bool for t in _tensors(index)):
                return f"{name} with a boolean-mask index: a shape that depends on device data"
        mixed = [t for t in inputs if self.is_host(t) and t.dim() > 0]
        if mixed and device_inputs and name not in MOVES:
            return f"{name}: a host tensor in a device op (copied to the device first)"
        return None

    @staticmethod
    def _sanctioned() -> bool:
        frame = sys._getframe(2)
        while frame is not None:
            if frame.f_code.co_filename == DEVICES:
                return True
            frame = frame.f_back
        return False

    @staticmethod
    def _site() -> str:
        """The innermost frame of this repository's own code."""
        frame = sys._getframe(2)
        while frame is not None:
            path = Path(frame.f_code.co_filename)
            if path.is_relative_to(ROOT) and ".venv" not in path.parts:
                return f"{path.relative_to(ROOT)}:{frame.f_lineno}"
            frame = frame.f_back
        return "?"


def processor_requests() -> list[tuple[list[int], SamplingParams]]:
    """Rows that each switch on processors of the sampling side; the prompt repeats itself so
    that DRY and the n-gram ban have work from the first token on."""
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    loop_break = dict(loop_policy="break", repetition_detection={"min_span": 0, "min_count": 3})
    return [
        (prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
        (prompt, SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=3)),
        (
            prompt,
            SamplingParams(
                max_tokens=12, repetition_penalty=1.3, presence_penalty=0.4,
                frequency_penalty=0.3, penalty_last_n=4, temperature=0.8, seed=1, logprobs=2,
            ),
        ),
        (prompt, SamplingParams(max_tokens=12, dry_multiplier=0.8, dry_allowed_length=2)),
        (prompt, SamplingParams(max_tokens=12, no_repeat_ngram_size=2, temperature=0)),
        # a bias this strong makes the row repeat one token: the loop guard breaks the loop
        # and bans the token there, and min_tokens holds the end ids off
        (
            prompt,
            SamplingParams(
                max_tokens=16, logit_bias={60: 30.0}, min_tokens=6, repetition_penalty=1.2,
                **loop_break,
            ),
        ),
        (prompt, SamplingParams(max_tokens=10, structured_outputs={"json_object": True})),
    ]  # fmt: skip


def test_the_sampling_side_of_a_step_never_waits_for_the_device(tokenizer, monkeypatch):
    model = make_model("llama", vocab_size=tokenizer.vocab_size, seed=5)
    audit = HostDeviceAudit()
    run = TokenChain.run

    def recorded_run(self, *args, **kwargs):
        audit.recording = True
        try:
            return run(self, *args, **kwargs)
        finally:
            audit.recording = False

    monkeypatch.setattr(TokenChain, "run", recorded_run)
    with audit:  # from the engine's start, so the tensors made for requests are classified
        engine = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=8))
        for prompt, params in processor_requests():
            engine.add_request(prompt, params)
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
    assert steps >= 10
    assert engine.chain.loops_broken >= 1  # the break path (bans, a fresh sampler) ran
    assert audit.sites == [], "\n".join(dict.fromkeys(audit.sites))


def _recording(audit: HostDeviceAudit, monkeypatch, cls, name: str, on: bool) -> None:
    """Make ``cls.name`` record (``on``) or not while it runs, then restore what was."""
    method = getattr(cls, name)

    def wrapped(self, *args, **kwargs):
        before, audit.recording = audit.recording, on
        try:
            return method(self, *args, **kwargs)
        finally:
            audit.recording = before

    monkeypatch.setattr(cls, name, wrapped)


def test_an_overlapped_step_waits_for_nothing_but_the_ids_it_lands(tokenizer, monkeypatch):
    """With overlap scheduling the step after one in flight is scheduled (with rows joining)
    and its forward launched, the ids in flight land, and the step is sampled, every row's bans
    and processors (penalties, DRY, n-gram bans, bias, a grammar, a loop break) applied: all of
    it, the model's forward aside, with no wait but ``arlm.devices``' copy of those ids."""
    model = make_model("llama", vocab_size=tokenizer.vocab_size, seed=5)
    audit = HostDeviceAudit()
    _recording(audit, monkeypatch, Overlap, "follow", True)
    _recording(audit, monkeypatch, Overlap, "launch", True)
    _recording(audit, monkeypatch, ModelRunner, "_forward", False)
    with audit:
        config = EngineConfig(max_num_seqs=4, async_scheduling=True)
        engine = Engine(model, tokenizer, config=config)
        for prompt, params in processor_requests():
            engine.add_request(prompt, params)
        while engine.has_unfinished():
            engine.step()
    stats = engine.stats()
    assert stats["overlapped_steps"] == stats["steps"] - 1 >= 15
    assert engine.chain.loops_broken >= 1  # a row rolled back while its next step was in flight
    assert audit.sites == [], "\n".join(dict.fromkeys(audit.sites))


def test_the_audit_sees_each_kind_of_sync():
    """The audit itself: each kind of call it must catch is caught, and pinned copies through
    ``arlm.devices`` and pure device work are not."""
    from arlm.devices import to_device

    audit = HostDeviceAudit()
    logits = torch.zeros(2, 8)  # made outside the audit: a device tensor
    with audit:
        audit.recording = True
        torch.tensor([1, 2], device=logits.device)  # pageable copy
        logits[0, 1].item()  # read back
        bool(logits.isfinite().any())  # read back
        logits[:, [1, 2]] = 0.0  # list index
        logits[logits > 0]  # boolean mask
        host = torch.tensor([1, 2])
        logits.index_select(1, host)  # host tensor in a device op
        host.to(logits.device)  # host tensor moved outside arlm.devices
        logits.nonzero()
        index = to_device([1, 2], torch.long, logits.device)
        logits.index_fill(1, index, float("-inf")).softmax(-1)
        host.tolist()  # a host tensor's values are on the host already
    caught = [site.split(": ")[1].split()[0] for site in audit.sites]
    want = ["torch.tensor(host", "item", "__bool__", "__setitem__", "__getitem__"]
    assert caught == [*want, "index_select", "to", "nonzero"], "\n".join(audit.sites)
    assert all(site.startswith("tests/test_step_sync.py:") for site in audit.sites)

"""Serving many LoRA adapters over one base model (``arlm.model.multi_lora``): each row of a
batch computes what its own adapter merged into the model computes, whatever the other rows
use; PEFT's mixed-adapter batches agree; the engine's prefix cache, decode graphs and the
server keep adapters apart; what cannot be served is refused by name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn as nn

import arlm
from arlm.engine import AdapterBusy
from arlm.formats.checkpoint import CheckpointError
from arlm.formats.read import load_lora_modules
from arlm.model.adapter_store import AdapterStore, ServedAdapter
from arlm.model.lora import LoRAConfig, LoRALinear
from arlm.model.multi_lora import AdapterRows, MultiLoRALinear
from arlm.serve.config import ServeConfig
from arlm.tokenizer import EOT, Tokenizer
from tests.numerics import assert_close
from tests.serving import LiveServer
from tests.test_lora import COMMON, VOCAB, _randomize

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

# adapter name -> (target modules, rank, rsLoRA): different modules, ranks and scalings
ADAPTERS = {
    "all": ("all-linear", 4, False),
    "qv": (["q_proj", "v_proj"], 8, True),
    "mlp": (["gate_proj", "down_proj"], 2, False),
}
MAX_TOKENS = 10
# long enough to fill prompt blocks, so that the prefix cache would share them if it could
PROMPTS = ["The old lighthouse keeper counted the ships that passed his rock each night. " * 2]
PROMPTS += ["A short one", "Rivers carry the mountains into the sea, one grain at a time."]


# ---------------------------------------------------------------------------------------------
# the layer


def _lora(base: nn.Linear, rank: int, alpha: float, slices, seed: int) -> LoRALinear:
    torch.manual_seed(seed)
    wrapper = LoRALinear(base, LoRAConfig(rank=rank, alpha=alpha), slices)
    with torch.no_grad():
        for b in wrapper.lora_B:
            b.normal_(0, 0.5)
    return wrapper


def _pairs(wrapper: LoRALinear) -> list:
    pairs = iter(zip(wrapper.lora_A, wrapper.lora_B, strict=True))
    return [next(pairs) if adapted else None for _, adapted in wrapper.slices]


def test_each_row_gets_its_own_adapter():
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    slices = ((8, True), (4, False), (8, True))  # a fused q/k/v with k left alone
    first = _lora(base, 4, 8.0, slices, seed=1)
    second = _lora(base, 2, 3.0, ((8, False), (4, True), (8, True)), seed=2)
    rows = AdapterRows(2, torch.float32, torch.device("cpu"))
    layer = MultiLoRALinear(base, slices, rank=4, rows=rows)
    layer.load(0, _pairs(first), first.config.scaling)
    layer.load(1, _pairs(second), second.config.scaling)
    x = torch.randn(1, 5, 24)
    slots = torch.tensor([1, -1, 0, 0, 1])
    with torch.no_grad(), rows.using(slots):
        out = layer(x)[0]
        plain, a, b = base(x)[0], first(x)[0], second(x)[0]
    want = torch.stack([b[0], plain[1], a[2], a[3], b[4]])
    assert_close(out, want, scale=want.abs().max().item())
    assert torch.equal(out[1], plain[1])  # a row without an adapter adds exact zeros
    assert (a - plain).abs().max() > 0.1 and (b - plain).abs().max() > 0.1
    with torch.no_grad():  # outside ``using``: the base alone, bit for bit
        assert rows.mask is None and torch.equal(layer(x), base(x))


def _store(slots: int, max_adapters: int) -> tuple[AdapterStore, MultiLoRALinear]:
    rows = AdapterRows(slots, torch.float32, torch.device("cpu"))
    model = nn.Sequential(nn.Linear(6, 4))
    model[0] = layer = MultiLoRALinear(model[0], ((4, True),), rank=2, rows=rows)
    return AdapterStore(model, rows, max_adapters), layer


def _adapter(value: float, rank: int = 2) -> ServedAdapter:
    pair = (torch.full((rank, 6), value), torch.ones(4, rank))
    return ServedAdapter(LoRAConfig(rank=rank, alpha=rank), {"0": [pair]})


def test_the_store_places_adapters_in_slots_least_recently_used_first():
    store, layer = _store(slots=2, max_adapters=4)
    for i, name in enumerate("abcd"):
        store.add(name, _adapter(i + 1.0))
    assert store.place("a", pinned=()) == 0 and store.place("b", pinned=()) == 1
    assert store.place("a", pinned=()) == 0  # held already: nothing written
    assert store.slot_writes == 2
    assert store.place("c", pinned=()) == 1  # over "b", used longer ago than "a"
    assert store.place("d", pinned={1}) == 0  # "c" runs: over "a", though used later
    assert store.rows.names == ["d", "c"] and store.slot_writes == 4
    assert store.place("a", pinned={0, 1}) is None  # every slot runs another adapter
    # each slot holds its adapter's numbers, the layer's own product of them
    x = torch.ones(1, 2, 6)
    with torch.no_grad(), store.rows.using(torch.tensor([0, 1])):
        update = layer(x) - layer.base(x)
    assert update[0, 0].tolist() == [2 * 6 * 4.0] * 4 and update[0, 1].tolist() == [2 * 6 * 3.0] * 4
    store.remove("c")  # its slot is free, and taken first
    assert store.rows.names == ["d", None] and store.place("b", pinned={0}) == 1


def test_the_store_refuses_what_it_cannot_hold():
    store, layer = _store(slots=1, max_adapters=2)
    store.add("a", _adapter(1.0))
    first_key = store.key("a")
    with pytest.raises(ValueError, match="'a' is loaded already"):
        store.add("a", _adapter(1.0))
    with pytest.raises(ValueError, match="name ' c' is not allowed"):
        store.add(" c", _adapter(1.0))
    with pytest.raises(ValueError, match="rank 3, above the slots' 2"):
        store.add("c", _adapter(1.0, rank=3))
    with pytest.raises(ValueError, match="adapts 1, which has no slots here"):
        store.add("c", ServedAdapter(LoRAConfig(rank=2, alpha=2), {"1": [None]}))
    store.add("b", _adapter(2.0))
    with pytest.raises(ValueError, match=r"all 2 LoRA adapters this model holds .* \(a, b\)"):
        store.add("c", _adapter(1.0))
    with pytest.raises(ValueError, match="no LoRA adapter named 'c' is loaded; loaded: a, b"):
        store.place("c", pinned=())
    store.remove("a")
    store.add("a", _adapter(5.0))  # the same name, another adapter: other prefix-cache blocks
    assert store.key("a") != first_key
    with pytest.raises(ValueError, match="rank 3 exceeds the slots' 2"):
        layer.load(0, [(torch.zeros(3, 6), torch.zeros(4, 3))], 1.0)


# ---------------------------------------------------------------------------------------------
# a base model and PEFT adapters of it


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer: Tokenizer) -> dict[str, Path]:
    """The folder of a tiny random Llama (grouped-query) saved by transformers, under "base",
    and one PEFT adapter folder of it per entry of ADAPTERS, with random non-zero updates."""
    root = tmp_path_factory.mktemp("multi_lora")
    eot = tokenizer.token_to_id(EOT)
    config = dict(COMMON, max_position_embeddings=256, bos_token_id=eot, eos_token_id=eot)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**config))
    _randomize(model, seed=0)
    folders = {"base": root / "base"}
    model.save_pretrained(folders["base"])
    tokenizer.save(folders["base"] / "tokenizer.json")
    for seed, (name, (targets, rank, rslora)) in enumerate(ADAPTERS.items(), 1):
        torch.manual_seed(seed)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folders["base"])
        lora = peft.LoraConfig(
            r=rank, lora_alpha=8, target_modules=targets, use_rslora=rslora, init_lora_weights=False
        )
        folders[name] = root / name
        peft.get_peft_model(hf, lora).save_pretrained(folders[name])
        config_file = folders[name] / "adapter_config.json"
        c = json.loads(config_file.read_text())
        config_file.write_text(json.dumps(c | {"base_model_name_or_path": str(folders["base"])}))
    return folders


def _load(path: Path, **kwargs) -> arlm.LM:
    kwargs.setdefault("kv_cache_memory_gib", 0.05)
    return arlm.load(path, generation_config="arlm", **kwargs)


@pytest.fixture(scope="module")
def served(folders) -> arlm.LM:
    return _load(folders["base"], lora_modules={name: folders[name] for name in ADAPTERS})


@pytest.fixture(scope="module")
def alone(folders) -> dict[str | None, list]:
    """Adapter (None: the base) -> the greedy completion of each prompt by that adapter merged
    into the model (or the base alone), one prompt at a time."""
    out = {}
    for name in [None, *ADAPTERS]:
        lm = _load(folders[name or "base"])
        out[name] = [
            lm.generate(p, temperature=0, max_tokens=MAX_TOKENS, logprobs=0) for p in PROMPTS
        ]
    return out


def _assert_same(got, want) -> None:
    assert got.token_ids == want.token_ids
    logprobs = [t.logprob for t in got.logprobs], [t.logprob for t in want.logprobs]
    assert_close(torch.tensor(logprobs[0]), torch.tensor(logprobs[1]), scale=math.log(VOCAB))


def _every_mix() -> tuple[list[str], list[str | None]]:
    """Each prompt under each adapter and the base, all in one batch."""
    names = [None, *ADAPTERS]
    return [p for p in PROMPTS for _ in names], [n for _ in PROMPTS for n in names]


def test_a_mixed_batch_computes_each_adapter_merged(served, alone):
    prompts, adapters = _every_mix()
    outs = served.generate(
        prompts, temperature=0, max_tokens=MAX_TOKENS, logprobs=0, adapter=adapters
    )
    for i, (out, name) in enumerate(zip(outs, adapters, strict=True)):
        _assert_same(out, alone[name][i // (len(ADAPTERS) + 1)])
    # the adapters really differ: not every adapter gives the base's tokens
    assert len({tuple(o.token_ids) for o in outs[: len(ADAPTERS) + 1]}) > 1


def test_prefix_blocks_are_not_shared_across_adapters(served, alone):
    """The long prompt fills prompt blocks; under another adapter its keys and values differ,
    so a later request of the same prompt takes hits only from its own adapter's blocks."""
    prompt = PROMPTS[0]
    for name in [*ADAPTERS, None, "all"]:  # each after the others have cached the prompt
        out = served.generate(
            prompt, temperature=0, max_tokens=MAX_TOKENS, logprobs=0, adapter=name
        )
        _assert_same(out, alone[name][0])
    again = served.generate(prompt, temperature=0, max_tokens=1, adapter="qv")
    assert again.usage.cached_prompt_tokens > 0  # its own adapter's blocks are shared


def test_padded_decode_graphs_give_the_same_rows(folders, alone):
    """The bucketed, padded forward that CUDA graphs replay (run eagerly on CPU), with rows
    of different adapters joining and leaving, gives each row what its adapter alone does."""
    lm = _load(folders["base"], lora_modules={name: folders[name] for name in ADAPTERS})
    lm.engine.use_decode_graphs(capture=False)
    prompts, adapters = _every_mix()
    outs = lm.generate(prompts, temperature=0, max_tokens=MAX_TOKENS, logprobs=0, adapter=adapters)
    for i, (out, name) in enumerate(zip(outs, adapters, strict=True)):
        _assert_same(out, alone[name][i // (len(ADAPTERS) + 1)])
    assert lm.engine.runner.decode_graphs.steps > 0


def test_seeded_samples_follow_the_adapter(served, folders):
    """A seeded sample is the merged model's sample: the adapter changes the distribution, not
    the random stream."""
    kwargs = dict(temperature=1.0, seed=7, max_tokens=MAX_TOKENS)
    want = _load(folders["qv"]).generate(PROMPTS[2], **kwargs)
    outs = served.generate([PROMPTS[2]] * 3, adapter=["qv", None, "qv"], **kwargs)
    assert outs[0].token_ids == outs[2].token_ids == want.token_ids


# PEFT's load_adapter warns of keys "missing" from the first adapter it loaded that are there
@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
def test_peft_mixed_batch_agrees(served, folders):
    """PEFT's own mixed-adapter batches (``adapter_names``) score arlm's greedy tokens as the
    likeliest at every step, with the same log-probabilities."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folders["base"])
    model = peft.PeftModel.from_pretrained(hf, folders["all"], adapter_name="all")
    for name in ("qv", "mlp"):
        model.load_adapter(folders[name], adapter_name=name)
    model.eval()
    names = ["all", None, "qv", "mlp"]
    prompt = PROMPTS[2]
    outs = served.generate(
        [prompt] * 4, temperature=0, max_tokens=MAX_TOKENS, logprobs=0, adapter=names
    )
    prompt_ids = served.tokenizer.encode(prompt)
    ids = torch.tensor([prompt_ids + o.token_ids for o in outs])
    with torch.no_grad():
        logits = model(ids, adapter_names=[n or "__base__" for n in names]).logits
    logprobs = torch.log_softmax(logits[:, len(prompt_ids) - 1 : -1].float(), -1)
    for row, out in enumerate(outs):
        assert logprobs[row].argmax(-1).tolist() == out.token_ids
        got = torch.tensor([t.logprob for t in out.logprobs])
        want = logprobs[row].gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        assert_close(got, want, scale=math.log(VOCAB))


def test_speculative_verify_rows_use_their_adapter(folders, alone):
    """Prompt-lookup guesses are verified by the row's own adapter: the greedy tokens are the
    adapter's, and some guesses are accepted (the verify rows carried their slots)."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    lm = _load(
        folders["base"],
        lora_modules={name: folders[name] for name in ADAPTERS},
        speculative=spec,
    )
    prompts, adapters = _every_mix()
    outs = lm.generate(prompts, temperature=0, max_tokens=MAX_TOKENS, logprobs=0, adapter=adapters)
    for i, (out, name) in enumerate(zip(outs, adapters, strict=True)):
        _assert_same(out, alone[name][i // (len(ADAPTERS) + 1)])
    assert sum(o.usage.spec_draft_tokens for o in outs) > 0


def test_stream_and_a_single_prompt(served, alone):
    text = "".join(served.stream(PROMPTS[1], temperature=0, max_tokens=MAX_TOKENS, adapter="mlp"))
    assert text == alone["mlp"][1].text
    one = served.generate(PROMPTS[1], temperature=0, max_tokens=MAX_TOKENS, adapter="mlp")
    assert one.token_ids == alone["mlp"][1].token_ids


def test_scoring_takes_an_adapter(served, folders):
    """``lm.score`` (windows and chunks through the cache) and ``lm.logits`` outside the engine
    compute the adapter merged's numbers."""
    merged = _load(folders["mlp"])
    for chunk_size in (None, 7):
        got = served.score(PROMPTS[0], chunk_size=chunk_size, adapter="mlp").token_logprobs
        want = merged.score(PROMPTS[0], chunk_size=chunk_size).token_logprobs
        assert_close(torch.tensor(got), torch.tensor(want), scale=math.log(VOCAB))
    ids = served.tokenizer.encode(PROMPTS[2])
    want = merged.logits(ids)
    assert_close(served.logits(ids, adapter="mlp"), want, scale=want.abs().max().item())
    assert (served.logits(ids) - want).abs().max() > 0.1  # the base's differ


def test_quantized_base_takes_adapters(folders):
    """On an int4 base the slots add each row's float update to the quantized layer: the base's
    rows equal the int4 model alone, the adapter's rows equal a batch of that adapter alone,
    and they are nearer the float model with the adapter merged than the int4 base is. (int4's
    kernel quantizes weights only; int8's rounds each call's activations together, so there a
    batch's rows change each other's rounding.)"""
    lm = _load(folders["base"], quantize="int4", lora_modules={"all": folders["all"]})
    kwargs = dict(temperature=0, max_tokens=1, prompt_logprobs=0)
    mixed = lm.generate([PROMPTS[2]] * 2, adapter=["all", None], **kwargs)
    adapted = lm.generate(PROMPTS[2], adapter="all", **kwargs)
    base = _load(folders["base"], quantize="int4").generate(PROMPTS[2], **kwargs)
    float_adapted = _load(folders["all"]).generate(PROMPTS[2], **kwargs)

    def logprobs(c):
        return torch.tensor([p.logprob for p in c.prompt_logprobs[1:]])

    scale = math.log(VOCAB)
    assert_close(logprobs(mixed[1]), logprobs(base), scale=scale)
    assert_close(logprobs(mixed[0]), logprobs(adapted), scale=scale)
    off = (logprobs(mixed[0]) - logprobs(float_adapted)).abs().mean()
    assert off < 0.5 * (logprobs(base) - logprobs(float_adapted)).abs().mean()


# ---------------------------------------------------------------------------------------------
# adapters loaded and unloaded while the model serves


def _greedy(lm, prompt: str, adapter: str | None):
    return lm.generate(prompt, temperature=0, max_tokens=MAX_TOKENS, logprobs=0, adapter=adapter)


@pytest.mark.parametrize("max_passes", [4, None])
def test_a_waiting_adapter_is_not_passed_over_forever(folders, max_passes):
    """One slot, and a request on "qv" arriving every step: a request on "mlp" waits while they
    go ahead, but after ``max_passes`` steps they wait behind it, and it runs once the slot's
    requests finish. (None: never their turn to wait; "mlp" does not run.)"""
    lm = _load(folders["base"], lora_modules={n: folders[n] for n in ADAPTERS}, max_loras=1)
    engine, params = lm.engine, arlm.SamplingParams(max_tokens=12, temperature=0)
    engine.scheduler.max_passes = max_passes or 10**9
    engine.add_request(PROMPTS[1], params, adapter="qv")
    waiting = engine.add_request(PROMPTS[1], params, adapter="mlp")
    steps = 0
    while engine.stats()["running_lora_adapters"] != "mlp" and steps < 60:
        engine.add_request(PROMPTS[1], params, adapter="qv")
        engine.step()
        steps += 1
    ran = engine.stats()["running_lora_adapters"] == "mlp"
    assert ran == (max_passes is not None)
    if ran:  # the slot's "qv" requests (at most 12 steps each) finished first
        assert max_passes < steps <= max_passes + params.max_tokens + 2
        engine.abort(waiting)


def test_adapters_added_and_removed_while_serving(folders, alone):
    """Room for two adapters and one slot, filled and emptied while the model serves: each
    adapter computes what it does merged; a slot rewritten by another adapter keeps none of the
    first's updates (in the layers the second leaves alone); an adapter's prefix-cache blocks
    serve it after it left its slot and came back, never another adapter, nor one added later
    under its name."""
    lm = _load(folders["base"], max_loras=1, max_cpu_loras=2, max_lora_rank=8)
    assert lm.adapters.names == ()
    lm.load_adapter("all", folders["all"])
    lm.load_adapter("qv", folders["qv"])
    for name in ("all", "qv", None):
        _assert_same(_greedy(lm, PROMPTS[0], name), alone[name][0])
    assert lm.adapters.rows.names == ["qv"]
    out = _greedy(lm, PROMPTS[0], "all")  # back into the slot, over "qv"
    _assert_same(out, alone["all"][0])
    assert out.usage.cached_prompt_tokens > 0  # its own blocks, from before it left
    with pytest.raises(ValueError, match=r"all 2 LoRA adapters this model holds are loaded"):
        lm.load_adapter("mlp", folders["mlp"])
    with pytest.raises(ValueError, match="'qv' is loaded already"):
        lm.load_adapter("qv", folders["qv"])
    lm.unload_adapter("all")
    with pytest.raises(ValueError, match="no LoRA adapter named 'all' is loaded; loaded: qv"):
        _greedy(lm, PROMPTS[0], "all")
    lm.load_adapter("all", folders["mlp"])  # the name again, another adapter
    out = _greedy(lm, PROMPTS[0], "all")
    _assert_same(out, alone["mlp"][0])
    assert out.usage.cached_prompt_tokens == 0  # not the blocks the first "all" computed
    _assert_same(_greedy(lm, PROMPTS[0], "qv"), alone["qv"][0])


@pytest.mark.parametrize("slots", [1, 2])
def test_more_adapters_than_slots(folders, alone, slots):
    """Three adapters and the base through fewer slots, every mix in one batch: each request
    computes what its adapter merged does, adapters taking turns in the slots."""
    lm = _load(folders["base"], lora_modules={n: folders[n] for n in ADAPTERS}, max_loras=slots)
    prompts, adapters = _every_mix()
    outs = lm.generate(prompts, temperature=0, max_tokens=MAX_TOKENS, logprobs=0, adapter=adapters)
    for i, (out, name) in enumerate(zip(outs, adapters, strict=True)):
        _assert_same(out, alone[name][i // (len(ADAPTERS) + 1)])
    # each adapter went into a slot, the waiting ones once a slot was free: not once per row
    assert len(ADAPTERS) <= lm.adapters.slot_writes < len(adapters)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_requests_take_their_adapter_again(served, folders, mode):
    """Through two slots and a third of the KV memory they need: sequences preempted (their
    blocks recomputed, or swapped to the host and back) come back on their own adapter, in
    whichever slot it is then, and give the tokens a slot each gives with room to spare."""
    prompts, adapters = _every_mix()
    kwargs = dict(temperature=0, max_tokens=40, ignore_eos=True, logprobs=0)
    want = served.generate(prompts, adapter=adapters, **kwargs)
    c, bs = served.config, 8
    block = 2 * c.n_layer * c.n_kv_head * c.head_dim * 4 * bs  # bytes of a block, float32
    need = [-(-(len(served.tokenizer.encode(p)) + 40) // bs) for p in prompts]
    pool = max(sum(need) // 3, max(need) + 2)
    lm = _load(
        folders["base"],
        lora_modules={n: folders[n] for n in ADAPTERS},
        max_loras=2,
        kv_block_size=bs,
        kv_cache_memory_gib=(pool + 0.5) * block / 2**30,
        kv_offload_gib=sum(need) * block / 2**30 if mode == "swap" else 0.0,
        preemption_mode=mode,
    )
    outs = lm.generate(prompts, adapter=adapters, **kwargs)
    for got, expected in zip(outs, want, strict=True):
        _assert_same(got, expected)
    assert lm.engine.stats()["preemptions"] > 0
    if mode == "swap":
        assert lm.engine.scheduler.num_swaps > 0


def test_a_request_whose_adapter_has_no_slot_waits_and_others_pass(folders):
    """One slot: a request on another adapter than the running one waits, and the requests
    behind it on the running adapter or the base go ahead; it runs once the slot is free."""
    lm = _load(folders["base"], lora_modules={n: folders[n] for n in ADAPTERS}, max_loras=1)
    engine, params = lm.engine, arlm.SamplingParams(max_tokens=4, temperature=0)
    ids = [engine.add_request(PROMPTS[1], params, adapter=a) for a in ("qv", "mlp", "qv", None)]
    engine.step()
    stats = engine.stats()
    assert stats["running"] == 3 and stats["waiting"] == 1
    assert (stats["running_lora_adapters"], stats["waiting_lora_adapters"]) == ("qv", "mlp")
    with pytest.raises(ValueError, match="every LoRA slot holds an adapter that running"):
        lm.logits(lm.tokenizer.encode(PROMPTS[1]), adapter="all")
    done = {i: engine.next_output(i).finished for i in ids}
    while not all(done.values()):
        for i in ids:
            done[i] = done[i] or engine.next_output(i).finished
    assert lm.adapters.rows.names == ["mlp"] and engine.stats()["lora_slot_writes"] == 2


def test_an_adapter_in_use_is_not_unloaded(folders):
    lm = _load(folders["base"], lora_modules={"qv": folders["qv"]})
    engine = lm.engine
    request = engine.add_request(PROMPTS[1], arlm.SamplingParams(max_tokens=4), adapter="qv")
    engine.step()
    stats = engine.stats()
    assert (stats["max_lora"], stats["running_lora_adapters"]) == (1, "qv")
    with pytest.raises(AdapterBusy, match="1 sequences still run on LoRA adapter 'qv'"):
        lm.unload_adapter("qv")
    while not engine.next_output(request).finished:
        pass
    lm.unload_adapter("qv")
    assert lm.adapters.names == ()


def test_slots_refuse_adapters_they_cannot_hold(folders):
    lm = _load(folders["base"], max_loras=2, max_lora_rank=4)
    with pytest.raises(ValueError, match="rank 8, above the slots' 4; start with a larger"):
        lm.load_adapter("qv", folders["qv"])
    assert lm.adapters.names == ()
    # slots only for the layers of the adapters given: another adapter's layers have none
    only = _load(folders["base"], lora_modules={"qv": folders["qv"]})
    only.unload_adapter("qv")
    with pytest.raises(ValueError, match="adapts h.0.mlp.c_fc, which has no slots here"):
        only.load_adapter("mlp", folders["mlp"])
    with pytest.raises(ValueError, match="has no LoRA slots; load it with lora_modules"):
        _load(folders["base"]).load_adapter("qv", folders["qv"])
    with pytest.raises(ValueError, match="max_lora_rank sizes the slots"):
        _load(folders["base"], max_lora_rank=8)
    two = {"a": folders["qv"], "b": folders["mlp"]}
    with pytest.raises(ValueError, match="max_cpu_loras=1 is not allowed; .* >= the 2 adapters"):
        _load(folders["base"], lora_modules=two, max_cpu_loras=1)
    with pytest.raises(ValueError, match="max_cpu_loras=2 is not allowed"):
        _load(folders["base"], lora_modules=two, max_loras=3, max_cpu_loras=2)


# ---------------------------------------------------------------------------------------------
# the server


def test_server_routes_requests_by_model_name(served, alone, folders):
    with LiveServer(served, ServeConfig(prepare_workers=0), name="base") as s:
        models = httpx.get(s.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["base", *ADAPTERS]
        assert all(m["parent"] == "base" for m in models[1:]) and "parent" not in models[0]
        for name in ["qv", "base", "all"]:
            body = {"model": name, "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "temperature": 0}
            r = httpx.post(s.url + "/v1/completions", json=body, timeout=60).json()
            assert r["model"] == name
            key = None if name == "base" else name
            assert r["choices"][0]["text"] == alone[key][1].text
        chat = {"model": "mlp", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        r = httpx.post(s.url + "/v1/chat/completions", json=chat, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == "mlp"
        r = httpx.post(s.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
        assert r.status_code == 404
        assert "'base', 'all', 'qv', 'mlp'" in r.json()["error"]["message"]
        metrics = httpx.get(s.url + "/metrics").text
        assert 'arlm:lora_requests_info{max_lora="3",running_lora_adapters=""' in metrics
        # without --allow-runtime-lora-updates there is nothing to load adapters with
        body = {"lora_name": "x", "lora_path": str(folders["qv"])}
        assert httpx.post(s.url + "/v1/load_lora_adapter", json=body).status_code == 404


def test_server_serves_more_adapters_than_slots(folders, alone):
    """Three adapters through one slot, asked for at once by concurrent clients: each answer is
    its adapter's, and /metrics counts the slot writes."""
    from concurrent.futures import ThreadPoolExecutor

    lm = _load(folders["base"], lora_modules={n: folders[n] for n in ADAPTERS}, max_loras=1)
    with LiveServer(lm, ServeConfig(prepare_workers=0), name="base") as s:

        def complete(model: str) -> str:
            body = {"model": model, "prompt": PROMPTS[1], "max_tokens": MAX_TOKENS}
            r = httpx.post(s.url + "/v1/completions", json=body | {"temperature": 0}, timeout=60)
            return r.json()["choices"][0]["text"]

        names = [*ADAPTERS, "base"] * 2
        with ThreadPoolExecutor(len(names)) as pool:
            texts = list(pool.map(complete, names))
        for name, text in zip(names, texts, strict=True):
            assert text == alone[None if name == "base" else name][1].text
        metrics = httpx.get(s.url + "/metrics").text
        writes = float(metrics.split("\narlm:lora_slot_writes_total ")[1].split()[0])
        assert writes >= len(ADAPTERS) and 'max_lora="1"' in metrics


def test_runtime_updates_need_slots(folders):
    with pytest.raises(ValueError, match="has no LoRA slots; start with max_cpu_loras N"):
        LiveServer(_load(folders["base"]), ServeConfig(allow_runtime_lora_updates=True))


def test_server_loads_and_unloads_adapters_at_runtime(folders, alone):
    lm = _load(folders["base"], max_loras=1, max_lora_rank=8)
    config = ServeConfig(prepare_workers=0, allow_runtime_lora_updates=True)
    with LiveServer(lm, config, name="base") as s:

        def complete(model):
            body = {
                "model": model,
                "prompt": PROMPTS[1],
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            }
            return httpx.post(s.url + "/v1/completions", json=body, timeout=60)

        def post(path, **body):
            return httpx.post(s.url + path, json=body, timeout=60)

        assert complete("qv").status_code == 404
        r = post("/v1/load_lora_adapter", lora_name="qv", lora_path=str(folders["qv"]))
        assert r.status_code == 200 and "'qv' added" in r.text
        assert [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]] == ["base", "qv"]
        r = complete("qv")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone["qv"][1].text
        r = post("/v1/load_lora_adapter", lora_name="mlp", lora_path=str(folders["mlp"]))
        message = r.json()["error"]["message"]
        assert r.status_code == 400 and "adapters this model holds are loaded" in message
        r = post("/v1/load_lora_adapter", lora_name="base", lora_path=str(folders["mlp"]))
        assert r.status_code == 400 and "the served model's own name" in r.text
        r = post("/v1/load_lora_adapter", lora_name="x", lora_path=str(folders["base"]))
        assert r.status_code == 400 and "not a LoRA adapter folder" in r.json()["error"]["message"]
        assert post("/v1/unload_lora_adapter", lora_name="qv").status_code == 200
        assert complete("qv").status_code == 404
        assert post("/v1/unload_lora_adapter", lora_name="qv").status_code == 404
        r = post("/v1/load_lora_adapter", lora_name="mlp", lora_path=str(folders["mlp"]))
        assert r.status_code == 200
        assert complete("mlp").json()["choices"][0]["text"] == alone["mlp"][1].text


def test_cli_serve_parses_lora_modules(folders, capsys):
    from arlm.cli import main, serve

    assert serve.lora_module("sql=runs/a=b") == ("sql", "runs/a=b")
    with pytest.raises(Exception, match="is not NAME=PATH"):
        serve.lora_module("runs/sql-lora")
    # refused before the model loads
    assert main(["serve", str(folders["base"]), "--allow-runtime-lora-updates"]) != 0
    assert "give --max-cpu-loras N" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# refusals


def test_an_unknown_adapter_is_refused_by_name(served, folders):
    with pytest.raises(ValueError, match="no LoRA adapter named 'sql' is loaded; loaded: all"):
        served.generate("x", max_tokens=1, adapter="sql")
    with pytest.raises(ValueError, match="no LoRA adapters are loaded"):
        _load(folders["base"]).generate("x", max_tokens=1, adapter="all")
    with pytest.raises(ValueError, match="contrastive search"):
        served.generate("x", max_tokens=2, penalty_alpha=0.6, top_k=4, adapter="all")


def test_folders_that_cannot_be_served_are_refused(folders, tmp_path):
    model = lambda: arlm.formats.read.read_model(folders["base"])[0]  # noqa: E731
    with pytest.raises(CheckpointError, match="is not a LoRA adapter folder"):
        load_lora_modules(model(), {"x": folders["base"]})
    chained = tmp_path / "chained"
    chained.mkdir()
    for f in folders["qv"].iterdir():
        (chained / f.name).write_bytes(f.read_bytes())
    c = json.loads((chained / "adapter_config.json").read_text())
    (chained / "adapter_config.json").write_text(
        json.dumps(c | {"base_model_name_or_path": str(folders["all"])})
    )
    with pytest.raises(CheckpointError, match="trained on another adapter"):
        load_lora_modules(model(), {"x": chained})
    with pytest.raises(ValueError, match="name ' x' is not allowed"):
        load_lora_modules(model(), {" x": folders["qv"]})
    with pytest.raises(ValueError, match="tensor parallelism"):
        arlm.load(folders["base"], tensor_parallel_size=2, lora_modules={"x": folders["qv"]})
    # a failed load leaves the model as it was
    m = model()
    with pytest.raises(CheckpointError):
        load_lora_modules(m, {"ok": folders["qv"], "bad": chained})
    assert not any(isinstance(x, MultiLoRALinear) for x in m.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("slots", [None, 1])
def test_cuda_graphs_replay_mixed_adapters_as_eager_steps(folders, slots):
    """On CUDA the decode steps replay graphs captured with the adapters' masked products:
    every mix of adapters over 40 steps gives the eager engine's tokens; with one slot, the
    adapters written into it in place between overlapped steps too."""
    modules = {name: folders[name] for name in ADAPTERS}
    prompts, adapters = _every_mix()
    kwargs = dict(temperature=0, max_tokens=40, ignore_eos=True, adapter=adapters)
    graphed = _load(
        folders["base"], device="cuda", dtype="float32", lora_modules=modules, max_loras=slots
    )
    eager = _load(
        folders["base"], device="cuda", dtype="float32", lora_modules=modules, enforce_eager=True
    )
    got = graphed.generate(prompts, **kwargs)
    assert graphed.engine.eager_reason is None and graphed.engine.stats()["graph_steps"] > 30
    want = eager.generate(prompts, **kwargs)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]

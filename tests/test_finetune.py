"""Fine-tuning (``--init-from``) and LoRA: a run starts from a trained model and its tokenizer,
learns a new corpus, resumes exactly, and its result loads (a LoRA run as a PEFT adapter that
PEFT itself applies to the same logits)."""

import json

import pytest
import torch

import arlm
from arlm.formats.checkpoint import save_model
from arlm.formats.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_targets
from arlm.formats.read import read_model
from arlm.model.lora import LoRAConfig, LoRALinear, add_lora, merge_lora
from arlm.model.quantize import Int4Linear, Int8Linear, quantize
from arlm.train import TrainConfig, Trainer
from tests.conftest import fine_tune_config
from tests.numerics import assert_close

# a corpus the base model never saw: repeated enough that a few steps learn it
NEW_TEXT = "".join(
    f"Order {i}: ship {i % 7 + 1} crates of pears to dock {i % 5}.\n" for i in range(400)
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "orders.txt"
    path.write_text(NEW_TEXT)
    return path


def _tune(tmp_path, base, corpus, cache_dir, **overrides):
    settings = dict(steps=12, batch_size=4, block_size=32, eval_interval=6, log_interval=2)
    return fine_tune_config(base, corpus, tmp_path / "tuned", cache_dir, **settings | overrides)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def test_full_fine_tuning_starts_from_the_model_and_learns_the_corpus(
    tmp_path, base, corpus, cache_dir
):
    trainer = Trainer(_tune(tmp_path, base, corpus, cache_dir, lr=3e-3), progress=False)
    start, tokenizer = read_model(base)
    # the run begins at the checkpoint's weights, with its tokenizer and its config
    for (name, a), (_, b) in zip(
        trainer.model.state_dict().items(), start.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert trainer.tokenizer.to_json() == tokenizer.to_json()
    before = trainer.evaluate()
    result = trainer.fit()
    assert result.val_loss < before - 0.5, (before, result.val_loss)
    assert trainer.window == 32 and trainer.model.config.block_size == start.config.block_size
    saved = json.loads((result.out / "config.json").read_text())
    assert saved == json.loads((base / "config.json").read_text())
    lm = arlm.load(result.out)
    assert lm.tokenizer.to_json() == tokenizer.to_json()
    assert len(lm.generate("Order 3:", max_tokens=4, temperature=0).token_ids) == 4


def test_fine_tuning_resumes_to_the_same_weights(tmp_path, base, corpus, cache_dir):
    straight = Trainer(_tune(tmp_path / "a", base, corpus, cache_dir, dropout=0.1), progress=False)
    straight.fit()

    def stop_at_5(trainer):
        if trainer.step == 5:
            trainer.request_stop()

    cfg = _tune(tmp_path / "b", base, corpus, cache_dir, dropout=0.1)
    Trainer(cfg, progress=False).fit(on_step=stop_at_5)
    resumed = Trainer(cfg, resume=True, progress=False)
    assert resumed.step == 5 and resumed.model.config.dropout == 0.1
    resumed.fit()
    for (name, a), (_, b) in zip(
        straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_lora_trains_only_the_adapters_and_loads_as_a_merged_model(
    tmp_path, base, corpus, cache_dir
):
    cfg = _tune(tmp_path, base, corpus, cache_dir, lora_rank=4, lr=1e-2)
    trainer = Trainer(cfg, progress=False)
    frozen = {n: p.clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    assert cfg.lora.alpha == 8.0 and cfg.peak_lr == 1e-2
    before = trainer.evaluate()
    result = trainer.fit()
    assert result.val_loss < before - 0.15, (before, result.val_loss)
    for name, p in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
    # the run folder is a PEFT adapter (and the run's state), not a copy of the model
    names = {p.name for p in result.out.iterdir()}
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json", "train_state.json"} <= names
    assert "model.safetensors" not in names
    adapter = json.loads((result.out / ADAPTER_CONFIG).read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(base.resolve())
    # arlm.load merges it into its base: the logits of the adapted model the run trained
    ids = torch.tensor(trainer.tokenizer.encode(NEW_TEXT[:200])[:48])[None]
    trainer.model.eval()
    adapted = _logits(trainer.model, ids)
    lm = arlm.load(result.out)
    assert not any(isinstance(m, LoRALinear) for m in lm.model.modules())
    assert_close(_logits(lm.model, ids), adapted)
    assert not torch.allclose(_logits(read_model(base)[0], ids), adapted, atol=1e-2)


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_lora_resumes_to_the_same_adapters(tmp_path, base, corpus, cache_dir, quantize):
    lora = dict(lora_rank=2, lora_alpha=4.0, lora_dropout=0.1, lora_targets="q_proj,v_proj")
    lora |= dict(quantize=quantize)
    straight = Trainer(_tune(tmp_path / "a", base, corpus, cache_dir, **lora), progress=False)
    straight.fit()

    def stop_at_5(trainer):
        if trainer.step == 5:
            trainer.request_stop()

    cfg = _tune(tmp_path / "b", base, corpus, cache_dir, **lora)
    Trainer(cfg, progress=False).fit(on_step=stop_at_5)
    resumed = Trainer(cfg, resume=True, progress=False)
    assert resumed.step == 5
    resumed.fit()
    a = dict(straight.model.named_parameters())
    b = dict(resumed.model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    adapted = {n for n, m in resumed.model.named_modules() if isinstance(m, LoRALinear)}
    assert adapted == {f"h.{i}.attn.c_attn" for i in range(resumed.model.config.n_layer)}


def test_qlora_trains_adapters_over_a_quantized_model(tmp_path, base, corpus, cache_dir):
    """--quantize int4: the frozen layers are int4 (the output head stays float for the chunked
    loss), only the adapters train, the loss falls, and the adapter, saved for the float base,
    lowers the float model's loss on the corpus too."""
    cfg = _tune(tmp_path, base, corpus, cache_dir, lora_rank=4, lr=1e-2, quantize="int4")
    trainer = Trainer(cfg, progress=False)
    model = trainer.model
    wrappers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert wrappers and all(isinstance(w.base, Int4Linear) for w in wrappers)
    assert type(model.lm_head) is torch.nn.Linear
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    before = trainer.evaluate()
    result = trainer.fit()
    assert result.val_loss < before - 0.15, (before, result.val_loss)
    adapter = json.loads((result.out / ADAPTER_CONFIG).read_text())
    assert adapter["base_model_name_or_path"] == str(base.resolve())
    ids = torch.tensor(trainer.tokenizer.encode(NEW_TEXT[:200])[:48])[None]

    def loss(m):
        with torch.no_grad():
            return m(ids[:, :-1], targets=ids[:, 1:])[1].item()

    assert loss(arlm.load(result.out, dtype="float32").model) < loss(read_model(base)[0]) - 0.15
    with pytest.raises(ValueError, match="hold no float weights to merge them into"):
        merge_lora(model)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_qlora_gradients_are_those_of_the_dequantized_model(base, method):
    """The adapters' gradients over a quantized model equal those over a float model holding
    the dequantized weights, and autograd keeps no float copy of a quantized weight between
    the forward and the backward pass (the float model's pass keeps one per layer)."""
    torch.manual_seed(0)
    quantized, _ = read_model(base)
    add_lora(quantized, LoRAConfig(4, 8.0), lora_targets(quantized, "all-linear"))
    for p in quantized.parameters():
        if p.requires_grad:  # B starts at zero: no gradient would reach A
            torch.nn.init.normal_(p, std=0.1)
    quantize(quantized, method, head=False)
    dense = read_model(base)[0]
    add_lora(dense, LoRAConfig(4, 8.0), lora_targets(dense, "all-linear"))
    adapters = {k: v for k, v in quantized.state_dict().items() if ".lora_" in k}
    dense.load_state_dict(adapters, strict=False)  # the rest is the same checkpoint's
    shapes = set()
    for name, module in quantized.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            target = dense.get_submodule(name)
            target.weight.data = module.dequantize(torch.float32)
            shapes.add(tuple(target.weight.shape))
    ids = torch.randint(0, quantized.config.vocab_size, (2, 24))

    def grads(model):
        saved = []

        def pack(t):
            saved.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids[:, :-1], targets=ids[:, 1:])[1]
        loss.backward()
        kept = sum(shape in shapes for shape in saved)
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, kept

    (got, kept), (want, dense_kept) = grads(quantized), grads(dense)
    assert got.keys() == want.keys()
    for name in got:
        assert_close(got[name], want[name], scale=want[name].abs().max().item())
    assert kept == 0 and dense_kept > 0


def test_an_adapter_trained_on_an_adapter_loads_through_both(tmp_path, base, corpus, cache_dir):
    """--init-from an adapter folder names it as the new adapter's base: loading merges the
    chain, the innermost first, to the logits the second run trained."""
    lora = dict(lora_rank=2, lr=1e-2, steps=3)
    first = Trainer(_tune(tmp_path / "a", base, corpus, cache_dir, **lora), progress=False).fit()
    cfg = _tune(tmp_path / "b", first.out, corpus, cache_dir, **lora)
    second = Trainer(cfg, progress=False)
    second.fit()
    adapter = json.loads((tmp_path / "b/tuned" / ADAPTER_CONFIG).read_text())
    assert adapter["base_model_name_or_path"] == str(first.out.resolve())
    ids = torch.arange(30)[None]
    second.model.eval()
    expected = _logits(second.model, ids)
    assert_close(_logits(arlm.load(tmp_path / "b/tuned").model, ids), expected)
    assert not torch.allclose(_logits(arlm.load(first.out).model, ids), expected, atol=1e-3)


def test_a_merged_lora_model_exports_as_the_base_family(tmp_path, base, corpus, cache_dir):
    result = Trainer(
        _tune(tmp_path, base, corpus, cache_dir, lora_rank=2, steps=2), progress=False
    ).fit()
    lm = arlm.load(result.out)
    from arlm.formats.hf import export_hf

    export_hf(lm.model, lm.tokenizer, tmp_path / "hf")
    assert json.loads((tmp_path / "hf/config.json").read_text())["model_type"] == "llama"
    ids = torch.arange(20)[None]
    assert_close(_logits(arlm.load(tmp_path / "hf").model, ids), _logits(lm.model, ids))


def test_peft_applies_an_arlm_trained_adapter_to_the_same_logits(tmp_path, base, corpus, cache_dir):
    """The adapter a run writes is PEFT's format: PEFT puts it on transformers' copy of the base
    model and computes the logits arlm computes with the adapter merged."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from arlm.formats.hf import export_hf

    export_hf(read_model(base)[0], read_model(base)[1], tmp_path / "base-hf")
    cfg = _tune(tmp_path, tmp_path / "base-hf", corpus, cache_dir, lora_rank=4, lr=1e-2, steps=4)
    result = Trainer(cfg, progress=False).fit()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base-hf")
    adapted = peft.PeftModel.from_pretrained(hf, result.out).eval()
    ids = torch.arange(40)[None]
    with torch.no_grad():
        expected = adapted(ids).logits
    assert_close(_logits(arlm.load(result.out).model, ids), expected)


def test_merge_lora_leaves_plain_linear_layers(tmp_path, base, corpus, cache_dir):
    trainer = Trainer(_tune(tmp_path, base, corpus, cache_dir, lora_rank=2), progress=False)
    ids = torch.arange(24)[None]
    with torch.no_grad():
        for m in trainer.model.modules():
            if isinstance(m, LoRALinear):
                for b in m.lora_B:
                    b.normal_()
    trainer.model.eval()
    before = _logits(trainer.model, ids)
    merge_lora(trainer.model)
    assert all(type(m.attn.c_attn) is torch.nn.Linear for m in trainer.model.h)
    assert_close(_logits(trainer.model, ids), before)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_layer": 4}, "n_layer=4: with --init-from the model"),
        ({"preset": "tiny"}, "preset=tiny: with --init-from"),
        ({"vocab_size": 300}, "vocab_size=300: with --init-from"),
        ({"lora_rank": 0}, "lora_rank=0"),
        ({"lora_rank": 4, "sharding": "fsdp"}, "fsdp is not supported with --lora-rank"),
        ({"lora_alpha": 4.0}, "lora_alpha=4.0 is a LoRA option, but lora_rank is not set"),
        ({"lora_targets": "q_proj"}, "lora_targets=q_proj is a LoRA option"),
        ({"quantize": "int4"}, "quantize=int4 is a LoRA option"),
        ({"lora_rank": 4, "quantize": "int2"}, "quantize='int2' is not allowed"),
        ({"lora_rank": 4, "group_size": 48}, "group_size=48 is not allowed"),
    ],
)
def test_bad_fine_tuning_options_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(init_from=str(tmp_path), **overrides)


def test_lora_needs_a_model_to_adapt():
    with pytest.raises(ValueError, match="needs --init-from"):
        TrainConfig(lora_rank=8)


def test_refusals_that_need_the_model(tmp_path, base, corpus, cache_dir):
    longer = r"block_size=4096 is longer than the context .* \(64 positions"
    with pytest.raises(ValueError, match=longer):
        Trainer(_tune(tmp_path / "a", base, corpus, cache_dir, block_size=4096), progress=False)
    with pytest.raises(ValueError, match="unknown_proj"):
        Trainer(
            _tune(
                tmp_path / "b", base, corpus, cache_dir, lora_rank=2, lora_targets="unknown_proj"
            ),
            progress=False,
        )
    model, tokenizer = read_model(base)
    quantize(model, "int8")
    save_model(tmp_path / "int8", model, tokenizer)
    with pytest.raises(ValueError, match="needs float weights and this model is quantized"):
        Trainer(_tune(tmp_path / "c", tmp_path / "int8", corpus, cache_dir), progress=False)

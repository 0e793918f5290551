"""On a CUDA GPU: ``device="auto"`` and ``dtype="auto"`` pick it and the checkpoint's dtype, the
engine's KV cache keeps to ``gpu_memory_utilization``, a model that cannot fit is refused with
both numbers, and neither a training step nor the sampling side of an engine step with logits
processors waits for the device. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
import transformers

import arlm
from arlm.engine import Engine, EngineConfig
from arlm.engine.config import DEFAULT_MAX_NUM_BATCHED_TOKENS
from arlm.engine.memory import GIB, activation_peak, check_weights_fit
from arlm.engine.token_chain import TokenChain
from arlm.train import TrainConfig, Trainer
from tests.conftest import make_model
from tests.numerics import assert_close
from tests.test_step_sync import processor_requests

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _hf_llama(folder, tokenizer, dtype: torch.dtype) -> None:
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_auto_loads_on_the_gpu_in_the_checkpoints_dtype(tmp_path, tokenizer, dtype):
    _hf_llama(tmp_path, tokenizer, dtype)
    lm = arlm.load(tmp_path)
    assert lm.device.type == "cuda"
    assert lm.model.wte.weight.dtype == dtype
    completion = lm.generate([5, 6, 7], max_tokens=4, ignore_eos=True)
    assert len(completion.token_ids) == 4


def _in_use(device: torch.device) -> int:
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def test_the_kv_cache_keeps_to_gpu_memory_utilization(tokenizer):
    device = torch.device("cuda")
    # 1 KiB of keys and values per position (2 layers x 2 KV heads x 32 x float32 x k,v): a
    # sequence of 65,536 positions needs 64 MiB, a block of 16 positions 16 KiB
    model = make_model("llama", n_layer=2, block_size=65536).to(device)
    longest, block = 2 * 2 * 2 * 32 * 4 * 65536, 2 * 2 * 2 * 32 * 4 * 16
    torch.cuda.empty_cache()
    chunk = DEFAULT_MAX_NUM_BATCHED_TOKENS["cuda"]
    peak = activation_peak(model, chunk, 256)  # the widest step: 8,192 positions, 256 sample
    total = torch.cuda.mem_get_info(device)[1]
    # room for half of the longest sequence above what is in use and the activations
    half = (_in_use(device) + peak + 0.5 * longest) / total
    whole = EngineConfig(max_model_len=65536, gpu_memory_utilization=half)
    with pytest.raises(ValueError, match=r"max_model_len=65536 needs 4096 KV blocks .* than the"):
        Engine(model, tokenizer, config=whole)
    utilization = (_in_use(device) + peak + 5.5 * longest) / total
    engine = Engine(model, tokenizer, config=EngineConfig(gpu_memory_utilization=utilization))
    assert engine.block_manager.num_blocks * block <= 5.5 * longest + block
    assert engine.scheduler.max_num_batched_tokens == chunk == 8192  # the GPU's default
    engine.preallocate()
    assert _in_use(device) <= utilization * total
    out = engine.generate(
        [[1, 2, 3]] * 6, arlm.SamplingParams(max_tokens=3, ignore_eos=True), progress=False
    )
    assert all(len(c.token_ids) == 3 for c in out)


def test_a_model_that_does_not_fit_is_refused_naming_both_sizes():
    device = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(device)
    with pytest.raises(ValueError, match=r"need \d+\.\d\d GiB in bfloat16, more than the \d+"):
        check_weights_fit(free + GIB, device, torch.bfloat16)
    check_weights_fit(min(free // 2, GIB), device, torch.bfloat16)  # fits: no error
    # split over two GPUs, a model one GPU cannot hold is checked by each one's share
    check_weights_fit(free + GIB // 2, device, torch.bfloat16, ranks=2)
    with pytest.raises(ValueError, match=r"a 1/2 share of the weights needs .* tensor_parallel"):
        check_weights_fit(3 * free, device, torch.bfloat16, ranks=2)


def test_a_kv_budget_above_the_free_memory_is_refused(tokenizer):
    model = make_model("llama").to("cuda")
    free = torch.cuda.mem_get_info()[0]
    too_much = 2 * free / GIB
    with pytest.raises(ValueError, match=r"kv_cache_memory_gib=.* GiB free after the weights"):
        Engine(model, tokenizer, config=EngineConfig(kv_cache_memory_gib=too_much))


def test_a_training_step_does_not_wait_for_the_gpu(tmp_path, cache_dir):
    cfg = TrainConfig(
        preset="tiny", n_layer=2, block_size=64, vocab_size=300, batch_size=4, steps=100,
        warmup_steps=1, out=str(tmp_path / "run"), cache_dir=str(cache_dir), device="cuda",
        bf16=True,
    )  # fmt: skip
    trainer = Trainer(cfg, progress=False)
    trainer.model.train()
    trainer.train_step()  # first-call set-up (allocator, kernels) may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = [trainer.train_step() for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(loss) for loss in losses)


def test_the_sampling_side_of_a_step_with_processors_does_not_wait_for_the_gpu(
    tokenizer, monkeypatch
):
    """Rows with penalties, DRY, logit bias, min_tokens, n-gram bans, a grammar and a loop
    break (``tests/test_step_sync.py``'s requests): every ``TokenChain.run`` after the first
    step (first-call set-up: the grammar kernel's compile) runs under the sync debug mode; its
    one wait is ``to_host``'s event, which the mode allows."""
    model = make_model("llama", vocab_size=tokenizer.vocab_size, seed=5).cuda()
    engine = Engine(model, tokenizer, config=EngineConfig(max_num_seqs=8))
    for prompt, params in processor_requests():
        engine.add_request(prompt, params)
    engine.step()
    torch.cuda.synchronize()
    run, checked = TokenChain.run, []

    def checked_run(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            checked.append(True)

    monkeypatch.setattr(TokenChain, "run", checked_run)
    while engine.has_unfinished():
        engine.step()
    assert len(checked) >= 8
    assert engine.chain.loops_broken >= 1  # the break path (bans, a fresh sampler) ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_chunks_over_cached_positions_give_one_forward_s_log_probabilities(tokenizer, dtype):
    """On CUDA a prompt chunk after the first attends to its cached positions through a
    lower-right causal bias, no mask tensor (``arlm.kv_cache.base.causal_mask``; FlashAttention
    in bfloat16): its prompt log-probabilities, 8 positions a step, equal one teacher-forced
    forward's. Rounding: ulps of the dtype at the log-probabilities' size; a query that saw
    the wrong keys moves them by far more in float32."""
    model = make_model("llama", vocab_size=tokenizer.vocab_size, seed=5).to("cuda", dtype)
    engine = EngineConfig(max_num_seqs=2, max_num_batched_tokens=8)
    lm = arlm.LM(model, tokenizer, engine_config=engine)
    ids = [(7 * i) % tokenizer.vocab_size for i in range(1, 41)]  # five chunks
    c = lm.generate(ids, max_tokens=0, prompt_logprobs=0)
    got = torch.tensor([p.logprob for p in c.prompt_logprobs[1:]])
    logp = lm.logits(ids).float().log_softmax(dim=-1).cpu()
    want = logp[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert_close(got, want, dtype=dtype)

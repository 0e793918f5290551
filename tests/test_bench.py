"""arlm bench: speeds measured through the one decode loop, and its input checks."""

import pytest
import torch

from arlm.api import LM
from arlm.cli import main
from arlm.measure.speed import bench
from tests.conftest import make_model


def test_bench_measures_every_run_in_full(tokenizer):
    lm = LM(make_model("llama", vocab_size=tokenizer.vocab_size), tokenizer)
    result = bench(lm, prompt_tokens=16, new_tokens=8, runs=2)
    assert result.prefill_tokens_per_second > 0 and result.decode_tokens_per_second > 0
    assert result.time_to_first_token_ms > 0
    per_position = lm.model.config.n_layer * 2 * 2 * 32 * 4  # layers, k and v, kv heads, hd, f32
    assert result.kv_cache_bytes == per_position * 32  # 23 positions: two blocks of 16
    assert result.kv_cache_peak_bytes == per_position * 23
    assert result.peak_memory_bytes > 0
    linears = [m for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    assert result.weight_bytes == sum(m.weight.numel() * 4 for m in linears)


def test_bench_refuses_a_run_that_does_not_fit_the_context(tokenizer):
    lm = LM(make_model("gpt2", vocab_size=tokenizer.vocab_size), tokenizer)
    with pytest.raises(ValueError, match="context of 128"):
        bench(lm, prompt_tokens=100, new_tokens=100)
    with pytest.raises(ValueError, match="at least 1"):
        bench(lm, runs=0)


def test_bench_command_prints_its_table(capsys, trained_run):
    _, result = trained_run
    code = main(
        ["bench", str(result.out), "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "decode" in out and "tokens/s" in out and "first token" in out
    assert "read per decode step" in out

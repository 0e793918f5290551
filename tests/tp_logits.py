"""Run under ``torchrun --nproc-per-node N``: every rank builds the same tiny model of each
family's shape, splits it with ``arlm.model.tensor_parallel.parallelize`` and runs one forward;
rank 0 prints, per shape, the largest logit difference from the whole model, the share of the
weights this rank holds, and the cache heads, as one JSON line. (tests/test_tensor_parallel.py)"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from arlm.config import ModelConfig
from arlm.model.tensor_parallel import local_bytes, parallelize
from arlm.model.transformer import Transformer

SHAPES = {
    # an odd vocabulary: the embedding and head shards are uneven
    "gpt2": dict(family="gpt2", vocab_size=301, n_layer=2, n_head=4, n_embd=32, block_size=64),
    # grouped-query attention with one KV head: replicated on every rank
    "llama-gqa": dict(
        family="llama", vocab_size=300, n_layer=2, n_head=4, n_kv_head=1, n_embd=32,
        block_size=64, tie_embeddings=False,
    ),
    # two KV heads for four query heads: split, one per rank
    "llama-gqa2": dict(
        family="llama", vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
        block_size=64, tie_embeddings=False,
    ),
    "qwen3": dict(
        family="llama", vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
        head_dim=16, qk_norm=True, block_size=64,
    ),
    "gemma3": dict(
        family="gemma", vocab_size=300, n_layer=2, n_head=4, n_kv_head=1, n_embd=32,
        head_dim=16, qk_norm=True, block_size=64, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], rope_local_theta=10000.0,
        rope_theta=1e6, attn_scale=0.25, logit_softcap=30.0,
    ),
    # capped attention scores, each rank capping its own heads'
    "gemma2": dict(
        family="gemma", vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
        head_dim=16, block_size=64, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], attn_scale=0.25,
        attn_softcap=1.0, logit_softcap=30.0,
    ),
}  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (size,))
    report = {}
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        whole = Transformer(ModelConfig(**shape)).eval()
        # the whole model is the reference: the split one starts from the same weights
        split = Transformer(ModelConfig(**shape)).eval()
        split.load_state_dict(whole.state_dict())
        parallelize(split, mesh)
        idx = torch.randint(
            0, shape["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1)
        )
        with torch.no_grad():
            want = whole(idx)[0]
            got = split(idx)[0]
        report[name] = {
            "max_diff": (want - got).abs().max().item(),
            "scale": want.abs().max().item(),
            "weight_share": local_bytes(split) / local_bytes(whole),
            "kv_heads": split.config.n_kv_head,
        }
    if rank == 0:
        print("TP " + json.dumps(report), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

"""Tensor-parallel inference beside one process: memory per rank and decode speed.

A random-weight Llama-layout model (grouped-query attention) is saved, then loaded whole in one
process and split over ``--size`` ranks (``arlm.load(..., tensor_parallel_size=N)``, which starts
the other ranks itself). Per side: the bytes of weights rank 0 holds (a DTensor by its local
shard), the bytes of its KV cache as a server preallocates it, and greedy decode speed of a batch
through the engine (the median of ``--rounds`` runs). On 2 shared CPU cores the split side
shows what its all-reduces and step messages cost, not a speed-up; on a machine with several
GPUs (``--device cuda``, NCCL) the same run shows the speed-up.

Run: ``OMP_NUM_THREADS=1 python benchmarks/tensor_parallel.py`` (about a minute on 2 cores;
one thread per rank, as torchrun sets it: two ranks of two threads on two cores spin against
each other in every collective).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "out"


def measure(lm, prompts: list[str], max_tokens: int, rounds: int, weight_bytes: int) -> dict:
    engine = lm.engine
    engine.preallocate()  # the KV memory a server holds from the start
    sampling = dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    lm.generate(prompts, **sampling)  # warm-up
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        results = lm.generate(prompts, progress=False, **sampling)
        seconds = time.perf_counter() - started
        rates.append(sum(len(r.token_ids) for r in results) / seconds)
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes": engine.runner.cache.nbytes,
        "tokens_per_s": statistics.median(rates),
        "tokens": [r.token_ids for r in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2, help="tensor-parallel ranks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4, help="sequences decoded together")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    import arlm
    from arlm.config import ModelConfig
    from arlm.formats.checkpoint import save_model
    from arlm.model.tensor_parallel import local_bytes
    from arlm.model.transformer import Transformer
    from arlm.tokenizer import Tokenizer
    from arlm.train.corpus import builtin_documents

    torch.manual_seed(0)
    config = ModelConfig(
        family="llama", vocab_size=4096, n_layer=args.layers, n_head=8, n_kv_head=2,
        n_embd=args.width, block_size=512,
    )  # fmt: skip
    prompts = [f"Prompt number {i} asks the model" for i in range(args.batch)]
    load = dict(device=args.device, dtype=None, max_num_seqs=args.batch, max_model_len=256)
    with tempfile.TemporaryDirectory(prefix="arlm-tp-bench-") as tmp:
        path = Path(tmp) / "model"
        tokenizer = Tokenizer.train(builtin_documents(), vocab_size=config.vocab_size)
        whole = Transformer(config)
        save_model(path, whole, tokenizer)
        # the whole model's tensors as stored (one process then packs its linear layers for
        # the CPU kernels, the same bytes in another layout)
        one = arlm.load(path, **load)
        one = measure(one, prompts, args.max_tokens, args.rounds, local_bytes(whole))
        lm = arlm.load(path, tensor_parallel_size=args.size, **load)
        try:
            split = measure(lm, prompts, args.max_tokens, args.rounds, local_bytes(lm.model))
        finally:
            lm.close()
    same = one.pop("tokens") == split.pop("tokens")
    mib = 2**20
    print(
        f"llama {args.layers} x {args.width} (8 heads, 2 KV heads, vocabulary 4096), "
        f"{args.device}, batch {args.batch} x {args.max_tokens} greedy tokens"
    )
    print(f"{'side':<12} {'weights MiB':>12} {'KV MiB':>8} {'tokens/s':>9}")
    for name, r in (("1 process", one), (f"TP {args.size}, rank 0", split)):
        print(
            f"{name:<12} {r['weight_bytes'] / mib:>12.2f} {r['kv_bytes'] / mib:>8.2f} "
            f"{r['tokens_per_s']:>9.1f}"
        )
    ratios = {
        "weights": split["weight_bytes"] / one["weight_bytes"],
        "kv": split["kv_bytes"] / one["kv_bytes"],
        "weights_and_kv": (split["weight_bytes"] + split["kv_bytes"])
        / (one["weight_bytes"] + one["kv_bytes"]),
        "decode_speed": split["tokens_per_s"] / one["tokens_per_s"],
    }
    print(
        f"rank 0 / one process: weights {ratios['weights']:.3f}x, KV {ratios['kv']:.3f}x, "
        f"both {ratios['weights_and_kv']:.3f}x (target <= 0.55x); decode speed "
        f"{ratios['decode_speed']:.2f}x; greedy tokens equal: {same}"
    )
    OUT.mkdir(exist_ok=True)
    (OUT / "tensor_parallel.json").write_text(
        json.dumps({"one": one, "split": split, "ratios": ratios, "same_tokens": same}, indent=2)
    )


if __name__ == "__main__":
    main()

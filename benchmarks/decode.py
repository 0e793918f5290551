"""Decode and prefill speed beside the peers a user would otherwise pick, on the same weights.

Builds two random-weight models once: GPT-2 124M, and a Llama-layout model with grouped-query
attention (12 layers, 768 wide, 4 KV heads, untied 32000-token vocabulary: 125M parameters, 100M
of them read per token); ``--models gemma2`` a third, the Llama one's sizes in Gemma 2's layout
(tied, as llama.cpp's gemma2 reads it; its attention scores capped at 50 and logits at 30, every
other layer sliding), where no fused attention kernel takes the cap and no target is set;
``--models mixtral`` a mixture of experts with the Llama one's attention and as many weights
read per token (8 experts of 1024 hidden units a layer, 2 a token: 294M parameters, 100M of
them read per token at batch 1), no target set either.
Each is saved as a Hugging Face folder (what transformers and arlm load) and as GGUF f32 and
q8_0 files (what llama.cpp loads, written by ``arlm export``). Then, in alternating rounds, each
engine prefills a 64-token prompt and greedily decodes 128 tokens:

- transformers: ``model.generate`` in float32 and bfloat16 (decode = generate minus a prefill);
- llama.cpp, through llama-cpp-python when it is installed (``pip install llama-cpp-python``;
  it compiles llama.cpp for this processor, a few minutes), f32 and q8_0; batch 1 only;
- arlm: everything through its engine (continuous batching, one KV slot per sequence), with
  prefix caching off so every row really prefills: ``lm.generate`` at batch 1, and at batch 8
  eight requests submitted together, prefilled in one forward and decoded in one forward per
  step, as a batching server runs them (transformers at batch 8: ``generate`` on 8 rows).

Before timing, it checks that arlm and transformers (and llama.cpp f32) produce the same greedy
tokens. It prints medians over the rounds, the ratios the targets are stated in, and the
bandwidth limit measured in the same run: a large float32 reduction's read speed, divided by
the bytes of weights a decode step reads.

Run: ``python benchmarks/decode.py`` (about ten minutes on two CPU cores); ``-v`` adds a
profile of arlm's engine decode steps and of the output projection's kernels; ``--quality RUN``
the held-out perplexity of a trained checkpoint with each weight format.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

import arlm
from arlm.formats.gguf import export_gguf
from arlm.model.packing import weight_bytes
from arlm.sampling import SamplingParams
from arlm.tokenizer import Tokenizer
from arlm.train.corpus import builtin_documents

PROMPT, NEW = 64, 128
BATCH = 8  # the batched column

try:
    import llama_cpp
except ImportError:
    llama_cpp = None


def build_hf(kind: str, root: Path, positions: int = 1024) -> Path:
    """A random-weight model of ``kind`` as a Hugging Face folder with a tokenizer, taking
    sequences of up to ``positions`` (another number names the folder ``{kind}-{positions}``)."""
    import transformers

    torch.manual_seed(0)
    # the Llama model's sizes, which the Gemma 2 one takes too
    sizes = dict(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=positions,
    )
    if kind == "gpt2":
        config = transformers.GPT2Config(n_positions=positions)
        hf = transformers.GPT2LMHeadModel(config)
    elif kind == "gemma2":  # query_pre_attn_scalar: the scale llama.cpp takes
        config = transformers.Gemma2Config(**sizes, head_dim=64, query_pre_attn_scalar=64)
        hf = transformers.Gemma2ForCausalLM(config)
    elif kind == "mixtral":  # two experts of half the Llama MLP's width: the same reads a token
        experts = dict(sizes, intermediate_size=1024, num_local_experts=8, num_experts_per_tok=2)
        config = transformers.MixtralConfig(**experts, tie_word_embeddings=False)
        hf = transformers.MixtralForCausalLM(config)
    else:
        hf = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**sizes, tie_word_embeddings=False)
        )
    folder = root / (kind if positions == 1024 else f"{kind}-{positions}")
    hf.save_pretrained(folder)
    # the tokenizer only has to exist: prompts are random ids
    Tokenizer.train(builtin_documents(), 1000).save(folder / "tokenizer.json")
    return folder


def build(kind: str, root: Path) -> Path:
    """The Hugging Face folder of ``build_hf``, plus its GGUF exports beside it."""
    folder = build_hf(kind, root)
    lm = arlm.load(folder)
    for gguf_type in ("f32", "q8_0"):
        export_gguf(lm.model, lm.tokenizer, root / f"{kind}-{gguf_type}.gguf", type=gguf_type)
    return folder


def read_bandwidth() -> float:
    """Bytes per second a sum over 1 GiB of float32 reads: the memory speed a decode step can
    count on (a lower bound: a tuned matrix-vector kernel can read faster)."""
    x = torch.ones(2**28)
    x.sum()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / min(times)


def gguf_weight_bytes(path: Path) -> int:
    """Bytes of the matrices llama.cpp multiplies one token by (token_embd only when it is the
    head; of each layer's stacked experts, the share a token runs through)."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    arch = reader.fields["general.architecture"].contents()
    experts = reader.fields.get(f"{arch}.expert_count")
    share = (
        1.0
        if experts is None
        else (reader.fields[f"{arch}.expert_used_count"].contents() / experts.contents())
    )
    skip = {"position_embd.weight"}
    if "output.weight" in tensors:  # an untied head: the embedding is only looked up
        skip.add("token_embd.weight")
    return round(
        sum(
            int(t.n_bytes) * (share if n.endswith("_exps.weight") else 1)
            for n, t in tensors.items()
            if len(t.shape) in (2, 3) and n not in skip
        )
    )


class Engine(Protocol):
    label: str
    batches: tuple[int, ...]
    weight_bytes: int  # of the weights one decode step reads

    def greedy(self, prompt: list[int], batch: int) -> tuple[list[int], float, float]:
        """Greedy ids of the first row, prefill tokens/s and decode tokens/s (all rows)."""
        ...


class Transformers:
    batches = (1, BATCH)

    def __init__(self, folder: Path, dtype: str, same_weights: Arlm) -> None:
        import transformers

        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=getattr(torch, dtype)
        ).eval()
        self.label = f"transformers {dtype}"
        self.weight_bytes = same_weights.weight_bytes

    @torch.inference_mode()
    def greedy(self, prompt, batch):
        ids = torch.tensor([prompt] * batch)
        t0 = time.perf_counter()
        self.model(ids)
        t1 = time.perf_counter()
        out = self.model.generate(
            ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
        t2 = time.perf_counter()
        decode = (t2 - t1) - (t1 - t0)  # generate = one prefill + NEW - 1 decode steps
        return (
            out[0, len(prompt) :].tolist(),
            batch * len(prompt) / (t1 - t0),
            (batch * (NEW - 1) / decode),
        )


def load_arlm(folder: Path, **kwargs) -> arlm.LM:
    """``arlm.load`` with an engine sized for this benchmark: room for the batch, its prompts
    prefilled in one forward, and no prefix cache, so a repeated prompt is computed again."""
    return arlm.load(
        folder,
        max_num_seqs=BATCH,
        max_num_batched_tokens=BATCH * PROMPT,
        max_model_len=PROMPT + NEW,
        enable_prefix_caching=False,
        **kwargs,
    )


GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


class Arlm:
    batches = (1, BATCH)

    def __init__(self, folder: Path, dtype: str, quantize: str | None = None) -> None:
        self.lm = load_arlm(folder, dtype=dtype, quantize=quantize)
        self.label = f"arlm {quantize or dtype}"
        self.weight_bytes = weight_bytes(self.lm.model)

    def greedy(self, prompt, batch):
        if batch == 1:
            c = self.lm.generate(prompt, GREEDY)
            u = c.usage
            return c.token_ids, u.prefill_tokens_per_second, u.decode_tokens_per_second
        return engine_batch(self.lm, prompt, batch)


def engine_batch(lm: arlm.LM, prompt: list[int], batch: int) -> tuple[list[int], float, float]:
    """``batch`` requests of ``prompt`` submitted together to the engine (``lm.generate`` on a
    list, without its progress bar): greedy ids of the first, and prefill and decode tokens/s
    over all of them. Usage is per sequence, so the batch's times come from the wall clock
    around the call: every row's first token comes out of the same prefill forward, and decode
    time is the rest of the call."""
    t0 = time.perf_counter()
    done = lm.engine.generate([prompt] * batch, GREEDY, progress=False)
    wall = time.perf_counter() - t0
    prefill = max(c.usage.prefill_seconds for c in done)  # time to the last row's first token
    prompt_tokens = sum(c.usage.prompt_tokens for c in done)
    decoded = sum(c.usage.completion_tokens - 1 for c in done)  # the first came from prefill
    return done[0].token_ids, prompt_tokens / prefill, decoded / (wall - prefill)


class LlamaCpp:
    batches = (1,)

    def __init__(self, path: Path, label: str) -> None:
        self.llm = llama_cpp.Llama(
            str(path),
            n_ctx=PROMPT + NEW,
            n_batch=PROMPT,
            n_threads=torch.get_num_threads(),
            n_threads_batch=torch.get_num_threads(),
            verbose=False,
        )
        self.label = label
        self.weight_bytes = gguf_weight_bytes(path)
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        pointer = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        logits = np.ctypeslib.as_array(
            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_vocab,)
        )
        return int(logits.argmax())

    def greedy(self, prompt, batch):
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(prompt)
        out = [self._argmax()]
        t1 = time.perf_counter()
        for _ in range(NEW - 1):
            self.llm.eval([out[-1]])
            out.append(self._argmax())
        t2 = time.perf_counter()
        return out, len(prompt) / (t1 - t0), (NEW - 1) / (t2 - t1)


def engines(kind: str, root: Path, folder: Path) -> dict[str, Engine]:
    ours = [
        Arlm(folder, "float32"),
        Arlm(folder, "bfloat16"),
        Arlm(folder, "float32", "int8"),
        Arlm(folder, "float32", "int4"),
    ]
    found: list[Engine] = [Transformers(folder, "float32", ours[0])]
    found += [Transformers(folder, "bfloat16", ours[1]), *ours]
    if llama_cpp is not None:
        found.append(LlamaCpp(root / f"{kind}-f32.gguf", "llama.cpp f32"))
        found.append(LlamaCpp(root / f"{kind}-q8_0.gguf", "llama.cpp q8_0"))
    return {e.label: e for e in found}


def check_parity(found: dict[str, Engine], prompt: list[int]) -> None:
    reference = found["transformers float32"].greedy(prompt, 1)[0]
    for label in ("arlm float32", "llama.cpp f32"):
        if label in found:
            ids = found[label].greedy(prompt, 1)[0]
            same = ids == reference
            where = "" if same else f" (first difference at token {_first_diff(ids, reference)})"
            print(
                f"  greedy tokens, {label} vs transformers float32: "
                f"{'identical' if same else 'DIFFERENT'} over {NEW} tokens{where}"
            )


def _first_diff(a: list[int], b: list[int]) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)


def measure(found: dict[str, Engine], prompt: list[int], rounds: int) -> dict:
    """{(label, batch): (prefill tok/s, decode tok/s)}, medians over rounds that alternate."""
    for engine in found.values():  # warm-up: first calls allocate and pick kernels
        for batch in engine.batches:
            engine.greedy(prompt, batch)
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for engine in found.values():
            for batch in engine.batches:
                _, p, d = engine.greedy(prompt, batch)
                runs.setdefault((engine.label, batch), []).append((p, d))
    return {
        key: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v))
        for key, v in runs.items()
    }


def report(kind: str, found: dict[str, Engine], results: dict, bandwidth: float) -> None:
    """The table, and the ratios (with the targets set for GPT-2 and Llama)."""
    print(f"\n{kind}: medians; limit = read bandwidth / weight bytes per token")
    print(
        f"  {'engine':<22}{'prefill':>10}{'decode B=1':>12}{'decode B=8':>12}"
        f"{'MB/token':>10}{'limit':>8}{'of limit':>10}"
    )
    for e in found.values():
        prefill_1, decode_1 = results[(e.label, 1)]
        decode_8 = results.get((e.label, BATCH), (0, 0))[1]
        limit = bandwidth / e.weight_bytes
        b8 = f"{decode_8:12.1f}" if decode_8 else f"{'-':>12}"
        print(
            f"  {e.label:<22}{prefill_1:10.1f}{decode_1:12.1f}{b8}"
            f"{e.weight_bytes / 1e6:10.1f}{limit:8.1f}{decode_1 / limit:10.0%}"
        )

    def ratio(a: str, b: str, batch: int = 1, col: int = 1) -> str:
        if (a, batch) not in results or (b, batch) not in results:
            return "n/a (llama-cpp-python not installed)"
        return f"{results[(a, batch)][col] / results[(b, batch)][col]:.2f}x"

    def target(text: str) -> str:
        return "" if kind in ("gemma2", "mixtral") else f"  (target {text})"

    print("  ratios of medians:")
    print(
        f"    decode, arlm float32 / transformers float32, B=1: "
        f"{ratio('arlm float32', 'transformers float32')}{target('>= 2')}"
    )
    print(
        f"    decode, arlm float32 / transformers float32, B=8: "
        f"{ratio('arlm float32', 'transformers float32', BATCH)}{target('>= 1.5')}"
    )
    print(
        f"    decode, arlm bfloat16 / transformers bfloat16, B=1: "
        f"{ratio('arlm bfloat16', 'transformers bfloat16')}"
    )
    print(
        f"    decode, arlm float32 / llama.cpp f32, B=1: "
        f"{ratio('arlm float32', 'llama.cpp f32')}{target('>= 0.9')}"
    )
    print(
        f"    decode, arlm int8 / llama.cpp q8_0, B=1: "
        f"{ratio('arlm int8', 'llama.cpp q8_0')}{target('>= 0.5')}"
    )
    print(
        f"    prefill, arlm float32 / llama.cpp f32: "
        f"{ratio('arlm float32', 'llama.cpp f32', col=0)}{target('>= 0.8')}"
    )


@torch.inference_mode()
def profile_step(folder: Path) -> None:
    """Where one arlm float32 decode step's time goes (an engine step: schedule, forward,
    sample), and the output projection's kernels."""
    from torch.profiler import ProfilerActivity, profile

    lm = arlm.load(folder)  # one request: the engine's defaults
    model, engine = lm.model, lm.engine
    steps = 32
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    request = engine.add_request([0] * PROMPT, params)
    engine.step()  # the prefill, and the first token
    engine.step()  # one decode step before profiling
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    engine.abort(request)
    while engine.has_unfinished():
        engine.step()
    print(f"\nprofile of {steps} arlm float32 engine decode steps (batch 1):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    weight = model.lm_head.packed.to_dense()
    x = torch.randn(1, model.config.n_embd)
    for label, fn in (
        ("F.linear (PyTorch's default)", lambda: F.linear(x, weight)),
        ("oneDNN, prepacked (arlm)", lambda: model.lm_head(x)),
    ):
        fn()
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        ms = statistics.median(times) * 1e3
        print(
            f"output projection {tuple(weight.shape)} float32, batch 1, {label}: "
            f"{ms:.2f} ms, {weight.numel() * 4 / ms / 1e6:.1f} GB/s"
        )


def quality(run: str) -> None:
    """Perplexity of a trained checkpoint on its corpus's held-out split, per weight format."""
    from arlm.measure.heldout import held_out_ids

    print(f"\nperplexity of {run} on the held-out split of the built-in corpus:")
    reference = None
    for label, kwargs in (
        ("float32", {}),
        ("bfloat16", {"dtype": "bfloat16"}),
        ("int8", {"quantize": "int8"}),
        ("int4 (groups of 32)", {"quantize": "int4"}),
    ):
        lm = arlm.load(run, **kwargs)
        ppl = lm.score(held_out_ids(lm.tokenizer)).perplexity
        reference = reference or ppl
        print(f"  {label:<20} {ppl:8.3f}  ({ppl / reference - 1:+.2%} vs float32)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", default="gpt2,llama", help="a comma list of gpt2, llama, gemma2, mixtral"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("-v", "--verbose", action="store_true", help="profile a decode step")
    parser.add_argument(
        "--quality",
        metavar="RUN",
        help="also the held-out perplexity of this trained checkpoint (e.g. make demo's run) in "
        "float32, bfloat16, int8 and int4",
    )
    args = parser.parse_args()
    kinds = args.models.split(",") if args.models else []
    if set(kinds) - {"gpt2", "llama", "gemma2", "mixtral"}:
        parser.error(
            f"--models {args.models}: give a comma list of gpt2, llama, gemma2, mixtral (or '' "
            "for none)"
        )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{PROMPT}-token prompt, {NEW} greedy tokens"
    )
    if llama_cpp is None:
        print(
            "llama.cpp column skipped: llama-cpp-python is not installed "
            "(pip install llama-cpp-python builds it for this processor)"
        )
    bandwidth = read_bandwidth()
    print(f"read bandwidth (sum over 1 GiB of float32): {bandwidth / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in kinds:
            folder = build(kind, root)
            found = engines(kind, root, folder)
            prompt = torch.randint(
                0, 1000, (PROMPT,), generator=torch.Generator().manual_seed(1)
            ).tolist()
            n_params = found["arlm float32"].lm.model.num_params()
            print(f"\n{kind}: {n_params / 1e6:.0f}M parameters, random weights")
            check_parity(found, prompt)
            report(kind, found, measure(found, prompt, args.rounds), bandwidth)
            if args.verbose:
                profile_step(folder)
            del found
    if args.quality:
        quality(args.quality)


if __name__ == "__main__":
    main()

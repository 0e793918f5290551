"""Options several commands share: the model to load, its KV cache and engine, sampling."""

from __future__ import annotations

import argparse

from arlm.api import GENERATION_CONFIGS
from arlm.cli.options import add_options, given
from arlm.config import INT4_GROUP_SIZES, QUANT_METHODS
from arlm.engine import EngineConfig
from arlm.kv_cache import CacheConfig
from arlm.loops import LoopDetectorConfig
from arlm.sampling import SamplingParams


def add_model_options(p: argparse.ArgumentParser, runs: bool = True) -> None:
    """The model and how to load it; ``runs``: the command runs the model, so it goes to the
    GPU when there is one, in the checkpoint's dtype there (a command that only converts it
    loads it on the CPU, in float32, whatever the machine)."""
    p.add_argument(
        "model",
        help="an arlm checkpoint folder, a Hugging Face model folder, or a Hugging Face Hub id "
        "(org/name: downloaded into the Hub cache; a local path of that name wins)",
    )
    p.add_argument(
        "--revision", help="with a Hub id, the branch, tag or commit to load (default: main)"
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a model whose only weights are pickled (pytorch_model.bin), with "
        "torch.load(weights_only=True); off because a pickle can run code",
    )
    if runs:
        device_help = "auto (CUDA when there is a GPU), cpu, cuda, cuda:1, ... (default: auto)"
        dtype_help = (
            "weights' dtype; auto: the checkpoint's on a GPU, on a CPU float32 unless it "
            "computes the checkpoint's half type natively and faster (default: auto)"
        )
    else:
        device_help = "cpu, cuda, cuda:1, ... or auto (default: cpu)"
        dtype_help = "weights' dtype; auto: as the commands that run a model (default: float32)"
    p.add_argument("--device", default="auto" if runs else "cpu", help=device_help)
    p.add_argument(
        "--dtype",
        default="auto" if runs else "float32",
        choices=["auto", "float32", "bfloat16", "float16"],
        help=dtype_help,
    )
    p.add_argument(
        "--quantize",
        choices=QUANT_METHODS,
        help="quantize the linear layers' weights as they load: int8 (a scale per output "
        "channel) or int4 (a scale and minimum per group of inputs); a quantized checkpoint "
        "needs no flag",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=32,
        help=f"with --quantize int4, inputs per group, one of {INT4_GROUP_SIZES} (default: 32)",
    )


def add_tensor_parallel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the model's heads and MLP over this many processes: under torchrun "
        "--nproc-per-node N (rank 0 prints or serves), or started by this command (default: 1)",
    )


def model_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {
        "device": args.device,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "group_size": args.group_size,
        "revision": args.revision,
        "allow_pickle": args.allow_pickle,
    }
    if getattr(args, "generation_config", None) is not None:
        kwargs["generation_config"] = args.generation_config
    return kwargs


def add_generation_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--generation-config",
        choices=GENERATION_CONFIGS,
        help="auto: the model's generation_config.json gives the sampling settings a request "
        "leaves unset (temperature, top-p, top-k, min-p, repetition penalty), as vLLM does; "
        "arlm: arlm's own defaults (default: auto)",
    )


def describe_defaults(lm, given: dict) -> str | None:
    """A line naming the model's sampling defaults that apply (those ``given`` does not set)."""
    used = {k: v for k, v in lm.sampling_defaults.items() if k not in given}
    if not used:
        return None
    settings = ", ".join(f"{k}={v}" for k, v in used.items())
    return f"[sampling defaults from the model's generation_config.json: {settings}]"


def add_cache_options(p: argparse.ArgumentParser, engine: bool = True) -> None:
    g = p.add_argument_group("KV cache")
    add_options(g, CacheConfig, dest_prefix="kv_")
    if engine:
        g = p.add_argument_group("engine")
        add_options(g, EngineConfig)
        g.add_argument(
            "--speculative-config",
            metavar="JSON",
            help='speculative decoding, vLLM\'s fields: {"method": "ngram", '
            '"num_speculative_tokens": 4} (prompt lookup) or {"method": "draft", "model": PATH} '
            "(a draft model sharing the tokenizer); see docs/speculative.md (default: off)",
        )


def load_kwargs(args: argparse.Namespace) -> dict:
    """``arlm.load`` keywords from the model, cache and engine options."""
    cache = given(args, CacheConfig, dest_prefix="kv_")
    kwargs = model_kwargs(args)
    for name, value in cache.items():  # arlm.load's names for them
        kwargs["kv_cache_dtype" if name == "dtype" else f"kv_{name}"] = value
    kwargs.update(given(args, EngineConfig))
    if getattr(args, "speculative_config", None) is not None:
        kwargs["speculative"] = args.speculative_config  # JSON, parsed and checked by load
    if getattr(args, "tensor_parallel_size", 1) != 1:
        kwargs["tensor_parallel_size"] = args.tensor_parallel_size
    return kwargs


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    add_options(p.add_argument_group("sampling"), SamplingParams)
    add_detector_options(p.add_argument_group("loop detection"))


def add_detector_options(g) -> None:
    add_options(
        g, LoopDetectorConfig, prefix="loop-", dest_prefix="loop_", help="loop detector threshold"
    )


def detector_kwargs(args: argparse.Namespace) -> dict:
    return given(args, LoopDetectorConfig, dest_prefix="loop_")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The ``SamplingParams`` fields given on the command line (checked), as keywords: the rest
    take the model's defaults (``LM.sampling_params``)."""
    kwargs = given(args, SamplingParams)
    detection = detector_kwargs(args)
    if detection:
        kwargs["repetition_detection"] = detection
    SamplingParams(**kwargs)  # bad values fail before the model loads
    return kwargs

"""``arlm serve``: an OpenAI-compatible HTTP server for a model."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from arlm.cli.common import (
    add_cache_options,
    add_generation_config_option,
    add_model_options,
    add_tensor_parallel_option,
    load_kwargs,
)
from arlm.cli.options import add_options, given


def add_parser(sub) -> None:
    from arlm.serve import ServeConfig

    p = sub.add_parser(
        "serve",
        help="serve a model over OpenAI's HTTP API (completions, chat, streaming)",
        description="Serve MODEL on /v1/completions, /v1/chat/completions and /v1/models, with "
        "/health and Prometheus /metrics; many requests share each forward (the engine). "
        "SIGTERM drains: new requests get 503, running ones finish.",
    )
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="server log level (default: info)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    add_options(p.add_argument_group("server"), ServeConfig)
    add_generation_config_option(p)
    add_cache_options(p)
    add_tensor_parallel_option(p)
    p.add_argument(
        "--lora-modules",
        nargs="+",
        metavar="NAME=PATH",
        type=lora_module,
        help="LoRA adapters (PEFT folders or Hub ids) of MODEL, each served as the model NAME "
        "beside the base, unmerged: every request picks one by its model field (default: none)",
    )
    p.add_argument(
        "--max-loras",
        type=int,
        help="LoRA slots: the adapters one step may mix; with fewer than --lora-modules, an "
        "adapter takes a slot when a request names it (default: one per --lora-modules)",
    )
    p.add_argument(
        "--max-cpu-loras",
        type=int,
        help="LoRA adapters held in host memory, those in slots among them; room beyond the "
        "--lora-modules given is for --allow-runtime-lora-updates (default: the more of "
        "--lora-modules and --max-loras)",
    )
    p.add_argument(
        "--max-lora-rank",
        type=int,
        help="the largest LoRA rank a slot takes (default: the largest given, else 16)",
    )
    p.set_defaults(run=run)


def lora_module(text: str) -> tuple[str, str]:
    """NAME=PATH (vLLM's --lora-modules form) as (name, path)."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not NAME=PATH: give each adapter a name for requests' model field and "
            "its folder, as sql=runs/sql-lora"
        )
    return name.strip(), path


def run(args: argparse.Namespace) -> None:
    import arlm
    from arlm.formats.hub import resolve
    from arlm.serve import ServeConfig
    from arlm.serve.server import serve

    config = ServeConfig(**given(args, ServeConfig))
    kwargs = load_kwargs(args)
    if args.lora_modules:
        names = [name for name, _ in args.lora_modules]
        if len(set(names)) != len(names):
            raise ValueError(f"--lora-modules names {names} repeat; give each adapter its own")
        kwargs["lora_modules"] = dict(args.lora_modules)
    for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    if config.allow_runtime_lora_updates and not {"max_loras", "max_cpu_loras"} & set(kwargs):
        raise ValueError(
            "--allow-runtime-lora-updates adds LoRA adapters beside those given; give "
            "--max-cpu-loras N (more than the --lora-modules given) or --max-loras N for them"
        )
    # a Hub id downloads now, before the server starts; it is then served under its id
    local = Path(args.model).exists()
    folder = resolve(args.model, kwargs.pop("revision"), args.allow_pickle)
    if args.tensor_parallel_size != 1 and int(os.environ.get("RANK", 0)) != 0:
        # a torchrun rank other than 0 serves no HTTP: it runs rank 0's engine steps
        arlm.load(folder, **kwargs)
        return
    serve(
        lambda: arlm.load(folder, **kwargs),
        config,
        model_name=folder.resolve().name if local else args.model,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
    )

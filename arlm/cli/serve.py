"""``arlm serve``: an OpenAI-compatible HTTP server for a model."""

from __future__ import annotations

import argparse
from pathlib import Path

from arlm.cli.common import add_cache_options, add_model_options, load_kwargs
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
    add_cache_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import arlm
    from arlm.serve import ServeConfig
    from arlm.serve.server import serve

    config = ServeConfig(**given(args, ServeConfig))
    model = Path(args.model)
    if not model.exists():
        raise FileNotFoundError(f"no model at {model}: give an arlm checkpoint or HF model folder")
    kwargs = load_kwargs(args)
    serve(
        lambda: arlm.load(model, **kwargs),
        config,
        model_name=model.resolve().name,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
    )

"""`rtpjax serve`: load the model, compile, and serve the OpenAI API with uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rtpjax.options import CLI_COMPILATION_CACHE, add_engine_arguments, engine_args_from

DEFAULT_NAME = "SmolLM2-135M-Instruct"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's own flags, then one flag per engine option (rtpjax.options)."""
    parser.add_argument("model", nargs="?", default=None,
                        help="a Hugging Face folder or a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    parser.add_argument("--served-model-name", default=None, help="the name clients use (default: the folder's)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond max-num-seqs before 429")
    parser.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGINT/SIGTERM")  # fmt: skip
    add_engine_arguments(parser, compilation_cache_dir=CLI_COMPILATION_CACHE)


def serve(args: argparse.Namespace) -> int:
    from rtpjax.loading.model_source import check_model

    engine_args_from(args)  # bad values fail here, in one line, before anything heavy is imported
    check_model(args.model)
    import uvicorn

    from rtpjax import AsyncLLM
    from rtpjax.serve.app import build_app

    engine_args = engine_args_from(args)  # bad values fail here, before anything starts
    llm = AsyncLLM(args.model, **dataclasses.asdict(engine_args))
    name = args.served_model_name or (Path(args.model).name.removesuffix(".gguf") if args.model else DEFAULT_NAME)
    app = build_app(llm, name, api_key=args.api_key, max_queue=args.max_queue)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout)  # fmt: skip
    try:
        uvicorn.Server(config).run()  # returns after SIGINT/SIGTERM, once in-flight requests end or time out
    finally:
        llm.shutdown()
    return 0

"""`rtpjax serve`: load the model, compile, and serve the OpenAI API with uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import threading
import time
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


def _stop_with_engine(llm) -> None:
    """A multi-host leader serves only while its engine runs: an engine process that exited (a follower was lost)
    takes the server down with it (SIGTERM: uvicorn's graceful shutdown), rather than answering 503s forever."""
    while llm.is_alive:
        time.sleep(0.5)
    logging.getLogger("rtpjax").error("the multi-host engine stopped; the server exits")
    os.kill(os.getpid(), signal.SIGTERM)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from rtpjax import AsyncLLM
    from rtpjax.serve.app import build_app

    engine_args = engine_args_from(args, progress=True)  # bad values fail here, before anything starts
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if engine_args.process_id > 0:  # a follower of a multi-host engine: no HTTP, the leader's steps until it stops
        from rtpjax.distributed import multihost
        from rtpjax.engine.core import LLMEngine

        return multihost.follow(LLMEngine(args.model, engine_args))
    llm = AsyncLLM(args.model, **dataclasses.asdict(engine_args))
    if engine_args.num_processes > 1:
        threading.Thread(target=_stop_with_engine, args=(llm,), name="rtpjax-engine-watch", daemon=True).start()
    name = args.served_model_name or (Path(args.model).name.removesuffix(".gguf") if args.model else DEFAULT_NAME)
    app = build_app(llm, name, api_key=args.api_key, max_queue=args.max_queue)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout)  # fmt: skip
    try:
        uvicorn.Server(config).run()  # returns after SIGINT/SIGTERM, once in-flight requests end or time out
    finally:
        llm.shutdown()
    return 0

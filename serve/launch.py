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

from rtpjax.options import CLI_COMPILATION_CACHE, add_engine_arguments, cli_fields, engine_args_from, flag

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
    parser.add_argument("--data-parallel-size", type=int, default=1,
                        help="replicas of the engine (each on its own GPUs when the host has enough, else sharing "
                        "each GPU's memory), on the next ports, behind a router on --port")  # fmt: skip
    from rtpjax.router.launch import add_policy_arguments

    add_policy_arguments(parser.add_argument_group("router (with --data-parallel-size > 1)"), prefix="router-")
    add_engine_arguments(parser, compilation_cache_dir=CLI_COMPILATION_CACHE)


def _stop_with_engine(llm) -> None:
    """A multi-host leader serves only while its engine runs: an engine process that exited (a follower was lost)
    takes the server down with it (SIGTERM: uvicorn's graceful shutdown), rather than answering 503s forever."""
    while llm.is_alive:
        time.sleep(0.5)
    logging.getLogger("rtpjax").error("the multi-host engine stopped; the server exits")
    os.kill(os.getpid(), signal.SIGTERM)


def run_then(server, cleanup) -> None:
    """Run uvicorn, then `cleanup`, even when a signal stopped it. uvicorn re-raises the SIGINT/SIGTERM that stopped
    it as `run` returns, which would end this process before the code after it: the engine would be killed with its
    parent rather than stopped (its prefix cache never written to the disk tier), a replica would be orphaned. So the
    signals are held until `cleanup` is done and raised again after it (the exit status still says which); a second
    signal during the cleanup does not wait for it."""
    held: list[int] = []
    cleaning = threading.Event()

    def hold(sig: int, frame) -> None:
        if cleaning.is_set() and held:
            signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
            signal.raise_signal(sig)
        held.append(sig)
        server.should_exit = True  # come before uvicorn set its own handlers: it stops once started

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, hold) for sig in handled}
    try:
        server.run()  # sets its own handlers while it serves, then restores `hold` and raises what it caught
    finally:
        cleaning.set()
        try:
            cleanup()
        finally:
            for sig in handled:
                signal.signal(sig, previous[sig])
            for sig in dict.fromkeys(held):
                signal.raise_signal(sig)


def replica_argv(args: argparse.Namespace) -> list[str]:
    """This command's model, server and engine flags, spelled out for a replica (without host, port and data
    parallelism)."""
    argv = [args.model] if args.model else []
    for name in ("api_key", "served_model_name"):
        if getattr(args, name) is not None:
            argv += [flag(name), getattr(args, name)]
    argv += ["--max-queue", str(args.max_queue), "--graceful-shutdown-timeout", str(args.graceful_shutdown_timeout)]
    for f in cli_fields():
        value = getattr(args, f.name)
        if isinstance(value, bool):
            argv.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        elif value is not None:
            argv += [flag(f.name), str(value)]
    return argv


def serve_replicas(args: argparse.Namespace, engine_args) -> int:
    """N engines, each an `rtpjax serve` on the ports after --port, and the router in this process."""
    import uvicorn

    from rtpjax.router.launch import router_app, start_replicas, stop_replicas

    n = args.data_parallel_size
    logging.getLogger("httpx").setLevel(logging.WARNING)
    app = router_app([f"http://127.0.0.1:{args.port + 1 + i}" for i in range(n)], args.model, args.tokenizer,
                     args.router_policy, args.router_balance_abs_threshold, args.router_balance_rel_threshold)  # fmt: skip
    procs = start_replicas(replica_argv(args), n, engine_args.tensor_parallel_size, args.port + 1)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout)  # fmt: skip
    run_then(uvicorn.Server(config), lambda: stop_replicas(procs, args.graceful_shutdown_timeout + 5))
    return 0


def serve(args: argparse.Namespace) -> int:
    from rtpjax.loading.model_source import check_model, resolve_model

    engine_args = engine_args_from(args)  # bad values fail here, in one line, before anything heavy is imported
    check_model(args.model)
    import uvicorn

    if args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be an integer >= 1, got {args.data_parallel_size}")

    from rtpjax import AsyncLLM
    from rtpjax.serve.app import build_app

    if args.data_parallel_size > 1:
        return serve_replicas(args, engine_args)
    if engine_args.process_id > 0:  # a follower of a multi-host engine: no HTTP, the leader's steps until it stops
        from rtpjax.distributed import multihost
        from rtpjax.engine.core import LLMEngine

        return multihost.follow(LLMEngine(args.model, engine_args))
    llm = AsyncLLM(args.model, **dataclasses.asdict(engine_args))
    if engine_args.num_processes > 1:
        threading.Thread(target=_stop_with_engine, args=(llm,), name="rtpjax-engine-watch", daemon=True).start()
    name = args.served_model_name or (Path(args.model).name.removesuffix(".gguf") if args.model else DEFAULT_NAME)
    app = build_app(llm, name, api_key=args.api_key, max_queue=args.max_queue, model_path=resolve_model(args.model))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout)  # fmt: skip
    run_then(uvicorn.Server(config), llm.shutdown)  # after SIGINT/SIGTERM, once in-flight requests end or time out
    return 0

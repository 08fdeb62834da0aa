"""`rtpjax router --worker-urls URL ...`: the router as a command (uvicorn), and the replicas that
`rtpjax serve --data-parallel-size N` starts behind it."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys

from rtpjax.router.policy import POLICIES


def add_policy_arguments(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """The routing flags `rtpjax router` and `rtpjax serve --data-parallel-size` share."""
    parser.add_argument(f"--{prefix}policy", choices=POLICIES, default="cache_aware",
                        help="cache_aware: the replica with the least predicted time to first token (its cached "
                        "prefix of the prompt, from the engines' KV events, and its queue, costed by its measured "
                        "steps; a prompt mostly cached on one replica, such as a conversation's next turn, sticks "
                        "to it unless that one is clearly overloaded); least_load: the fewest outstanding "
                        "requests; round_robin")  # fmt: skip
    parser.add_argument(f"--{prefix}balance-abs-threshold", type=int, default=8,
                        help="cache_aware sets aside replicas with more outstanding requests than the least loaded "
                        "one's times --balance-rel-threshold plus this")  # fmt: skip
    parser.add_argument(f"--{prefix}balance-rel-threshold", type=float, default=1.5)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker-urls", nargs="+", help="the replicas' base URLs (rtpjax serve)")
    parser.add_argument("--pd-disaggregation", action="store_true",
                        help="prefill/decode disaggregation: each request's prompt on a --prefill worker, the rest on "
                        "a --decode worker (rtpjax serve --role prefill / --role decode)")  # fmt: skip
    parser.add_argument("--prefill", nargs="+", default=[], help="prefill workers' base URLs (--pd-disaggregation)")
    parser.add_argument("--decode", nargs="+", default=[], help="decode workers' base URLs (--pd-disaggregation)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="the replicas' model folder or .gguf, for its tokenizer "
                        "(cache_aware hashes prompts as the engines do; default: the embedded SmolLM2)")  # fmt: skip
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    add_policy_arguments(parser)
    parser.add_argument("--health-check-interval", type=float, default=0.5, help="seconds between GET /load polls")
    parser.add_argument("--health-check-timeout", type=float, default=1.0,
                        help="a replica that takes longer to answer GET /load is out")  # fmt: skip


def router_app(urls: list[str], model: str | None, tokenizer: str | None, policy: str, balance_abs: int,
               balance_rel: float, interval: float = 0.5, timeout: float = 1.0):  # fmt: skip
    from rtpjax.router.app import build_router

    tok = None
    if policy == "cache_aware":
        from rtpjax.loading.model_source import resolve_model
        from rtpjax.loading.tokenizer import load_tokenizer, tokenizer_source

        tok = load_tokenizer(tokenizer_source(resolve_model(model), tokenizer, False))
    return build_router(urls, policy, tok, balance_abs, balance_rel, interval, timeout)


def check_urls(args: argparse.Namespace) -> None:
    """The worker flags that go together, and URLs that are URLs."""
    if args.pd_disaggregation:
        if args.worker_urls:
            raise ValueError("--pd-disaggregation takes --prefill and --decode URLs, not --worker-urls")
        if not args.prefill or not args.decode:
            raise ValueError("--pd-disaggregation needs at least one --prefill and one --decode URL")
        named = [("--prefill", u) for u in args.prefill] + [("--decode", u) for u in args.decode]
    else:
        if args.prefill or args.decode:
            raise ValueError("--prefill and --decode need --pd-disaggregation")
        if not args.worker_urls:
            raise ValueError("give the replicas with --worker-urls URL ... (or --pd-disaggregation with --prefill "
                             "and --decode)")  # fmt: skip
        named = [("--worker-urls", u) for u in args.worker_urls]
    for flag, url in named:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{flag}: {url!r} is not an http:// or https:// URL")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    check_urls(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll
    if args.pd_disaggregation:
        from rtpjax.router.pd import build_pd_router

        app = build_pd_router(args.prefill, args.decode, args.health_check_timeout)
    else:
        app = router_app(args.worker_urls, args.model, args.tokenizer, args.policy, args.balance_abs_threshold,
                         args.balance_rel_threshold, args.health_check_interval, args.health_check_timeout)  # fmt: skip
    # No access log: at log level warning its lines are dropped, but uvicorn still formats each one's fields.
    uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)).run()
    return 0


# -- replicas for `rtpjax serve --data-parallel-size N` ----------------------------------------------------------------


def gpu_count() -> int:
    """GPUs this host shows (CUDA_VISIBLE_DEVICES, else nvidia-smi), without importing JAX in the parent."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    if shutil.which("nvidia-smi") is None:
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def replica_envs(n: int, tensor_parallel: int, gpus: int, memory_fraction: float = 0.9) -> list[dict]:
    """Per replica, the environment it starts with: its own GPUs when the host has n * tensor_parallel of them,
    else a 1/n share of each device's memory (several engines on one GPU)."""
    if gpus >= n * tensor_parallel:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(gpus)]
        return [{"CUDA_VISIBLE_DEVICES": ",".join(ids[i * tensor_parallel : (i + 1) * tensor_parallel])}
                for i in range(n)]  # fmt: skip
    return [{"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{memory_fraction / n:.3f}"} for _ in range(n)]


def start_replicas(serve_argv: list[str], n: int, tensor_parallel: int, base_port: int) -> list[subprocess.Popen]:
    """`rtpjax serve` n times on 127.0.0.1, ports base_port..base_port+n-1, with `serve_argv` (model and engine
    flags)."""
    procs = []
    for i, env in enumerate(replica_envs(n, tensor_parallel, gpu_count())):
        argv = [sys.executable, "-m", "rtpjax.cli", "serve", *serve_argv, "--host", "127.0.0.1",
                "--port", str(base_port + i)]  # fmt: skip
        procs.append(subprocess.Popen(argv, env={**os.environ, **env}))
    return procs


def stop_replicas(procs: list[subprocess.Popen], timeout: float = 30.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

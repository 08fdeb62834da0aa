"""`rtpjax serve`: load the model, compile, and serve the OpenAI API with uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


DEFAULT_NAME = "SmolLM2-135M-Instruct"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="a Hugging Face folder or a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    parser.add_argument("--served-model-name", default=None, help="the name clients use (default: the folder's)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--num-gpu-blocks", type=int, default=None, help="KV cache blocks (overrides the fraction)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--kv-cache-dtype", choices=["auto", "bfloat16", "float16", "float32", "int8", "fp8"],
                        default="auto")  # fmt: skip
    parser.add_argument("--quantization", choices=["int8", "fp8"], default=None,
                        help="weight-only quantization of the linear weights, done on the device at load")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--attention-impl", choices=["auto", "pallas", "reference"], default="auto")
    parser.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    parser.add_argument("--compilation-cache-dir", default=str(Path.home() / ".cache" / "rtpjax" / "xla"),
                        help="JAX persistent compilation cache ('' to disable): the second start skips compiling")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: random weights made on the devices from config.json (benchmarks)")
    parser.add_argument("--max-queue", type=int, default=256, help="requests waiting beyond max-num-seqs before 429")
    parser.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGINT/SIGTERM")  # fmt: skip


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from rtpjax import AsyncLLM
    from rtpjax.serve.app import build_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    llm = AsyncLLM(
        args.model, max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks=args.num_gpu_blocks, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size, dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype, tensor_parallel_size=args.tensor_parallel_size,
        attention_impl=args.attention_impl, enable_prefix_caching=args.enable_prefix_caching,
        compilation_cache_dir=args.compilation_cache_dir or None, load_format=args.load_format, progress=True,
        quantization=args.quantization,
    )  # fmt: skip
    name = args.served_model_name or (Path(args.model).name.removesuffix(".gguf") if args.model else DEFAULT_NAME)
    app = build_app(llm, name, api_key=args.api_key, max_queue=args.max_queue)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=args.graceful_shutdown_timeout)  # fmt: skip
    try:
        uvicorn.Server(config).run()  # returns after SIGINT/SIGTERM, once in-flight requests end or time out
    finally:
        llm.shutdown()
    return 0

"""The `rtpjax` command line. A user's mistake (a bad path, a hub id, a bad flag value, options that do not fit in
memory) is one line on stderr and exit code 2, found before anything heavy is imported where it can be; `--debug`
shows tracebacks and debug logs instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rtpjax.options import CLI_COMPILATION_CACHE, QUANTIZATION_METHODS, add_engine_arguments
from rtpjax.progress import stacks_on_sigusr1

log = logging.getLogger("rtpjax")


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """generate's own flags, then one flag per engine option (rtpjax.options)."""
    parser.add_argument("prompt")
    parser.add_argument("--model", default=None,
                        help="a Hugging Face folder or a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--ignore-eos", action="store_true")
    # One prompt: one sequence, a context and token budget sized to it (generate_sizes), and no warm-up: only the
    # step shapes this prompt runs are compiled (or fetched from the compilation cache), at first use.
    add_engine_arguments(parser, max_num_seqs=1, warmup=False, compilation_cache_dir=CLI_COMPILATION_CACHE)


# A sized context is at least this long (a power of two above it otherwise), so most short prompts share one set of
# step shapes in the compilation cache; the token budget is the prompt's power of two, at most PROMPT_CHUNK.
MIN_CONTEXT = 1024
PROMPT_CHUNK = 512


def _power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def generate_sizes(engine_args, prompt_tokens: int, max_tokens: int) -> dict:
    """The sizes not given on the command line, for one prompt of `prompt_tokens`: a context that holds it and its
    output, and a token budget that prefills it in one step (so two step shapes run: the prompt's and decode's)."""
    sizes = {}
    if engine_args.max_model_len is None:
        sizes["max_model_len"] = max(MIN_CONTEXT, _power_of_two(prompt_tokens + max_tokens))
    if engine_args.max_num_batched_tokens is None:
        sizes["max_num_batched_tokens"] = min(PROMPT_CHUNK, _power_of_two(prompt_tokens))
    return sizes


def _sized_for_prompt(args: argparse.Namespace, engine_args, tokenizer):
    """(the prompt as the engine gets it, the engine options sized to it where not given)."""
    import dataclasses

    prompt = args.prompt
    if tokenizer is None:
        return prompt, engine_args
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer.encode(prompt))
    sizes = generate_sizes(engine_args, prompt_tokens, args.max_tokens)
    log.info("sized for a prompt of %d tokens and up to %d more: %s", prompt_tokens, args.max_tokens,
             ", ".join(f"{name} {value}" for name, value in sizes.items()) or "(all sizes given)")  # fmt: skip
    return prompt, dataclasses.replace(engine_args, **sizes)


def generate(args: argparse.Namespace) -> int:
    import time
    from concurrent.futures import ThreadPoolExecutor

    from rtpjax.loading.model_source import check_model, resolve_model
    from rtpjax.loading.tokenizer import load_tokenizer, tokenizer_source
    from rtpjax.options import engine_args_from
    from rtpjax.sampling_params import SamplingParams

    # Every argument is checked before minutes of loading and compiling.
    engine_args = engine_args_from(args)
    check_model(args.model)
    # --seed is the engine's seed option, and this one prompt is sampled with it: `generate --seed S` gives the tokens
    # a request with seed S gets from the server.
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)  # fmt: skip
    model = resolve_model(args.model)
    source = tokenizer_source(model, engine_args.tokenizer, engine_args.skip_tokenizer_init)
    with ThreadPoolExecutor(1) as pool:  # the tokenizer loads while JAX and the engine's modules are imported
        tokenizer = pool.submit(load_tokenizer, source)
        from rtpjax.engine.core import LLMEngine
        from rtpjax.models import load_config
        from rtpjax.runner.model_runner import CompileCounter

        load_config(model)  # the model's own errors (an unsupported architecture) come first, as the engine says them
        tokenizer = tokenizer.result()
    prompt, engine_args = _sized_for_prompt(args, engine_args, tokenizer)
    CompileCounter.install()  # counts this run's executables from here on, loading included
    engine = LLMEngine(model, engine_args)
    if engine.args.process_id > 0:  # a follower of a multi-host engine: the leader prints
        from rtpjax.distributed import multihost

        return multihost.follow(engine)
    log.info("generating up to %d tokens%s", args.max_tokens,
             "" if engine.args.warmup else " (each step shape compiles, or loads from the compilation cache, at first "
             "use)")  # fmt: skip
    if not args.chat:
        sys.stdout.write(prompt)
    began, tokens = time.monotonic(), 0
    engine.add_request(prompt, params)
    while engine.has_work():
        for out in engine.step():
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
            tokens += len(out.outputs[0].delta_token_ids)
    sys.stdout.write("\n")
    sys.stdout.flush()
    log.info("%d tokens in %.2f s; executables of this run: %d compiled, %d from the compilation cache", tokens,
             time.monotonic() - began, CompileCounter.count, CompileCounter.fetched)  # fmt: skip
    return 0


def convert(args: argparse.Namespace) -> int:
    from rtpjax.loading.model_source import check_model

    check_model(args.model)
    from rtpjax.loading.convert import convert as write_converted

    print(write_converted(args.model, args.out, dtype=args.dtype, quantization=args.quantization))
    return 0


def bench_serve(args: argparse.Namespace) -> int:
    from rtpjax.benchmarks import serve_bench

    metrics = serve_bench.main(args.rest)
    return 0 if metrics is None or metrics["failed"] == 0 else 1


def configure_logging(debug: bool) -> None:
    """rtpjax's progress and startup lines on stderr; other libraries' INFO lines (JAX's probe for TPU backends) only
    with --debug."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    if not debug:
        logging.getLogger("jax").setLevel(logging.WARNING)


def _exit_now(code: int) -> None:
    """End the process once the answer is out: flush, run the exit handlers, and skip tearing the interpreter down
    (freeing JAX's, transformers' and the model's objects one by one took 0.5-1.8 s after a one-line answer)."""
    import atexit
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    atexit._run_exitfuncs()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser = argparse.ArgumentParser(prog="rtpjax", description="LLM inference on JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="complete one prompt, streaming to the terminal", parents=[common],
                              description="Complete one prompt, streaming to the terminal. The prompt is sampled with "
                              "--seed (the engine's seed option), as a server request with that seed is.")  # fmt: skip
    add_generate_arguments(gen)
    conv = commands.add_parser("convert", help="write a ready-to-load orbax checkpoint (transformed, in --dtype)",
                               parents=[common])  # fmt: skip
    conv.add_argument("model", help="a Hugging Face folder or a .gguf file")
    conv.add_argument("out", help="a new folder; load it wherever a model folder is accepted")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    conv.add_argument("--quantization", choices=QUANTIZATION_METHODS, default=None,
                      help="store quantized linear weights (loads quantized, no work at load)")
    bench = commands.add_parser("bench", help="benchmarks (`rtpjax bench serve --help`)")
    bench.add_argument("which", choices=["serve"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    from rtpjax.router import launch as router
    from rtpjax.serve.launch import add_arguments, serve

    add_arguments(commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API", parents=[common]))
    router.add_arguments(commands.add_parser("router", help="one OpenAI endpoint in front of rtpjax replicas", parents=[common],
                                             description="Route OpenAI requests over rtpjax replicas: by cached "
                                             "prefix and predicted time to first token, least load, or in turn."))  # fmt: skip
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    configure_logging(debug)
    if argv is None:  # the command itself, not a caller in Python
        stacks_on_sigusr1()
    try:
        code = {"generate": generate, "serve": serve, "convert": convert, "bench": bench_serve,
                "router": router.run}[args.command](args)  # fmt: skip
        if args.command == "generate" and argv is None:  # the command itself, not a caller in Python
            _exit_now(code)
        return code
    except (ValueError, OSError) as e:  # bad model folder or arguments: one line, no traceback
        if debug:
            raise
        print(f"rtpjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("rtpjax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line saying how to see where
        if debug:
            raise
        print(f"rtpjax: internal error: {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The `rtpjax` command line."""

from __future__ import annotations

import argparse
import sys

from rtpjax.options import CLI_COMPILATION_CACHE, QUANTIZATION_METHODS, add_engine_arguments


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
    # One prompt: a small engine unless told otherwise (fewer step shapes to compile).
    add_engine_arguments(parser, max_num_seqs=8, max_num_batched_tokens=128,
                         compilation_cache_dir=CLI_COMPILATION_CACHE)  # fmt: skip


def generate(args: argparse.Namespace) -> int:
    from rtpjax import LLMEngine, SamplingParams
    from rtpjax.options import engine_args_from

    engine = LLMEngine(args.model, engine_args_from(args))
    # --seed is the engine's seed option, and this one prompt is sampled with it: `generate --seed S` gives the tokens
    # a request with seed S gets from the server.
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            max_tokens=args.max_tokens, ignore_eos=args.ignore_eos)  # fmt: skip
    prompt = args.prompt
    if args.chat:
        messages = [{"role": "user", "content": prompt}]
        prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        sys.stdout.write(prompt)
    engine.add_request(prompt, params)
    while engine.has_work():
        for out in engine.step():
            sys.stdout.write(out.outputs[0].delta_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def convert(args: argparse.Namespace) -> int:
    from rtpjax.loading.convert import convert as write_converted

    print(write_converted(args.model, args.out, dtype=args.dtype, quantization=args.quantization))
    return 0


def bench_serve(args: argparse.Namespace) -> int:
    from rtpjax.benchmarks import serve_bench

    metrics = serve_bench.main(args.rest)
    return 0 if metrics is None or metrics["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtpjax", description="LLM inference on JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="complete one prompt, streaming to the terminal",
                              description="Complete one prompt, streaming to the terminal. The prompt is sampled with "
                              "--seed (the engine's seed option), as a server request with that seed is.")  # fmt: skip
    add_generate_arguments(gen)
    conv = commands.add_parser("convert", help="write a ready-to-load orbax checkpoint (transformed, in --dtype)")
    conv.add_argument("model", help="a Hugging Face folder or a .gguf file")
    conv.add_argument("out", help="a new folder; load it wherever a model folder is accepted")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    conv.add_argument("--quantization", choices=QUANTIZATION_METHODS, default=None,
                      help="store quantized linear weights (loads quantized, no work at load)")
    bench = commands.add_parser("bench", help="benchmarks (`rtpjax bench serve --help`)")
    bench.add_argument("which", choices=["serve"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    from rtpjax.serve.launch import add_arguments, serve

    add_arguments(commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API"))
    args = parser.parse_args(argv)
    try:
        return {"generate": generate, "serve": serve, "convert": convert, "bench": bench_serve}[args.command](args)
    except (ValueError, OSError) as e:  # bad model folder or arguments: one line, no traceback
        print(f"rtpjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

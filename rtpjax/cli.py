"""The `rtpjax` command line."""

from __future__ import annotations

import argparse
import sys


def generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from rtpjax.greedy import greedy_tokens
    from rtpjax.loader import load_model

    cfg, family, params = load_model(args.model, dtype=args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        prompt = [cfg.bos_token_id if cfg.bos_token_id is not None else 0]
    stop = () if args.ignore_eos else cfg.eos_token_ids
    out: list[int] = []
    shown = ""
    sys.stdout.write(args.prompt)
    for token in greedy_tokens(params, cfg, family, prompt, args.max_tokens, stop_ids=stop):
        if token in stop:
            break
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold back a multi-byte character until it is complete
            sys.stdout.write(text[len(shown) :])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtpjax", description="LLM inference on JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="greedy-complete one prompt, streaming to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, help="a Hugging Face model folder (config.json + safetensors)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    args = parser.parse_args(argv)
    try:
        return {"generate": generate}[args.command](args)
    except (ValueError, OSError) as e:  # bad model folder or arguments: one line, no traceback
        print(f"rtpjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

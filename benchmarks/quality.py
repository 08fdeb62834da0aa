"""Quality of each quantized format against the unquantized model (float32), reported rather than assumed.

Per model and format: greedy agreement (the reference's 128 greedy tokens after each of 16 prompts, teacher-forced
through the quantized model: the share of positions whose argmax is the reference's token), the mean next-token KL
divergence over those positions, and perplexity on tests/data/quality.txt. Weight formats quantize at load; KV formats
keep the weights and store the cache in int8 / fp8 (or a calibrated per-layer map). Runs on the CPU.

    python -m rtpjax.benchmarks.quality --models smollm2 stories --out results/quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.loading.model_source import load_model, resolve_model
from rtpjax.loading.tokenizer import load_tokenizer
from rtpjax.quant import kv_precision
from rtpjax.runner.greedy import greedy_tokens

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "quality.txt"
PROMPTS = [
    "The capital of France is", "Once upon a time, there was a little", "To make a cup of tea, you", "The sun is",
    "My favourite animal is the", "In the morning, the children", "Water is made of", "The best way to learn is",
    "A long time ago, in a small village,", "The dog ran to the", "Here is a list of fruits:", "The ocean is deep and",
    "When it rains, people", "The old man looked at the", "Numbers: one, two, three,", "She opened the door and saw",
]  # fmt: skip
WEIGHTS = ("fp8", "int8", "fp8-weight-only", "int8-weight-only", "int4", "int4-asym")
HEADS = tuple(f"{m}-head" for m in WEIGHTS)  # the same with the output head quantized too (--quantize-lm-head)
KV = ("kv-int8", "kv-fp8", "kv-calibrated")
MODELS = {"smollm2": None, "stories": Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"}


def _scores(params, cfg, family, sequences, starts, kv) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per sequence: log-probabilities of the positions from `start` on (predicting the next token)."""
    out = []
    for seq, start in zip(sequences, starts):
        lp = kv_precision.log_probs(params, cfg, family, seq, kv)
        out.append(np.asarray(lp[start - 1 : len(seq) - 1]))
    return out


def evaluate(model, name: str, new_tokens: int = 128, budget: float = 0.02, formats=WEIGHTS + KV) -> list[dict]:
    source = resolve_model(model)
    tok = load_tokenizer(source)
    cfg, family, ref_params = load_model(source, dtype="float32")
    prompts = [tok.encode(p) for p in PROMPTS]
    sequences = [p + list(greedy_tokens(ref_params, cfg, family, p, new_tokens)) for p in prompts]
    starts = [len(p) for p in prompts]
    text = tok.encode(TEXT.read_text())[: cfg.max_position_embeddings]
    auto = ("auto",) * cfg.num_layers
    ref = _scores(ref_params, cfg, family, sequences, starts, auto)
    rows = [{"model": name, "format": "float32", "agreement": 1.0, "mean_kl": 0.0,
             "perplexity": _perplexity(ref_params, cfg, family, text, auto)}]  # fmt: skip
    for fmt in formats:
        began = time.perf_counter()
        params, kv = ref_params, auto
        if fmt in WEIGHTS + HEADS:
            method = fmt.removesuffix("-head")
            _, _, params = load_model(source, dtype="float32", quantization=method, quantize_lm_head=method != fmt)
        elif fmt == "kv-calibrated":
            kv = kv_precision.calibrate(ref_params, cfg, family, tok.encode(kv_precision.CALIBRATION_TEXT), budget)
        else:
            kv = (fmt.removeprefix("kv-"),) * cfg.num_layers
        got = _scores(params, cfg, family, sequences, starts, kv)
        agree = np.mean([np.mean(g.argmax(-1) == np.asarray(s[st:])) for g, s, st in zip(got, sequences, starts)])
        kl = np.mean([float(kv_precision.mean_kl(jnp.asarray(r), jnp.asarray(g))) for r, g in zip(ref, got)])
        row = {"model": name, "format": fmt, "agreement": float(agree), "mean_kl": float(kl),
               "perplexity": _perplexity(params, cfg, family, text, kv)}  # fmt: skip
        if fmt == "kv-calibrated":
            row["map"] = kv_precision.format_map(kv)
        print(f"{name:8s} {fmt:18s} agreement {agree:6.3f}  mean KL {kl:.4f}  perplexity {row['perplexity']:.3f}  "
              f"({time.perf_counter() - began:.0f} s)", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def _perplexity(params, cfg, family, tokens, kv) -> float:
    lp = kv_precision.log_probs(params, cfg, family, tokens, kv)
    nll = -np.asarray(jnp.take_along_axis(lp[:-1], jnp.asarray(tokens[1:])[:, None], axis=-1))
    return float(np.exp(nll.mean()))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--formats", nargs="+", choices=WEIGHTS + HEADS + KV, default=WEIGHTS + KV)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    rows = [row for name in args.models for row in evaluate(MODELS[name], name, args.new_tokens, formats=args.formats)]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

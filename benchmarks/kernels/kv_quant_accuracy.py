"""Which int8/fp8 KV scale granularity loses less accuracy per byte: one scale per token per head, or one per block
(16 tokens) per head. Measured on real K/V activations (SmolLM2-135M-Instruct, the embedded default model, float32)
through attention outputs, on the CPU.

    python benchmarks/kernels/kv_quant_accuracy.py --out kv_quant_accuracy.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from rtpjax.kv import kv_cache
from rtpjax.kernels.reference import QUANT_MAX, reference_attention
from rtpjax.runner.greedy import jit_forward
from rtpjax.loading.model_source import load_model
from rtpjax.runner.step_inputs import SeqChunk, build_step

BLOCK = 16


def quantize_grouped(x: np.ndarray, dtype, group_tokens: int) -> np.ndarray:
    """Quantize-dequantize x [H, T, D] with one scale per (head, `group_tokens` consecutive tokens)."""
    heads, tokens, dim = x.shape
    g = x.reshape(heads, tokens // group_tokens, group_tokens * dim)
    qmax = QUANT_MAX[jnp.dtype(dtype)]
    scale = np.maximum(np.abs(g).max(-1, keepdims=True), 1e-30) / qmax
    y = g / scale
    y = np.clip(np.round(y), -qmax, qmax) if dtype == jnp.int8 else np.asarray(jnp.asarray(y).astype(dtype), np.float32)
    return (y * scale).reshape(x.shape).astype(np.float32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="kv_quant_accuracy.json")
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    cfg, family, params = load_model(None)  # the embedded SmolLM2-135M-Instruct
    rng = np.random.default_rng(0)
    from transformers import AutoTokenizer

    from rtpjax.loading.model_source import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(None))
    text = ("The history of the printing press begins in the fifteenth century, when movable type changed how "
            "knowledge spread across Europe. ") * 40  # fmt: skip
    ids = tok.encode(text)[: args.tokens]
    n = len(ids) - len(ids) % BLOCK
    ids = ids[:n]
    blocks = n // BLOCK
    cache = kv_cache.allocate(cfg, blocks, BLOCK)
    step = build_step([SeqChunk(ids, 0, list(range(blocks)))], BLOCK)
    _, cache = jit_forward(family)(params, cfg, step.tokens, step.positions, cache, step.meta)
    meta = step.meta
    results = []
    for layer in (0, cfg.num_layers // 2, cfg.num_layers - 1):
        k, v = (np.asarray(c).reshape(cfg.num_kv_heads, n, cfg.head_dim) for c in cache[layer])
        q = jnp.asarray(rng.standard_normal((n, cfg.num_heads, cfg.head_dim)), jnp.float32) * float(np.abs(k).mean())
        full = (jnp.asarray(k).reshape(cache[layer][0].shape), jnp.asarray(v).reshape(cache[layer][1].shape))
        ref = np.asarray(reference_attention(q, full, meta, scale=cfg.head_dim**-0.5))
        for dtype, name in ((jnp.int8, "int8"), (jnp.float8_e4m3fn, "fp8")):
            for group, label in ((1, "per token"), (BLOCK, "per block")):
                kq, vq = quantize_grouped(k, dtype, group), quantize_grouped(v, dtype, group)
                quant = (jnp.asarray(kq).reshape(full[0].shape), jnp.asarray(vq).reshape(full[1].shape))
                out = np.asarray(reference_attention(q, quant, meta, scale=cfg.head_dim**-0.5))
                err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                bytes_per_value = 1 + 4 / (group * cfg.head_dim)  # a float32 scale per group
                results.append(dict(layer=layer, dtype=name, scales=label, rel_err=err, bytes_per_value=bytes_per_value,
                                    k_rel_err=float(np.linalg.norm(kq - k) / np.linalg.norm(k))))  # fmt: skip
    print("| dtype | scales | bytes/value | attention rel. error (layers 0, mid, last) |")
    print("|---|---|---|---|")
    for name in ("int8", "fp8"):
        for label in ("per token", "per block"):
            rows = [r for r in results if r["dtype"] == name and r["scales"] == label]
            errs = ", ".join(f"{r['rel_err']:.2e}" for r in rows)
            print(f"| {name} | {label} | {rows[0]['bytes_per_value']:.4f} | {errs} |")
    Path(args.out).write_text(json.dumps(dict(model="SmolLM2-135M-Instruct", tokens=n, results=results), indent=1))


if __name__ == "__main__":
    main()

"""One linear layer per quantized format against bf16 at an 8B model's shapes: microseconds per call and TFLOP/s,
for decode-sized (1, 32 tokens) and prefill-sized (2048) inputs; and the int4 Pallas kernel against XLA's dot of the
dequantized weight. Says which path each format should take before the engine's numbers do.

    python -m rtpjax.benchmarks.kernels.quant_bench --out quant_bench.json   (--quick: tiny shapes, any backend)
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.loading.quantization import METHODS, dequantize, placed, quantize
from rtpjax.quant import int4_matmul
from rtpjax.quant.matmul import linear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # Llama-3-8B
FORMATS = ("bf16", "fp8", "int8", "fp8-weight-only", "int8-weight-only", "int4")


def _time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    began = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - began) / repeats


def run(shapes: dict, tokens: list[int], repeats: int) -> list[dict]:
    rows = []
    step = jax.jit(linear)
    for name, (out, inp) in shapes.items():
        w = jax.random.normal(jax.random.key(0), (out, inp), jnp.float32) * 0.02
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        weights = {f: w.astype(jnp.bfloat16) if f == "bf16" else quantize(w, placed(f, device)) for f in FORMATS}
        for t in tokens:
            x = jax.random.normal(jax.random.key(1), (t, inp), jnp.bfloat16)
            row = {"layer": name, "out": out, "in": inp, "tokens": t}
            for f, wf in weights.items():
                seconds = _time(step, x, wf, repeats=repeats)
                row[f"{f}_us"] = seconds * 1e6
                row[f"{f}_tflops"] = 2 * t * out * inp / seconds / 1e12
            qw = weights["int4"]
            if int4_matmul.supported(t, out, inp, 128) and jax.default_backend() == "gpu":
                kernel = jax.jit(lambda x, q: int4_matmul.int4_matmul(x, q.q, q.scale, q.zero, group=128))
                row["int4_kernel_us"] = _time(kernel, x, qw, repeats=repeats) * 1e6
            xla = jax.jit(lambda x, q: jnp.dot(x, dequantize(q, x.dtype).T))
            row["int4_xla_us"] = _time(xla, x, qw, repeats=repeats) * 1e6
            rows.append(row)
            print(f"{name:8s} T={t:5d} " + "  ".join(f"{f} {row[f + '_us']:8.1f} us" for f in FORMATS)
                  + f"  int4 kernel {row.get('int4_kernel_us', float('nan')):8.1f} / XLA {row['int4_xla_us']:8.1f} us",
                  flush=True)  # fmt: skip
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="quant_bench.json")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU check of the script)")
    args = parser.parse_args(argv)
    assert set(FORMATS) - {"bf16"} <= set(METHODS)
    shapes = {"tiny": (256, 256)} if args.quick else SHAPES
    rows = run(shapes, [1, 32] if args.quick else [1, 32, 2048], repeats=2 if args.quick else 50)
    with open(args.out, "w") as f:
        json.dump({"device": str(jax.devices()[0].device_kind), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

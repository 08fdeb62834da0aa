"""Can XLA's GPU dot read int4 weights itself? One decode-sized linear per 8B shape, timed back to back: bf16, the
small-M Pallas kernel on rtpjax's packed int4, and XLA's dot of a `jnp.int4` weight converted and group-scaled inside
the dot (fused into the GEMM, it reads half a byte a weight; not fused, it writes and reads a bf16 copy first), with
one-byte fp8 weights the same way beside them. Effective TB/s counts the weight bytes as stored."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import jax
import jax.numpy as jnp

from rtpjax.benchmarks.probes import report
from rtpjax.loading.quantization import METHODS, QuantizedWeight, quantize
from rtpjax.quant.matmul import decode_by, linear
from rtpjax.quant.small_matmul import UNPACKS, Tiles, small_matmul

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096)}
GROUP = 128


def timed(fn, *args, iters: int) -> float:
    """Seconds per call, calls queued back to back (dispatch overlaps the device)."""
    fn(*args).block_until_ready()
    t = time.perf_counter()
    for _ in range(iters):
        y = fn(*args)
    y.block_until_ready()
    return (time.perf_counter() - t) / iters


def s4_dot(x, w4, scale):
    """x @ (w4 * scale per group of inputs).T with the conversion where XLA may fuse it into the GEMM."""
    n, k = w4.shape
    w = (w4.astype(x.dtype).reshape(n, k // GROUP, GROUP) * scale[:, :, None].astype(x.dtype)).reshape(n, k)
    return x @ w.T


def s4_dot_f32_scale(x, w4, scale):
    """As s4_dot with the scales multiplied in float32."""
    n, k = w4.shape
    w = (w4.astype(jnp.float32).reshape(n, k // GROUP, GROUP) * scale[:, :, None]).reshape(n, k)
    return jnp.dot(x, w.T.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)


def fp8_xla(w) -> QuantizedWeight:
    """w as fp8 weights whose decode steps take XLA's dot: the engine's `--quantized-decode auto` path."""
    return decode_by(quantize(w, dataclasses.replace(METHODS["fp8"], whole=True)), "xla")


def sweep(key, iters: int) -> list[dict]:
    """The int4 kernel at 16 rows over tile sizes and both ways of unpacking nibbles, gate_up and down."""
    runs = []
    for name in ("gate_up", "down"):
        n, k = SHAPES[name]
        packed = jax.random.randint(key, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        gscale = jax.random.uniform(key, (n, k // GROUP), jnp.float32)
        x = jax.random.normal(key, (16, k), jnp.bfloat16)
        configs = itertools.product((64, 128), (128, 256, 512), UNPACKS, ((4, 3), (4, 4)))
        for bn, bk, unpack, (warps, stages) in configs:
            tiles = Tiles(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages, unpack=unpack)
            fn = jax.jit(lambda x, q, s, t=tiles: small_matmul(x, q, s, fmt="int4", group=GROUP, tiles=t))
            try:
                sec = timed(fn, x, packed, gscale, iters=iters)
            except Exception as e:  # tiles past shared memory, or a lowering this JAX lacks: skip
                print(f"{name} {tiles}: {str(e)[:80]}", flush=True)
                continue
            tb = (n * k // 2 + 4 * n * k // GROUP) / sec / 1e12
            runs.append({"shape": name, "tiles": str(tiles), "us": round(sec * 1e6, 1), "tb_per_s": round(tb, 2)})
            print(f"{name:8s} bn {bn:3d} bk {bk:4d} w{warps} s{stages} {unpack:7s} {sec * 1e6:7.1f} us {tb:5.2f} TB/s",
                  flush=True)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="1,16,32")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--sweep", action="store_true", help="only the int4 kernel's tiles on gate_up and down")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    key, result = jax.random.key(0), {"group": GROUP, "runs": []}
    if args.sweep:
        result["sweep"] = sweep(key, args.iters)
        report(result, args.out)
        return
    for name, (n, k) in SHAPES.items():
        w = jax.random.normal(key, (n, k), jnp.bfloat16)
        w4 = jax.random.randint(key, (n, k), -8, 8, jnp.int8).astype(jnp.int4)
        packed = jax.random.randint(key, (n, k // 2), 0, 256, jnp.int32).astype(jnp.uint8)
        gscale = jax.random.uniform(key, (n, k // GROUP), jnp.float32)
        paths = {
            "bf16": (jax.jit(lambda x, w: x @ w.T), (w,), 2 * n * k),
            "int4_pallas": (jax.jit(lambda x, q, s: small_matmul(x, q, s, fmt="int4", group=GROUP)), (packed, gscale),
                            n * k // 2 + 4 * n * k // GROUP),  # fmt: skip
            "int4_xla": (jax.jit(s4_dot), (w4, gscale), n * k // 2 + 4 * n * k // GROUP),
            "int4_xla_f32_scale": (jax.jit(s4_dot_f32_scale), (w4, gscale), n * k // 2 + 4 * n * k // GROUP),
            "fp8_xla": (jax.jit(lambda x, w: linear(x, w, backend="gpu")), (fp8_xla(w),), n * k + 4 * n),
        }
        for rows in [int(r) for r in args.rows.split(",")]:
            x = jax.random.normal(key, (rows, k), jnp.bfloat16)
            for path, (fn, weights, nbytes) in paths.items():
                try:
                    s = timed(fn, x, *weights, iters=args.iters)
                except Exception as e:  # a path this JAX cannot lower: say so, keep the others
                    result["runs"].append({"shape": name, "rows": rows, "path": path, "error": str(e)[:200]})
                    continue
                result["runs"].append({"shape": name, "rows": rows, "path": path, "us": round(s * 1e6, 1),
                                       "tb_per_s": round(nbytes / s / 1e12, 2)})  # fmt: skip
                print(f"{name:8s} rows {rows:3d} {path:20s} {s * 1e6:8.1f} us {nbytes / s / 1e12:6.2f} TB/s",
                      flush=True)
    report(result, args.out)


if __name__ == "__main__":
    main()

"""Decode-shaped matmuls with the weight stored [out, in] (as checkpoints store it; `x @ w.T`) against [in, out]:
does keeping the checkpoint layout cost anything at small batch? Prints ms and TB/s of weight bytes, writes JSON.

    python -m rtpjax.benchmarks.kernels.matmul_layout --out matmul_layout.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def timed(f, *args, iters: int = 50) -> float:
    jax.block_until_ready(f(*args))
    began = time.perf_counter()
    for _ in range(iters):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - began) / iters


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for out_dim, in_dim in ((14336, 4096), (4096, 14336), (128256, 4096)):
        w_oi = jax.random.normal(jax.random.key(0), (out_dim, in_dim), jnp.bfloat16)
        w_io = w_oi.T.copy()
        for m in (1, 8, 16, 32, 64, 128, 256):
            x = jax.random.normal(jax.random.key(1), (m, in_dim), jnp.bfloat16)
            # 20 chained matmuls per call so launch overhead does not hide the kernel time
            f_oi = jax.jit(lambda x, w: sum((x + i) @ w.T for i in range(20)))
            f_io = jax.jit(lambda x, w: sum((x + i) @ w for i in range(20)))
            t_oi, t_io = timed(f_oi, x, w_oi) / 20, timed(f_io, x, w_io) / 20
            rows.append({"out": out_dim, "in": in_dim, "m": m, "ms_out_in": t_oi * 1e3, "ms_in_out": t_io * 1e3,
                         "tbps_out_in": w_oi.nbytes / t_oi / 1e12, "tbps_in_out": w_oi.nbytes / t_io / 1e12})
            r = rows[-1]
            print(f"{out_dim:6d}x{in_dim:5d} M={m:3d}  [out,in] {r['ms_out_in']:.3f} ms {r['tbps_out_in']:.2f} TB/s"
                  f"   [in,out] {r['ms_in_out']:.3f} ms {r['tbps_in_out']:.2f} TB/s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

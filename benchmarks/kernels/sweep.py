"""Tile-parameter sweep for the ragged paged attention kernel on the GPU (to set the wrapper's defaults).

    python benchmarks/kernels/sweep.py --out sweep.json [--decode-shapes 32x2048 --dtypes int8,fp8 --no-prefill]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_bench import D, HKV, HQ, PAGE, decode_case, timed  # noqa: E402

from rtpjax.kernels.metadata import AttentionMetadata  # noqa: E402
from rtpjax.kernels.reference import quantize
from rtpjax.kernels.ragged_paged_attention import default_kv_unpack, ragged_paged_attention  # noqa: E402


DECODE_GRID = dict(pages_per_tile=(4, 8, 16), num_splits=(1, 2, 4, 8), num_stages=(2, 3), num_warps=(4, 8))


def decode_sweep(shapes, dtypes, results, out: Path | None = None):
    """Every DECODE_GRID tiling per (batch, ctx) shape and KV dtype; prints the best of each beside bf16's default
    tiling (the speed-up a one-byte cache gives over the engine's bf16 kernel as it runs today)."""
    for batch, ctx in shapes:
        kv_bytes = 2 * batch * ctx * HKV * D * 2
        q, k, v, metas = decode_case(batch, ctx)
        caches = {"bf16": (k, v)}
        for name, dt in (("int8", jnp.int8), ("fp8", jnp.float8_e4m3fn)):
            if name in dtypes:
                (kq, ks), (vq, vs) = quantize(k, dt), quantize(v, dt)
                caches[name] = (kq, vq, ks, vs)
        runs = [("bf16", {})] + [(dt, dict(zip(DECODE_GRID, combo))) for dt in dtypes
                                 for combo in itertools.product(*DECODE_GRID.values())]  # fmt: skip
        best = {}
        for dtype, kw in runs:
            label = "bf16_default" if dtype == "bf16" and not kw else dtype
            if dtype == "int8" and "kv_unpack" not in kw:  # recorded: the default depends on the GPU
                kw = dict(kw, kv_unpack=default_kv_unpack(q.dtype))
            f = lambda q, *c, kw=kw: ragged_paged_attention(q, tuple(c[:-1]), c[-1], scale=D**-0.5, **kw)  # noqa: E731
            try:
                us = timed(f, (q, *caches[dtype]), [(m,) for m in metas]) * 1e6
            except Exception as e:  # past shared memory or registers: skipped
                results.append(dict(kind="decode", batch=batch, ctx=ctx, dtype=label, error=str(e)[:200], **kw))
                continue
            results.append(dict(kind="decode", batch=batch, ctx=ctx, dtype=label, us=us,
                                bf16_equiv_TBps=kv_bytes / (us * 1e-6) / 1e12, **kw))  # fmt: skip
            if label not in best or us < best[label][0]:
                best[label] = (us, kw)
        if out is not None:  # after each shape: a run cut short keeps what it measured
            out.write_text(json.dumps(results, indent=1))
        if "bf16_default" not in best:
            print(f"decode b={batch} ctx={ctx}: bf16's default tiling failed (see its error in the JSON)", flush=True)
            continue
        base = best.pop("bf16_default")[0]
        for label, (us, kw) in best.items():
            print(f"decode b={batch} ctx={ctx} {label}: {us:.1f} us, {base / us:.2f}x bf16's default ({base:.1f} us) "
                  f"{kw}", flush=True)  # fmt: skip
        del q, k, v, metas, caches


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="sweep.json")
    parser.add_argument("--decode-shapes", default="1x8192,8x2048,32x2048,128x2048", help="BATCHxCTX,...")
    parser.add_argument("--dtypes", default="bf16,int8", help="KV dtypes to sweep: bf16, int8, fp8")
    parser.add_argument("--no-prefill", action="store_true")
    args = parser.parse_args()
    results = []
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.decode_shapes.split(",") if shape]
    decode_sweep(shapes, args.dtypes.split(","), results, Path(args.out))
    if args.no_prefill:
        return
    T = 4096
    pages = T // PAGE
    key = jax.random.key(0)
    qs = [(jax.random.normal(jax.random.fold_in(key, 9 + i), (T, HQ, D), jnp.bfloat16),) for i in range(2)]
    k = jax.random.normal(jax.random.fold_in(key, 1), (HKV, pages, PAGE, D), jnp.bfloat16)
    v = jax.random.normal(jax.random.fold_in(key, 2), (HKV, pages, PAGE, D), jnp.bfloat16)
    meta = AttentionMetadata(jnp.asarray([0, T], jnp.int32), jnp.asarray([T], jnp.int32),
                             jnp.arange(pages, dtype=jnp.int32)[None], jnp.zeros(T, jnp.int32))  # fmt: skip
    flops = 4 * HQ * D * T * (T + 1) / 2
    for bq, ppt, warps, stages in itertools.product((16, 32), (4, 8), (4, 8), (2, 3, 4)):
        kw = dict(block_q=bq, pages_per_tile=ppt, num_warps=warps, num_stages=stages, scale=D**-0.5)
        try:
            f = lambda k, v, q, kw=kw: ragged_paged_attention(q, (k, v), meta, **kw)  # noqa: E731
            us = timed(f, (k, v), qs, iters=10) * 1e6
            results.append(dict(kind="prefill", tokens=T, us=us, TFLOPs=flops / (us * 1e-6) / 1e12, **kw))
        except Exception as e:
            results.append(dict(kind="prefill", tokens=T, error=str(e)[:200], **kw))
    pre = sorted((r for r in results if r["kind"] == "prefill" and "us" in r), key=lambda r: r["us"])[:3]
    for r in pre:
        print(f"prefill T={T}: {r['TFLOPs']:.0f} TFLOP/s block_q={r['block_q']} ppt={r['pages_per_tile']} "
              f"warps={r['num_warps']} stages={r['num_stages']}")
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

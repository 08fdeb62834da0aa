"""Tile-parameter sweep for the ragged paged attention kernel on the GPU (to set the wrapper's defaults).

    python benchmarks/kernels/sweep.py --out sweep.json
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
from rtpjax.kernels.ragged_paged_attention import ragged_paged_attention  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="sweep.json")
    args = parser.parse_args()
    results = []
    for batch, ctx in [(1, 8192), (8, 2048), (32, 2048), (128, 2048)]:
        kv_bytes = 2 * batch * ctx * HKV * D * 2
        q, k, v, metas = decode_case(batch, ctx, max(1, min(8, (400 << 20) // kv_bytes)))
        (kq, ks), (vq, vs) = quantize(k, jnp.int8), quantize(v, jnp.int8)
        for dtype, ppt, splits, stages, warps in itertools.product(("bf16", "int8"), (4, 8), (1, 2, 4, 8), (2, 3), (4,)):
            kw = dict(pages_per_tile=ppt, num_splits=splits, num_stages=stages, num_warps=warps, scale=D**-0.5)
            try:
                if dtype == "bf16":
                    f = lambda q, k, v, m, kw=kw: ragged_paged_attention(q, (k, v), m, **kw)  # noqa: E731
                    us = timed(f, (q, k, v), [(m,) for m in metas]) * 1e6
                else:
                    f = lambda q, a, b, c, d, m, kw=kw: ragged_paged_attention(q, (a, b, c, d), m, **kw)  # noqa: E731
                    us = timed(f, (q, kq, vq, ks, vs), [(m,) for m in metas]) * 1e6
                results.append(dict(kind="decode", batch=batch, ctx=ctx, dtype=dtype, us=us,
                                    bf16_equiv_TBps=kv_bytes / (us * 1e-6) / 1e12, **kw))  # fmt: skip
            except Exception as e:
                results.append(dict(kind="decode", batch=batch, ctx=ctx, dtype=dtype, error=str(e)[:200], **kw))
        best = {}
        for r in results:
            if r.get("batch") == batch and r.get("ctx") == ctx and "us" in r:
                if r["dtype"] not in best or r["us"] < best[r["dtype"]]["us"]:
                    best[r["dtype"]] = r
        for dt, r in best.items():
            print(f"decode b={batch} ctx={ctx} {dt}: {r['us']:.1f} us ({r['bf16_equiv_TBps']:.2f} TB/s bf16-equiv) "
                  f"ppt={r['pages_per_tile']} splits={r['num_splits']} stages={r['num_stages']}", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
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

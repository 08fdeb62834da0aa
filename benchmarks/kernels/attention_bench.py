"""Paged attention on the GPU: decode KV bandwidth and prefill TFLOP/s, rtpjax's Pallas kernel beside JAX's own
(deprecated) Pallas `paged_attention` and plain XLA, on the same shapes, in one run.

    python benchmarks/kernels/attention_bench.py --out results.json [--quick]

Shapes follow Llama-3-8B attention: 32 query heads, 8 KV heads, head_dim 128, blocks of 16 tokens, bfloat16.
KV bandwidth counts the K and V bytes (and scales) the decode step must read once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rtpjax.attention import AttentionMetadata, quantize, reference_attention  # noqa: E402
from rtpjax.pallas_kernels.ragged_paged_attention import ragged_paged_attention  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16


def timed(fn, args_list, iters=20):
    """Median seconds per call; calls rotate over input sets (beyond L2) and pipeline like a serving loop."""
    jax.block_until_ready(fn(*args_list[0]))
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for i in range(iters):
            out = fn(*args_list[i % len(args_list)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t) / iters)
    return statistics.median(samples)


def decode_case(batch, ctx, rotations, dtype=jnp.bfloat16):
    rng = np.random.default_rng(batch * 7919 + ctx)
    pages = ctx // PAGE
    num_blocks = batch * pages * rotations
    k = jnp.asarray(rng.standard_normal((HKV, num_blocks, PAGE, D), np.float32), dtype)
    v = jnp.asarray(rng.standard_normal((HKV, num_blocks, PAGE, D), np.float32), dtype)
    q = jnp.asarray(rng.standard_normal((batch, HQ, D), np.float32), dtype)
    perm = rng.permutation(num_blocks).astype(np.int32).reshape(rotations, batch, pages)
    metas = [AttentionMetadata(jnp.arange(batch + 1, dtype=jnp.int32), jnp.full(batch, ctx, jnp.int32),
                               jnp.asarray(perm[r]), jnp.zeros(batch, jnp.int32)) for r in range(rotations)]  # fmt: skip
    return q, k, v, metas


def decode_suite(batches, contexts, out):
    rows = []
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

    for ctx in contexts:
        for batch in batches:
            kv_bytes = 2 * batch * ctx * HKV * D * 2
            rotations = max(1, min(8, (400 << 20) // kv_bytes))
            q, k, v, metas = decode_case(batch, ctx, rotations)
            row = dict(batch=batch, ctx=ctx)
            scale = D**-0.5

            def ours(q, cache, meta, **kw):
                return ragged_paged_attention(q, cache, meta, scale=scale, **kw)

            for name, kw in [("rtpjax", {}), ("rtpjax_p8", dict(pages_per_tile=8)),
                             ("rtpjax_p8w8", dict(pages_per_tile=8, num_warps=8))]:  # fmt: skip
                try:
                    f = jax.jit(lambda q, k, v, m, kw=kw: ours(q, (k, v), m, **kw))
                    row[name + "_us"] = timed(f, [(q, k, v, m) for m in metas]) * 1e6
                except Exception as e:  # report, keep measuring the rest
                    row[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            for qname, qdtype in [("int8", jnp.int8), ("fp8", jnp.float8_e4m3fn)]:
                try:
                    (kq, ks), (vq, vs) = quantize(k, qdtype), quantize(v, qdtype)
                    f = jax.jit(lambda q, a, b, c, d, m: ours(q, (a, b, c, d), m, pages_per_tile=8))
                    row[f"rtpjax_{qname}_us"] = timed(f, [(q, kq, vq, ks, vs, m) for m in metas]) * 1e6
                except Exception as e:
                    row[f"rtpjax_{qname}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            try:
                splits = 1 if batch >= 32 else 8
                f = jax.jit(lambda q, k, v, m: jax_paged.paged_attention(
                    q, k, v, m.block_tables, m.seq_lens, block_h=16, pages_per_compute_block=8, k_splits=splits))
                row["jax_paged_us"] = timed(f, [(q, k, v, m) for m in metas]) * 1e6
            except Exception as e:
                row["jax_paged_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            try:
                def xla(q, k, v, m):
                    keys = k[:, m.block_tables].reshape(HKV, batch, ctx, D)
                    vals = v[:, m.block_tables].reshape(HKV, batch, ctx, D)
                    qg = q.reshape(batch, HKV, HQ // HKV, D)
                    s = jnp.einsum("bhgd,hbcd->bhgc", qg, keys, preferred_element_type=jnp.float32) * scale
                    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
                    return jnp.einsum("bhgc,hbcd->bhgd", p, vals).reshape(batch, HQ, D)
                row["xla_us"] = timed(jax.jit(xla), [(q, k, v, m) for m in metas]) * 1e6
            except Exception as e:
                row["xla_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            for key in list(row):
                if key.endswith("_us"):
                    # one byte per element plus a float32 scale per token per head
                    nbytes = kv_bytes * (D + 4) / (2 * D) if ("int8" in key or "fp8" in key) else kv_bytes
                    row[key.replace("_us", "_TBps")] = nbytes / (row[key] * 1e-6) / 1e12
            rows.append(row)
            out["decode"] = rows
            best = max((row[k] for k in row if k.startswith("rtpjax") and k.endswith("TBps") and "int8" not in k
                        and "fp8" not in k), default=float("nan"))  # fmt: skip
            print(f"decode b={batch:4d} ctx={ctx:5d} rtpjax {best:5.2f} TB/s  int8 "
                  f"{row.get('rtpjax_int8_TBps', float('nan')):5.2f}  fp8 {row.get('rtpjax_fp8_TBps', float('nan')):5.2f}"
                  f"  jax {row.get('jax_paged_TBps', float('nan')):5.2f}  xla {row.get('xla_TBps', float('nan')):5.2f}",
                  flush=True)  # fmt: skip
            del q, k, v, metas


def prefill_suite(chunks, out):
    rows = []
    for T in chunks:
        rng = np.random.default_rng(T)
        pages = T // PAGE
        q = jnp.asarray(rng.standard_normal((T, HQ, D), np.float32), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((HKV, pages, PAGE, D), np.float32), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((HKV, pages, PAGE, D), np.float32), jnp.bfloat16)
        meta = AttentionMetadata(jnp.asarray([0, T], jnp.int32), jnp.asarray([T], jnp.int32),
                                 jnp.arange(pages, dtype=jnp.int32)[None], jnp.zeros(T, jnp.int32))  # fmt: skip
        flops = 4 * HQ * D * T * (T + 1) / 2  # causal: QK^T and PV over the lower triangle
        row = dict(tokens=T)
        for name, kw in [("rtpjax", {}), ("rtpjax_q128", dict(block_q=32, pages_per_tile=4, num_warps=8)),
                         ("rtpjax_q128s3", dict(block_q=32, pages_per_tile=4, num_warps=8, num_stages=3))]:  # fmt: skip
            try:
                f = jax.jit(lambda q, k, v, m, kw=kw: ragged_paged_attention(q, (k, v), m, scale=D**-0.5, **kw))
                row[name + "_us"] = timed(f, [(q, k, v, meta)], iters=10) * 1e6
            except Exception as e:
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for impl in ("xla", "cudnn"):
            try:
                def dense(q, k, v, impl=impl):
                    kk = jnp.repeat(k.reshape(HKV, T, D), HQ // HKV, axis=0).transpose(1, 0, 2)[None]
                    vv = jnp.repeat(v.reshape(HKV, T, D), HQ // HKV, axis=0).transpose(1, 0, 2)[None]
                    return jax.nn.dot_product_attention(q[None], kk, vv, is_causal=True, implementation=impl)[0]
                row[impl + "_us"] = timed(jax.jit(dense), [(q, k, v)], iters=10) * 1e6
            except Exception as e:
                row[impl + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for key in list(row):
            if key.endswith("_us"):
                row[key.replace("_us", "_TFLOPs")] = flops / (row[key] * 1e-6) / 1e12
        rows.append(row)
        out["prefill"] = rows
        best = max((row[k] for k in row if k.startswith("rtpjax") and k.endswith("TFLOPs")), default=float("nan"))
        print(f"prefill T={T:5d} rtpjax {best:6.1f} TFLOP/s  xla {row.get('xla_TFLOPs', float('nan')):6.1f}"
              f"  cudnn {row.get('cudnn_TFLOPs', float('nan')):6.1f}", flush=True)


def correctness(out):
    """Compiled (not interpreted) kernel against the float32 reference on fresh random inputs."""
    checks = []
    rng = np.random.default_rng(0)
    for spec, splits in [([(1, 5), (1, 300), (37, 0), (9, 40)], 1), ([(1, 5), (1, 300), (37, 0), (9, 40)], 4)]:
        T = 64
        lens = [n for n, _ in spec]
        qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        qsl = np.concatenate([qsl, np.full(4, qsl[-1], np.int32)])
        seq_lens = np.asarray([s + n for n, s in spec] + [0] * 4, np.int32)
        tables = rng.permutation(200).astype(np.int32)[: 8 * 24].reshape(8, 24)
        meta = AttentionMetadata(jnp.asarray(qsl), jnp.asarray(seq_lens), jnp.asarray(tables), jnp.zeros(T, jnp.int32))
        q = jnp.asarray(rng.standard_normal((T, HQ, D)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((HKV, 200, PAGE, D)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((HKV, 200, PAGE, D)), jnp.bfloat16)
        got = jax.jit(lambda q, k, v: ragged_paged_attention(q, (k, v), meta, scale=D**-0.5, num_splits=splits))(q, k, v)
        ref = reference_attention(q.astype(jnp.float32), (k, v), meta, scale=D**-0.5)
        got, ref = np.asarray(got, np.float32)[: qsl[4]], np.asarray(ref)[: qsl[4]]
        err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        checks.append(dict(splits=splits, rel_err=err, nan=bool(np.isnan(got).any())))
        print(f"correctness splits={splits}: relative error {err:.2e} nan={np.isnan(got).any()}", flush=True)
    out["correctness"] = checks


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="attention_bench.json")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    out = dict(device=str(jax.devices()[0]), jax=jax.__version__)
    print(out, flush=True)
    steps = [lambda: correctness(out)]
    if args.quick:
        steps += [lambda: decode_suite([1, 32], [2048], out), lambda: prefill_suite([1024], out)]
    else:
        steps += [lambda: decode_suite([1, 8, 32, 64, 128], [512, 2048, 8192], out),
                  lambda: prefill_suite([512, 1024, 2048, 4096], out)]  # fmt: skip
    for step in steps:
        try:
            step()
        except Exception:
            traceback.print_exc(limit=3)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""Paged attention on the GPU: decode KV bandwidth and prefill TFLOP/s, rtpjax's Pallas kernel beside JAX's own
(deprecated) Pallas `paged_attention` and plain XLA, on the same shapes, in one run; for prefill also dense peers on
contiguous K/V: cuDNN and JAX's Mosaic GPU flash attention (what the wgmma/TMA lowering reaches on this GPU); and
rtpjax's Mosaic GPU prefill kernel (rtpjax/kernels/prefill_mosaic.py), which the engine runs for long chunks on Hopper.

    python benchmarks/kernels/attention_bench.py --out results.json [--quick]

Shapes follow Llama-3-8B attention: 32 query heads, 8 KV heads, head_dim 128, blocks of 16 tokens, bfloat16.
KV bandwidth counts the K and V bytes (and scales) the decode step must read once.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
from rtpjax.kernels import kv_write, prefill_mosaic  # noqa: E402
from rtpjax.kernels.attention import IMPLEMENTATIONS, plan_step  # noqa: E402
from rtpjax.kernels.metadata import AttentionMetadata  # noqa: E402
from rtpjax.kernels.reference import quantize, reference_attention, write_kv  # noqa: E402
from rtpjax.kernels.ragged_paged_attention import KV_UNPACKS, default_kv_unpack, ragged_paged_attention  # noqa: E402

HQ, HKV, D, PAGE = 32, 8, 128, 16


def timed(fn, consts, varying, iters=20):
    """Median device seconds per call of fn(*consts, *varying[i]).

    The calls run inside one jitted loop (no per-call host dispatch, as inside the engine's step), rotating over the
    `varying` input sets (different block tables: reads spread beyond L2, and nothing is loop-invariant).
    """
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *varying)
    n = len(varying)

    @jax.jit
    def many(consts, stacked):
        def body(i, acc):
            args = jax.tree.map(lambda x: x[i % n], stacked)
            return acc + jnp.sum(fn(*consts, *args).astype(jnp.float32))

        return jax.lax.fori_loop(0, iters, body, jnp.float32(0))

    jax.block_until_ready(many(consts, stacked))
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(many(consts, stacked))
        samples.append((time.perf_counter() - t) / iters)
    return statistics.median(samples)


def decode_case(batch, ctx, dtype=jnp.bfloat16):
    """Random cache and queries, with several block tables: copies of the KV beyond L2 where memory allows."""
    rng = np.random.default_rng(batch * 7919 + ctx)
    pages = ctx // PAGE
    kv_bytes = 2 * batch * ctx * HKV * D * 2
    copies = max(1, min(8, (400 << 20) // kv_bytes))
    num_blocks = batch * pages * copies
    k = jnp.asarray(rng.standard_normal((HKV, num_blocks, PAGE, D), np.float32), dtype)
    v = jnp.asarray(rng.standard_normal((HKV, num_blocks, PAGE, D), np.float32), dtype)
    q = jnp.asarray(rng.standard_normal((batch, HQ, D), np.float32), dtype)
    metas = []
    for _ in range(max(2, copies)):
        table = rng.permutation(num_blocks)[: batch * pages].astype(np.int32).reshape(batch, pages)
        metas.append(AttentionMetadata(jnp.arange(batch + 1, dtype=jnp.int32), jnp.full(batch, ctx, jnp.int32),
                                       jnp.asarray(table), jnp.zeros(batch, jnp.int32)))  # fmt: skip
    return q, k, v, metas


def decode_suite(batches, contexts, out):
    rows = []
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

    for ctx in contexts:
        for batch in batches:
            kv_bytes = 2 * batch * ctx * HKV * D * 2
            q, k, v, metas = decode_case(batch, ctx)
            # The step's query blocks made once outside the timed calls, as the engine makes them once per step for
            # all its layers (rtpjax.kernels.attention.plan_step); the other implementations ignore them.
            varying = [(plan_step(dataclasses.replace(m, impl="pallas"), batch, HQ, HKV),) for m in metas]
            row = dict(batch=batch, ctx=ctx)
            scale = D**-0.5

            def ours(q, cache, meta, **kw):
                return ragged_paged_attention(q, cache, meta, scale=scale, **kw)

            for name, kw in [("rtpjax", {}), ("rtpjax_p4", dict(pages_per_tile=4)),
                             ("rtpjax_p8w8", dict(pages_per_tile=8, num_warps=8)),
                             ("rtpjax_s2", dict(num_splits=2)), ("rtpjax_s4", dict(num_splits=4))]:  # fmt: skip
                try:
                    f = lambda q, k, v, m, kw=kw: ours(q, (k, v), m, **kw)  # noqa: E731
                    row[name + "_us"] = timed(f, (q, k, v), varying) * 1e6
                except Exception as e:  # report, keep measuring the rest
                    row[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            for qname, qdtype in [("int8", jnp.int8), ("fp8", jnp.float8_e4m3fn)]:
                (kq, ks), (vq, vs) = quantize(k, qdtype), quantize(v, qdtype)
                tilings = [("", {}), ("_p16", dict(pages_per_tile=16)), ("_s2", dict(num_splits=2)),
                           ("_s4", dict(num_splits=4))]  # the best tiling counts
                if qname == "int8":  # and both ways to floats (the default: `default_kv_unpack`, recorded)
                    row["int8_default_unpack"] = default_kv_unpack(q.dtype)
                    tilings += [(f"_{u}", dict(kv_unpack=u)) for u in KV_UNPACKS]
                    tilings += [(f"_s2_{u}", dict(num_splits=2, kv_unpack=u)) for u in KV_UNPACKS]
                want = None
                for tiling, kw in tilings:
                    try:
                        f = lambda q, a, b, c, d, m, kw=kw: ours(q, (a, b, c, d), m, **kw)  # noqa: E731
                        got = jax.jit(f)(q, kq, vq, ks, vs, *varying[0]).astype(jnp.float32)
                        want = got if want is None else want  # the first tiling's output: the others must match it
                        err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                        if not err <= 1e-2:  # (NaN too)
                            row[f"rtpjax_{qname}{tiling}_error"] = (
                                f"wrong: {err:.3g} from the first tiling's output (the default kernel's, which the "
                                "correctness suite checks)")
                            continue
                        row[f"rtpjax_{qname}{tiling}_us"] = timed(f, (q, kq, vq, ks, vs), varying) * 1e6
                    except Exception as e:
                        row[f"rtpjax_{qname}{tiling}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                del kq, vq, ks, vs
            try:
                splits = 1 if batch >= 32 else 8
                f = lambda q, k, v, m: jax_paged.paged_attention(  # noqa: E731
                    q, k, v, m.block_tables, m.seq_lens, block_h=16, pages_per_compute_block=8, k_splits=splits)
                row["jax_paged_us"] = timed(f, (q, k, v), varying) * 1e6
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
                row["xla_us"] = timed(xla, (q, k, v), varying) * 1e6
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
            bq = {n: max((row[k] for k in row if k.startswith(f"rtpjax_{n[:4]}") and k.endswith("TBps")
                          and n[4:] in k), default=float("nan"))
                  for n in ("int8", "int8_asm", "int8_convert", "fp8")}  # fmt: skip
            print(f"decode b={batch:4d} ctx={ctx:5d} rtpjax {best:5.2f} TB/s  int8 {bq['int8']:5.2f} "
                  f"(PTX {bq['int8_asm']:5.2f}, converted {bq['int8_convert']:5.2f})  fp8 {bq['fp8']:5.2f}"
                  f"  jax {row.get('jax_paged_TBps', float('nan')):5.2f}  xla {row.get('xla_TBps', float('nan')):5.2f}",
                  flush=True)  # fmt: skip
            del q, k, v, metas


def prefill_suite(chunks, out):
    rows = []
    for T in chunks:
        rng = np.random.default_rng(T)
        pages = T // PAGE
        qs = [(jnp.asarray(rng.standard_normal((T, HQ, D), np.float32), jnp.bfloat16),) for _ in range(2)]
        k = jnp.asarray(rng.standard_normal((HKV, pages, PAGE, D), np.float32), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((HKV, pages, PAGE, D), np.float32), jnp.bfloat16)
        meta = AttentionMetadata(jnp.asarray([0, T], jnp.int32), jnp.asarray([T], jnp.int32),
                                 jnp.arange(pages, dtype=jnp.int32)[None], jnp.zeros(T, jnp.int32))  # fmt: skip
        flops = 4 * HQ * D * T * (T + 1) / 2  # causal: QK^T and PV over the lower triangle
        row = dict(tokens=T)
        for name, kw in [("rtpjax", {}), ("rtpjax_p4s4", dict(pages_per_tile=4, num_stages=4)),
                         ("rtpjax_q16", dict(block_q=16))]:  # fmt: skip
            try:
                f = lambda k, v, m, q, kw=kw: ragged_paged_attention(q, (k, v), m, scale=D**-0.5, **kw)  # noqa: E731
                row[name + "_us"] = timed(f, (k, v, meta), qs, iters=10) * 1e6
            except Exception as e:
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for impl in ("xla", "cudnn"):
            try:
                def dense(k, v, q, impl=impl):  # GQA on contiguous K/V (no paging): the dense peer
                    kk = k.reshape(HKV, T, D).transpose(1, 0, 2)[None]
                    vv = v.reshape(HKV, T, D).transpose(1, 0, 2)[None]
                    return jax.nn.dot_product_attention(q[None], kk, vv, is_causal=True, implementation=impl)[0]
                row[impl + "_us"] = timed(dense, (k, v), qs, iters=10) * 1e6
            except Exception as e:
                row[impl + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        try:  # JAX's Mosaic GPU flash attention (wgmma + TMA, Hopper): float16 only, contiguous K/V, no paging
            from jax.experimental.pallas.ops.gpu import attention_mgpu

            config = attention_mgpu.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2, causal=True)
            k16, v16 = (x.reshape(HKV, T, D).transpose(1, 0, 2)[None].astype(jnp.float16) for x in (k, v))
            q16 = [(q.astype(jnp.float16)[None],) for (q,) in qs]
            mosaic = lambda k, v, q: attention_mgpu.attention(q, k, v, config)  # noqa: E731
            row["mosaic_f16_us"] = timed(mosaic, (k16, v16), q16, iters=10) * 1e6
        except Exception as e:
            row["mosaic_f16_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for bs in (16, 64):  # rtpjax's Mosaic GPU prefill kernel on the engine's cache, blocks of 16 (and 64)
            try:
                cache = (k, v) if bs == PAGE else (k.reshape(HKV, -1, bs, D), v.reshape(HKV, -1, bs, D))
                m = AttentionMetadata(meta.query_start_loc, meta.seq_lens, jnp.arange(T // bs, dtype=jnp.int32)[None],
                                      meta.slot_mapping)  # fmt: skip
                step = prefill_mosaic.plan(m, T)
                f = lambda c, t, p, q: prefill_mosaic.prefill_attention(q, c, t, p, scale=D**-0.5)  # noqa: E731
                row[f"mosaic_b{bs}_us"] = timed(f, (cache, m.block_tables, step), qs, iters=10) * 1e6
                if bs == PAGE:  # the kernel alone: queries already in whole tiles (what the gathers around it cost)
                    tables = prefill_mosaic.table_rows(m.block_tables)
                    tiled = [(q[step["q_rows"]],) for (q,) in qs]
                    f = lambda c, t, p, q: prefill_mosaic.attention_in_tiles(  # noqa: E731
                        q, c, t, p["tiles"], scale=D**-0.5)
                    row[f"mosaic_b{bs}_kernel_us"] = timed(f, (cache, tables, step), tiled, iters=10) * 1e6
            except Exception as e:
                row[f"mosaic_b{bs}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        for key in list(row):
            if key.endswith("_us"):
                row[key.replace("_us", "_TFLOPs")] = flops / (row[key] * 1e-6) / 1e12
        rows.append(row)
        out["prefill"] = rows
        best = max((row[k] for k in row if k.startswith("rtpjax") and k.endswith("TFLOPs")), default=float("nan"))
        print(f"prefill T={T:5d} rtpjax {best:6.1f} TFLOP/s  xla {row.get('xla_TFLOPs', float('nan')):6.1f}"
              f"  cudnn {row.get('cudnn_TFLOPs', float('nan')):6.1f}"
              f"  mosaic(f16) {row.get('mosaic_f16_TFLOPs', float('nan')):6.1f}  rtpjax mosaic b16 / alone / b64 "
              + " / ".join(f"{row.get(k + '_TFLOPs', float('nan')):.1f}"
                           for k in ("mosaic_b16", "mosaic_b16_kernel", "mosaic_b64")), flush=True)  # fmt: skip


def write_suite(token_counts, out, num_blocks=16384):
    """The step's KV write per layer: XLA's scatter (attention.write_kv, the engine's default) against the Pallas
    kernel (rtpjax/kernels/kv_write.py), into a 262,144-slot cache; GB/s of the new rows (and scales) written. Each
    kernel's cache after one write is compared with XLA's, bit for bit."""
    rows = []
    rng = np.random.default_rng(0)
    for kv in ("bf16", "int8", "fp8"):
        dtype = {"bf16": jnp.bfloat16, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[kv]
        shape = (HKV, num_blocks, PAGE, D)
        for tokens in token_counts:
            sets = []
            for _ in range(4):  # whole blocks in random order, as a step's sequences own them
                blocks = rng.permutation(num_blocks)[: -(-tokens // PAGE)]
                slots = (blocks[:, None] * PAGE + np.arange(PAGE)).reshape(-1)[:tokens].astype(np.int32)
                new = [jnp.asarray(rng.standard_normal((tokens, HKV, D)), jnp.bfloat16) for _ in range(2)]
                sets.append((*new, jnp.asarray(slots)))
            row = dict(kv=kv, tokens=tokens)
            caches = {}
            for name, write in (("xla", write_kv), ("pallas", kv_write.write_kv)):
                cache = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                if kv != "bf16":
                    cache += (jnp.ones(shape[:3], jnp.float32), jnp.ones(shape[:3], jnp.float32))
                caches[name] = jax.jit(write)(cache, *sets[0])
                row[name + "_us"] = timed_write(write, cache, sets) * 1e6
            same = [jnp.array_equal(bits(a), bits(b)) for a, b in zip(caches["xla"], caches["pallas"])]
            row["bit_exact"] = all(bool(x) for x in same)
            written = 2 * tokens * HKV * (D * jnp.dtype(dtype).itemsize + (4 if kv != "bf16" else 0))
            row["xla_GBps"], row["pallas_GBps"] = (written / row[n + "_us"] / 1e3 for n in ("xla", "pallas"))
            rows.append(row)
            print(f"write {kv:4s} {tokens:5d} tokens: XLA scatter {row['xla_us']:7.1f} us, Pallas "
                  f"{row['pallas_us']:7.1f} us ({row['xla_us'] / row['pallas_us']:.2f}x), same cache: {row['bit_exact']}",
                  flush=True)  # fmt: skip
    out["write"] = rows


def bits(x):
    """An array's raw bits (compares NaNs and float8 exactly)."""
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])


def timed_write(write, cache, sets, iters=20):
    """Median device seconds per write, calls back to back in one jitted loop over a donated cache (in place, as the
    engine's step runs them), rotating over the input sets."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *sets)

    @functools.partial(jax.jit, donate_argnums=0)
    def many(cache, stacked):
        body = lambda i, c: write(c, *jax.tree.map(lambda x: x[i % len(sets)], stacked))  # noqa: E731
        return jax.lax.fori_loop(0, iters, body, cache)

    cache = jax.block_until_ready(many(cache, stacked))
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        cache = jax.block_until_ready(many(cache, stacked))
        samples.append((time.perf_counter() - t) / iters)
    return statistics.median(samples)


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
        for kv in ("bf16", "int8", "fp8"):
            cache = (k, v)
            if kv != "bf16":
                dtype = jnp.int8 if kv == "int8" else jnp.float8_e4m3fn
                (kq, ks), (vq, vs) = quantize(k, dtype), quantize(v, dtype)
                cache = (kq, vq, ks, vs)
            got = jax.jit(lambda q, c: ragged_paged_attention(q, c, meta, scale=D**-0.5, num_splits=splits))(q, cache)
            ref = reference_attention(q.astype(jnp.float32), cache, meta, scale=D**-0.5)
            got, ref = np.asarray(got, np.float32)[: qsl[4]], np.asarray(ref)[: qsl[4]]
            err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            checks.append(dict(kv=kv, splits=splits, rel_err=err, nan=bool(np.isnan(got).any())))
            print(f"correctness {kv} splits={splits}: relative error {err:.2e} nan={np.isnan(got).any()}", flush=True)
    # A step split between the kernels (as the engine runs it on Hopper): long chunks to the Mosaic GPU kernel,
    # decode rows and short chunks to the Triton one; every token against the reference.
    spec = [(1, 5), (600, 0), (1, 300), (37, 0), (130, 70), (9, 40), (64, 700)]
    lens = [n for n, _ in spec]
    qsl = jnp.asarray(np.cumsum([0] + lens), jnp.int32)
    tables = jnp.asarray(rng.integers(0, 200, (7, 48)), jnp.int32)  # blocks may repeat: the data is random
    meta = AttentionMetadata(qsl, jnp.asarray([s + n for n, s in spec], jnp.int32), tables,
                             jnp.full(sum(lens), -1, jnp.int32), impl="pallas", mosaic_prefill=True)  # fmt: skip
    meta = plan_step(meta, sum(lens), HQ, HKV)
    q = jnp.asarray(rng.standard_normal((sum(lens), HQ, D)), jnp.bfloat16)
    new = jnp.zeros((sum(lens), HKV, D), jnp.bfloat16)
    got, _ = jax.jit(lambda q, c, m: IMPLEMENTATIONS["pallas"](q, new, new, c, m, scale=D**-0.5, window=None,
                                                               soft_cap=None))(q, (k, v), meta)  # fmt: skip
    ref = np.asarray(reference_attention(q.astype(jnp.float32), (k, v), meta, scale=D**-0.5))
    got = np.asarray(got, np.float32)
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    split = "prefill_tiles" in meta.plan
    checks.append(dict(kv="bf16", mixed_step_split_to_mosaic=split, rel_err=err, nan=bool(np.isnan(got).any())))
    print(f"correctness mixed step (long chunks to the Mosaic kernel: {split}): relative error {err:.2e} "
          f"nan={np.isnan(got).any()}", flush=True)
    out["correctness"] = checks


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="attention_bench.json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--suites", default="correctness,decode,prefill,write", help="comma-separated, of these four")
    parser.add_argument("--batches", default=None, help="decode batch sizes, e.g. 32,128 (default: 1,8,32,64,128)")
    parser.add_argument("--contexts", default=None, help="decode contexts, e.g. 2048,8192 (default: 512,2048,8192)")
    args = parser.parse_args()
    suites = set(args.suites.split(","))
    out = dict(device=str(jax.devices()[0]), jax=jax.__version__)
    print(out, flush=True)
    decode = ([1, 32], [2048]) if args.quick else ([1, 8, 32, 64, 128], [512, 2048, 8192])
    decode = tuple([int(v) for v in flag.split(",")] if flag else default
                   for flag, default in zip((args.batches, args.contexts), decode))  # fmt: skip
    chunks = [1024] if args.quick else [512, 1024, 2048, 4096]
    steps = {"correctness": lambda: correctness(out), "decode": lambda: decode_suite(*decode, out),
             "prefill": lambda: prefill_suite(chunks, out),
             "write": lambda: write_suite([32, 128] if args.quick else [1, 32, 128, 512, 2048, 8192], out)}  # fmt: skip
    for step in (steps[name] for name in steps if name in suites):
        try:
            step()
        except Exception:
            traceback.print_exc(limit=3)
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

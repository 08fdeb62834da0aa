"""Each quantized weight format's linear layer against bf16 at an 8B model's shapes, decode-sized inputs (1, 16, 32
tokens): microseconds per call and GB/s of weights read against the H200's 4.3 TB/s. Per quantized format it times the
path `linear` takes (the small-M kernel on a GPU), the XLA path it replaces (W8A8 dot / dequantized dot) and a sweep of
the kernel's tiles at 16 rows (`--sweep-rows 1`: the one-row tiles; over 64: row-tiled ones, and int4_dequant's
programs alone), so one GPU call finds the best tiles and the row count where the kernel stops paying; the kernel
column takes the best tiles at the sweep's row count, the defaults at the others.

Every timing is one compiled program of several calls on different inputs and weight copies (more bytes than the
50 MB L2 holds), as a model's step reads each layer's weights once.

    python -m rtpjax.benchmarks.kernels.quant_bench --out quant_bench.json   (--quick: tiny shapes, any backend)
    python -m rtpjax.benchmarks.kernels.quant_bench --table quant_none.json quant_fp8.json ...   (gpu_run.sh quant)

--table compares the engine runs of `gpu_run.sh quant` (offline.py JSON, one per format) with the bf16 one, or the
serving runs of `gpu_run.sh quant_serve` given as FORMAT=PATH (serve_bench JSON; none=PATH for bf16).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
from jax import lax

from rtpjax.loading.quantization import QuantizedWeight, dequantize, placed, quantize, values
from rtpjax.quant import int4_dequant, int4_mosaic, small_matmul
from rtpjax.quant.int4_dequant import DequantTiles, dequantize_int4
from rtpjax.quant.matmul import linear, row_reduce, w8a8
from rtpjax.quant.small_matmul import Tiles

SHAPES = {"o": (4096, 4096), "up": (14336, 4096), "down": (4096, 14336), "head": (128256, 4096)}  # [out, in]
FORMATS = ("bf16", "fp8", "int8", "int4")
HBM_BYTES_PER_S = 4.3e12
L2_BYTES = 50 << 20
MAX_ERROR = 2e-2  # relative to the output's largest value: bf16 inputs and output, exact weights
W8A8_ERROR = 0.1  # the same where the path may quantize the activations too (W8A8 steps past the kernel's rows)
SWEEP = (Tiles(), Tiles(block_n=32), Tiles(block_n=128), Tiles(block_k=128), Tiles(block_k=512), Tiles(split_k=1),
         Tiles(split_k=4), Tiles(num_warps=8), Tiles(num_stages=4), Tiles(block_n=128, num_warps=8),
         Tiles(block_n=16, split_k=1), Tiles(block_n=32, split_k=1), Tiles(block_n=16, block_k=512, split_k=1),
         Tiles(block_n=32, block_k=512, split_k=1), Tiles(block_n=32, block_k=128, split_k=2),
         Tiles(block_n=16, block_k=256, split_k=2), Tiles(num_stages=5), Tiles(block_n=32, num_warps=2),
         Tiles(block_n=16, block_k=1024, split_k=1, num_warps=4, num_stages=2),
         Tiles(unpack="magic"), Tiles(block_k=128, unpack="magic"), Tiles(unpack="asm"),
         Tiles(block_k=128, unpack="asm"), Tiles(block_n=32, unpack="asm"), Tiles(block_k=512, unpack="asm"),
         Tiles(block_n=128, num_warps=8, unpack="asm"))  # fmt: skip (unpack: int4 only)
# Past a decode step's rows (`--sweep-rows` over 64): tiles of 64 or 128 rows, for steps that would otherwise take
# the weight dequantized (int4: `int4_dequant`, then a 16-bit GEMM).
LARGE_SWEEP = tuple(Tiles(row_tile=r, block_n=n, block_k=k, num_warps=w, num_stages=st, unpack=u, split_k=1)
                    for r, n, k, w, st, u in (
                        (64, 64, 256, 4, 3, "asm"), (64, 128, 128, 8, 3, "asm"), (128, 64, 128, 8, 3, "asm"),
                        (128, 128, 128, 8, 3, "asm"), (128, 128, 128, 8, 4, "asm"), (128, 128, 256, 8, 3, "asm"),
                        (128, 256, 128, 8, 3, "asm"), (64, 128, 256, 4, 4, "asm"), (128, 128, 128, 8, 3, "magic"),
                        (128, 64, 256, 4, 3, "magic"), (64, 64, 128, 4, 3, "convert"),
                        (128, 128, 128, 8, 3, "convert")))  # fmt: skip (unpack: int4 only)
MOSAIC_STAGES = (2, 3, 4)  # int4_mosaic's pipeline depths timed past a decode step's rows (groups in flight)
# int4_dequant's programs: the defaults, then wider, longer, more warps, deeper.
DEQUANT_SWEEP = (DequantTiles(), DequantTiles(block_n=128), DequantTiles(block_n=32), DequantTiles(block_bytes=512),
                 DequantTiles(block_bytes=128), DequantTiles(block_n=128, num_warps=8),
                 DequantTiles(block_n=64, block_bytes=512, num_warps=8), DequantTiles(num_stages=3),
                 DequantTiles(block_n=256, block_bytes=128, num_warps=8))  # fmt: skip
# One row on the vector units (`--sweep-rows 1`), and the padded tensor-core dot it replaces.
ONE_ROW_SWEEP = (*(Tiles(one_row=True, block_n=n, block_k=k, num_warps=w, num_stages=st, split_k=sk, unpack=u)
                   for n, k, w, st, sk, u in (
                       (8, 512, 4, 3, 0, "convert"), (16, 256, 4, 3, 0, "convert"), (16, 512, 4, 3, 0, "convert"),
                       (16, 1024, 4, 3, 0, "convert"), (32, 256, 4, 3, 0, "convert"), (32, 512, 4, 3, 0, "convert"),
                       (64, 128, 4, 3, 0, "convert"), (64, 256, 4, 3, 0, "convert"), (16, 512, 2, 3, 0, "convert"),
                       (16, 512, 4, 4, 0, "convert"), (16, 512, 4, 3, 1, "convert"), (32, 512, 8, 3, 0, "convert"),
                       (16, 256, 4, 3, 0, "magic"), (32, 256, 4, 3, 0, "magic"), (16, 512, 4, 3, 0, "magic"),
                       (32, 512, 8, 3, 0, "magic"),
                       (16, 256, 4, 3, 0, "asm"), (32, 256, 4, 3, 0, "asm"), (16, 512, 4, 3, 0, "asm"),
                       (8, 512, 4, 3, 0, "asm"), (32, 512, 8, 3, 0, "asm"))),
                 Tiles(), Tiles(unpack="asm"), Tiles(block_n=32, unpack="asm"),
                 Tiles(block_k=512, unpack="asm"))  # fmt: skip


def _nbytes(w) -> int:
    return sum(a.nbytes for a in jax.tree.leaves(w))


def _time(fn, xs: jax.Array, weights: list, repeats: int) -> float:
    """Seconds per call of fn(x, w): one program calling it on each of xs with the weights in turn."""

    @jax.jit
    def run(xs, weights):
        # Each call's input waits on the last call's result (XLA merges dots sharing a weight into one), and each
        # output is consumed by its max (XLA moves a slice or a sum of a dot into the dot's operands).
        acc = jnp.zeros((), jnp.float32)
        for i in range(xs.shape[0]):
            x, acc = jax.lax.optimization_barrier((xs[i], acc))
            acc += jnp.max(fn(x, weights[i % len(weights)])).astype(jnp.float32)
        return acc

    jax.block_until_ready(run(xs, weights))
    began = time.perf_counter()
    for _ in range(repeats):
        out = run(xs, weights)
    jax.block_until_ready(out)
    return (time.perf_counter() - began) / repeats / xs.shape[0]


def _xla(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """The path `linear` takes without the small kernel."""
    if w.scheme.act is not None:
        return w8a8(x, w).astype(x.dtype)
    return jnp.dot(x, dequantize(w, x.dtype).T)


def _weight_only(x: jax.Array, w) -> jax.Array:
    """XLA's dot of the weight converted to x's dtype, scales after (one-byte) or before (int4, `_as_s4`'s signed
    nibbles times their group scales): the form in which XLA fuses the conversion into its GEMM."""
    if isinstance(w, QuantizedWeight):
        y = jnp.dot(x, w.q.T.astype(x.dtype), preferred_element_type=jnp.float32) * w.scale[:, 0]
        return y.astype(x.dtype)
    q4, scale = w
    out, groups = scale.shape
    full = (q4.astype(x.dtype).reshape(out, groups, -1) * scale[:, :, None].astype(x.dtype)).reshape(out, -1)
    return jnp.dot(x, full.T)


def _u4_dot(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """XLA's dot of an int4 weight as stored ([out, in/2] bytes), its nibbles read as XLA's uint4 by a bitcast and
    dequantized in x's dtype in the same expression (each half group of nibbles back in input order): a form whose
    conversion XLA's GEMM fusion may take in, against `linear`'s float32 dequantization (large steps)."""
    out, half_in = w.q.shape
    group = w.scheme.group_size(half_in * 2)
    nibbles = lax.bitcast_convert_type(w.q, jnp.uint4).reshape(out, half_in * 2 // group, group // 2, 2)
    u = jnp.swapaxes(nibbles, -1, -2).astype(x.dtype)  # [out, groups, 2, g/2]: inputs j (low), then j + g/2 (high)
    zero = 8 if w.zero is None else w.zero.astype(x.dtype)[:, :, None, None]
    full = ((u - zero) * w.scale.astype(x.dtype)[:, :, None, None]).reshape(out, half_in * 2)
    return jnp.dot(x, full.T)


def _row_reduce(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """One row (x [1, in]) without a dot: the stored weight times the row, summed over the inputs in float32, which
    XLA emits as one row reduction reading the weight as stored (int4: each group's nibbles against its half rows,
    then its scale). Batch 1's bytes at the speed of XLA's reduction emitter, against the kernel's."""
    if w.scheme.weight != "int4":  # `linear`'s own path for one-row steps of one-byte weights
        return row_reduce(x, w).astype(x.dtype)
    row = x[0].astype(jnp.float32)
    out, half_in = w.q.shape
    group = w.scheme.group_size(half_in * 2)
    q = w.q.reshape(out, half_in * 2 // group, group // 2)
    halves = row.reshape(half_in * 2 // group, 2, group // 2)  # each group's inputs j and j + g/2
    zero = 8.0 if w.zero is None else w.zero.astype(jnp.float32)[:, :, None]
    lo, hi = (q & 15).astype(jnp.float32) - zero, (q >> 4).astype(jnp.float32) - zero
    part = jnp.sum(lo * halves[:, 0] + hi * halves[:, 1], axis=-1)  # [out, groups]
    return jnp.sum(part * w.scale, axis=-1)[None].astype(x.dtype)


def _as_s4(w: QuantizedWeight):
    """A symmetric int4 weight as XLA's own int4 array [out, in] and its scales."""
    return values(w).astype(jnp.int4), w.scale


def _weights(out: int, inp: int, fmt: str, copies: int) -> list:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    made = []
    for c in range(copies):
        w = jax.random.normal(jax.random.key(c), (out, inp), jnp.float32) * 0.02
        made.append(w.astype(jnp.bfloat16) if fmt == "bf16" else quantize(w, placed(fmt, device)))
    return jax.block_until_ready(made)


def _error(fn, x: jax.Array, w: QuantizedWeight) -> float:
    """fn(x, w)'s largest difference from the dequantized float32 product, relative to that product's largest value."""
    want = jnp.dot(x.astype(jnp.float32), dequantize(w, jnp.float32).T)
    got = fn(x, w).astype(jnp.float32)
    return float(jnp.max(jnp.abs(got - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))


def _record(row: dict, key: str, seconds: float, nbytes: int) -> None:
    row[f"{key}_us"] = seconds * 1e6
    row[f"{key}_gbps"] = nbytes / seconds / 1e9
    row[f"{key}_hbm"] = nbytes / seconds / HBM_BYTES_PER_S


def dequant_sweep(weights: list, calls: int, repeats: int, interpret: bool) -> dict:
    """int4_dequant alone under each of DEQUANT_SWEEP's tiles, each checked against the reference element for element
    first: microseconds and GB/s of bytes read and written, the best."""
    one = weights[0]
    x = jnp.zeros((calls, 1, 1), jnp.bfloat16)
    moved = _nbytes(one) + one.q.shape[0] * one.shape[1] * 2  # read packed + scales, written bf16
    want = dequantize(one, jnp.bfloat16, stored_order=True)
    times, wrong = {}, []
    for tiles in DEQUANT_SWEEP:
        def run(v, w, tiles=tiles):  # v orders the calls and keeps XLA from merging two on one weight
            w = dataclasses.replace(w, scale=w.scale + v[0, 0].astype(jnp.float32) * 0)
            return dequantize_int4(w, jnp.bfloat16, interpret=interpret, tiles=tiles)[:1, :1]

        if not jnp.array_equal(dequantize_int4(one, jnp.bfloat16, interpret=interpret, tiles=tiles), want):
            wrong.append(str(dataclasses.astuple(tiles)))
            continue
        times[tiles] = _time(run, x, weights, repeats)
    best = min(times, key=times.get) if times else None
    return {"tiles": best and dataclasses.asdict(best), "us": best and times[best] * 1e6,
            "gbps": best and moved / times[best] / 1e9, "wrong": wrong,
            "sweep_us": {str(dataclasses.astuple(t)): v * 1e6 for t, v in times.items()}}  # fmt: skip


def bench_shape(name: str, out: int, inp: int, tokens: list[int], repeats: int, sweep: tuple, quick: bool = False,
                sweep_rows: int = 16, formats: tuple = FORMATS, unpacks: tuple = small_matmul.UNPACKS,
                mosaic: bool = False):  # fmt: skip
    """Rows (one per token count) and the best of the `sweep` tiles per quantized format (of `formats`, bf16 always;
    int4's tiles of `unpacks` only) at `sweep_rows` rows. quick: one weight copy, two calls per program. Every
    kernel's output is checked before it is timed: a wrong one (or NaN) is reported, not timed."""
    formats = ("bf16", *(f for f in formats if f != "bf16"))
    interpret = jax.default_backend() != "gpu"  # a CPU run checks the script: the kernel interpreted
    kernel = lambda tiles: lambda x, w: small_matmul.quantized_matmul(x, w, tiles, interpret=interpret)
    rows, best = [{"layer": name, "out": out, "in": inp, "tokens": t} for t in tokens], {}
    for fmt in formats:
        one = _weights(out, inp, fmt, 1)[0]
        nbytes = _nbytes(one)
        copies = 1 if quick else min(16, -(-2 * L2_BYTES // nbytes))  # twice the L2
        weights = [one, *_weights(out, inp, fmt, copies - 1)]
        calls = 2 if quick else max(copies, 32)  # GPU time per program well above its dispatch
        tiles = None  # the format's defaults
        if fmt != "bf16" and sweep and small_matmul.applies(sweep_rows, one):
            xm = jax.random.normal(jax.random.key(1), (calls, sweep_rows, inp), jnp.bfloat16)
            fits = [t for t in sweep if small_matmul.applies(sweep_rows, one, t)
                    and (t.unpack in unpacks if fmt == "int4" else t.unpack == Tiles.unpack)]  # unpacking: int4's alone
            errors = {t: _error(kernel(t), xm[0], one) for t in fits}
            times = {t: _time(kernel(t), xm, weights, repeats) for t in fits if errors[t] <= MAX_ERROR}
            tiles = min(times, key=times.get) if times else None
            best[fmt] = {"tiles": tiles and dataclasses.asdict(tiles), "us": tiles and times[tiles] * 1e6,
                         "sweep_us": {str(dataclasses.astuple(t)): s * 1e6 for t, s in times.items()},
                         "wrong": {str(dataclasses.astuple(t)): e for t, e in errors.items()
                                   if not e <= MAX_ERROR}}  # fmt: skip
        if fmt == "int4" and sweep and sweep_rows > small_matmul.MAX_ROWS and int4_dequant.applies(one):
            best["int4_dequant"] = dequant_sweep(weights, calls, repeats, interpret)
        for row in rows:
            xs = jax.random.normal(jax.random.key(2), (calls, row["tokens"], inp), jnp.bfloat16)
            _record(row, fmt, _time(linear, xs, weights, repeats), nbytes)
            if fmt == "bf16":
                continue
            row[f"{fmt}_error"] = _error(linear, xs[0], one)  # the engine's path (its default tiles), checked too
            if not row[f"{fmt}_error"] <= (MAX_ERROR if one.scheme.act is None else W8A8_ERROR):
                print(f"{name:5s} {fmt}: WRONG results from the linear path (relative error {row[fmt + '_error']:.3g})")
            _record(row, f"{fmt}_xla", _time(_xla, xs, weights, repeats), nbytes)
            if fmt == "int4":  # the conversion XLA can fuse needs its own int4 type
                s4 = [_as_s4(w) for w in weights]
                _record(row, "int4_s4", _time(_weight_only, xs, s4, repeats), _nbytes(s4[0]))
                row["int4_u4_error"] = _error(_u4_dot, xs[0], one)
                _record(row, "int4_u4", _time(_u4_dot, xs, weights, repeats), nbytes)
                if mosaic and row["tokens"] > small_matmul.MAX_ROWS and int4_mosaic.applies(row["tokens"], one):
                    mosaic_row(row, xs, weights, repeats, interpret, MOSAIC_STAGES[1:2] if quick else MOSAIC_STAGES)
            else:
                _record(row, f"{fmt}_wonly", _time(_weight_only, xs, weights, repeats), nbytes)
            if row["tokens"] == 1 and (one.scheme.per_channel or fmt == "int4"):
                row[f"{fmt}_reduce_error"] = _error(_row_reduce, xs[0], one)
                _record(row, f"{fmt}_reduce", _time(_row_reduce, xs, weights, repeats), nbytes)
            best_tiles = tiles if row["tokens"] == sweep_rows else None  # tuned for that many rows only
            if small_matmul.applies(row["tokens"], one, best_tiles):
                _record(row, f"{fmt}_kernel", _time(kernel(best_tiles), xs, weights, repeats), nbytes)
    for row in rows:
        print(f"{name:5s} {out:6d}x{inp:<5d} T={row['tokens']:3d}  bf16 {row['bf16_us']:7.1f} us "
              f"{row['bf16_gbps']:5.0f} GB/s  " + "  ".join(
                  f"{f} {row[f + '_us']:7.1f} us {row[f + '_hbm']:4.0%} HBM (XLA {row[f + '_xla_us']:7.1f}, "
                  f"weight-only {row.get(f + '_wonly_us', row.get('int4_s4_us', 0)):7.1f}"
                  + (f", uint4 {row['int4_u4_us']:7.1f}" if f == "int4" else "")
                  + (f", mosaic {row['int4_mosaic_us']:7.1f}" if f == "int4" and "int4_mosaic_us" in row else "")
                  + (f", reduce {row[f + '_reduce_us']:7.1f}" if f + "_reduce_us" in row else "")
                  + (f", kernel {row[f + '_kernel_us']:7.1f})" if f + "_kernel_us" in row else ")")
                  for f in formats[1:]), flush=True)  # fmt: skip
    return rows, best


def mosaic_row(row: dict, xs: jax.Array, weights: list, repeats: int, interpret: bool, depths: tuple) -> None:
    """int4_mosaic's kernel at each of `depths` pipeline depths (a Hopper GPU, or interpreted on a CPU): the
    fastest as int4_mosaic_us, each checked first; a depth that fails to lower or answers wrongly is recorded and
    printed (a hang or a device fault still ends the run: `--mosaic` asks for it, and the JSON is written after each
    shape)."""
    if not interpret and not int4_mosaic.available():
        return
    times, row["int4_mosaic_failed"] = {}, {}
    for stages in depths:
        fn = functools.partial(_mosaic, stages=stages, interpret=interpret)
        try:
            error = _error(fn, xs[0], weights[0])
            if error <= MAX_ERROR:
                times[stages] = _time(fn, xs, weights, repeats)
            else:
                row["int4_mosaic_failed"][stages] = f"relative error {error:.3g}"
        except Exception as e:  # noqa: BLE001 - reported in the row and on stdout
            row["int4_mosaic_failed"][stages] = f"{type(e).__name__}: {str(e)[:300]}"
    for stages, why in row["int4_mosaic_failed"].items():
        print(f"int4_mosaic, {stages} stages, {row['tokens']} tokens: {why}", flush=True)
    if times:
        best = min(times, key=times.get)
        _record(row, "int4_mosaic", times[best], _nbytes(weights[0]))
        row["int4_mosaic_stages"] = best


def _mosaic(x: jax.Array, w: QuantizedWeight, stages: int, interpret: bool) -> jax.Array:
    return int4_mosaic.int4_matmul(x, w, stages=stages, interpret=interpret)


def _engine_numbers(run: dict) -> dict:
    """An offline.py run's figures, or a serve_bench run's (`gpu_run.sh quant_serve`)."""
    if "decode" not in run:
        if not run.get("completed"):
            raise ValueError(f"--table: a serving run with no completed request ({(run.get('errors') or [''])[0]})")
        return {"serve_tok_s": run["output_throughput"], "p95_ttft_ms": run["p95_ttft_ms"],
                "p95_itl_ms": run["p95_itl_ms"]}  # fmt: skip
    decode = run["decode"]
    return {"b1_tok_s": decode["1"]["decode_tokens_per_s"], "b32_tok_s": decode["32"]["decode_tokens_per_s"],
            "throughput_tok_s": run.get("throughput", {}).get("output_tokens_per_s", float("nan")),
            "ttft_ms": run.get("ttft", {}).get("seconds", float("nan")) * 1e3}  # fmt: skip


def engine_table(paths: list[str]) -> dict:
    """Each format's figures and their ratios to bf16's: decode batch 1 / 32, offline throughput and long-prompt TTFT
    from offline.py runs (named by their --quantization; none: bf16), or serving throughput and P95 TTFT / ITL from
    serve_bench runs (named FORMAT=PATH, none for bf16)."""
    runs = {}
    for entry in paths:
        name, named, path = entry.partition("=")
        if not named or "/" in name or os.path.exists(entry):  # a path alone (which may hold an "=")
            name, path = "", entry
        with open(path) as f:
            run = json.load(f)
        if not name and "decode" not in run:
            raise ValueError(f"--table: name the format of serving run {path} (FORMAT=PATH, none= for bf16)")
        fmt = (name if name != "none" else "") or run.get("quantization") or "bf16"
        if fmt.startswith("none-"):  # bf16 weights with something else changed (none-kvfp8: bf16-kvfp8)
            fmt = "bf16" + fmt[4:]
        if not name and run.get("quantize_lm_head"):
            fmt += "-head"  # the head quantized too (gpu_run.sh's METHOD-head)
        if not name and run.get("kv_cache_dtype", "auto") != "auto":
            fmt += f"-kv{run['kv_cache_dtype']}"  # the KV cache stored so too (gpu_run.sh's FORMAT-kvDTYPE)
        if run.get("quantization") and run.get("quantized_decode", "auto") != "auto":
            fmt += f"/{run['quantized_decode']}"  # the same weights, decode steps through the named path
        if fmt in runs:
            raise ValueError(f"--table: two runs of {fmt} ({entry})")
        runs[fmt] = _engine_numbers(run)
    if "bf16" not in runs:
        raise ValueError(f"--table: no bf16 run (one without --quantization, or named none=) among {', '.join(paths)}")
    base = runs["bf16"]
    if mixed := [fmt for fmt, r in runs.items() if r.keys() != base.keys()]:
        raise ValueError(f"--table: {', '.join(mixed)} are not the same kind of run as bf16's (offline or serving)")
    columns = list(base)
    print(f"{'format':12s} " + " ".join(f"{k:>15s}" for k in columns))
    for fmt, r in runs.items():
        r["vs_bf16"] = {k: r[k] / base[k] for k in columns}
        print(f"{fmt:12s} " + " ".join(f"{r[k]:8.1f} {r['vs_bf16'][k]:5.2f}x" for k in columns), flush=True)
    return runs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="quant_bench.json")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    parser.add_argument("--tokens", default="1,16,32")
    parser.add_argument("--no-sweep", action="store_true", help="time the default tiles only")
    parser.add_argument("--mosaic", action="store_true",
                        help="also time int4 steps past 64 rows through rtpjax.quant.int4_mosaic (Hopper; unmeasured)")
    parser.add_argument("--sweep-rows", type=int, default=16,
                        help="rows of the tile sweep (1: the one-row tiles; over 64: row tiles and int4_dequant's)")
    parser.add_argument("--formats", default=",".join(FORMATS[1:]), help=f"of {', '.join(FORMATS[1:])} (and bf16)")
    parser.add_argument("--unpack", default=",".join(small_matmul.UNPACKS),
                        help="sweep only the int4 tiles of these unpackings (the format column is the engine's path: "
                             "its default tiles)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU check of the script)")
    parser.add_argument("--table", nargs="+", metavar="[FORMAT=]JSON", help="compare engine runs instead (see above)")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.out, "w") as f:
            json.dump(engine_table(args.table), f, indent=1)
        return
    if unknown := set(args.formats.split(",")) - set(FORMATS):
        parser.error(f"--formats: {', '.join(sorted(unknown))}: choose of {', '.join(FORMATS)}")
    if unknown := set(args.unpack.split(",")) - set(small_matmul.UNPACKS):
        parser.error(f"--unpack: {', '.join(sorted(unknown))}: choose of {', '.join(small_matmul.UNPACKS)}")
    shapes = {"tiny": (256, 256)} if args.quick else {s: SHAPES[s] for s in args.shapes.split(",")}
    tokens = [int(t) for t in args.tokens.split(",")]
    result = {"device": str(jax.devices()[0].device_kind), "rows": [], "best_tiles": {}}
    for name, (out, inp) in shapes.items():
        sweep = (() if args.no_sweep else ONE_ROW_SWEEP if args.sweep_rows == 1
                 else LARGE_SWEEP if args.sweep_rows > small_matmul.MAX_ROWS else SWEEP)  # fmt: skip
        sweep = sweep[:2] if args.quick else sweep
        rows, best = bench_shape(name, out, inp, tokens, 1 if args.quick else 10, sweep, quick=args.quick,
                                 sweep_rows=args.sweep_rows, formats=tuple(args.formats.split(",")),
                                 unpacks=tuple(args.unpack.split(",")), mosaic=args.mosaic)  # fmt: skip
        result["rows"] += rows
        result["best_tiles"][name] = best
        if dq := best.pop("int4_dequant", None):
            result.setdefault("int4_dequant", {})[name] = dq
            if dq["tiles"]:
                print(f"{name:5s} int4_dequant: best {dq['tiles']} {dq['us']:.1f} us ({dq['gbps']:.0f} GB/s moved)",
                      flush=True)  # fmt: skip
            if dq["wrong"]:
                print(f"{name:5s} int4_dequant: WRONG results from tiles {dq['wrong']}", flush=True)
        for fmt, b in best.items():
            if b["wrong"]:
                print(f"{name:5s} {fmt}: WRONG results (relative error) from tiles {b['wrong']}", flush=True)
            if b["tiles"]:
                print(f"{name:5s} {fmt}: best tiles {b['tiles']} {b['us']:.1f} us at {args.sweep_rows} rows",
                      flush=True)
        with open(args.out, "w") as f:  # after each shape: a later shape's hang or fault keeps these
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

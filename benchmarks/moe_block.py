"""One MoE block's expert compute on the device, per --moe-impl, beside its weight-bandwidth floor.

Random Qwen3-30B-A3B-shaped expert weights (128 experts of 768 x 2048, top-8, bf16) and uniform random routing; per
batch size and implementation the block's device time (--repeats blocks chained in one program, each on its own
routing draw, so no host dispatch comes between them), and at each batch size the floor: the bytes of the distinct
experts a draw touches (the mean over the draws), read once at the card's reference bandwidth (REFERENCE_BANDWIDTH:
what a copy reaches on that card, as benchmarks/RESULTS.md states; another card: a sum over 1 GiB, measured in the same
run; --bandwidth sets it instead, in bytes/s). The measured read rate is reported either way: XLA's sums and copies
stay well below what the grouped kernel itself streams at on the lent cards, so a floor from them is not one.
`bound_vs_dense` is the most any implementation can gain on dense there (dense time / floor).

The grouped-matmul kernel (pallas) is also swept over block sizes (--pallas-blocks: BLOCK_N x BLOCK_K, optionally
x NUM_WARPS x NUM_STAGES [x SPLIT_K]; --pallas-rows: rows per tile, default the engine's choice; --one-row-sums:
when one-row tiles sum their products, "step" and/or "end"; --pallas-down-blocks: blocks of the down projection, each
with every --pallas-blocks of gate and up), reporting each and the best.
Off the GPU the kernel runs in Pallas' interpreter: tiny shapes only (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.models import moe


# bytes/s a copy reaches on the card (benchmarks/RESULTS.md's header): the floor's rate where the card is known
REFERENCE_BANDWIDTH = {"NVIDIA H100 80GB HBM3": 2.92e12, "NVIDIA H200": 4.3e12}


def read_bandwidth(repeats: int = 10) -> float:
    """Bytes read per second by one jitted sum over 1 GiB (64 MiB off the GPU), the best of `repeats`: how fast XLA
    streams the card's memory (the floor's rate only on a card without a reference one: XLA reads slower than the
    grouped kernel streams)."""
    nbytes = (1 << 30) if jax.default_backend() == "gpu" else (64 << 20)
    x = jnp.ones(nbytes // 2, jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - began)
    return nbytes / best


def block_us(block, args) -> float:
    """Device time of one block: `block(x, ids, weights, w)` chained over the routing draws `ids` [R, T, k] in one
    program (each block's output the next one's input, as a model's layers are), so no host dispatch comes between
    blocks; the best of three runs, divided by R."""
    run = jax.jit(lambda x, ids, wt, w: jax.lax.scan(lambda h, i: (block(h, i, wt, w), None), x, ids)[0])
    jax.block_until_ready(run(*args))
    times = []
    for _ in range(3):
        began = time.perf_counter()
        jax.block_until_ready(run(*args))
        times.append(time.perf_counter() - began)
    return min(times) / args[1].shape[0] * 1e6


def timed(block, args) -> dict:
    """{"us": ...}, or {"error": ...} when it does not compile or run (one GPU call measures everything else)."""
    try:
        return {"us": block_us(block, args)}
    except Exception as e:  # noqa: BLE001 - recorded in the result
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}


def parse_blocks(spec: str, names=("block_n", "block_k", "num_warps", "num_stages", "split_k")) -> list[dict]:
    """"64x128,128x64x8x4x2" -> the kernel's keyword arguments per configuration (block_n x block_k [x num_warps
    x num_stages [x split_k]]; or other `names` in their order)."""
    out = [dict(zip(names, map(int, c.split("x")))) for c in spec.split(",") if c]
    if any(c.count("x") >= len(names) for c in spec.split(",")):
        raise ValueError(f"a block configuration of {spec!r} has more than {len(names)} fields ({'x'.join(names)})")
    return out


FUSED_NAMES = ("block_i", "block_k", "block_h", "num_warps", "num_stages")  # grouped_matmul.fused_expert_mlp's


def pallas_sweep(t: int, e: int, args, inputs) -> list[dict]:
    """The kernel path at every (rows per tile, block) configuration: us each, fastest first (a configuration Triton
    cannot compile, e.g. one past the shared memory, is recorded with its error and skipped)."""
    rows = [int(r) for r in args.pallas_rows.split(",") if r] or [moe.kernel_rows(t * args.top_k, e)]
    runs = []
    sums = args.one_row_sums.split(",")
    downs = [{"down": d} for d in parse_blocks(args.pallas_down_blocks)] or [{}]  # none: the same as gate/up's
    configs = [(tile, {**blocks, **down, **({"one_row_sum": s} if tile == 1 else {})})
               for tile in rows for blocks in parse_blocks(args.pallas_blocks) for down in downs
               for s in (sums if tile == 1 else [None])]  # fmt: skip
    if 1 in rows:  # one-row tiles' whole MLP in one kernel, per block configuration
        configs += [(1, {"fused": f}) for f in parse_blocks(args.pallas_fused_blocks, FUSED_NAMES)]
    for tile, blocks in configs:
        block = lambda x, ids, wt, w, tile=tile, blocks=blocks: moe.pallas_experts(  # noqa: E731
            x, ids, wt, w["w_gate"], w["w_up"], w["w_down"], tile, None, **blocks)  # fmt: skip
        warps = {"num_warps": blocks.get("num_warps", blocks.get("fused", {}).get("num_warps", "default"))}
        runs.append({"block_m": tile, **blocks, **warps, **timed(block, inputs)})
    return sorted(runs, key=lambda r: r.get("us", float("inf")))


def add_ratios(row: dict, impls: list[str], floor_us: float) -> None:
    """Each implementation that ran: its share of the floor and its speedup on dense and grouped; the bound on dense."""
    ran = {impl: row[impl]["us"] for impl in impls if "us" in row[impl]}
    if "dense" in ran:
        row["bound_vs_dense"] = ran["dense"] / floor_us
    for impl, us in ran.items():
        row[impl]["of_floor"] = floor_us / us
        for base in ("dense", "grouped"):
            if base in ran and impl not in ("dense", "grouped"):
                row[impl][f"vs_{base}"] = ran[base] / us


def measure(t: int, floor_us: float, args, inputs) -> tuple[dict, list[str]]:
    """One batch size: every implementation (and the kernel's sweep), with their ratios; the row and its impls."""
    w, e, k = inputs[3], args.experts, args.top_k
    row = {"tokens": t, "floor_us": floor_us}
    impls = args.impls.split(",")
    for impl in impls:
        block = lambda x, ids, wt, w, impl=impl: moe.run_experts(w, x, ids, wt, impl)  # noqa: E731
        tile = moe.kernel_rows(t * k, e) if moe.use_kernel(impl, w["w_gate"]) else moe.plan(t * k, e, t, impl)
        row[impl] = {**timed(block, inputs), "tile": tile}
    if "pallas" in impls and (args.pallas_blocks or args.pallas_fused_blocks):
        row["pallas_sweep"] = pallas_sweep(t, e, args, inputs)
        row["pallas_best"] = dict(row["pallas_sweep"][0])
        impls = [*impls, "pallas_best"]
    add_ratios(row, impls, floor_us)
    return row, impls


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--batch-sizes", default="1,8,32,64,2048")
    parser.add_argument("--impls", default="grouped,dense,auto,pallas")
    parser.add_argument("--pallas-blocks", default="32x128,64x64,64x128,128x64,128x128,256x64,64x128x4x4,64x256x4x2,"
                        "64x128x4x3x2,64x128x4x3x4")  # fmt: skip
    parser.add_argument("--pallas-rows", default="", help="rows per tile to sweep (default: moe.kernel_rows)")
    parser.add_argument("--pallas-down-blocks", default="", help="blocks of the down projection to sweep with each "
                        "of --pallas-blocks (same syntax; default: the same as gate and up's)")  # fmt: skip
    parser.add_argument("--pallas-fused-blocks", default="", help="one-row tiles also as one kernel for both "
                        "projections: block_i x block_k x block_h [x num_warps x num_stages], comma-separated "
                        "(grouped_matmul.fused_expert_mlp)")  # fmt: skip
    parser.add_argument("--one-row-sums", default="step", help="one-row tiles: when the products are summed, of "
                        "step, end (grouped_matmul.ONE_ROW_SUMS)")  # fmt: skip
    parser.add_argument("--bandwidth", type=float, default=0.0, help="bytes/s for the floor (0: the card's "
                        "reference rate, or the measured read rate on a card without one)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=50, help="blocks chained in one program, each on its own "
                        "routing draw")  # fmt: skip
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    e, k, h, m = args.experts, args.top_k, args.hidden, args.inter
    keys = jax.random.split(jax.random.key(0), 4)
    w = dict(w_gate=jax.random.normal(keys[0], (e, m, h), jnp.bfloat16) * 0.02,
             w_up=jax.random.normal(keys[1], (e, m, h), jnp.bfloat16) * 0.02,
             w_down=jax.random.normal(keys[2], (e, h, m), jnp.bfloat16) * 0.02)  # fmt: skip
    expert_bytes = 3 * m * h * 2
    rng = np.random.default_rng(0)
    device, measured = str(jax.devices()[0].device_kind), read_bandwidth()
    bandwidth = args.bandwidth or REFERENCE_BANDWIDTH.get(device, measured)
    source = "given" if args.bandwidth else "reference" if device in REFERENCE_BANDWIDTH else "measured"
    result = {"device": device, "experts": e, "top_k": k, "hidden": h, "inter": m, "bandwidth": bandwidth,
              "bandwidth_source": source, "read_bandwidth_measured": measured, "rows": []}  # fmt: skip
    print(f"floor at {bandwidth / 1e12:.2f} TB/s ({source}); a sum over 1 GiB read {measured / 1e12:.2f}", flush=True)
    for t in [int(b) for b in args.batch_sizes.split(",")]:
        draws = np.stack([np.stack([rng.permutation(e)[:k] for _ in range(t)]) for _ in range(args.repeats)])
        ids = jnp.asarray(draws, jnp.int32)  # [R, T, k]
        weights = jnp.full((t, k), 1.0 / k, jnp.bfloat16)
        x = jax.random.normal(keys[3], (t, h), jnp.bfloat16)
        distinct = np.mean([len(np.unique(d)) for d in draws])  # experts a block reads, on average over the draws
        floor_us = distinct * expert_bytes / bandwidth * 1e6
        row, impls = measure(t, floor_us, args, (x, ids, weights, w))
        result["rows"].append(row)
        if args.out:  # after every row: a later one that times out loses only itself
            Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"tokens {t:5d}  floor {floor_us:8.1f} us" + (f" (at most {row['bound_vs_dense']:.2f}x dense)"
              if "bound_vs_dense" in row else ""), flush=True)  # fmt: skip
        for impl in impls:
            r = row[impl]
            blocks = f" blocks m{r['block_m']} n{r['block_n']} k{r['block_k']}" if "block_n" in r else ""
            blocks += f" sum {r['one_row_sum']}" if "one_row_sum" in r else ""
            blocks += " down n{block_n} k{block_k}".format(**r["down"]) if "down" in r else ""
            blocks += " fused m1 i{block_i} k{block_k} h{block_h}".format(**r["fused"]) if "fused" in r else ""
            blocks += f" w{r['num_warps']}" if "num_warps" in r else ""
            if "error" in r:
                print(f"  {impl:12s} failed: {r['error']}{blocks}", flush=True)
                continue
            gains = "  ".join(f"{r[key]:5.2f}x {key[3:]}" for key in ("vs_dense", "vs_grouped") if key in r)
            print(f"  {impl:12s} {r['us']:9.1f} us  {r['of_floor']:6.1%} of floor  {gains}{blocks}", flush=True)
    return result


if __name__ == "__main__":
    main()

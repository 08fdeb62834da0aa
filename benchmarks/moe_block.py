"""One MoE block's expert compute on the device, grouped against dense, beside its weight-bandwidth floor.

Random Qwen3-30B-A3B-shaped expert weights (128 experts of 768 x 2048, top-8, bf16) and uniform random routing; per
batch size and implementation the block's device time, and at each batch size the floor: the bytes of the distinct
experts the routing touches, read once at the device's copy bandwidth (--bandwidth, bytes/s; an H200 ~4.3e12).
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


def block_us(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    began = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - began) / repeats * 1e6


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--batch-sizes", default="1,8,32,64,2048")
    parser.add_argument("--impls", default="grouped,dense,auto")
    parser.add_argument("--bandwidth", type=float, default=4.3e12)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    e, k, h, m = args.experts, args.top_k, args.hidden, args.inter
    keys = jax.random.split(jax.random.key(0), 4)
    w = dict(w_gate=jax.random.normal(keys[0], (e, m, h), jnp.bfloat16) * 0.02,
             w_up=jax.random.normal(keys[1], (e, m, h), jnp.bfloat16) * 0.02,
             w_down=jax.random.normal(keys[2], (e, h, m), jnp.bfloat16) * 0.02)  # fmt: skip
    expert_bytes = 3 * m * h * 2
    rng = np.random.default_rng(0)
    result = {"device": str(jax.devices()[0].device_kind), "experts": e, "top_k": k, "hidden": h, "inter": m,
              "rows": []}  # fmt: skip
    for t in [int(b) for b in args.batch_sizes.split(",")]:
        ids = jnp.asarray(np.stack([rng.permutation(e)[:k] for _ in range(t)]), jnp.int32)
        weights = jnp.full((t, k), 1.0 / k, jnp.bfloat16)
        x = jax.random.normal(keys[3], (t, h), jnp.bfloat16)
        floor_us = len(np.unique(np.asarray(ids))) * expert_bytes / args.bandwidth * 1e6
        row = {"tokens": t, "floor_us": floor_us}
        for impl in args.impls.split(","):
            fn = jax.jit(lambda x, ids, wt, w, impl=impl: moe.run_experts(w, x, ids, wt, impl))
            us = block_us(fn, (x, ids, weights, w), args.repeats)
            row[impl] = {"us": us, "of_floor": floor_us / us, "tile": moe.plan(t * k, e, t, impl)}
        result["rows"].append(row)
        print(f"tokens {t:5d}  floor {floor_us:8.1f} us  " + "  ".join(
            f"{impl} {row[impl]['us']:9.1f} us ({row[impl]['of_floor']:5.1%} of floor, tile {row[impl]['tile']})"
            for impl in args.impls.split(",")), flush=True)  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()

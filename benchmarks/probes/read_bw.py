"""How fast XLA's own programs stream device memory: sums (whole, by rows, by columns), a max, and an add (read and
write, both counted) over one bf16 array, the best of 20 runs each. The MoE block's floor (moe_block.py) asks
whether such a rate can stand for the card's bandwidth; on the lent cards the grouped kernel streams faster than all
of them, so it cannot.

    python -m rtpjax.benchmarks.probes.read_bw --out read_bw.json     # 1 GiB on a GPU (--mib to change)
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

PROGRAMS = {  # name -> (program, bytes moved per byte of input)
    "sum_all_f32": (lambda a: jnp.sum(a, dtype=jnp.float32), 1),
    "sum_axis0_f32": (lambda a: jnp.sum(a, axis=0, dtype=jnp.float32), 1),
    "sum_axis1_f32": (lambda a: jnp.sum(a, axis=1, dtype=jnp.float32), 1),
    "max_by_64_rows": (lambda a: jnp.max(a.reshape(-1, 64, a.shape[1]), axis=1), 1),
    "add_one_read_write": (lambda a: a + 1, 2),
}


def best_seconds(fn, x, repeats: int) -> float:
    jax.block_until_ready(fn(x))
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - began)
    return min(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the array in MiB")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    x = jnp.ones((args.mib * 256, 2048), jnp.bfloat16)
    out = {"device": jax.devices()[0].device_kind, "bytes": x.nbytes, "TBps": {}}
    for name, (program, moved) in PROGRAMS.items():
        rate = x.nbytes * moved / best_seconds(jax.jit(program), x, args.repeats) / 1e12
        out["TBps"][name] = rate
        print(f"{name:20s} {rate:6.2f} TB/s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

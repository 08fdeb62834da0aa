"""What a tensor-parallel decode step pays in all-reduces: 64 chained sums of a [batch, 4096] bfloat16 row block over
the tensor devices (two per layer of a 32-layer model), alone and each after a row-parallel [4096 / n, 4096] matmul.

    python -m rtpjax.benchmarks.probes.allreduce_chain --out allreduce.json           # every visible device
    NCCL_PROTO=LL python -m rtpjax.benchmarks.probes.allreduce_chain                    # compare NCCL settings

Prints ms per chain of 64 (one jitted call, back to back, so host dispatch is hidden by the device time).
"""

from __future__ import annotations

import argparse
import os
import time

from rtpjax.benchmarks.probes import report

LAYERS_X2 = 64


def measure(hidden: int = 4096, batches=(1, 32, 256)) -> dict:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(jax.devices(), ("tp",))
    n = len(jax.devices())

    def sums_only(x):
        def body(x):
            for _ in range(LAYERS_X2):
                x = jax.lax.psum(x / n, "tp")  # the mean: ones stay ones, so the result checks the sums
            return x
        return jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P())(x)

    def matmul_then_sum(x, w):
        def body(x, w):
            for i in range(LAYERS_X2):
                full = jax.lax.psum(x @ w[i], "tp")  # partial products of the row-parallel matmul, summed
                x = jax.lax.dynamic_slice_in_dim(full, jax.lax.axis_index("tp") * (hidden // n), hidden // n, 1)
            return x
        specs = dict(in_specs=(P(None, "tp"), P(None, "tp", None)), out_specs=P(None, "tp"))
        return jax.shard_map(body, mesh=mesh, **specs)(x, w)

    weights = jnp.full((LAYERS_X2, hidden, hidden), 1e-3, jnp.bfloat16)
    w = jax.device_put(weights, NamedSharding(mesh, P(None, "tp", None)))
    result = {"devices": n, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "nccl": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}  # fmt: skip
    for batch in batches:
        cases = {"sums_only": (jax.jit(sums_only), (jax.device_put(jnp.ones((batch, hidden), jnp.bfloat16),
                                                                   NamedSharding(mesh, P())),)),
                 "matmul_then_sum": (jax.jit(matmul_then_sum), (jax.device_put(
                     jnp.ones((batch, hidden), jnp.bfloat16), NamedSharding(mesh, P(None, "tp"))), w))}  # fmt: skip
        for name, (fn, inputs) in cases.items():
            fn(*inputs).block_until_ready()
            began = time.perf_counter()
            for _ in range(30):
                out = fn(*inputs)
            out.block_until_ready()
            result[f"{name}_batch{batch}_ms"] = round((time.perf_counter() - began) / 30 * 1e3, 3)
            if name == "sums_only":  # 64 means of ones over every device: still ones if each sum covered them all
                error = float(jnp.max(jnp.abs(out.astype(jnp.float32) - 1)))
                result["sums_only_max_error"] = max(result.get("sums_only_max_error", 0.0), error)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batches", default="1,32,256")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = measure(args.hidden, [int(b) for b in args.batches.split(",")])
    report(result, args.out)


if __name__ == "__main__":
    main()

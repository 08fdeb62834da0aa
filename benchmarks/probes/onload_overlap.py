"""Can a prefill hide the onload of its history's KV? A later turn's history (an 8B's 215 blocks, 430 MB) crosses
from pinned host memory before its prefill today: the copy adds to TTFT. This times, on stand-ins of an 8B prefill
(`layers` layers of a [tokens, 4096] block through the 8B's matmul shapes, one weight set shared by every layer):

    compute   the layers alone
    copy      the history's KV, a slice per layer, from pinned_host to the device (one program of device_puts)
    serial    the copy, then the layers (what a load does today)
    in_jit    one program: layer i waits for its slice only (XLA host offloading: pinned_host inputs moved by
              device_put inside the program, which XLA may start ahead of the layers before)
    groups    the layers in `groups` programs, each slice group put on the device by its own device_put before
              its program (the copies queue on the transfer stream, the programs wait for their own)

overlap = (copy + compute - t) / min(copy, compute): 1 where a way hides the copy wholly, 0 where it hides nothing.

    python -m rtpjax.benchmarks.probes.onload_overlap --out onload_overlap.json
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.benchmarks.probes import report


def _layer(x, w):
    """One stand-in layer: the 8B's projections and MLP matmuls on `x` [tokens, hidden] (attention left out)."""
    wqkv, wo, wgu, wd = w
    h = x + (x @ wqkv)[:, : x.shape[1]] @ wo
    gate, up = jnp.split(h @ wgu, 2, axis=1)
    return h + (jax.nn.silu(gate) * up) @ wd


def _uses(x, kv):
    """A dependency of the layer on its KV slice that reads all of it (as attention over the history would)."""
    return x + jnp.mean(kv.astype(jnp.float32)).astype(x.dtype)


def _timed(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and first run
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - began)
    return float(np.median(times))


def _ways(x, w, host_kv: list, groups: int, on_device) -> dict:
    """A callable per way (the module's docstring), each queuing its programs and returning their output."""

    def layers(x, w, kvs, put=False):
        for kv in kvs:
            x = _layer(_uses(x, jax.device_put(kv, on_device) if put else kv), w)
        return x

    compute = jax.jit(lambda x, w: functools.reduce(lambda h, _: _layer(h, w), host_kv, x))
    copy = jax.jit(lambda kvs: [jax.device_put(kv, on_device) for kv in kvs])
    in_jit = jax.jit(functools.partial(layers, put=True))
    on_device_layers = jax.jit(layers)
    per = -(-len(host_kv) // groups)

    def in_groups():
        out = x
        for g in range(0, len(host_kv), per):
            out = on_device_layers(out, w, jax.device_put(host_kv[g : g + per], on_device))
        return out

    return {"compute": lambda: compute(x, w), "copy": lambda: copy(host_kv),
            "serial": lambda: on_device_layers(x, w, copy(host_kv)), "in_jit": lambda: in_jit(x, w, host_kv),
            "groups": in_groups}  # fmt: skip


def measure(tokens: int, hidden: int, ffn: int, layers: int, kv_mib_per_layer: float, groups: int,
            repeats: int) -> dict:  # fmt: skip
    device = jax.devices()[0]
    on_device = jax.sharding.SingleDeviceSharding(device)
    key = jax.random.split(jax.random.key(0), 5)
    w = tuple(jax.random.normal(k, shape, jnp.bfloat16) * hidden**-0.5 for k, shape in zip(
        key[:4], [(hidden, hidden + hidden // 2), (hidden, hidden), (hidden, 2 * ffn), (ffn, hidden)]))  # fmt: skip
    x = jax.random.normal(key[4], (tokens, hidden), jnp.bfloat16)
    rows = max(1, int(kv_mib_per_layer * 2**20) // (2 * hidden))
    host_kv = [jax.device_put(np.full((rows, hidden), i % 7, np.float32).astype(jnp.bfloat16),
                              on_device.with_memory_kind("pinned_host")) for i in range(layers)]  # fmt: skip
    ways = _ways(x, w, host_kv, groups, on_device)
    t = {name: _timed(fn, repeats) for name, fn in ways.items()}
    want = np.asarray(ways["serial"](), np.float32)
    differs = {name: float(np.max(np.abs(np.asarray(ways[name](), np.float32) - want)))
               for name in ("in_jit", "groups")}  # fmt: skip
    kv_bytes = layers * rows * hidden * 2
    result = dict(device=device.device_kind, tokens=tokens, hidden=hidden, ffn=ffn, layers=layers, groups=groups,
                  kv_bytes=kv_bytes, copy_GBps=kv_bytes / t["copy"] / 1e9, max_abs_diff_vs_serial=differs,
                  **{f"{k}_ms": 1e3 * v for k, v in t.items()},
                  **{f"overlap_{k}": (t["copy"] + t["compute"] - t[k]) / min(t["copy"], t["compute"])
                     for k in ("serial", "in_jit", "groups")})  # fmt: skip
    print(f"{'way':8} {'ms':>9} {'overlap':>8}")
    for k in t:
        overlap = result.get(f"overlap_{k}")
        print(f"{k:8} {1e3 * t[k]:9.2f} {'' if overlap is None else f'{overlap:8.2f}'}")
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="prefill tokens (a turn's new tokens)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=14336)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-mib-per-layer", type=float, default=13.4, help="a history's KV per layer (8B: 215 blocks)")
    p.add_argument("--groups", type=int, default=4, help="programs the `groups` way runs the layers in")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    report(measure(a.tokens, a.hidden, a.ffn, a.layers, a.kv_mib_per_layer, a.groups, a.repeats), a.out)


if __name__ == "__main__":
    main()

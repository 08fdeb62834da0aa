"""Host-to-device bandwidth by path, the floor for warm loading: one pageable numpy array, several at once from
threads, from page-locked (DMA-mapped) buffers as the loader uses, and through JAX's pinned host memory; plus the file-order reader alone (page cache -> host buffers).

    python -m rtpjax.benchmarks.transfer_bench [CHECKPOINT] --out transfer.json
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np


def gbps(nbytes: int, fn) -> float:
    fn()  # warm
    began = time.perf_counter()
    fn()
    return nbytes / 1e9 / (time.perf_counter() - began)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = jax.devices()[0]
    size = 1 << 30
    host = [np.random.default_rng(i).integers(0, 255, size // 4, np.uint8) for i in range(4)]
    one = np.concatenate(host)
    r = {}
    r["pageable_1x1GiB"] = gbps(size, lambda: jax.block_until_ready(jax.device_put(one, dev)))
    r["pageable_4x256MiB_serial"] = gbps(size, lambda: jax.block_until_ready([jax.device_put(h, dev) for h in host]))
    with ThreadPoolExecutor(4) as pool:
        r["pageable_4x256MiB_threads"] = gbps(
            size, lambda: jax.block_until_ready(list(pool.map(lambda h: jax.device_put(h, dev), host)))
        )
    from rtpjax.loading.loader import _aligned_buffer, dma_mapper

    pin = dma_mapper([dev])
    if pin is not None:  # the loader's path: its reusable buffers page-locked for the device's DMA
        mapped = [_aligned_buffer(size // 4) for _ in range(4)]
        for m, h in zip(mapped, host):
            m[:] = h
        began = time.perf_counter()
        unpins = [pin(m) for m in mapped]
        r["dma_map_seconds_per_GiB"] = (time.perf_counter() - began) * (1 << 30) / size
        r["dma_mapped_4x256MiB_serial"] = gbps(size, lambda: jax.block_until_ready([jax.device_put(m, dev) for m in mapped]))
        for unpin in unpins:
            unpin()
    try:
        pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
        staged = jax.block_until_ready(jax.device_put(one, pinned))
        r["host_to_pinned_1GiB"] = gbps(size, lambda: jax.block_until_ready(jax.device_put(one, pinned)))
        on_device = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
        r["pinned_to_device_1GiB"] = gbps(size, lambda: jax.block_until_ready(jax.device_put(staged, on_device)))
    except Exception as e:  # memory kinds differ by backend
        r["pinned_error"] = f"{type(e).__name__}: {e}"[:200]
    if args.checkpoint:
        from rtpjax.loading.loader import Checkpoint, FileOrderReader, LoadOptions, plan_reads

        ckpt = Checkpoint(args.checkpoint)
        batches = plan_reads(ckpt, ckpt.names(), LoadOptions().batch_bytes)
        total = sum(b.end - b.start for b in batches)
        for threads in (4, 16):
            opts = LoadOptions(threads=threads)

            def read_all():
                reader = FileOrderReader(batches, opts)
                for _, buf, _ in reader:
                    reader.recycle(buf)
                reader.close()

            r[f"reader_only_{threads}_threads"] = gbps(total, read_all)
    for k, v in r.items():
        print(f"{k:32s} {v:.2f} GB/s" if isinstance(v, float) else f"{k}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()

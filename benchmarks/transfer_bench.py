"""Host-to-device bandwidth by path, the floor for warm loading: one pageable numpy array, several at once from
threads, from page-locked (DMA-mapped) buffers as the loader uses, and through JAX's pinned host memory; plus the
file-order reader alone (page cache -> host buffers). Then the K/V block copies (KV tiers, P/D hand-off) of one prompt
(default 2,048 tokens of Llama-3-8B's KV, 268 MB), each old path beside the new:

  memcpy_fresh / memcpy_reused      host copy into fresh pages (faulted per copy) / into a reused buffer
  crc32 / adler32 (_threads)        checksums of 64 MiB, one thread / 16 MiB chunks on the staging pool
  d2h_pageable / d2h_pinned         device rows -> numpy: copy_to_host_async (old) / device_put to pinned_host, then
                                    np.asarray (new; d2h_pinned_dma: the DMA alone; pinned_asarray_copies: whether
                                    np.asarray of a pinned_host array copies)
  h2d_rows_per_row                  rows to the device one transfer each, pageable (old put_rows / write_packed)
  h2d_rows_pieces[_pinned|_locked]  BlockCopier.put_rows: power-of-two pieces, pageable direct / staged through
                                    pinned_host (the default) / from DMA-mapped memory (a page-locked host tier)
  h2d_pinned_array / h2d_one_array  the floors: a pinned_host array to the device / one pageable array
  pd_old / pd_new                   the hand-off through the shared-memory channel, device to device: pieces copied
                                    down, staged with checksums, pulled, put on the device (old: pageable copies, rows
                                    one by one; new: pinned D2H, put_rows)

    python -m rtpjax.benchmarks.transfer_bench [CHECKPOINT] --out transfer.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.benchmarks.pd_bench import median_seconds


def gbps(nbytes: int, fn) -> float:
    fn()  # warm
    began = time.perf_counter()
    fn()
    return nbytes / 1e9 / (time.perf_counter() - began)


def loading_paths(size: int, checkpoint: str | None) -> dict:
    dev = jax.devices()[0]
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
    if checkpoint:
        from rtpjax.loading.loader import Checkpoint, FileOrderReader, LoadOptions, plan_reads

        ckpt = Checkpoint(checkpoint)
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
    return r


def _host_costs(host: np.ndarray, repeats: int) -> dict:
    """Seconds of a host copy (fresh pages, reused buffer) and of checksums on 64 MiB (one thread, the pool)."""
    from rtpjax.disagg import staging

    warm = np.empty_like(host)
    sample = np.resize(host.reshape(-1), 64 << 20)
    r = {"memcpy_fresh_s": median_seconds(lambda _: np.copyto(np.empty_like(host), host), repeats),
         "memcpy_reused_s": median_seconds(lambda _: np.copyto(warm, host), repeats)}  # fmt: skip
    for name, fn in (("crc32", zlib.crc32), ("adler32", zlib.adler32)):
        r[f"{name}_64MiB_s"] = median_seconds(lambda _, fn=fn: fn(sample), repeats)
        views = [memoryview(sample)[i : i + staging.CHUNK] for i in range(0, sample.size, staging.CHUNK)]
        r[f"{name}_64MiB_threads_s"] = median_seconds(lambda _, fn=fn, v=views: list(staging.POOL.map(fn, v)), repeats)
    return r


def _d2h(x: jax.Array, pinned) -> np.ndarray:
    if pinned is None:
        x.copy_to_host_async()
        return np.asarray(x)
    return np.asarray(jax.device_put(x, pinned))


def _asarray_copies(pinned, dev) -> bool | str:
    """Whether np.asarray of a pinned_host array copies it (False: a view of the pinned buffer)."""
    p = jax.device_put(jax.device_put(np.arange(1 << 16, dtype=np.uint8), dev), pinned)
    try:
        return np.asarray(p).ctypes.data != p.unsafe_buffer_pointer()
    except Exception as e:  # noqa: BLE001 - some backends do not say where the buffer is
        return f"unknown ({type(e).__name__})"


def kv_paths(args) -> dict:
    from rtpjax.kv.block_copy import BlockCopier
    from rtpjax.kv.block_copy import pinned as pinned_of
    from rtpjax.kv.host_blocks import KVLayout
    from rtpjax.loading.loader import _aligned_buffer, dma_mapper

    dev = jax.devices()[0]
    layout = KVLayout(args.dtype, args.block_size, args.layers, args.kv_heads, args.head_dim)
    n, bb = -(-args.kv_tokens // layout.block_size), layout.block_bytes
    host = np.random.default_rng(0).integers(0, 255, (n, bb), dtype=np.uint8)
    on_device = jax.device_put(host, dev)
    pinned = pinned_of(jax.sharding.SingleDeviceSharding(dev))
    reps = args.repeats

    def fresh():  # a jax.Array keeps its host copy once fetched: each run needs a new one
        return (on_device + 0).block_until_ready()

    r = {"kv_tokens": args.kv_tokens, "kv_blocks": n, "block_bytes": bb, "kv_bytes": host.nbytes,
         "pinned_host": pinned is not None}  # fmt: skip
    r.update(_host_costs(host, reps))
    r["d2h_pageable_s"] = median_seconds(lambda x: _d2h(x, None), reps, fresh)
    if pinned is not None:
        r["d2h_pinned_dma_s"] = median_seconds(lambda x: jax.device_put(x, pinned).block_until_ready(), reps, fresh)
        r["d2h_pinned_s"] = median_seconds(lambda x: _d2h(x, pinned), reps, fresh)
        r["pinned_asarray_copies"] = _asarray_copies(pinned, dev)
        staged = jax.device_put(host, pinned).block_until_ready()
        to_device = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
        r["h2d_pinned_array_s"] = median_seconds(lambda _: jax.device_put(staged, to_device).block_until_ready(), reps)
    r["h2d_one_array_s"] = median_seconds(lambda _: jax.device_put(host, dev, may_alias=False).block_until_ready(), reps)
    r["h2d_rows_per_row_s"] = median_seconds(lambda _: jax.block_until_ready(jax.device_put(list(host), dev,
                                                                                       may_alias=False)), reps)
    cache = [tuple(jnp.zeros((args.kv_heads, 1, args.block_size, args.head_dim), jnp.dtype(args.dtype))
                   for _ in range(2)) for _ in range(args.layers)]  # fmt: skip
    sizes = [1 << i for i in range(max(1, n.bit_length()))]
    pageable, new = (BlockCopier(cache, layout, sizes, use_pinned=p) for p in (False, True))
    r["h2d_rows_pieces_s"] = median_seconds(lambda _: jax.block_until_ready(pageable.put_rows(host)), reps)
    r["h2d_rows_pieces_pinned_s"] = median_seconds(lambda _: jax.block_until_ready(new.put_rows(host)), reps)
    pin = dma_mapper([dev])
    if pin is not None:
        locked = _aligned_buffer(host.nbytes).reshape(n, bb)
        locked[:] = host
        unpin = pin(locked)
        if unpin is not None:
            r["h2d_rows_pieces_locked_s"] = median_seconds(
                lambda _: jax.block_until_ready(new.put_rows(locked, page_locked=True)), reps)  # fmt: skip
            unpin()
    r.update(_pd(layout, on_device, n, reps, new, pinned))
    for key in [k for k in r if k.endswith("_s")]:
        r[key[:-2] + "_GBps"] = round((64 << 20 if "64MiB" in key else host.nbytes) / r[key] / 1e9, 3)
    return r


def _pd(layout, on_device: jax.Array, n: int, reps: int, copier, pinned) -> dict:
    """The hand-off device to device through the shared-memory channel, in the pieces handoff._gather makes: the old
    copies (pageable D2H, one transfer per row) and the new (pinned D2H, put_rows)."""
    from rtpjax.disagg import channel, staging

    store = staging.HeldStore()
    server = channel.TransferServer(store, "127.0.0.1", 0)
    step = max(1, staging.CHUNK // layout.block_bytes)
    dev = next(iter(on_device.devices()))

    def pieces():  # gathered pieces on the device, as many as handoff._gather makes
        return [(min(step, n - i), (on_device[i : i + step] + 0).block_until_ready()) for i in range(0, n, step)]

    def old_down(x):
        x.copy_to_host_async()
        return x

    def old_load(_, rows):
        return jax.device_put(list(np.array(rows) if dev.platform == "cpu" else rows), dev, may_alias=False)

    def new_down(x):
        return x if pinned is None else jax.device_put(x, pinned)

    phases: dict[str, list] = {}

    def once(name, down, load):
        def run(ps):
            staged = store.stage([(real, down(x)) for real, x in ps], layout)
            store.put("t", staging.Held(layout, n, n * layout.block_size, [], time.monotonic() + 60, staged))
            got = channel.pull("127.0.0.1", server.port, "t", "shm", time.monotonic() + 60, load)
            d2h, stage = staged.done.result()
            phases.setdefault(name, []).append({"d2h": d2h, "stage": stage, **got.times})

        return run

    out = {}
    try:
        out["pd_old_s"] = median_seconds(once("pd_old", old_down, old_load), reps, pieces)
        out["pd_new_s"] = median_seconds(once("pd_new", new_down, lambda _, rows: copier.put_rows(rows)), reps, pieces)
    finally:
        server.close()
        store.close()
    for name, runs in phases.items():
        for phase in runs[0]:  # where the time goes (they overlap: each chunk moves on once staged)
            out[f"{name}_{phase}_ms"] = round(1e3 * statistics.median(p[phase] for p in runs[1:] or runs), 2)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--size-mib", type=int, default=1024, help="bytes of the loading paths' transfers")
    parser.add_argument("--kv-tokens", type=int, default=2048, help="tokens of the K/V copies (0: skip them)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    r = loading_paths(args.size_mib << 20, args.checkpoint)
    if args.kv_tokens:
        r["kv"] = kv_paths(args)
    for k, v in r.items():
        if k == "kv":
            for kk, vv in v.items():
                if not kk.endswith("_s"):
                    print(f"kv {kk:34s} {vv}" + (" GB/s" if kk.endswith("_GBps") else ""))
        else:
            print(f"{k:32s} {v:.2f} GB/s" if isinstance(v, float) else f"{k}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()

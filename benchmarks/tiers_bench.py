"""KV tier transfer floors and what the tiers reach, on one machine in one run (benchmarks/gpu_run.sh `tiers`).

  h2d_pageable / h2d_pinned   one big host array to the device, from ordinary and from page-locked memory
  onload_packed               the host tier's path: each block one contiguous row, back-to-back rows crossing in
                              power-of-two pieces (from the page-locked buffer, or staged through pinned_host),
                              written into the cache by the compiled packed write (block_copy.write_packed)
  onload_rows                 the same before: one pageable transfer per block
  onload_staged_N             what a fetch waits for before admission (the tier's onload thread: block_copy.stage):
                              the page-locked rows on the device in pieces of at most N blocks, not yet written
                              into the cache (the engine's write before the step does that)
  onload_staged_64_streamsS   (GPUs) pieces of 64 with each copy cut over S streams of the device (copy engines)
  onload_staged_64_during_steps  pieces of 64 while the device computes back to back (a thread queues matmuls one
                              ahead, as the engine queues steps; steps_during_onload: how many ran); _device_put:
                              where rows land by the driver, the same by device_put (each new array waits for the
                              programs queued before it)
  onload_staged_scattered     the same for rows in random order over the buffer (nearly all crossing alone), as an
                              LRU can leave a fetch's rows; _during_offload: while another thread downloads gathers
  offload_tier                the write-down as the tier does it: packed gather, copied into the host tier's own
                              page-locked rows (block_copy.download_into: by the CUDA driver where it can)
  offload_pinned / _pageable  the same copied into pinned_host memory by device_put (before) or into pageable memory
                              by copy_to_host_async (before that), until numpy has the rows
  onload_strided              the other layout: each block as one slice per layer and part (2 x layers transfers)
  disk_dd / disk_tier         the file system's sequential read (dd of one file, page cache dropped) against the disk
                              tier's reads of as many bytes (checksummed block files, 4 reader threads)

    python -m rtpjax.benchmarks.tiers_bench --blocks 512 --out tiers_bw.json   # Llama-3-8B's KV layout, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.kv.block_copy import BlockCopier, rows_to_host
from rtpjax.kv.host_blocks import KVLayout, PackedBlocks
from rtpjax.kv.tiers.disk import DiskTier
from rtpjax.kv.tiers.host import HostTier
from rtpjax.loading.loader import dma_mapper


def _timed(fn, repeats: int = 3) -> float:
    fn()  # first call: one-time setup
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return float(np.median(times))


@contextlib.contextmanager
def _device_busy():
    """A thread keeps the device computing (chained matmuls, each dispatched before the one ahead is waited for) until
    the block ends; yields a one-element list that holds the count of programs run once it has."""
    size = 8192 if jax.default_backend() == "gpu" else 128  # a few ms a program on a GPU, as an 8B step takes
    step = jax.jit(lambda a: jnp.tanh(a @ a @ a @ a))
    x = jnp.ones((size, size), jnp.bfloat16) / size
    jax.block_until_ready(step(x))
    done, started, count = threading.Event(), threading.Event(), [0]

    def loop():
        ahead = step(x)
        while not done.is_set():
            nxt = step(ahead)
            jax.block_until_ready(ahead)
            ahead, count[0] = nxt, count[0] + 1
            started.set()
        jax.block_until_ready(ahead)

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(loop)
        try:
            started.wait(60)  # the device busy before anything is measured
            yield count
        finally:
            done.set()
            running.result()


def _drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@dataclasses.dataclass
class Setup:
    """What the measurements share: the host tier's page-locked rows (`host`) for `n` blocks of a Llama-like KV
    layout, then (`allocate`, after the floors) the device cache of n + 1 blocks (the last one where dropped writes
    go; replaced by each write) and the packed copier the tier uses."""

    args: argparse.Namespace
    layout: KVLayout
    n: int
    nbytes: int
    host: HostTier
    cache: list | None = None
    sizes: list[int] | None = None
    copier: BlockCopier | None = None

    @property
    def pinned(self) -> bool:
        return self.host.unpin is not None

    def rate(self, seconds: float) -> float:
        """GB/s for the run's bytes, 3 significant digits."""
        return float(f"{self.nbytes / seconds / 1e9:.3g}")

    def rows(self) -> list[np.ndarray]:
        return [self.host.buf[i] for i in range(self.n)]

    def allocate(self) -> None:
        args, n = self.args, self.n
        self.cache = [tuple(jnp.zeros((args.kv_heads, n + 1, args.block_size, args.head_dim), jnp.dtype(args.dtype))
                            for _ in range(2)) for _ in range(args.layers)]  # fmt: skip
        self.sizes = [s for s in (1, 2, 4, 8, 16, 32, 64) if s <= n] or [n]
        self.copier = BlockCopier(self.cache, self.layout, self.sizes)
        for job in self.copier.jobs(self.cache, packed=True):
            job()


def setup(args, pin) -> Setup:
    layout = KVLayout(args.dtype, args.block_size, args.layers, args.kv_heads, args.head_dim)
    n = args.blocks
    host = HostTier(n * layout.block_bytes, layout.block_bytes, pin=pin)
    host.buf[:] = 1
    return Setup(args, layout, n, n * layout.block_bytes, host)


def h2d_floors(b: Setup) -> dict:
    """One big array to the device from pageable and from page-locked memory."""
    pageable = np.ones(b.nbytes, np.uint8)
    return {"h2d_pageable_GBps": b.rate(_timed(lambda: jax.device_put(pageable).block_until_ready())),
            "host_page_locked": b.pinned,
            "h2d_pinned_GBps": b.rate(_timed(lambda: jax.device_put(b.host.buf).block_until_ready()))}  # fmt: skip


def onloads(b: Setup) -> dict:
    """Host rows to the device: written into the cache (packed, per row), staged in pieces and over several streams,
    and as strided slices (the other layout)."""
    result, rows, n = {}, b.rows(), b.n
    packed = PackedBlocks(b.layout, rows, page_locked=b.pinned)

    def write(copier):
        def run():
            b.cache = copier.write_packed(b.cache, list(range(n)), packed)
            jax.block_until_ready(b.cache)
        return run

    result["onload_packed_GBps"] = b.rate(_timed(write(b.copier)))
    for piece in (16, 64, 256):
        stager = BlockCopier(b.cache, b.layout, [min(piece, n)], max_piece=piece)
        result[f"onload_staged_{piece}_GBps"] = b.rate(_timed(lambda: stager.stage(rows, b.pinned)))
    if b.copier.landing_rows:  # rows land by the driver: each copy over several streams (copy engines) instead of one
        for streams in (2, 4):
            stager = BlockCopier(b.cache, b.layout, [min(64, n)], land_streams=streams)
            result[f"onload_staged_64_streams{streams}_GBps"] = b.rate(_timed(lambda: stager.stage(rows, b.pinned)))
    # the copies before pinned_host (its executables compile in _timed's first, untimed call: only the buckets used)
    result["onload_rows_GBps"] = b.rate(_timed(write(BlockCopier(b.cache, b.layout, b.sizes, use_pinned=False,
                                                                  max_piece=1))))  # fmt: skip
    # One slice per layer and part of every block: what a tier holding KVBlocks' per-layer layout would transfer.
    strided = b.host.buf.reshape(n, 2, b.args.layers, -1)
    slices = [strided[i, part, layer] for i in range(n) for part in range(2) for layer in range(b.args.layers)]
    result["onload_strided_GBps"] = b.rate(_timed(lambda: jax.block_until_ready(jax.device_put(slices))))
    result["layout"] = "packed" if result["onload_packed_GBps"] >= result["onload_strided_GBps"] else "strided"
    return result


def onloads_under_load(b: Setup, pin) -> dict:
    """A fetch's rows as an LRU can leave them (scattered over the buffer, nearly all alone), alone and while the
    write-down's downloads run on another thread, as in serving; then staging while the device computes."""
    result, n, copier = {}, b.n, b.copier
    order = np.random.default_rng(0).permutation(n)
    scattered = [b.host.buf[i] for i in order]
    result["onload_staged_scattered_GBps"] = b.rate(_timed(lambda: copier.stage(scattered, b.pinned)))
    # the staged rows are the host rows, in the order asked (rows marked by their index; the bytes checked)
    b.host.buf[:, :8] = np.arange(n, dtype=np.uint64)[:, None].view(np.uint8)
    staged = copier.stage(scattered, b.pinned)
    exact = bool(np.array_equal(rows_to_host(staged), np.stack(scattered)))
    assert exact, "a staged row differs from its host row"
    result["onload_staged_rows_exact"] = exact
    busy = threading.Event()
    down = HostTier(min(n, 64) * b.layout.block_bytes, b.layout.block_bytes, pin=pin)  # the downloads' own tier rows

    def download_loop():
        while not busy.is_set():
            at = 0
            for real, rows_ in copier.gather_packed(b.cache, list(range(min(n, 64))), download=False):
                copier.download_into(rows_, list(down.buf[at : at + real]))
                at += real

    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(download_loop)
            result["onload_staged_scattered_during_offload_GBps"] = b.rate(
                _timed(lambda: copier.stage(scattered, b.pinned)))  # fmt: skip
            busy.set()
            running.result()
    finally:
        if down.unpin is not None:
            down.unpin()
    # while the device computes (steps queued back to back, one ahead, as the engine runs them): the staging a fetch
    # waits for in serving, as the tier does it and, where rows land by the driver, by device_put instead
    rows = b.rows()
    stagers = {"": BlockCopier(b.cache, b.layout, [min(64, n)])}
    if stagers[""].landing_rows:
        stagers["_device_put"] = BlockCopier(b.cache, b.layout, [min(64, n)], land=False)
    for name, stager in stagers.items():
        with _device_busy() as steps:
            result[f"onload_staged_64_during_steps{name}_GBps"] = b.rate(_timed(lambda: stager.stage(rows, b.pinned)))
        result[f"steps_during_onload{name}"] = steps[0]
    return result


def offloads(b: Setup) -> dict:
    """Device blocks down to host rows: as the tier does it, into pinned_host memory, into pageable memory."""
    n = b.n

    def offload(c):
        return [np.asarray(rows)[:real] for real, rows in c.gather_packed(b.cache, list(range(n)))]

    def offload_tier():
        at = 0
        for real, rows_ in b.copier.gather_packed(b.cache, list(range(n)), download=False):
            b.copier.download_into(rows_, list(b.host.buf[at : at + real]))
            at += real

    pageable = BlockCopier(b.cache, b.layout, b.sizes, use_pinned=False, max_piece=1)
    return {"offload_tier_GBps": b.rate(_timed(offload_tier)),
            "offload_pinned_GBps": b.rate(_timed(lambda: offload(b.copier))),
            "offload_pageable_GBps": b.rate(_timed(lambda: offload(pageable)))}  # fmt: skip


def disk_reads(b: Setup) -> dict:
    """The file system's sequential read (dd, page cache dropped) against the disk tier's reads of as many bytes."""
    result, n = {}, b.n
    with tempfile.TemporaryDirectory(dir=b.args.dir) as tmp:
        big = os.path.join(tmp, "sequential.bin")
        with open(big, "wb") as f:
            for i in range(n):
                f.write(b.host.buf[i])
        _drop_cache(big)
        began = time.perf_counter()
        subprocess.run(["dd", f"if={big}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
        result["disk_dd_GBps"] = b.rate(time.perf_counter() - began)
        os.unlink(big)
        disk = DiskTier(tmp, b.nbytes * 2, b.layout.block_bytes, {"bench": 1})
        hashes = [i.to_bytes(16, "little") for i in range(n)]
        for h, i in zip(hashes, range(n)):
            disk.write(h, b.host.buf[i])
        for h in hashes:
            _drop_cache(str(disk.path(h)))
        began = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            ok = list(pool.map(lambda i: disk.read_into(hashes[i], b.host.buf[i]), range(n)))
        result["disk_tier_GBps"] = b.rate(time.perf_counter() - began)
        result["disk_tier_vs_dd"] = round(result["disk_tier_GBps"] / result["disk_dd_GBps"], 3)
        assert all(ok), "a block written by the benchmark read back wrong"
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--blocks", type=int, default=512, help="blocks moved per measurement")
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where the disk measurements write")
    p.add_argument("--out")
    args = p.parse_args(argv)

    pin = dma_mapper(jax.devices())
    b = setup(args, pin)
    result = dict(device=str(jax.devices()[0].device_kind), block_bytes=b.layout.block_bytes, blocks=b.n,
                  bytes=b.nbytes)  # fmt: skip
    try:
        result |= h2d_floors(b)  # before the device cache and the copiers take their memory
        b.allocate()
        result |= onloads(b)
        result |= onloads_under_load(b, pin)
        result |= offloads(b)
        result["onload_vs_pinned"] = round(result["onload_packed_GBps"] / result["h2d_pinned_GBps"], 3)
        result["onload_staged_vs_pinned"] = round(result["onload_staged_64_GBps"] / result["h2d_pinned_GBps"], 3)
        result |= disk_reads(b)
    finally:
        if b.pinned:
            b.host.unpin()
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

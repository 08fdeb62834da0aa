"""Three ways to move a file that sits in the page cache to the GPU, with the CUDA driver called directly (no XLA in
the timed path), so the host's own limits show:

  reader      threads `preadv` 16 MiB pieces into 3 page-locked 256 MiB buffers; each buffer is copied to the GPU
              asynchronously while the others fill (what rtpjax's loader does, minus its bookkeeping)
  pin_cache   the file is mmapped and each 256 MiB piece of the page cache itself is pinned read-only
              (cuMemHostRegister with CU_MEMHOSTREGISTER_READ_ONLY) on a thread, then copied straight from there
  both        the two at once on disjoint halves

    python -m rtpjax.benchmarks.probes.page_cache_dma --gib 8 --out page_cache_dma.json

Also measured: pinning costs (one call, per piece, several threads) and whether one copy may span two pinned pieces.
Needs an NVIDIA GPU and libcuda; the file is written under --dir first.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import ctypes
import json
import mmap
import os
import queue
import threading
import time

import numpy as np

from rtpjax.benchmarks.probes import report

MiB = 1 << 20
PIECE = 256 * MiB
READ_ONLY = 0x08  # CU_MEMHOSTREGISTER_READ_ONLY: the only way CUDA accepts a shared file mapping


class Cuda:
    """The few driver calls used, on device 0's primary context (the one XLA uses, so its buffers are addressable)."""

    def __init__(self):
        self.lib = lib = ctypes.CDLL("libcuda.so.1")
        lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cuMemcpyHtoD_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t]
        lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.cuStreamSynchronize.argtypes = [ctypes.c_void_p]
        self.check(lib.cuInit(0))
        device, self.ctx = ctypes.c_int(), ctypes.c_void_p()
        self.check(lib.cuDeviceGet(ctypes.byref(device), 0))
        self.check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), device))
        self.bind()

    def bind(self):
        """The context is per thread: every thread that calls the driver binds it first."""
        self.check(self.lib.cuCtxSetCurrent(self.ctx))

    def check(self, status: int):
        if status != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(status, ctypes.byref(text))
            raise RuntimeError(f"CUDA error {status}: {text.value.decode() if text.value else '?'}")

    def stream(self):
        handle = ctypes.c_void_p()
        self.check(self.lib.cuStreamCreate(ctypes.byref(handle), 1))
        return handle

    def pin(self, ptr: int, size: int, flags: int = 0):
        self.check(self.lib.cuMemHostRegister_v2(ptr, size, flags))

    def unpin(self, ptr: int):
        self.check(self.lib.cuMemHostUnregister(ptr))

    def copy_async(self, dst: int, src: int, size: int, stream):
        self.check(self.lib.cuMemcpyHtoDAsync_v2(dst, src, size, stream))

    def sync(self, stream):
        self.check(self.lib.cuStreamSynchronize(stream))


def write_file(path: str, size: int):
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    block = np.arange(1 << 27, dtype=np.uint64)  # 1 GiB of distinct words
    with open(path, "wb") as f:
        for i in range(size >> 30):
            f.write((block * (2 * i + 1)).tobytes())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=int, default=8)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    size = args.gib << 30
    path = os.path.join(args.dir, "page_cache_dma.bin")
    write_file(path, size)
    os.system(f"cat {path} > /dev/null")  # warm: every page in the page cache
    jax.devices()
    cuda = Cuda()
    target = jnp.zeros((size,), jnp.uint8).block_until_ready()
    dst = target.unsafe_buffer_pointer()
    fd = os.open(path, os.O_RDONLY)
    offsets = list(range(0, size, PIECE))
    result: dict = {"gb": size / 1e9}

    def mapping():
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        return mm, np.frombuffer(mm, np.uint8).ctypes.data

    # pinning costs, and whether one copy may cross from one pinned piece into the next
    mm, base = mapping()
    began = time.perf_counter()
    cuda.pin(base, size, READ_ONLY)
    result["pin_whole_file_one_call_s"] = time.perf_counter() - began
    cuda.unpin(base)
    for threads in (1, 4, 16):
        def pin_some(mine):
            cuda.bind()
            for o in mine:
                cuda.pin(base + o, PIECE, READ_ONLY)
        with cf.ThreadPoolExecutor(threads) as pool:
            began = time.perf_counter()
            list(pool.map(pin_some, [offsets[i::threads] for i in range(threads)]))
        result[f"pin_pieces_{threads}_threads_s"] = time.perf_counter() - began
        if threads == 1:
            try:
                cuda.check(cuda.lib.cuMemcpyHtoD_v2(dst, base + PIECE - 4096, 8192))
                result["copy_across_pinned_pieces"] = "allowed"
            except RuntimeError as e:
                result["copy_across_pinned_pieces"] = f"refused ({e})"
        began = time.perf_counter()
        for o in offsets:
            cuda.unpin(base + o)
        result[f"unpin_pieces_{threads}_threads_s"] = time.perf_counter() - began
    del mm

    buffers = [np.empty(PIECE, np.uint8) for _ in range(3)]
    for b in buffers:
        b[:] = 0
        cuda.pin(b.ctypes.data, PIECE)
    streams = [cuda.stream() for _ in buffers]
    readers = cf.ThreadPoolExecutor(16)

    def reader(pieces):
        cuda.bind()
        for i, o in enumerate(pieces):
            j = i % len(buffers)
            cuda.sync(streams[j])  # the buffer's previous copy has left it
            view = memoryview(buffers[j])
            list(readers.map(lambda s: os.preadv(fd, [view[s:s + 16 * MiB]], o + s), range(0, PIECE, 16 * MiB)))
            cuda.copy_async(dst + o, buffers[j].ctypes.data, PIECE, streams[j])
        for s in streams:
            cuda.sync(s)

    def pin_cache(pieces):
        cuda.bind()
        mm, base = mapping()
        ready, stream = queue.Queue(), cuda.stream()

        def pin_all():
            cuda.bind()
            for o in pieces:
                cuda.pin(base + o, PIECE, READ_ONLY)
                ready.put(o)
        pinner = threading.Thread(target=pin_all)
        pinner.start()
        for _ in pieces:
            o = ready.get()
            cuda.copy_async(dst + o, base + o, PIECE, stream)
        cuda.sync(stream)
        pinner.join()
        return mm, base, pieces

    def unpin_cache(mm, base, pieces):
        began = time.perf_counter()
        for o in pieces:
            cuda.unpin(base + o)
        return time.perf_counter() - began

    def both():
        half = len(offsets) // 2
        with cf.ThreadPoolExecutor(1) as pool:
            pinned = pool.submit(pin_cache, offsets[half:])
            reader(offsets[:half])
            return pinned.result()

    for rep in range(args.repeats):
        for name, run in (("reader", lambda: reader(offsets)), ("pin_cache", lambda: pin_cache(offsets)),
                          ("both", both)):  # fmt: skip
            began = time.perf_counter()
            pinned = run()
            seconds = time.perf_counter() - began
            result.setdefault(name + "_s", []).append(round(seconds, 4))
            if pinned:
                result.setdefault(name + "_unpin_s", []).append(round(unpin_cache(*pinned), 4))
        print(json.dumps({k: v for k, v in result.items() if isinstance(v, list)}), flush=True)
    last = np.asarray(target.reshape(-1, MiB)[-1])
    result["copied_bytes_match"] = bool(np.array_equal(last, np.fromfile(path, np.uint8, MiB, offset=size - MiB)))
    for name in ("reader", "pin_cache", "both"):
        result[name + "_best_GBps"] = size / 1e9 / min(result[name + "_s"])
    report(result, args.out)


if __name__ == "__main__":
    main()

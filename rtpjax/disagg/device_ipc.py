"""K/V between two processes' GPUs on one host, device to device: CUDA IPC through the driver API (libcuda, ctypes).

The host-staged paths copy a prompt's K/V four times (device -> pinned host -> shared memory -> device); two engines on
one host can skip the host. XLA's allocator maps its memory in a way CUDA cannot export to another process
(cuIpcGetMemHandle refuses it), so the prefill side copies a hand-off's gathered pieces (device to device, a small
cost next to a host copy) into one buffer of its own (cuMemAlloc, pooled and reused, so the decode side meets the same
few buffers again; never freed, as a peer may hold it open; MAX_EXPORT_BYTES in all) and exports that. The decode side
opens each buffer once (a few kept, the oldest closed) and copies each piece into an array of its own (reused: making a
new one costs more than the copy) on a pooled stream, waited on before anything reads the array. Both sides checksum
each piece on their device (`checksum`), so a copy that went wrong is refused as a corrupted host copy is.

`available(device)` says whether a device can take part (a CUDA GPU whose driver library loads); anything else, or a
buffer that cannot be had, uses the host-staged paths. The decode side's copies write into arrays that nothing else
holds or reads (leased until given back): the one place rtpjax writes device memory behind XLA's back.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

IPC_LAZY_ENABLE_PEER_ACCESS = 1  # the source may lie on another GPU of the host (peer access, e.g. over NVLink)
STREAM_NON_BLOCKING = 1
PAGE = 4096  # copies split over streams are cut at page boundaries
MIN_BUFFER = 16 << 20  # export buffers come in powers of two from here: few sizes, so they are reused
MAX_EXPORT_BYTES = 4 << 30  # all export buffers of a process (outside XLA's memory; never freed: peers keep them open)
KEEP_OPENED = 16  # peers' buffers kept open (decode side)
KEEP_DESTINATION_BYTES = 1 << 30  # arrays kept for the copies to land in (decode side)


class IPCError(Exception):
    """A device-to-device hand-off that cannot be made (the host-staged paths remain)."""


@dataclasses.dataclass
class Exported:
    """A hand-off's pieces in one exportable buffer: piece i at `offsets[i]` in the buffer of `handle`. `release()`
    gives the buffer back once the decode side has its copies."""

    handle: bytes  # CUipcMemHandle, 64 bytes
    offsets: list[int]
    release: object = lambda: None


@dataclasses.dataclass
class _Buffer:
    ordinal: int
    address: int
    size: int
    handle: bytes


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * 64)]  # bytes, NULs included (a c_char field would stop at the first)


class _Driver:
    """The driver API calls the hand-off needs, each checked; the devices' primary contexts (XLA's own)."""

    def __init__(self, lib=None):
        """`lib`: the driver library (tests pass a fake)."""
        if lib is None:
            try:
                lib = ctypes.CDLL("libcuda.so.1")
            except OSError as e:
                raise IPCError(f"no CUDA driver library: {e}") from None
        self.lib = lib
        self._check(self.lib.cuInit(0), "cuInit")
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._streams: dict[int, list] = {}  # ordinal -> idle streams (one per copy under way at most)
        self._opened: dict[tuple[int, bytes], tuple[int, int]] = {}  # (ordinal, peer's handle) -> (address, size) here
        self._idle: list[_Buffer] = []  # our export buffers between hand-offs
        self.exported_bytes = 0  # all our export buffers, idle or leased
        self._lock = threading.Lock()
        self.copying = threading.Lock()  # decode side: one copy from peers' buffers at a time
        self.open_handle = self._symbol("cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle")
        self.open_handle.argtypes = [ctypes.POINTER(ctypes.c_uint64), _Handle, ctypes.c_uint]
        self.copy_async = self._symbol("cuMemcpyDtoDAsync_v2", "cuMemcpyDtoDAsync")
        self.copy_async.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        self.copy_up_async = self._symbol("cuMemcpyHtoDAsync_v2", "cuMemcpyHtoDAsync")
        self.copy_up_async.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        self.copy_down_async = self._symbol("cuMemcpyDtoHAsync_v2", "cuMemcpyDtoHAsync")
        self.copy_down_async.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        self._copies = {"d2d": (self.copy_async, "cuMemcpyDtoDAsync"), "up": (self.copy_up_async, "cuMemcpyHtoDAsync"),
                        "down": (self.copy_down_async, "cuMemcpyDtoHAsync")}  # fmt: skip
        self.address_range = self._symbol("cuMemGetAddressRange_v2", "cuMemGetAddressRange")
        self.address_range.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t),
                                       ctypes.c_uint64]  # fmt: skip

    def _symbol(self, *names):
        for name in names:
            fn = getattr(self.lib, name, None)
            if fn is not None:
                return fn
        raise IPCError(f"the CUDA driver has none of {names}")

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            text = ctypes.c_char_p()
            self.lib.cuGetErrorString(result, ctypes.byref(text))
            raise IPCError(f"{what} failed: {(text.value or b'?').decode()} ({result})")

    def use(self, ordinal: int) -> None:
        """Make the device's primary context (the one XLA runs in) current on this thread."""
        with self._lock:
            ctx = self._contexts.get(ordinal)
            if ctx is None:
                dev, ctx = ctypes.c_int(), ctypes.c_void_p()
                self._check(self.lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
                self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
                self._contexts[ordinal] = ctx
        self._check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def lease(self, ordinal: int, nbytes: int) -> _Buffer:
        """An exportable buffer of at least `nbytes` on the device: the smallest idle one that fits, else a new one
        while all of them stay within MAX_EXPORT_BYTES (else IPCError: the hand-off takes a host path). A buffer is
        never freed: a peer may hold it open, and CUDA leaves freeing an exported buffer under an importer undefined."""
        size = max(MIN_BUFFER, 1 << (nbytes - 1).bit_length())
        with self._lock:
            fits = [b for b in self._idle if b.ordinal == ordinal and b.size >= nbytes]
            if fits:
                best = min(fits, key=lambda b: b.size)
                self._idle.remove(best)
                return best
            if self.exported_bytes + size > MAX_EXPORT_BYTES:
                raise IPCError(f"no export buffer for {nbytes} bytes: {self.exported_bytes} of the "
                               f"{MAX_EXPORT_BYTES} allowed are taken")  # fmt: skip
            self.exported_bytes += size
        try:
            self.use(ordinal)
            address, handle = ctypes.c_uint64(), _Handle()
            self._check(self.lib.cuMemAlloc_v2(ctypes.byref(address), ctypes.c_size_t(size)), "cuMemAlloc")
            try:
                self._check(self.lib.cuIpcGetMemHandle(ctypes.byref(handle), address), "cuIpcGetMemHandle")
            except IPCError:
                self.lib.cuMemFree_v2(address)  # never exported: free to go
                raise
        except IPCError:
            with self._lock:
                self.exported_bytes -= size
            raise
        return _Buffer(ordinal, address.value, size, bytes(handle))

    def give_back(self, buffer: _Buffer) -> None:
        """The buffer is free for the next hand-off (its last copy read)."""
        with self._lock:
            self._idle.append(buffer)

    def copy(self, ordinal: int, moves: list[tuple[int, int, int]], direction: str = "d2d") -> None:
        """Device-to-device copies (dst, src, nbytes) on a stream of device `ordinal` ("up": from host addresses,
        "down": to host addresses); returns once every copy enqueued has landed (also when one fails to enqueue:
        nothing may still be writing after an error)."""
        self.copy_each({ordinal: moves}, direction)

    def copy_each(self, moves: dict[int, list[tuple[int, int, int]]], direction: str = "d2d",
                  streams: int = 1) -> float:  # fmt: skip
        """`copy` onto several devices (ordinal -> its copies), enqueued on each device's streams before any is waited
        for, so the devices copy at once; `streams` > 1: each copy cut into at most that many parts over as many
        streams of its device (parallel copies may take copy engines of their own). Returns the seconds enqueuing
        took (the rest was the copies' wait: a slow enqueue means the driver held the call, a slow wait the copy)."""
        if streams < 1:
            raise ValueError(f"copies need at least one stream a device, got {streams}")
        taken, error, (copy_async, name) = [], 0, self._copies[direction]
        began = enqueued = time.perf_counter()
        try:
            for ordinal, device_moves in moves.items():
                self.use(ordinal)
                mine = []
                for _ in range(streams):
                    mine.append(self._stream(ordinal))
                    taken.append((ordinal, mine[-1]))  # (waited for and given back, whatever fails next)
                for i, (dst, src, nbytes) in enumerate(split_moves(device_moves, streams)):
                    error = copy_async(dst, src, nbytes, mine[i % streams])
                    if error:
                        break
                if error:
                    break
        finally:
            synced, enqueued = 0, time.perf_counter()
            for ordinal, stream in taken:
                self.use(ordinal)
                synced = self.lib.cuStreamSynchronize(stream) or synced
                with self._lock:
                    self._streams[ordinal].append(stream)
        self._check(error, name)
        self._check(synced, "cuStreamSynchronize")
        return enqueued - began

    def _stream(self, ordinal: int):
        """An idle stream of device `ordinal` (its context current), made if none is."""
        with self._lock:
            idle = self._streams.setdefault(ordinal, [])
            stream = idle.pop() if idle else None
        if stream is None:
            stream = ctypes.c_void_p()
            self._check(self.lib.cuStreamCreate(ctypes.byref(stream), STREAM_NON_BLOCKING), "cuStreamCreate")
        return stream

    def opened(self, ordinal: int, handle: bytes) -> tuple[int, int]:
        """The base address and size of a peer's exported buffer here (opened once; the oldest of KEEP_OPENED closed).
        Callers hold `self.copying` while they use it, so nothing is closed under a copy."""
        found = self._opened.pop((ordinal, handle), None)
        if found is None:
            self.use(ordinal)
            ptr, base, size = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_size_t()
            opened = self.open_handle(ctypes.byref(ptr), _Handle.from_buffer_copy(handle), IPC_LAZY_ENABLE_PEER_ACCESS)
            self._check(opened, "cuIpcOpenMemHandle")
            ranged = self.address_range(ctypes.byref(base), ctypes.byref(size), ptr.value)
            if ranged:
                self.lib.cuIpcCloseMemHandle(ctypes.c_uint64(ptr.value))
                self._check(ranged, "cuMemGetAddressRange")
            found = (ptr.value, base.value + size.value - ptr.value)  # bytes from the opened address to the end
        self._opened[ordinal, handle] = found  # the most recent last
        while len(self._opened) > KEEP_OPENED:
            old_ordinal, old_handle = next(iter(self._opened))
            old, _ = self._opened.pop((old_ordinal, old_handle))
            self.use(old_ordinal)
            self.lib.cuIpcCloseMemHandle(ctypes.c_uint64(old))
            self.use(ordinal)
        return found


_DRIVER: list = []  # the one _Driver, or the IPCError that loading it raised
_DRIVER_LOCK = threading.Lock()


def _driver() -> _Driver:
    with _DRIVER_LOCK:
        if not _DRIVER:
            try:
                _DRIVER.append(_Driver())
            except IPCError as e:
                _DRIVER.append(e)
    if isinstance(_DRIVER[0], IPCError):
        raise _DRIVER[0]
    return _DRIVER[0]


def split_moves(moves: list[tuple[int, int, int]], parts: int) -> list[tuple[int, int, int]]:
    """Each (dst, src, nbytes) copy cut into at most `parts` consecutive pieces of whole 4 KiB pages (the last
    piece takes the rest), in order: dealt round-robin over `parts` streams, each copy's pieces land on different
    ones."""
    out = []
    for dst, src, nbytes in moves:
        step = max(PAGE, -(-nbytes // parts // PAGE) * PAGE) if parts > 1 else nbytes
        out += [(dst + at, src + at, min(step, nbytes - at)) for at in range(0, nbytes, max(step, 1))]
    return out


def copy_up(moves: dict[int, list[tuple[int, int, int]]], streams: int = 1) -> float:
    """Host-to-device copies (device address, host address, nbytes) per device ordinal, all landed on return, over
    `streams` streams a device; the seconds their enqueuing took (`_Driver.copy_each`)."""
    return _driver().copy_each(moves, "up", streams=streams)


def copy_down(moves: dict[int, list[tuple[int, int, int]]]) -> float:
    """Device-to-host copies (host address, device address, nbytes) per device ordinal, all landed on return; the
    seconds their enqueuing took."""
    return _driver().copy_each(moves, "down")


def available(device: jax.Device) -> bool:
    """Whether K/V on `device` can go device to device to another process (a CUDA GPU, its driver loaded)."""
    if device.platform != "gpu" or "cuda" not in getattr(device.client, "platform_version", "cuda").lower():
        return False
    try:
        _driver()
    except IPCError:
        return False
    return True


def _one_device(arrays: list[jax.Array]) -> jax.Device:
    devices = {d for a in arrays for d in a.sharding.device_set}
    if len(devices) != 1:
        raise IPCError("device-to-device hand-offs take arrays on one device")
    return devices.pop()


def export_pieces(arrays: list[jax.Array]) -> Exported:
    """The computed arrays copied into one exportable buffer, exported; the caller releases it once copied."""
    jax.block_until_ready(arrays)
    ordinal, driver = _one_device(arrays).local_hardware_id, _driver()
    offsets, at = [], 0
    for a in arrays:
        offsets.append(at)
        at += -(-a.nbytes // 256) * 256  # each piece aligned as the device's own allocations are
    buffer = driver.lease(ordinal, at)
    try:
        driver.copy(ordinal, [(buffer.address + o, a.unsafe_buffer_pointer(), a.nbytes)
                              for a, o in zip(arrays, offsets)])  # fmt: skip
    except IPCError:
        driver.give_back(buffer)
        raise
    return Exported(buffer.handle, offsets, lambda: driver.give_back(buffer))


class ReusedArrays:
    """Device arrays that driver copies land in, reused: on GPUs a new one may be written only after every step queued
    before it was made (XLA's allocator), and making one costs more than the copy. Each is leased by one holder, given
    back with the output of its last reader (`guard`, None: nothing reads it any more) and leased again only once that
    has run; at most `keep_bytes` of them idle (the oldest dropped)."""

    def __init__(self, keep_bytes: int):
        self.keep_bytes = keep_bytes
        self._idle: list[tuple[jax.Array, jax.Array | None]] = []  # (array, guard), oldest first
        self._lock = threading.Lock()

    def lease(self, shape: tuple, dtype, where) -> jax.Array:
        """An array of `shape` and `dtype` on `where` (a device or a sharding): an idle one whose last reader has run,
        else the oldest idle one once its reader has run (a new one would wait as long), else a new one."""
        if isinstance(where, jax.Device):
            where = jax.sharding.SingleDeviceSharding(where)
        with self._lock:
            same = [i for i, (a, _) in enumerate(self._idle)
                    if a.shape == tuple(shape) and a.dtype == dtype and a.sharding == where]  # fmt: skip
            ready = [i for i in same if self._idle[i][1] is None or self._idle[i][1].is_ready()]
            pick = ready[0] if ready else same[0] if same else None
            array, guard = self._idle.pop(pick) if pick is not None else (None, None)
        if array is None:
            return jax.block_until_ready(jnp.zeros(shape, dtype, device=where))
        if guard is not None:
            guard.block_until_ready()
        return array

    def give_back(self, array: jax.Array, guard: jax.Array | None = None) -> None:
        """`array` may be leased again once `guard` (already dispatched) is ready."""
        with self._lock:
            self._idle.append((array, guard))
            while sum(a.nbytes for a, _ in self._idle) > self.keep_bytes:
                self._idle.pop(0)


_DESTINATIONS = ReusedArrays(KEEP_DESTINATION_BYTES)


def give_back(arrays: list[jax.Array]) -> None:
    """Arrays copy_in made, once nothing reads them any more (their consumers are done): the next copies reuse them."""
    for array in arrays:
        _DESTINATIONS.give_back(array)


def copy_in(handle: bytes, parts: list[tuple[int, tuple]], dtype, device: jax.Device, times=None) -> list[jax.Array]:
    """New arrays on `device` holding the bytes of each (offset, shape) part of a peer's exported buffer. `times`, a
    dict, gets the seconds of "alloc" (the arrays) and "copy"."""
    began = time.perf_counter()
    outs = [_DESTINATIONS.lease(tuple(shape), jnp.dtype(dtype), device) for _, shape in parts]  # our own buffers
    jax.block_until_ready(outs)  # before our copies land in them
    allocated = time.perf_counter()
    ordinal, driver = device.local_hardware_id, _driver()
    with driver.copying:
        base, size = driver.opened(ordinal, handle)
        for out, (offset, _) in zip(outs, parts):  # a peer's offer must not make us read past its buffer
            if offset < 0 or offset + out.nbytes > size:
                give_back(outs)
                raise IPCError(f"the peer offered {out.nbytes} bytes at offset {offset} of an exported buffer of "
                               f"{size} bytes")  # fmt: skip
        driver.copy(ordinal, [(out.unsafe_buffer_pointer(), base + offset, out.nbytes)
                              for out, (offset, _) in zip(outs, parts)])  # fmt: skip
    if times is not None:
        times.update(alloc=allocated - began, copy=time.perf_counter() - allocated)
    return outs


@jax.jit
def checksum(rows: jax.Array, real: jax.Array) -> jax.Array:
    """Two 32-bit sums over the first `real` rows' 32-bit words (uint8 rows, width a multiple of 4): the plain sum
    (any flipped bit changes it) and one weighted by each word's odd position factor (moved words change it)."""
    n, width = rows.shape
    words = jax.lax.bitcast_convert_type(rows.reshape(n, width // 4, 4), jnp.uint32)
    words = jnp.where((jnp.arange(n) < real)[:, None], words, jnp.uint32(0))
    row = jnp.arange(n, dtype=jnp.uint32)[:, None] * jnp.uint32(width // 4)
    position = row + jnp.arange(width // 4, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * (2 * position + 1), dtype=jnp.uint32)])


def checksums(parts: list[tuple[jax.Array, int]]) -> list[list[int]]:
    """`checksum` of each (rows, real) part, computed together, read back once."""
    if any(rows.shape[1] % 4 for rows, _ in parts):
        raise IPCError("device checksums need rows of a multiple of 4 bytes")
    return [[int(v) for v in s] for s in jax.device_get([checksum(rows, np.int32(real)) for rows, real in parts])]

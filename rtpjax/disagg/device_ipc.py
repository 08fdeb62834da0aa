"""K/V between two processes' GPUs on one host, device to device: CUDA IPC through the driver API (libcuda, ctypes).

The host-staged paths copy a prompt's K/V four times (device -> pinned host -> shared memory -> device); two engines on
one host can skip the host. The prefill side exports each gathered piece's device buffer (an IPC handle of the
allocation that holds it, and the piece's offset in it); the decode side opens each allocation once (XLA's allocator
holds a few large regions, so the mappings are kept for the process's life) and copies the piece into a buffer of its
own with one device-to-device copy on a stream of its own, waited on before anything reads the buffer. Both sides
checksum the piece on their device (`checksum`), so a copy that went wrong is refused as a corrupted host copy is.

`available(device)` says whether a device can take part (a CUDA GPU whose driver library loads); anything else uses
the host-staged paths. The copy writes into a fresh array that nothing else has seen, the one place rtpjax writes
device memory behind XLA's back.
"""

from __future__ import annotations

import ctypes
import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np

IPC_LAZY_ENABLE_PEER_ACCESS = 1  # the source may lie on another GPU of the host (peer access, e.g. over NVLink)
STREAM_NON_BLOCKING = 1


class IPCError(Exception):
    """A device-to-device hand-off that cannot be made (the host-staged paths remain)."""


@dataclasses.dataclass(frozen=True)
class Exported:
    """One gathered piece as the decode side opens it: `nbytes` bytes at `offset` in the allocation of `handle`."""

    handle: bytes  # CUipcMemHandle, 64 bytes
    offset: int
    nbytes: int


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]


class _Driver:
    """The driver API calls the hand-off needs, each checked; the devices' primary contexts (XLA's own)."""

    def __init__(self):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise IPCError(f"no CUDA driver library: {e}") from None
        self._check(self.lib.cuInit(0), "cuInit")
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._streams: dict[tuple[int, int], ctypes.c_void_p] = {}  # (ordinal, thread id) -> stream
        self._opened: dict[tuple[int, bytes], int] = {}  # (ordinal, handle) -> mapped base address
        self._lock = threading.Lock()
        self.get_range = self._symbol("cuMemGetAddressRange_v2", "cuMemGetAddressRange")
        self.open_handle = self._symbol("cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle")
        self.open_handle.argtypes = [ctypes.POINTER(ctypes.c_uint64), _Handle, ctypes.c_uint]
        self.copy = self._symbol("cuMemcpyDtoDAsync_v2", "cuMemcpyDtoDAsync")
        self.copy.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]

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

    def export(self, ordinal: int, address: int, nbytes: int) -> Exported:
        self.use(ordinal)
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self._check(self.get_range(ctypes.byref(base), ctypes.byref(size), ctypes.c_uint64(address)),
                    "cuMemGetAddressRange")  # fmt: skip
        if address + nbytes > base.value + size.value:
            raise IPCError("the piece is not inside one device allocation")
        handle = _Handle()
        self._check(self.lib.cuIpcGetMemHandle(ctypes.byref(handle), ctypes.c_uint64(base.value)), "cuIpcGetMemHandle")
        return Exported(bytes(handle.reserved), address - base.value, nbytes)

    def _base(self, ordinal: int, handle: bytes) -> int:
        with self._lock:
            base = self._opened.get((ordinal, handle))
            if base is None:
                ptr = ctypes.c_uint64()
                self._check(self.open_handle(ctypes.byref(ptr), _Handle(handle), IPC_LAZY_ENABLE_PEER_ACCESS),
                            "cuIpcOpenMemHandle")  # fmt: skip
                base = self._opened[ordinal, handle] = ptr.value
        return base

    def _stream(self, ordinal: int) -> ctypes.c_void_p:
        key = (ordinal, threading.get_ident())
        with self._lock:
            stream = self._streams.get(key)
            if stream is None:
                stream = ctypes.c_void_p()
                self._check(self.lib.cuStreamCreate(ctypes.byref(stream), STREAM_NON_BLOCKING), "cuStreamCreate")
                self._streams[key] = stream
        return stream

    def copy_in(self, ordinal: int, source: Exported, address: int) -> None:
        """Copy the exported bytes to `address` on this process's device `ordinal`; returns once they are there."""
        self.use(ordinal)
        src, stream = self._base(ordinal, source.handle) + source.offset, self._stream(ordinal)
        self._check(self.copy(address, src, source.nbytes, stream), "cuMemcpyDtoDAsync")
        self._check(self.lib.cuStreamSynchronize(stream), "cuStreamSynchronize")


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


def available(device: jax.Device) -> bool:
    """Whether K/V on `device` can go device to device to another process (a CUDA GPU, its driver loaded)."""
    if device.platform != "gpu" or "cuda" not in getattr(device.client, "platform_version", "cuda").lower():
        return False
    try:
        _driver()
    except IPCError:
        return False
    return True


def _one_device(array: jax.Array) -> jax.Device:
    devices = array.sharding.device_set
    if len(devices) != 1:
        raise IPCError("device-to-device hand-offs take arrays on one device")
    return next(iter(devices))


def export(array: jax.Array) -> Exported:
    """The IPC reference to a computed array's buffer (the caller keeps the array alive until the copy is made)."""
    array.block_until_ready()
    device = _one_device(array)
    return _driver().export(device.local_hardware_id, array.unsafe_buffer_pointer(), array.nbytes)


def copy_in(source: Exported, shape: tuple, dtype, device: jax.Device) -> jax.Array:
    """A new array on `device` holding the exported bytes (of that shape and dtype)."""
    nbytes = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    if nbytes != source.nbytes:
        raise IPCError(f"the exported piece holds {source.nbytes} bytes, not the {nbytes} of {list(shape)} {dtype}")
    out = jnp.zeros(shape, dtype, device=device).block_until_ready()  # a buffer of our own, computed on the device
    _driver().copy_in(device.local_hardware_id, source, out.unsafe_buffer_pointer())
    return out


@jax.jit
def checksum(rows: jax.Array, real: jax.Array) -> jax.Array:
    """Two 32-bit sums over the first `real` rows' 32-bit words (uint8 rows, width a multiple of 4): the plain sum
    (any flipped bit changes it) and one weighted by each word's odd position factor (moved words change it)."""
    n, width = rows.shape
    words = jax.lax.bitcast_convert_type(rows.reshape(n, width // 4, 4), jnp.uint32)
    words = jnp.where((jnp.arange(n) < real)[:, None], words, jnp.uint32(0))
    position = jnp.arange(n, dtype=jnp.uint32)[:, None] * jnp.uint32(width // 4) + jnp.arange(width // 4, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * (2 * position + 1), dtype=jnp.uint32)])


def checksum_of(rows: jax.Array, real: int) -> list[int]:
    if rows.shape[1] % 4:
        raise IPCError("device checksums need rows of a multiple of 4 bytes")
    return [int(v) for v in np.asarray(checksum(rows, np.int32(real)))]

"""The K/V hand-off channel: a prefill engine serves the K/V it holds, a decode engine pulls it.

One interface, two host-staged paths: over the TCP socket itself (any two hosts), or, when both engines run on one
host, through a file in shared memory (/dev/shm) that the decode side maps, the socket carrying only the offer.

The prefill side stages a hand-off as soon as it holds it, not when it is pulled: its bytes go into the shared-memory
file and their crc32s are computed together, piece by piece on a thread pool (pwrite and zlib release the GIL). A pull
then costs the decode side one mapping of that file (no copy: the K/V stays in the mapping until written to the
device) and a parallel check of the checksums; over TCP the file goes out by sendfile and each piece is checked as soon
as it has arrived, while the next one is still on the wire. A corrupted transfer is refused, never adopted. A hand-off
is served once: the first pull takes it, whatever happens next; what nobody pulls is dropped when it expires. Where
/dev/shm has no room the bytes stay in process memory and travel over the socket on either path.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import struct
import tempfile
import threading
import time
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

import msgspec
import numpy as np

from rtpjax.distributed.messages import KVOffer, KVPull, KVPulled
from rtpjax.kv.host_blocks import KVBlocks

log = logging.getLogger("rtpjax")

CHUNK = 16 << 20  # bytes per checksummed piece: enough pieces to keep the threads busy, few enough to be cheap
SOCKET_BUFFER = 8 << 20  # large socket buffers: fewer, larger reads and writes on a fast link
_POOL = ThreadPoolExecutor(min(16, os.cpu_count() or 1), thread_name_prefix="rtpjax-kv-io")
_CHECKER = ThreadPoolExecutor(2, thread_name_prefix="rtpjax-kv-sums")  # runs checksums(), which waits on _POOL
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_PREFIX = "rtpjax-kv-"


class TransferError(Exception):
    """A pull that brought no usable K/V (the decode side recomputes the prompt)."""


def host_id() -> str:
    """Names this host: two engines with equal ids can hand K/V over through shared memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{socket.gethostname()}/{f.read().strip()}"
    except OSError:
        return socket.gethostname()


def pieces(sizes: list[int], chunk: int = CHUNK) -> list[tuple[int, int]]:
    """(offset, length) of each `chunk`-byte piece of a payload of parts of `sizes` (pieces never straddle parts)."""
    out, at = [], 0
    for size in sizes:
        out += [(at + i, min(chunk, size - i)) for i in range(0, size, chunk)]
        at += size
    return out


def checksums(parts, chunk: int = CHUNK) -> list[int]:
    """crc32 of each `chunk`-byte piece of each part (pieces never straddle two parts)."""
    views = [memoryview(p)[i : i + chunk] for p in parts for i in range(0, len(p), chunk)]
    return list(_POOL.map(zlib.crc32, views))


def _parts(kv: KVBlocks) -> list:
    return [kv.keys, kv.values] + ([kv.key_scales, kv.value_scales] if kv.layout.quantized else [])


def _unlink(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def sweep_dead() -> None:
    """Remove the shared-memory files of engines that died (killed) before they could remove their own."""
    try:
        names = os.listdir(_SHM_DIR)
    except OSError:
        return
    for name in names:
        pid = name[len(_PREFIX) :].split("-", 1)[0]
        if name.startswith(_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _unlink(os.path.join(_SHM_DIR, name))


# -- the prefill side ------------------------------------------------------------------------------------------------


def _pwrite(fd: int, view: memoryview, at: int) -> None:
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


class ShmArena:
    """The prefill side's reusable shared-memory files. Their pages stay allocated between hand-offs, so staging one
    is a warm copy rather than an allocation of fresh tmpfs pages (which costs several times a copy). A file is leased
    for one pull: the decode side copies out of it before it answers, and it comes back here. At most `keep` idle
    files are kept; all are removed at close."""

    def __init__(self, keep: int = 4):
        self.keep, self.closed = keep, False
        self._idle: list[tuple[str, int]] = []  # (path, capacity)
        self._lock = threading.Lock()

    def write(self, parts) -> str | None:
        """A leased file holding `parts` one after another, written piece by piece in parallel; None (the bytes then
        go over the socket) where the file system has no room for them."""
        sizes = [len(p) for p in parts]
        with self._lock:
            fits = [f for f in self._idle if f[1] >= sum(sizes)] or self._idle[-1:]
            if fits:
                self._idle.remove(fits[0])
        path = fits[0][0] if fits else os.path.join(_SHM_DIR, f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        except OSError as e:
            return self._no_room(path, sum(sizes), e)
        try:
            if not fits or fits[0][1] < sum(sizes):
                os.posix_fallocate(fd, 0, max(1, sum(sizes)))  # no room: an error now, not a SIGBUS in a reader
            jobs = [(memoryview(p).cast("B"), i) for p in parts for i in range(0, len(p), CHUNK)]
            list(_POOL.map(lambda job, at: _pwrite(fd, job[0][job[1] : job[1] + CHUNK], at), jobs,
                           [at for at, _ in pieces(sizes)]))  # fmt: skip
        except OSError as e:
            return self._no_room(path, sum(sizes), e)
        finally:
            os.close(fd)
        return path

    def _no_room(self, path: str, size: int, error: OSError) -> None:
        _unlink(path)
        log.warning("a K/V hand-off goes over the socket: no room in %s for %d bytes (%s)", _SHM_DIR, size, error)

    def give_back(self, path: str | None) -> None:
        if path is None:
            return
        with self._lock:
            if not self.closed and len(self._idle) < self.keep:
                self._idle.append((path, os.stat(path).st_size))
                self._idle.sort(key=lambda f: f[1])
                return
        _unlink(path)

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self.closed = self._idle, [], True
        for path, _ in idle:
            _unlink(path)


@dataclasses.dataclass
class Held:
    """A hand-off's K/V on the prefill side: `num_tokens` leading positions of `prompt_ids` in `kv`'s blocks."""

    kv: KVBlocks
    num_tokens: int
    prompt_ids: list[int]
    expires: float  # time.monotonic()
    checksums: Future | None = None  # of list[int]: started when the store takes it, done long before most pulls


class HeldStore:
    """Hand-offs waiting for their decode engine; the server thread takes them, the engine loop expires them."""

    def __init__(self):
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def put(self, transfer_id: str, held: Held) -> None:
        """Hold `held`, its checksums computed meanwhile off the engine loop and off the pull's path."""
        held.checksums = _CHECKER.submit(checksums, _parts(held.kv))
        with self._lock:
            self._held[transfer_id] = held

    def take(self, transfer_id: str) -> Held | None:
        with self._lock:
            held = self._held.pop(transfer_id, None)
        return held if held is not None and held.expires > time.monotonic() else None

    def expire(self) -> list[str]:
        """Drop what expired; returns their ids."""
        now = time.monotonic()
        with self._lock:
            gone = [t for t, h in self._held.items() if h.expires <= now]
            for t in gone:
                del self._held[t]
        return gone


# -- framing ---------------------------------------------------------------------------------------------------------


def _send(sock: socket.socket, message) -> None:
    data = msgspec.msgpack.encode(message)
    sock.sendall(struct.pack("!I", len(data)) + data)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise ConnectionError("the peer closed the connection mid-transfer")
        view = view[n:]


def _recv(sock: socket.socket, kind: type):
    head = bytearray(4)
    _recv_exact(sock, memoryview(head))
    body = bytearray(struct.unpack("!I", head)[0])
    _recv_exact(sock, memoryview(body))
    return msgspec.msgpack.decode(body, type=kind)


def _big_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass  # the kernel's limit stands


class TransferServer:
    """Serves HeldStore's hand-offs on a TCP port, one thread per connection."""

    def __init__(self, store: HeldStore, host: str, port: int):
        self.store, self.arena = store, ShmArena()
        sweep_dead()
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.host, self.port = host, self.sock.getsockname()[1]
        threading.Thread(target=self._accept, name="rtpjax-kv-server", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), name="rtpjax-kv-send", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        path = None
        try:
            conn.settimeout(60.0)
            _big_buffers(conn)
            pull = _recv(conn, KVPull)
            held = self.store.take(pull.transfer_id)
            if held is None:
                _send(conn, KVOffer(error=f"no hand-off {pull.transfer_id!r} here (unknown, taken or expired)"))
                return
            parts = _parts(held.kv)
            if pull.channel == "shm":
                path = self.arena.write(parts)
            offer = KVOffer(layout=held.kv.layout, num_blocks=held.kv.num_blocks, num_tokens=held.num_tokens,
                            prompt_ids=held.prompt_ids, sizes=[len(p) for p in parts], chunk=CHUNK,
                            checksums=held.checksums.result(timeout=60.0), shm_path=path)  # fmt: skip
            _send(conn, offer)
            if path is None:
                for part in parts:
                    conn.sendall(part)
            _recv(conn, KVPulled)  # the reader has copied the file out (or read the socket's bytes)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            pass  # the decode side went away or spoke nonsense: it recomputes; what it took is dropped
        finally:
            self.arena.give_back(path)
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self.arena.close()


# -- the decode side -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pulled:
    kv: KVBlocks
    num_tokens: int
    prompt_ids: list[int]


def _read_shm(path: str, offer: KVOffer) -> tuple[memoryview, list[Future]]:
    """The leased file's payload copied into this process (the file is reused once we answer), each piece by a pool
    thread that checksums it while it is still in the cache."""
    view = memoryview(np.empty(sum(offer.sizes), np.uint8)).cast("B")
    fd = os.open(path, os.O_RDONLY)

    def one(at: int, size: int) -> int:
        if os.preadv(fd, [view[at : at + size]], at) != size:
            raise TransferError(f"the shared-memory file {path} is short")
        return zlib.crc32(view[at : at + size])

    try:
        sums = [_POOL.submit(one, at, size) for at, size in pieces(offer.sizes, offer.chunk)]
        for f in sums:
            f.exception()  # every read done before the file is closed (and handed back)
    finally:
        os.close(fd)
    return view, sums


def _sizes(layout, num_blocks: int) -> list[int]:
    return [num_blocks * int(np.prod(shape)) * dtype.itemsize for dtype, shape in layout.block_parts()]


def _receive(sock: socket.socket, offer: KVOffer) -> tuple[memoryview, list[Future]]:
    """The payload off the socket into one buffer, each piece's crc32 started as soon as the piece is in."""
    view = memoryview(np.empty(sum(offer.sizes), np.uint8)).cast("B")
    sums = []
    for at, size in pieces(offer.sizes, offer.chunk):
        _recv_exact(sock, view[at : at + size])
        sums.append(_POOL.submit(zlib.crc32, view[at : at + size]))
    return view, sums


def pull(host: str, port: int, transfer_id: str, channel: str, deadline: float) -> Pulled:
    """The hand-off's K/V, checked against its checksums; TransferError (saying why) for anything else. `deadline`:
    time.monotonic() after which the pull gives up."""

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferError(f"the hand-off from {host}:{port} did not arrive in time")
        return left

    try:
        with socket.create_connection((host, port), timeout=remaining()) as sock:
            _big_buffers(sock)
            sock.settimeout(remaining())
            _send(sock, KVPull(transfer_id, channel))
            offer = _recv(sock, KVOffer)
            if offer.error is not None:
                raise TransferError(offer.error)
            if offer.chunk < 1 or offer.layout is None or offer.sizes != _sizes(offer.layout, offer.num_blocks):
                raise TransferError(f"the offer from {host}:{port} does not match its layout (sizes, piece size)")
            sock.settimeout(remaining())
            if offer.shm_path is not None:
                payload, sums = _read_shm(offer.shm_path, offer)
            else:
                payload, sums = _receive(sock, offer)
            _send(sock, KVPulled(True))
            sums = [f.result(timeout=remaining()) for f in sums]
            remaining()  # arrived too late: stale, never adopted
    except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise TransferError(f"pulling K/V from {host}:{port} failed: {type(e).__name__}: {e}") from None
    if sums != offer.checksums:
        raise TransferError(f"the K/V from {host}:{port} arrived corrupted (checksum mismatch)")
    parts, at = [], 0
    for size in offer.sizes:
        parts.append(payload[at : at + size])
        at += size
    kv = KVBlocks(offer.layout, offer.num_blocks, *parts)
    try:
        kv.arrays()
    except ValueError as e:
        raise TransferError(f"the K/V from {host}:{port} does not match its layout: {e}") from None
    return Pulled(kv, offer.num_tokens, offer.prompt_ids)

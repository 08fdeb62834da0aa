"""The K/V hand-off channel: a prefill engine serves the K/V it holds, a decode engine pulls it.

One interface, two host-staged paths: over the TCP socket itself (any two hosts), or, when both engines run on one
host, through a file in shared memory (/dev/shm) that the decode side maps, the socket carrying only the offer.

The payload is the prompt's blocks as packed rows (block_copy.pack: each block one contiguous row of every layer's
keys and values), the form in which the device gathers them and a decode engine writes them. Between the two devices
the bytes are copied once on each side:

- prefill: `stage` waits (on a hand-off thread, never the engine loop) for each gathered piece's device-to-host copy
  and copies it into a leased shared-memory file, chunk by chunk on a thread pool that computes each chunk's crc32
  while it is still in the cache (numpy copies and zlib release the GIL); a piece is staged while the next one is
  still crossing from the device. A pull gets the offer as soon as the file is leased, then each chunk's crc32 (a
  KVChunk; over TCP the chunk's bytes follow) as soon as that chunk is staged.
- decode: the file is mapped (no copy) and each chunk goes to the device straight from the mapping (`load`) once it
  is announced, its checksum computed meanwhile; over TCP each chunk lands by recv_into in one preallocated buffer
  and goes on while the next is on the wire. So the device copies of one side overlap the staging of the other. The
  answer that lets the prefill side reuse the file waits until the device has its copy.

A corrupted transfer is refused, never adopted. A hand-off is served once: the first pull takes it, whatever happens
next; what nobody pulls is dropped when it expires. Where /dev/shm has no room the bytes stay in process memory and
travel over the socket on either path.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import socket
import struct
import tempfile
import threading
import time
import uuid
import zlib
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import msgspec
import numpy as np

from rtpjax.distributed.messages import KVChunk, KVOffer, KVPull, KVPulled
from rtpjax.kv.host_blocks import KVLayout

log = logging.getLogger("rtpjax")

CHUNK = 16 << 20  # bytes per checksummed piece: enough pieces to keep the threads busy, few enough to be cheap
SOCKET_BUFFER = 8 << 20  # large socket buffers: fewer, larger reads and writes on a fast link
_POOL = ThreadPoolExecutor(min(16, os.cpu_count() or 1), thread_name_prefix="rtpjax-kv-io")
_STAGER = ThreadPoolExecutor(2, thread_name_prefix="rtpjax-kv-stage")  # runs stage(), which waits on _POOL
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


def pieces_of(sizes: list[int], chunk: int = CHUNK) -> list[tuple[int, int]]:
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


def chunk_for(block_bytes: int) -> int:
    """Bytes per checksummed piece: whole blocks (a chunk goes to the device as rows), about CHUNK of them."""
    return max(1, CHUNK // block_bytes) * block_bytes


class ShmArena:
    """The prefill side's reusable shared-memory files, each mapped once. Their pages stay allocated between
    hand-offs, so staging one is a warm copy rather than an allocation of fresh tmpfs pages (which costs several
    times a copy). A file is leased from staging until its pull has been answered (or the hand-off is dropped). At
    most `keep` idle files are kept; all are removed at close."""

    def __init__(self, keep: int = 4):
        self.keep, self.closed = keep, False
        self._idle: list[tuple[str, np.ndarray]] = []  # (path, its whole mapping as uint8), smallest first
        self._lock = threading.Lock()

    def lease(self, size: int) -> tuple[str | None, np.ndarray]:
        """(path, a writable mapping of `size` bytes of it); (None, process memory) where /dev/shm has no room."""
        with self._lock:
            fits = [f for f in self._idle if f[1].size >= size]
            if fits:
                self._idle.remove(fits[0])
                return fits[0][0], fits[0][1][:size]
        path = os.path.join(_SHM_DIR, f"{_PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(fd, 0, max(1, size))  # no room: an error now, not a SIGBUS in a writer or reader
                mapping = np.frombuffer(mmap.mmap(fd, max(1, size)), np.uint8)
            finally:
                os.close(fd)
        except OSError as e:
            _unlink(path)
            log.warning("a K/V hand-off goes over the socket: no room in %s for %d bytes (%s)", _SHM_DIR, size, e)
            return None, np.empty(size, np.uint8)
        return path, mapping[:size]

    def give_back(self, path: str | None, view: np.ndarray) -> None:
        if path is None:
            return
        whole = view.base if isinstance(view.base, np.ndarray) else view  # the file's whole mapping
        with self._lock:
            if not self.closed and len(self._idle) < self.keep:
                self._idle.append((path, whole))
                self._idle.sort(key=lambda f: f[1].size)
                return
        _unlink(path)

    def close(self) -> None:
        with self._lock:
            idle, self._idle, self.closed = self._idle, [], True
        for path, _ in idle:
            _unlink(path)


class Staged:
    """A hand-off's payload on its way into a leased file: uint8 rows [num_blocks * block_bytes]. `leased` is known
    first (the file, so a pull can start), then each chunk's crc32 once that chunk is in the file, then `done`: the
    decode side follows chunk by chunk, its device copies overlapping the staging of the chunks after."""

    def __init__(self, size: int, block_bytes: int, arena: ShmArena):
        self.size, self.chunk, self.arena = size, chunk_for(block_bytes), arena
        self.leased: Future = Future()  # of (path or None, payload)
        self.sums: list[Future] = [Future() for _ in pieces_of([size], self.chunk)]  # of int
        self.done: Future = Future()  # of (d2h_s, copy_s): waiting for the device's copies, copying past the last one

    def fail(self, error: BaseException) -> None:
        for f in [self.leased, *self.sums, self.done]:
            if not f.done():
                f.set_exception(error)

    def release(self) -> None:
        """Give the file back once nothing writes into it any more (at once if nothing does)."""

        def back(_):
            if self.leased.exception() is None and self.arena is not None:
                self.arena.give_back(*self.leased.result())
                self.arena = None

        self.done.add_done_callback(back)


def stage(staged: Staged, pieces) -> None:
    """Stage gathered pieces ((real rows, array [>= real, block_bytes]) in order, whose host copies may still be on
    their way): each chunk is copied into the file and checksummed by a pool thread as soon as its rows are here."""
    try:
        path, payload = staged.arena.lease(staged.size)
    except BaseException as e:
        staged.fail(e)
        raise
    staged.leased.set_result((path, payload))
    bounds, landed, waited, jobs, at = pieces_of([staged.size], staged.chunk), [], 0.0, [], 0

    def one(i: int, sources) -> None:
        start, size = bounds[i]
        try:
            for src_at, src in sources:  # the landed pieces this chunk overlaps
                lo, hi = max(start, src_at), min(start + size, src_at + src.size)
                if lo < hi:
                    np.copyto(payload[lo:hi], src[lo - src_at : hi - src_at])
            staged.sums[i].set_result(zlib.crc32(payload[start : start + size]))
        except BaseException as e:  # noqa: BLE001 - handed to the pull that waits on this chunk
            staged.sums[i].set_exception(e)

    try:
        for real, array in pieces:
            t = time.perf_counter()
            host = np.asarray(array)[:real].reshape(-1)  # this piece's host copy (later ones keep coming meanwhile)
            waited += time.perf_counter() - t
            landed.append((at, host))
            at += host.size
            while len(jobs) < len(bounds) and sum(bounds[len(jobs)]) <= at:
                jobs.append(_POOL.submit(one, len(jobs), list(landed)))
        t = time.perf_counter()
        futures.wait(jobs)
        staged.done.set_result((waited, time.perf_counter() - t))
    except BaseException as e:  # noqa: BLE001 - a failed device copy: every waiter hears of it
        futures.wait(jobs)  # no copy still writing into the file once it is back
        staged.fail(e)


@dataclasses.dataclass
class Held:
    """A hand-off on the prefill side: `num_tokens` leading positions of `prompt_ids` in `num_blocks` blocks, staged
    (or still staging) on a hand-off thread."""

    layout: KVLayout
    num_blocks: int
    num_tokens: int
    prompt_ids: list[int]
    expires: float  # time.monotonic()
    staged: Staged


class HeldStore:
    """Hand-offs waiting for their decode engine; the server thread takes them, the engine loop expires them."""

    def __init__(self):
        self.arena = ShmArena()
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def stage(self, pieces, layout: KVLayout) -> Staged:
        """Start staging gathered pieces on a hand-off thread."""
        staged = Staged(sum(real for real, _ in pieces) * layout.block_bytes, layout.block_bytes, self.arena)
        _STAGER.submit(stage, staged, pieces)
        return staged

    def put(self, transfer_id: str, held: Held) -> None:
        with self._lock:
            old = self._held.pop(transfer_id, None)
            self._held[transfer_id] = held
        if old is not None:
            old.staged.release()

    def take(self, transfer_id: str) -> Held | None:
        """The hand-off, now the caller's to release; None if unknown, taken or expired."""
        with self._lock:
            held = self._held.pop(transfer_id, None)
        if held is not None and held.expires <= time.monotonic():
            held.staged.release()
            return None
        return held

    def expire(self) -> list[str]:
        """Drop what expired; returns their ids."""
        now = time.monotonic()
        with self._lock:
            gone = {t: h for t, h in self._held.items() if h.expires <= now}
            for t in gone:
                del self._held[t]
        for held in gone.values():
            held.staged.release()
        return list(gone)

    def close(self) -> None:
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for h in held:
            h.staged.release()
        self.arena.close()


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
        self.store = store
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
        held = None
        try:
            conn.settimeout(60.0)
            _big_buffers(conn)
            pull = _recv(conn, KVPull)
            held = self.store.take(pull.transfer_id)
            if held is None:
                _send(conn, KVOffer(error=f"no hand-off {pull.transfer_id!r} here (unknown, taken or expired)"))
                return
            staged = held.staged
            try:
                path, payload = staged.leased.result(timeout=max(0.0, held.expires - time.monotonic()))
            except Exception as e:  # noqa: BLE001 - no file and no memory for it: said, not adopted
                _send(conn, KVOffer(error=f"the hand-off {pull.transfer_id!r} could not be staged: {e!r}"))
                return
            shm = pull.channel == "shm" and path is not None
            _send(conn, KVOffer(layout=held.layout, num_blocks=held.num_blocks, num_tokens=held.num_tokens,
                                prompt_ids=held.prompt_ids, sizes=[staged.size], chunk=staged.chunk,
                                shm_path=path if shm else None))  # fmt: skip
            for (at, size), crc in zip(pieces_of([staged.size], staged.chunk), staged.sums):
                try:
                    _send(conn, KVChunk(crc.result(timeout=max(0.0, held.expires - time.monotonic()))))
                except Exception as e:  # noqa: BLE001 - the device copy failed or took past the expiry
                    _send(conn, KVChunk(error=f"the hand-off {pull.transfer_id!r} could not be staged: {e!r}"))
                    return
                if not shm:
                    conn.sendall(payload[at : at + size])
            _recv(conn, KVPulled)  # the device on the other side has its copy: the file may be reused
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            pass  # the decode side went away or spoke nonsense: it recomputes; what it took is dropped
        finally:
            if held is not None:
                held.staged.release()
            conn.close()

    def close(self) -> None:
        self.sock.close()


# -- the decode side -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pulled:
    layout: KVLayout
    rows: list  # one per block: what `load` made of it (device rows, or host copies)
    num_tokens: int
    prompt_ids: list[int]
    times: dict[str, float]  # seconds: "channel" (offer, bytes in, checksums), "h2d" (in `load`, device copies done)


def host_rows(layout: KVLayout, rows: np.ndarray) -> list[np.ndarray]:
    """`pull`'s default load: the rows copied out of the payload (which is reused once the pull answers)."""
    return list(rows.copy())


def _map(path: str, size: int) -> np.ndarray:
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size < size:
            raise TransferError(f"the shared-memory file {path} is short")
        return np.frombuffer(mmap.mmap(fd, size, prot=mmap.PROT_READ), np.uint8)
    finally:
        os.close(fd)


def _arrive(sock: socket.socket, offer: KVOffer, load) -> tuple[list, list[Future], list[int], float]:
    """Each chunk of the payload as soon as the prefill side has staged it (its crc32 comes first, then, over TCP,
    its bytes), checksummed on a pool thread while `load` takes its rows; the rows, the checksums computed and sent,
    and the seconds spent in `load`."""
    bb, size = offer.layout.block_bytes, offer.sizes[0]
    payload = _map(offer.shm_path, size) if offer.shm_path is not None else np.empty(size, np.uint8)
    rows, sums, sent, loading = [], [], [], 0.0
    for at, n in pieces_of(offer.sizes, offer.chunk):
        chunk = _recv(sock, KVChunk)
        if chunk.error is not None:
            raise TransferError(chunk.error)
        sent.append(chunk.checksum)
        piece = payload[at : at + n]
        if offer.shm_path is None:
            _recv_exact(sock, memoryview(piece))
        sums.append(_POOL.submit(zlib.crc32, piece))
        began = time.perf_counter()
        rows += load(offer.layout, piece.reshape(-1, bb))
        loading += time.perf_counter() - began
    return rows, sums, sent, loading


def pull(host: str, port: int, transfer_id: str, channel: str, deadline: float, load=host_rows) -> Pulled:
    """The hand-off's K/V, checked against its checksums; TransferError (saying why) for anything else. `deadline`:
    time.monotonic() after which the pull gives up. `load(layout, rows uint8 [k, block_bytes]) -> k rows` takes each
    chunk as it arrives; it must copy (the shared-memory file is reused once the pull answers, which waits for every
    copy `load` started on a device)."""

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferError(f"the hand-off from {host}:{port} did not arrive in time")
        return left

    began = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=remaining()) as sock:
            _big_buffers(sock)
            sock.settimeout(remaining())
            _send(sock, KVPull(transfer_id, channel))
            offer = _recv(sock, KVOffer)
            if offer.error is not None:
                raise TransferError(offer.error)
            lay = offer.layout
            if lay is None or offer.sizes != [offer.num_blocks * lay.block_bytes] or offer.chunk < 1 or \
                    offer.chunk % lay.block_bytes:  # fmt: skip
                raise TransferError(f"the offer from {host}:{port} does not match its layout (sizes, piece size)")
            sock.settimeout(remaining())
            rows, sums, sent, loading = _arrive(sock, offer, load)
            arrived = time.perf_counter()
            jax.block_until_ready(rows)
            loading += time.perf_counter() - arrived
            _send(sock, KVPulled(True))
            sums = [f.result(timeout=remaining()) for f in sums]
            remaining()  # arrived too late: stale, never adopted
    except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise TransferError(f"pulling K/V from {host}:{port} failed: {type(e).__name__}: {e}") from None
    if sums != sent:
        raise TransferError(f"the K/V from {host}:{port} arrived corrupted (checksum mismatch)")
    took = time.perf_counter() - began
    return Pulled(lay, rows, offer.num_tokens, offer.prompt_ids, {"channel": took - loading, "h2d": loading})

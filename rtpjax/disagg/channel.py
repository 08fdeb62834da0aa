"""The K/V hand-off channel: a prefill engine serves the K/V it holds, a decode engine pulls it.

One interface, three paths: over the TCP socket itself (any two hosts); when both engines run on one host, through a
file in shared memory (/dev/shm) that the decode side maps, the socket carrying only the offer; and, when both run on
CUDA GPUs of one host, device to device (device_ipc: the offer carries the gathered pieces' exported device buffers,
which the decode side copies and checksums on its device; no host memory). An engine that can export keeps a
hand-off's K/V on its device and stages it in host memory only when a pull asks for a host path.

The payload is the prompt's blocks as packed rows (block_copy.pack: each block one contiguous row of every layer's
keys and values), the form in which the device gathers them and a decode engine writes them. On the host paths the
bytes are copied once on each side between the two devices:

- prefill: staging.py stages the gathered rows into a leased shared-memory file with their crc32s, chunk by chunk. A
  pull gets the offer as soon as the file is leased, then each chunk's crc32 (a KVChunk; over TCP the chunk's bytes
  follow) as soon as that chunk is staged.
- decode: the file is mapped (no copy; the mapping is kept, pages populated, for the next hand-off through the same
  reused file) and each chunk goes to the device straight from the mapping (`load`) once it is announced, its
  checksum computed meanwhile; over TCP each chunk lands by recv_into in a reused buffer (no fresh pages to fault)
  and goes on while the next is on the wire. So the device copies of one side overlap the staging of the other. The
  answer that lets the prefill side reuse the file waits until the device has its copy.

A corrupted transfer is refused, never adopted. A hand-off is served once: the first pull takes it, whatever happens
next; what nobody pulls is dropped when it expires. Where /dev/shm has no room the bytes stay in process memory and
travel over the socket on either path.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import mmap
import os
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import Future

import jax
import msgspec
import numpy as np

from rtpjax.disagg import device_ipc
from rtpjax.disagg.staging import CHUNK, POOL, Held, HeldStore, pieces_of, sweep_dead
from rtpjax.distributed.messages import KVChunk, KVDevicePiece, KVOffer, KVPull, KVPulled
from rtpjax.kv import block_copy
from rtpjax.kv.host_blocks import KVLayout

log = logging.getLogger("rtpjax")
SOCKET_BUFFER = 8 << 20  # large socket buffers: fewer, larger reads and writes on a fast link


class TransferError(Exception):
    """A pull that brought no usable K/V (the decode side recomputes the prompt)."""


class DeviceCopyError(TransferError):
    """A device-to-device copy that could not be made (this pair of engines goes through host memory instead)."""


def host_id() -> str:
    """Names this host: two engines with equal ids can hand K/V over through shared memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{socket.gethostname()}/{f.read().strip()}"
    except OSError:
        return socket.gethostname()


def checksums(parts, chunk: int = CHUNK) -> list[int]:
    """crc32 of each `chunk`-byte piece of each part (pieces never straddle two parts)."""
    views = [memoryview(p)[i : i + chunk] for p in parts for i in range(0, len(p), chunk)]
    return list(POOL.map(zlib.crc32, views))


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
            if pull.channel == "device" and held.pieces is not None:
                self._serve_device(conn, pull, held)
            else:
                self._serve_host(conn, pull, held)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            pass  # the decode side went away or spoke nonsense: it recomputes; what it took is dropped
        finally:
            if held is not None:
                held.release()
            conn.close()

    @staticmethod
    def _offer(held: Held, **fields) -> KVOffer:
        return KVOffer(layout=held.layout, num_blocks=held.num_blocks, num_tokens=held.num_tokens,
                       prompt_ids=held.prompt_ids, sizes=[held.num_blocks * held.layout.block_bytes], **fields)

    def _serve_host(self, conn: socket.socket, pull: KVPull, held: Held) -> None:
        staged = held.host()
        try:
            path, payload = staged.leased.result(timeout=max(0.0, held.expires - time.monotonic()))
        except Exception as e:  # noqa: BLE001 - no file and no memory for it: said, not adopted
            _send(conn, KVOffer(error=f"the hand-off {pull.transfer_id!r} could not be staged: {e!r}"))
            return
        shm = pull.channel in ("shm", "device") and path is not None  # "device" implies this host
        _send(conn, self._offer(held, chunk=staged.chunk, shm_path=path if shm else None))
        for (at, size), crc in zip(pieces_of([staged.size], staged.chunk), staged.sums):
            try:
                _send(conn, KVChunk(crc.result(timeout=max(0.0, held.expires - time.monotonic()))))
            except Exception as e:  # noqa: BLE001 - the device copy failed or took past the expiry
                _send(conn, KVChunk(error=f"the hand-off {pull.transfer_id!r} could not be staged: {e!r}"))
                return
            if not shm:
                conn.sendall(payload[at : at + size])
        _recv(conn, KVPulled)  # the device on the other side has its copy: the file may be reused

    def _serve_device(self, conn: socket.socket, pull: KVPull, held: Held) -> None:
        """The gathered pieces in an exported device buffer, held until the decode side has its copies."""
        try:
            exported = device_ipc.export_pieces([array for _, array in held.pieces])
        except device_ipc.IPCError as e:  # no buffer to export (all taken, or the driver refuses): the host path
            log.log(logging.INFO if "no export buffer" in str(e) else logging.WARNING,
                    "a K/V hand-off goes through host memory: %s", e)  # fmt: skip
            self._serve_host(conn, pull, held)
            return
        except Exception as e:  # noqa: BLE001 - e.g. the gather failed on the device: said, not adopted
            _send(conn, KVOffer(error=f"the hand-off {pull.transfer_id!r} could not be gathered: {e!r}"))
            return
        try:
            try:
                sums = device_ipc.checksums([(array, real) for real, array in held.pieces])
            except Exception as e:  # noqa: BLE001 - said, not adopted
                _send(conn, KVOffer(error=f"the hand-off {pull.transfer_id!r} could not be checksummed: {e!r}"))
                return
            pieces = [KVDevicePiece(exported.handle, offset, array.nbytes, array.shape[0], real, checksum)
                      for (real, array), offset, checksum in zip(held.pieces, exported.offsets, sums)]  # fmt: skip
            _send(conn, self._offer(held, chunk=held.layout.block_bytes, device=pieces))
            _recv(conn, KVPulled)  # copied: the buffer may be reused
        finally:
            exported.release()

    def close(self) -> None:
        """Stop accepting: shutting the socket down wakes the thread blocked in accept (closing it alone does not)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected or already shut
        self.sock.close()


# -- the decode side -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pulled:
    layout: KVLayout
    rows: list  # one per block: what `load` made of it (device rows, or host copies)
    num_tokens: int
    prompt_ids: list[int]
    times: dict[str, float]  # seconds: "channel" (offer, bytes in, checksums), "h2d" (in `load`, device copies done);
    # device to device: "d2d_offer" (until the offer: the prefill side's copy into its export buffer and checksums),
    # "d2d_copy" (the copies here and their checksums)


def host_rows(layout: KVLayout, rows: np.ndarray) -> list[np.ndarray]:
    """`pull`'s default load: the rows copied out of the payload (which is reused once the pull answers)."""
    return list(rows.copy())


@dataclasses.dataclass
class _Mapped:
    ino: int
    whole: np.ndarray  # the file's whole mapping
    unpin: object = None  # undoes its page-locking for the devices' DMA
    users: int = 0  # pulls reading it now


class Mappings:
    """The decode side's mappings of the prefill side's shared-memory files, kept (at most `keep` idle ones) while
    their files exist: the prefill side reuses its files, so a later hand-off through the same file finds it mapped,
    its pages in this process's page tables (a new mapping is populated in one call, not faulted page by page) and,
    where the devices' runtime can map host memory (loader.dma_mapper), page-locked once: chunks then cross to the
    device by DMA straight from the file, no staging copy (block_copy.register_page_locked). A mapping in use by a
    pull is never unmapped."""

    def __init__(self, keep: int = 8, pin=None, find_pin: bool = True):
        self.keep, self._pin, self._find_pin = keep, pin, find_pin and pin is None
        self._maps: collections.OrderedDict[str, _Mapped] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _pinner(self):
        if self._find_pin:
            from rtpjax.loading.loader import dma_mapper

            self._pin, self._find_pin = dma_mapper(jax.local_devices()), False
        return self._pin

    def get(self, path: str, size: int) -> np.ndarray:
        """The first `size` bytes of the file, leased until `give_back(path)`."""
        pin = self._pinner()
        try:
            fd = os.open(path, os.O_RDWR if pin is not None else os.O_RDONLY)  # page-locking needs writable pages
        except PermissionError:
            pin, fd = None, os.open(path, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if st.st_size < size:
                raise TransferError(f"the shared-memory file {path} is short")
            with self._lock:
                kept = self._maps.get(path)
                if kept is not None and kept.ino == st.st_ino and kept.whole.size >= size:
                    kept.users += 1
                    self._maps.move_to_end(path)
                    return kept.whole[:size]
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if pin is not None else 0)
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            whole = np.frombuffer(mmap.mmap(fd, st.st_size, flags=flags, prot=prot), np.uint8)
        finally:
            os.close(fd)
        mapped = _Mapped(st.st_ino, whole, pin(whole) if pin is not None else None, users=1)
        if mapped.unpin is not None:
            block_copy.register_page_locked(whole)
        with self._lock:
            old = self._maps.pop(path, None)
            self._maps[path] = mapped
            gone = self._evict([old] if old is not None and not old.users else [])
        self._drop(gone)
        return whole[:size]

    def give_back(self, path: str) -> None:
        with self._lock:
            kept = self._maps.get(path)
            if kept is not None and kept.users:
                kept.users -= 1
            gone = self._evict([])
        self._drop(gone)

    def _evict(self, gone: list) -> list[_Mapped]:
        """Idle mappings of files removed or replaced, and the oldest idle ones past `keep` (under the lock)."""
        for path, m in list(self._maps.items()):
            try:
                alive = os.stat(path).st_ino == m.ino
            except OSError:
                alive = False
            if not alive and not m.users:
                gone.append(self._maps.pop(path))
        idle = [path for path, m in self._maps.items() if not m.users]
        for path in idle[: max(0, len(self._maps) - self.keep)]:
            gone.append(self._maps.pop(path))
        return gone

    @staticmethod
    def _drop(gone: list[_Mapped]) -> None:
        for m in gone:
            if m.unpin is not None:
                block_copy.unregister_page_locked(m.whole)
                m.unpin()

    def close(self) -> None:
        with self._lock:
            gone = [m for m in self._maps.values() if not m.users]
            self._maps = collections.OrderedDict((p, m) for p, m in self._maps.items() if m.users)
        self._drop(gone)


class Buffers:
    """Reused receive buffers for the TCP path (at most `keep` idle, `keep_bytes` in all, the largest that fit): a
    buffer is the pull's until it answers. A larger hand-off allocates its own and leaves it to the collector."""

    def __init__(self, keep: int = 2, keep_bytes: int = 1 << 30):
        self.keep, self.keep_bytes = keep, keep_bytes
        self._idle: list[np.ndarray] = []
        self._lock = threading.Lock()

    def lease(self, size: int) -> np.ndarray:
        with self._lock:
            fits = [b for b in self._idle if b.size >= size]
            if fits:
                best = min(fits, key=lambda b: b.size)
                self._idle.remove(best)
                return best[:size]
        return np.empty(size, np.uint8)

    def give_back(self, view: np.ndarray) -> None:
        whole = view.base if isinstance(view.base, np.ndarray) else view
        with self._lock:
            kept, total = [], 0
            for b in sorted([*self._idle, whole], key=lambda b: -b.size):
                if len(kept) < self.keep and total + b.size <= self.keep_bytes:
                    kept.append(b)
                    total += b.size
            self._idle = kept


MAPPINGS, BUFFERS = Mappings(), Buffers()


def _settle(rows: list) -> None:
    """Wait for the device copies started from a mapping before it may be unmapped (they may have failed)."""
    try:
        jax.block_until_ready(rows)
    except Exception as e:  # noqa: BLE001 - a failed copy no longer reads anything
        log.debug("a K/V copy failed while its pull gave up: %s", e)


def _arrive(sock: socket.socket, offer: KVOffer, load, payload: np.ndarray, rows: list) -> tuple[list[Future],
                                                                                                list[int], float]:
    """Each chunk of the payload as soon as the prefill side has staged it (its crc32 comes first, then, over TCP,
    its bytes into `payload`), checksummed on a pool thread while `load` takes its rows (into `rows`); the checksums
    computed and sent, and the seconds spent in `load`."""
    bb = offer.layout.block_bytes
    sums, sent, loading = [], [], 0.0
    for at, n in pieces_of(offer.sizes, offer.chunk):
        chunk = _recv(sock, KVChunk)
        if chunk.error is not None:
            raise TransferError(chunk.error)
        sent.append(chunk.checksum)
        piece = payload[at : at + n]
        if offer.shm_path is None:
            _recv_exact(sock, memoryview(piece))
        sums.append(POOL.submit(zlib.crc32, piece))
        began = time.perf_counter()
        rows += load(offer.layout, piece.reshape(-1, bb))
        loading += time.perf_counter() - began
    return sums, sent, loading


@dataclasses.dataclass
class DeviceLoad:
    """A "device" pull's destination: the device to copy to, and `take(layout, copied, pieces) -> rows`, which makes
    rows of the copied pieces (their first `real` rows each) and may give the copies back (device_ipc.give_back)."""

    device: object
    take: object


def device_pieces(pieces: list[KVDevicePiece], block_bytes: int, device, landed=lambda: None) -> list[jax.Array]:
    """Exported pieces copied device to device onto `device`, each uint8 [rows, block_bytes], checked against their
    device checksums (`landed()` is called in between: the peer's buffer is free); the caller gives them back
    (device_ipc.give_back) once it has taken their rows."""
    if any(p.nbytes != p.rows * block_bytes or not 0 < p.real <= p.rows for p in pieces) or \
            len({p.handle for p in pieces}) != 1:  # fmt: skip
        raise TransferError("the device pieces of the offer do not match its layout")
    try:
        rows = device_ipc.copy_in(pieces[0].handle, [(p.offset, (p.rows, block_bytes)) for p in pieces], np.uint8,
                                  device)  # fmt: skip
    except device_ipc.IPCError as e:
        raise DeviceCopyError(f"the device-to-device copy failed: {e}") from None
    landed()
    try:
        ok = device_ipc.checksums([(r, p.real) for r, p in zip(rows, pieces)]) == [p.checksum for p in pieces]
    except device_ipc.IPCError as e:
        ok, error = False, e
    else:
        error = None
    if not ok:
        device_ipc.give_back(rows)
        raise TransferError(f"the K/V arrived corrupted (device checksum mismatch){f': {error}' if error else ''}")
    return rows


def pull(host: str, port: int, transfer_id: str, channel: str, deadline: float, load=host_rows,
         load_device=None) -> Pulled:  # fmt: skip
    """The hand-off's K/V, checked against its checksums; TransferError (saying why) for anything else. `deadline`:
    time.monotonic() after which the pull gives up. `load(layout, rows uint8 [k, block_bytes]) -> k rows` takes each
    chunk as it arrives; it must copy (the shared-memory file is reused once the pull answers, which waits for every
    copy `load` started on a device). Channel "device" (this host; the prefill side may answer with a host path
    instead): the exported pieces are copied to `load_device` (a DeviceLoad), which takes their rows."""

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
            if offer.device:
                return _pull_device(sock, offer, load_device, remaining, began, f"{host}:{port}")
            size, rows = offer.sizes[0], []
            payload = MAPPINGS.get(offer.shm_path, size) if offer.shm_path is not None else BUFFERS.lease(size)
            try:
                sums, sent, loading = _arrive(sock, offer, load, payload, rows)
                arrived = time.perf_counter()
                jax.block_until_ready(rows)
                loading += time.perf_counter() - arrived
                sums = [f.result(timeout=remaining()) for f in sums]  # before the prefill may restage the file
                _send(sock, KVPulled(True))
                if offer.shm_path is None:
                    BUFFERS.give_back(payload)  # nothing reads it any more: rows are copies, checksums done
            finally:
                if offer.shm_path is not None:
                    _settle(rows)
                    MAPPINGS.give_back(offer.shm_path)
            remaining()  # arrived too late: stale, never adopted
    except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise TransferError(f"pulling K/V from {host}:{port} failed: {type(e).__name__}: {e}") from None
    if sums != sent:
        raise TransferError(f"the K/V from {host}:{port} arrived corrupted (checksum mismatch)")
    took = time.perf_counter() - began
    return Pulled(lay, rows, offer.num_tokens, offer.prompt_ids, {"channel": took - loading, "h2d": loading})


def _pull_device(sock: socket.socket, offer: KVOffer, load: DeviceLoad | None, remaining, began: float,
                 peer: str) -> Pulled:  # fmt: skip
    if load is None or sum(p.real for p in offer.device) != offer.num_blocks:
        raise TransferError(f"the device offer from {peer} cannot be taken here (no device copy, or pieces that do "
                            "not cover its blocks)")  # fmt: skip
    offered = time.perf_counter()
    copied = device_pieces(offer.device, offer.layout.block_bytes, load.device,
                           landed=lambda: _send(sock, KVPulled(True)))  # fmt: skip
    rows = load.take(offer.layout, copied, offer.device)
    remaining()  # arrived too late: stale, never adopted
    return Pulled(offer.layout, rows, offer.num_tokens, offer.prompt_ids, {"d2d_offer": offered - began,
                                                                           "d2d_copy": time.perf_counter() - offered})

"""The K/V hand-off channel: a prefill engine serves the K/V it holds, a decode engine pulls it.

One interface, two host-staged paths: over the TCP socket itself (any two hosts), or, when both engines run on one
host, through a file in shared memory (/dev/shm) that the prefill side writes and the decode side reads, the socket
carrying only the offer. Every payload travels with crc32s of its pieces (computed and checked on a thread pool: zlib
releases the GIL), so a corrupted transfer is refused, never adopted. A hand-off is served once: the first pull takes
it, whatever happens next; what nobody pulls is dropped when it expires.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import tempfile
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor

import msgspec

from rtpjax.distributed.messages import KVOffer, KVPull, KVPulled
from rtpjax.kv.host_blocks import KVBlocks

CHUNK = 16 << 20  # bytes per checksummed piece: enough pieces to keep the hashing threads busy
_POOL = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="rtpjax-kv-crc")
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class TransferError(Exception):
    """A pull that brought no usable K/V (the decode side recomputes the prompt)."""


def host_id() -> str:
    """Names this host: two engines with equal ids can hand K/V over through shared memory."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f"{socket.gethostname()}/{f.read().strip()}"
    except OSError:
        return socket.gethostname()


def checksums(parts, chunk: int = CHUNK) -> list[int]:
    """crc32 of each `chunk`-byte piece of each part (pieces never straddle two parts)."""
    pieces = [memoryview(p)[i : i + chunk] for p in parts for i in range(0, len(p), chunk)]
    return list(_POOL.map(zlib.crc32, pieces))


@dataclasses.dataclass
class Held:
    """A hand-off's K/V on the prefill side: `num_tokens` leading positions of `prompt_ids` in `kv`'s blocks."""

    kv: KVBlocks
    num_tokens: int
    prompt_ids: list[int]
    expires: float  # time.monotonic()


class HeldStore:
    """Hand-offs waiting for their decode engine; the server thread takes them, the engine loop expires them."""

    def __init__(self):
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def put(self, transfer_id: str, held: Held) -> None:
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


def _parts(kv: KVBlocks) -> list:
    return [kv.keys, kv.values] + ([kv.key_scales, kv.value_scales] if kv.layout.quantized else [])


# -- the prefill side ------------------------------------------------------------------------------------------------


class TransferServer:
    """Serves HeldStore's hand-offs on a TCP port, one thread per connection."""

    def __init__(self, store: HeldStore, host: str, port: int):
        self.store = store
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
            pull = _recv(conn, KVPull)
            held = self.store.take(pull.transfer_id)
            if held is None:
                _send(conn, KVOffer(error=f"no hand-off {pull.transfer_id!r} here (unknown, taken or expired)"))
                return
            parts = _parts(held.kv)
            offer = KVOffer(layout=held.kv.layout, num_blocks=held.kv.num_blocks, num_tokens=held.num_tokens,
                            prompt_ids=held.prompt_ids, sizes=[len(p) for p in parts], chunk=CHUNK,
                            checksums=checksums(parts))  # fmt: skip
            if pull.channel == "shm":
                path = os.path.join(_SHM_DIR, f"rtpjax-kv-{uuid.uuid4().hex}")
                with open(path, "xb") as f:
                    for part in parts:
                        f.write(part)
                offer.shm_path = path
                _send(conn, offer)
            else:
                _send(conn, offer)
                for part in parts:
                    conn.sendall(part)
            _recv(conn, KVPulled)  # the reader is done with the file (or the socket's bytes)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError):
            pass  # the decode side went away or spoke nonsense: it recomputes; what it took is dropped
        finally:
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            conn.close()

    def close(self) -> None:
        self.sock.close()


# -- the decode side -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pulled:
    kv: KVBlocks
    num_tokens: int
    prompt_ids: list[int]


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
            sock.settimeout(remaining())
            _send(sock, KVPull(transfer_id, channel))
            offer = _recv(sock, KVOffer)
            if offer.error is not None:
                raise TransferError(offer.error)
            payload = bytearray(sum(offer.sizes))
            if offer.shm_path is not None:
                with open(offer.shm_path, "rb") as f:
                    if f.readinto(payload) != len(payload):
                        raise TransferError(f"the shared-memory file {offer.shm_path} is short")
            else:
                sock.settimeout(remaining())
                _recv_exact(sock, memoryview(payload))
            _send(sock, KVPulled(True))
            remaining()  # arrived too late: stale, never adopted
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
        raise TransferError(f"pulling K/V from {host}:{port} failed: {type(e).__name__}: {e}") from None
    view, parts, at = memoryview(payload), [], 0
    for size in offer.sizes:
        parts.append(view[at : at + size])
        at += size
    if offer.chunk < 1 or checksums(parts, offer.chunk) != offer.checksums:
        raise TransferError(f"the K/V from {host}:{port} arrived corrupted (checksum mismatch)")
    kv = KVBlocks(offer.layout, offer.num_blocks, *parts)
    try:
        kv.arrays()
    except ValueError as e:
        raise TransferError(f"the K/V from {host}:{port} does not match its layout: {e}") from None
    return Pulled(kv, offer.num_tokens, offer.prompt_ids)

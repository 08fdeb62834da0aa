"""The prefill side's half of the K/V hand-off: a prompt's gathered rows staged in shared memory with their checksums.

`stage` waits (on a hand-off thread, never the engine loop) for each gathered piece's device-to-host copy (into pinned
host memory: block_copy.gather_packed) and copies it into a leased file of the ShmArena, chunk by chunk on a thread
pool, each chunk's crc32 computed from the same source bytes on another pool thread at the same time (numpy copies and
zlib release the GIL; crc32 was the fastest of zlib's and hashlib's checksums on this work, transfer_bench.py compares
it with adler32); a piece is staged while the next one is still crossing from the device. A chunk is announced once
both are done. Staged says what is ready as it becomes ready (the file first, then each chunk), so a pull follows
chunk by chunk. HeldStore keeps the hand-offs until they are pulled or expire; every way out gives the file back.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import tempfile
import threading
import time
import uuid
import zlib
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np

from rtpjax.kv.host_blocks import KVLayout

log = logging.getLogger("rtpjax")

CHUNK = 16 << 20  # bytes per checksummed piece: enough pieces to keep the threads busy, few enough to be cheap
POOL = ThreadPoolExecutor(min(16, os.cpu_count() or 1), thread_name_prefix="rtpjax-kv-io")  # copies, checksums
_STAGER = ThreadPoolExecutor(2, thread_name_prefix="rtpjax-kv-stage")  # runs stage(), which waits on POOL
SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
PREFIX = "rtpjax-kv-"


def pieces_of(sizes: list[int], chunk: int = CHUNK) -> list[tuple[int, int]]:
    """(offset, length) of each `chunk`-byte piece of a payload of parts of `sizes` (pieces never straddle parts)."""
    out, at = [], 0
    for size in sizes:
        out += [(at + i, min(chunk, size - i)) for i in range(0, size, chunk)]
        at += size
    return out


def _unlink(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass


def sweep_dead() -> None:
    """Remove the shared-memory files of engines that died (killed) before they could remove their own."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return
    for name in names:
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if name.startswith(PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _unlink(os.path.join(SHM_DIR, name))


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
        path = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}-{uuid.uuid4().hex}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(fd, 0, max(1, size))  # no room: an error now, not a SIGBUS in a writer or reader
                mapping = np.frombuffer(mmap.mmap(fd, max(1, size)), np.uint8)
            finally:
                os.close(fd)
        except OSError as e:
            _unlink(path)
            log.warning("a K/V hand-off goes over the socket: no room in %s for %d bytes (%s)", SHM_DIR, size, e)
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


def stage(staged: Staged, pieces, download=None) -> None:
    """Stage gathered pieces ((real rows, array [>= real, block_bytes]) in order, whose host copies may still be on
    their way, or are started here by `download`): each chunk is copied into the file and checksummed by a pool thread
    as soon as its rows are here."""
    try:
        path, payload = staged.arena.lease(staged.size)
    except BaseException as e:
        staged.fail(e)
        raise
    staged.leased.set_result((path, payload))
    bounds, landed, waited, jobs, at = pieces_of([staged.size], staged.chunk), [], 0.0, [], 0

    def parts(i: int, sources):
        """(destination, source) of each landed piece this chunk overlaps, in order."""
        start, size = bounds[i]
        for src_at, src in sources:
            lo, hi = max(start, src_at), min(start + size, src_at + src.size)
            if lo < hi:
                yield payload[lo:hi], src[lo - src_at : hi - src_at]

    def crc(i: int, sources) -> int:
        value = 0
        for _, src in parts(i, sources):
            value = zlib.crc32(src, value)  # chained: the crc32 of the whole chunk
        return value

    def one(i: int, sources, crc_of: Future) -> None:
        try:
            for dst, src in parts(i, sources):
                np.copyto(dst, src)
            staged.sums[i].set_result(crc_of.result())  # submitted before this job: running or done
        except BaseException as e:  # noqa: BLE001 - handed to the pull that waits on this chunk
            staged.sums[i].set_exception(e)

    try:
        if download is not None:  # the device rows are freed once their copies are under way (the list is ours)
            started = [(real, download(array)) for real, array in pieces]
            pieces.clear()
            pieces = started
        for real, array in pieces:
            t = time.perf_counter()
            host = np.asarray(array)[:real].reshape(-1)  # this piece's host copy (later ones keep coming meanwhile)
            waited += time.perf_counter() - t
            landed.append((at, host))
            at += host.size
            while len(jobs) < len(bounds) and sum(bounds[len(jobs)]) <= at:
                sources = list(landed)
                crc_of = POOL.submit(crc, len(jobs), sources)
                jobs.append(POOL.submit(one, len(jobs), sources, crc_of))
        t = time.perf_counter()
        futures.wait(jobs)
        staged.done.set_result((waited, time.perf_counter() - t))
    except BaseException as e:  # noqa: BLE001 - a failed device copy: every waiter hears of it
        futures.wait(jobs)  # no copy still writing into the file once it is back
        staged.fail(e)


@dataclasses.dataclass
class Held:
    """A hand-off on the prefill side: `num_tokens` leading positions of `prompt_ids` in `num_blocks` blocks. Its K/V
    is staged in host memory (`staged`, started at once, or by the first pull that needs it: `stage`), or still on the
    device as gathered (`pieces`: (real rows, array)), where a decode engine of this host may copy it device to device.
    A pull takes one of the two."""

    layout: KVLayout
    num_blocks: int
    num_tokens: int
    prompt_ids: list[int]
    expires: float  # time.monotonic()
    staged: Staged | None
    pieces: list | None = None
    stage: Callable[[], Staged] | None = None

    def host(self) -> Staged:
        """The host staging, started now if it was left to the first pull that needs it (the device rows go with it)."""
        if self.staged is None:
            self.staged, self.pieces = self.stage(), None
        return self.staged

    def release(self) -> None:
        """Give back what it holds: the staging's file, the device rows."""
        self.pieces = self.stage = None  # `stage` holds the device rows too
        if self.staged is not None:
            self.staged.release()


class HeldStore:
    """Hand-offs waiting for their decode engine; the server thread takes them, the engine loop expires them."""

    def __init__(self):
        self.arena = ShmArena()
        self._held: dict[str, Held] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._held)

    def device_bytes(self) -> int:
        """Bytes of the hand-offs held on the device (not staged)."""
        with self._lock:
            return sum(a.nbytes for h in self._held.values() if h.pieces for _, a in h.pieces)

    def stage(self, pieces, layout: KVLayout, download=None) -> Staged:
        """Start staging gathered pieces on a hand-off thread (`download` starts each piece's host copy there)."""
        staged = Staged(sum(real for real, _ in pieces) * layout.block_bytes, layout.block_bytes, self.arena)
        _STAGER.submit(stage, staged, pieces, download)
        return staged

    def put(self, transfer_id: str, held: Held) -> None:
        with self._lock:
            old = self._held.pop(transfer_id, None)
            self._held[transfer_id] = held
        if old is not None:
            old.release()

    def take(self, transfer_id: str) -> Held | None:
        """The hand-off, now the caller's to release; None if unknown, taken or expired."""
        with self._lock:
            held = self._held.pop(transfer_id, None)
        if held is not None and held.expires <= time.monotonic():
            held.release()
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
            held.release()
        return list(gone)

    def close(self) -> None:
        with self._lock:
            held, self._held = list(self._held.values()), {}
        for h in held:
            h.release()
        self.arena.close()

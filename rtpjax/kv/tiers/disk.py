"""The disk tier: one file per KV block under a folder bound to what produced the blocks; it survives restarts.

The folder is `<kv_disk_path>/<identity digest>/`, with the identity (model fingerprint, dtype, KV layout, block
size, tokenizer) spelled out in its manifest.json: an engine of another model, dtype, block size or tokenizer looks in
another folder and never reads these blocks. Each file holds a header (magic, the block's chained hash, the payload's
length and CRC-32) and the packed row. A file that is missing, truncated, corrupt or of another block is deleted and
reported as a miss (the block is recomputed, never loaded wrong); a write that fails (a full disk) drops the block.
Files are written whole under a temporary name and renamed, so a crash never leaves half a block under a real name.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import threading
import zlib
from pathlib import Path

import numpy as np

log = logging.getLogger("rtpjax")

MAGIC = b"RTPJAXKV"
HEADER = struct.Struct("<8s16sQI")  # magic, block hash, payload bytes, CRC-32 of the payload
SUFFIX = ".kv"


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


class DiskTier:
    name = "disk"

    def __init__(self, root: str, capacity_bytes: int, block_bytes: int, identity: dict):
        self.block_bytes, self.file_bytes = block_bytes, HEADER.size + block_bytes
        self.dir = Path(root) / identity_digest(identity)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".write-probe"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise ValueError(f"--kv-disk-path {root!r} is not writable: {e.strerror or e}") from None
        manifest = self.dir / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()) != identity:
            raise ValueError(f"--kv-disk-path: {manifest} describes other KV blocks than this engine makes")
        manifest.write_text(json.dumps(identity, indent=1, sort_keys=True))
        self.index: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # oldest first
        files = sorted(self.dir.glob(f"*/*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for path in files:
            try:
                self.index[bytes.fromhex(path.stem)] = None
            except ValueError:
                continue  # not one of ours
        free = shutil.disk_usage(self.dir).free + len(self.index) * self.file_bytes
        if capacity_bytes > free:
            raise ValueError(f"--kv-disk-size {capacity_bytes / 2**30:.2f} GiB is larger than the free space under "
                             f"{root!r} ({free / 2**30:.2f} GiB)")  # fmt: skip
        self.num_slots = capacity_bytes // self.file_bytes
        if self.num_slots < 1:
            raise ValueError(f"--kv-disk-size holds no KV block: {capacity_bytes} bytes < one block of "
                             f"{self.file_bytes}")  # fmt: skip
        self.lock = threading.Lock()
        self._made: set[str] = set()  # subfolders known to exist
        self.errors = 0  # corrupt, truncated or missing files read, and failed writes
        with self.lock:
            self._evict(0)
        if self.index:
            log.info("KV disk tier: %d blocks from earlier runs in %s", len(self.index), self.dir)

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.file_bytes

    @property
    def used_bytes(self) -> int:
        return len(self.index) * self.file_bytes

    def __contains__(self, h: bytes) -> bool:
        return h in self.index

    def path(self, h: bytes) -> Path:
        name = h.hex()
        return self.dir / name[:2] / (name + SUFFIX)

    def _evict(self, room: int) -> None:
        """Delete the least recently used files until `room` more fit (lock held)."""
        while self.index and len(self.index) + room > self.num_slots:
            old, _ = self.index.popitem(last=False)
            self.path(old).unlink(missing_ok=True)

    def write(self, h: bytes, row: np.ndarray) -> bool:
        """Store one packed block (False: it failed and is dropped, with a warning)."""
        with self.lock:
            if h in self.index:
                self.index.move_to_end(h)
                return True
            self._evict(1)
        path = self.path(h)
        tmp = path.with_suffix(f".tmp{threading.get_ident()}")
        try:
            header = HEADER.pack(MAGIC, h, row.nbytes, zlib.crc32(row))
            fd = self._create(tmp)
            try:
                written = os.writev(fd, [header, row])
            finally:
                os.close(fd)
            if written != len(header) + row.nbytes:
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(header) + row.nbytes} bytes)")
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self._fail(f"could not write KV block {h.hex()} to {path}: {e.strerror or e}; it is dropped")
            return False
        with self.lock:
            self.index[h] = None
        return True

    def _create(self, tmp: Path) -> int:
        """A new file's descriptor; its folder is made once (the writer's thread shares the GIL), and again if it
        went missing since (a cleaner emptied the path)."""
        if tmp.parent.name not in self._made:
            tmp.parent.mkdir(exist_ok=True)
            self._made.add(tmp.parent.name)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except FileNotFoundError:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    def read_into(self, h: bytes, out: np.ndarray) -> bool:
        """Read block `h` into `out` (uint8 [block_bytes]); False, with the file deleted, if it is not exactly the
        block that was written."""
        path = self.path(h)
        try:
            with open(path, "rb") as f:
                magic, got, size, crc = HEADER.unpack(f.read(HEADER.size).ljust(HEADER.size, b"\0"))
                ok = magic == MAGIC and got == h and size == out.nbytes
                ok = ok and f.readinto(memoryview(out)) == size and not f.read(1) and zlib.crc32(out) == crc
        except OSError as e:
            ok, why = False, e.strerror or str(e)
        else:
            why = "corrupt or truncated"
        if ok:
            with self.lock:
                if h in self.index:
                    self.index.move_to_end(h)
            return True
        with self.lock:
            self.index.pop(h, None)
        path.unlink(missing_ok=True)
        self._fail(f"KV block {h.hex()} in {path} is {why}; it is recomputed")
        return False

    def _fail(self, message: str) -> None:
        with self.lock:
            self.errors += 1
        log.warning("KV disk tier: %s", message)

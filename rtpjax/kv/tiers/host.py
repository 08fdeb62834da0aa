"""The host tier: KV blocks in host memory, one packed row each, least recently used evicted first.

One buffer of fixed-size rows, allocated once at start and page-locked where the devices' runtime can map it
(loader.dma_mapper): an onload then reads each row straight from it, with no staging copy. A row read by a transfer
in flight, or being filled by a disk read, is leased and never reused until given back.
"""

from __future__ import annotations

import collections
import threading

import numpy as np


class HostTier:
    name = "host"

    def __init__(self, capacity_bytes: int, block_bytes: int, pin=None):
        self.num_slots = capacity_bytes // block_bytes
        if self.num_slots < 1:
            raise ValueError(f"--kv-offloading-size holds no KV block: {capacity_bytes} bytes < one block of "
                             f"{block_bytes}")  # fmt: skip
        self.block_bytes = block_bytes
        self.buf = np.empty((self.num_slots, block_bytes), np.uint8)
        self.unpin = pin(self.buf) if pin is not None else None
        self.index: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # hash -> slot, oldest first
        self.hash_of: list[bytes | None] = [None] * self.num_slots
        self.leases = [0] * self.num_slots
        self.free = list(range(self.num_slots - 1, -1, -1))
        self.lock = threading.Lock()

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.block_bytes

    @property
    def used_bytes(self) -> int:
        return len(self.index) * self.block_bytes

    def __contains__(self, h: bytes) -> bool:
        return h in self.index

    def lease(self, h: bytes) -> int | None:
        """The slot holding `h`, leased (and now the most recently used), or None."""
        with self.lock:
            slot = self.index.get(h)
            if slot is not None:
                self.index.move_to_end(h)
                self.leases[slot] += 1
            return slot

    def reserve(self) -> int | None:
        """A leased slot for new content (a free one, else the least recently used one not leased), or None."""
        with self.lock:
            if self.free:
                slot = self.free.pop()
            else:
                slot = next((s for s in self.index.values() if not self.leases[s]), None)
                if slot is None:
                    return None
                del self.index[self.hash_of[slot]]
                self.hash_of[slot] = None
            self.leases[slot] = 1
            return slot

    def publish(self, h: bytes, slot: int) -> bool:
        """The reserved slot now holds block `h` (the first copy wins: a second one is freed on release, and this
        returns False)."""
        with self.lock:
            if h in self.index:
                return False
            self.index[h] = slot
            self.hash_of[slot] = h
            return True

    def release(self, slot: int) -> None:
        """Give back one lease; a slot whose content never arrived (a failed read) becomes free."""
        with self.lock:
            self.leases[slot] -= 1
            assert self.leases[slot] >= 0, f"host slot {slot} released twice"
            self._free_if_unused(slot)

    def _free_if_unused(self, slot: int) -> None:
        if not self.leases[slot] and self.hash_of[slot] is None:
            self.free.append(slot)

    def put(self, h: bytes, row: np.ndarray) -> bool:
        """Copy a block in (False: every slot is leased; the block is dropped)."""
        slot = self.reserve()
        if slot is None:
            return False
        self.buf[slot] = row
        self.publish(h, slot)
        self.release(slot)
        return True

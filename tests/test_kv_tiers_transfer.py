"""KV tiers and their copies: a block still on its way down is waited for, not recomputed (the writer fills the row
a fetch reserved for it), and one that never lands fails the fetch's run; the write-down reads the gathered pieces in
place."""

import threading

import numpy as np

from rtpjax.kv.host_blocks import KVLayout
from rtpjax.kv.tiers.host import HostTier
from rtpjax.kv.tiers.manager import KVTiers

LAYOUT = KVLayout("float32", 16, 2, 2, 8)


class _Landing:
    """A gathered piece whose host copy arrives when `gate` is set (np.asarray waits for it, as for a device copy)."""

    def __init__(self, rows: np.ndarray, gate: threading.Event):
        self.rows, self.gate = rows, gate

    def __array__(self, dtype=None, copy=None):
        assert self.gate.wait(30)
        return self.rows


def _tiers(slots: int = 8, max_pending: int | None = None) -> KVTiers:
    return KVTiers(LAYOUT, HostTier(slots * LAYOUT.block_bytes, LAYOUT.block_bytes), None, "swap", max_pending)


def test_fetch_waits_for_blocks_on_their_way_down():
    tiers = _tiers()
    rows = np.random.default_rng(0).integers(0, 256, (3, LAYOUT.block_bytes), dtype=np.uint8)
    hashes = [bytes([i]) * 16 for i in range(3)]
    gate = threading.Event()
    try:
        for b, h in enumerate(hashes):
            tiers.write_down(b, h)
        tiers.dispatch(lambda blocks: [(len(blocks), _Landing(rows, gate))])
        fetch = tiers.fetch(hashes, 0)
        assert fetch is not None and not fetch.ready, "blocks on their way down were not waited for"
        gate.set()
        tiers.flush()
        assert fetch.ready and fetch.valid == 3
        packed, lookup = tiers.take(fetch, 0, 3)
        np.testing.assert_array_equal(np.stack(packed.rows), rows)
        assert (lookup.from_host, lookup.from_disk) == (3, 0)
        tiers.release(packed)
        assert not any(tiers.host.leases) and not tiers.awaited and not tiers.inflight
    finally:
        gate.set()
        tiers.close()


def test_a_block_that_never_lands_ends_the_run():
    """The writer's backlog is full: the second block is dropped, the fetch waiting for it gets the first only."""
    tiers = _tiers(max_pending=1)
    rows = np.random.default_rng(1).integers(0, 256, (1, LAYOUT.block_bytes), dtype=np.uint8)
    hashes = [b"a" * 16, b"b" * 16]
    gate = threading.Event()
    try:
        for b, h in enumerate(hashes):
            tiers.write_down(b, h)
        fetch = tiers.fetch(hashes, 0)  # queued, not yet dispatched: both in flight
        assert fetch is not None and not fetch.ready
        tiers.dispatch(lambda blocks: [(len(blocks), _Landing(rows, gate))])  # keeps one, drops the other
        gate.set()
        tiers.flush()
        assert fetch.ready and fetch.valid == 1
        packed, _ = tiers.take(fetch, 0, 2)
        np.testing.assert_array_equal(packed.rows[0], rows[0])
        tiers.release(packed)
        assert not any(tiers.host.leases) and not tiers.awaited
    finally:
        gate.set()
        tiers.close()


def test_a_dropped_fetch_gives_back_rows_still_awaited():
    tiers = _tiers()
    rows = np.zeros((1, LAYOUT.block_bytes), np.uint8)
    gate = threading.Event()
    try:
        tiers.write_down(0, b"c" * 16)
        tiers.dispatch(lambda blocks: [(len(blocks), _Landing(rows, gate))])
        fetch = tiers.fetch([b"c" * 16], 0)
        tiers.drop(fetch)
        gate.set()
        tiers.flush()
        assert not any(tiers.host.leases) and b"c" * 16 in tiers.host
    finally:
        gate.set()
        tiers.close()

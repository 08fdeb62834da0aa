"""The hand-off channel's host copies, no engines: the decode side maps a reused staging file once (later pulls find
it mapped), receives over TCP into a reused buffer, and still refuses a corrupted payload on either path."""

import time

import numpy as np
import pytest

from rtpjax.disagg import channel, staging
from rtpjax.kv.host_blocks import KVLayout

LAYOUT = KVLayout("bfloat16", 4, 2, 2, 8)


@pytest.fixture
def served(monkeypatch):
    monkeypatch.setattr(staging, "CHUNK", 2 * LAYOUT.block_bytes)
    monkeypatch.setattr(channel, "MAPPINGS", channel.Mappings())
    monkeypatch.setattr(channel, "BUFFERS", channel.Buffers())
    store = staging.HeldStore()
    server = channel.TransferServer(store, "127.0.0.1", 0)
    yield store, server
    server.close()
    store.close()


def _offer(store, rows) -> staging.Staged:
    staged = store.stage([(len(rows), rows)], LAYOUT)
    store.put("t", staging.Held(LAYOUT, len(rows), 4 * len(rows), [1], time.monotonic() + 30, staged))
    return staged


def _pull(server, path):
    return channel.pull("127.0.0.1", server.port, "t", path, time.monotonic() + 30)


def _pull_fresh_rows(store, server, path, times):
    """Offer new rows and pull them back `times` times; each pull returns exactly what was offered."""
    for seed in range(times):
        rows = np.random.default_rng(seed).integers(0, 256, (5, LAYOUT.block_bytes), dtype=np.uint8)
        _offer(store, rows)
        got = _pull(server, path)
        np.testing.assert_array_equal(np.stack(got.rows), rows)
        _settle(store)


def _settle(store):
    for _ in range(100):  # the serving thread gives the file back just after the pull returns
        if store.arena._idle:
            return
        time.sleep(0.02)


def test_shm_pulls_map_a_reused_file_once(served, monkeypatch):
    store, server = served
    maps, real = [], channel.mmap.mmap
    def spy(*a, **k):
        if k.get("prot") == channel.mmap.PROT_READ:  # the decode side's (the prefill side maps its files writable)
            maps.append(a)
        return real(*a, **k)

    monkeypatch.setattr(channel.mmap, "mmap", spy)
    _pull_fresh_rows(store, server, "shm", times=3)
    assert len(maps) == 1, "each pull mapped the reused file again"


def test_tcp_pulls_reuse_the_receive_buffer(served, monkeypatch):
    store, server = served
    leased, lease = [], channel.BUFFERS.lease
    monkeypatch.setattr(channel.BUFFERS, "lease", lambda size: leased.append(lease(size)) or leased[-1])
    _pull_fresh_rows(store, server, "tcp", times=3)
    assert len({b.ctypes.data for b in leased}) == 1, "each pull received into a fresh buffer"


@pytest.mark.parametrize("path", ["shm", "tcp"])
def test_a_flipped_byte_is_refused(served, path):
    store, server = served
    rows = np.random.default_rng(9).integers(0, 256, (5, LAYOUT.block_bytes), dtype=np.uint8)
    staged = _offer(store, rows)
    staged.done.result(timeout=10)
    _, payload = staged.leased.result()
    payload[3 * LAYOUT.block_bytes + 5] ^= 0x01  # after its checksum was taken
    with pytest.raises(channel.TransferError, match="checksum"):
        _pull(server, path)


def test_mappings_page_lock_once_and_never_unpin_in_use(tmp_path):
    """With a runtime that can page-lock host memory (faked here), a file's mapping is locked once and registered,
    so rows in it cross without staging; it is unlocked only once no pull reads it and it is past `keep` or gone."""
    from rtpjax.kv import block_copy

    events = []

    def pin(buf):
        events.append("pin")
        return lambda: events.append("unpin")

    path = tmp_path / "f"
    path.write_bytes(bytes(4096))
    maps = channel.Mappings(keep=0, pin=pin)
    view = maps.get(str(path), 1024)
    again = maps.get(str(path), 2048)
    assert events == ["pin"] and block_copy.is_page_locked(view) and block_copy.is_page_locked(again[1024:])
    assert not block_copy.is_page_locked(np.zeros(16, np.uint8))
    path.unlink()
    maps.give_back(str(path))
    assert events == ["pin"], "unlocked while a pull still reads it"
    maps.give_back(str(path))
    assert events == ["pin", "unpin"] and not block_copy.is_page_locked(view)


def test_receive_buffers_kept_are_bounded_in_count_and_bytes():
    buffers = channel.Buffers(keep=2, keep_bytes=300)
    small, mid, big = buffers.lease(100), buffers.lease(150), buffers.lease(400)
    for b in (big, small, mid):
        buffers.give_back(b)
    assert sorted(b.size for b in buffers._idle) == [100, 150]  # the 400-byte one is over the bound: not kept
    again = buffers.lease(120)
    assert again.size == 120 and again.base is not None and again.base.size == 150  # the smallest that fits, reused
    buffers.give_back(again)
    buffers.give_back(np.empty(200, np.uint8))  # 150 + 200 > 300: the two largest that fit are kept
    assert sorted(b.size for b in buffers._idle) == [100, 200]

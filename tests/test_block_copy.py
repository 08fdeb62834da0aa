"""block_copy's host copies: rows go down into pinned host memory (JAX's pinned_host kind, which the CPU backend has
too), come up in runs of back-to-back rows (one transfer per power-of-two piece, the rows kept in their piece, staged
through pinned memory when pageable), written one piece per dispatch, all compiled at warm-up; and the pageable path
where a backend lacks pinned_host."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kv import block_copy
from rtpjax.kv.block_copy import BlockCopier, OnDevice, gather, powers, rows_to_host, runs
from rtpjax.kv.host_blocks import KVLayout, PackedBlocks

LAYOUT = KVLayout("float32", 4, 2, 2, 8)


def _cache(num_blocks: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (LAYOUT.num_kv_heads, num_blocks, LAYOUT.block_size, LAYOUT.head_dim)
    return [tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2)) for _ in range(LAYOUT.num_layers)]


def _copier(cache, sizes=(4, 8, 16), land=None):
    copier = BlockCopier(cache, LAYOUT, list(sizes), land=land)
    for job in copier.jobs(cache, packed=True):
        job()
    return copier


class _Puts:
    """Counts the host pieces (rows together, or a row alone) jax.device_put moves, and to which memory kinds."""

    def __init__(self, monkeypatch):
        self.host_arrays, self.kinds, real = 0, [], jax.device_put

        def put(x, device=None, **kw):
            xs = x if isinstance(x, (list, tuple)) else [x]
            self.host_arrays += sum(isinstance(a, np.ndarray) for a in xs)
            self.kinds.append(getattr(device, "memory_kind", None))
            return real(x, device, **kw)

        monkeypatch.setattr(block_copy.jax, "device_put", put)


def test_powers_and_runs():
    assert powers(13, 8) == [8, 4, 1] and powers(20, 8) == [8, 8, 4] and powers(0, 8) == []
    buf = np.zeros((6, 16), np.uint8)
    other = np.zeros((2, 16), np.uint8)
    rows = [buf[0], buf[1], buf[2], buf[4], other[0], other[1], buf[5]]
    assert runs(rows) == [(0, 3, 1), (3, 1, 1), (4, 2, 1), (6, 1, 1)]
    backwards = [buf[5], buf[4], buf[3], buf[1], buf[2], other[1], other[0], buf[0]]  # a tier's tail-first writes
    assert runs(backwards) == [(0, 3, -1), (3, 2, 1), (5, 2, -1), (7, 1, 1)]


def test_gather_packed_lands_in_pinned_host_memory():
    cache = _cache()
    copier = _copier(cache)
    want = np.asarray(block_copy.pack(gather(cache, np.array([5, 2, 9]), copies=1)))
    (real, rows), = copier.gather_packed(cache, [5, 2, 9])  # fmt: skip
    assert rows.sharding.memory_kind == "pinned_host"
    np.testing.assert_array_equal(np.asarray(rows)[:real], want)


def test_rows_go_up_in_pieces_through_pinned_memory(monkeypatch):
    """13 back-to-back rows cross as 3 transfers (8 + 4 + 1) staged in pinned memory; the device rows are copies."""
    cache = _cache()
    copier = _copier(cache)
    host = np.random.default_rng(1).integers(0, 256, (13, LAYOUT.block_bytes), dtype=np.uint8)
    puts = _Puts(monkeypatch)
    rows = copier.put_rows(host)
    jax.block_until_ready(rows)
    sent = host.copy()
    host[:] = 0  # reused once they are ready (put_rows' contract): the device rows must not alias it
    assert puts.host_arrays == 3 and "pinned_host" in puts.kinds
    assert len(rows) == 13 and len({id(r.piece) for r in rows}) == 3  # the rows stay in the pieces they crossed in
    assert all(leaf is row.piece for leaf, row in zip(jax.tree.leaves(rows), rows))  # block_until_ready waits for them
    np.testing.assert_array_equal(_host(rows), sent)
    assert copier._copy_out._cache_size() == 0, "a copy compiled after warm-up"


@pytest.mark.parametrize("page_locked", [False, True])
@pytest.mark.parametrize("slots", [[0, 1, 2, 3, 7, 8, 4], [3, 2, 1, 0, 8, 7, 4]])  # runs forwards; backwards
def test_tier_rows_write_in_runs(monkeypatch, page_locked, slots):
    """Rows of a tier buffer in three runs (and one row of a piece already on the device, one of a piece on another
    device) land in the right blocks, one transfer per run piece, in either direction, one write per piece, nothing
    compiled after warm-up; page-locked rows are not staged."""
    cache = _cache()
    copier = _copier(cache)
    writes = _count_writes(copier)
    buf = np.random.default_rng(2).integers(0, 256, (12, LAYOUT.block_bytes), dtype=np.uint8)
    on_device = OnDevice(jax.device_put(buf[11:12]), 0)
    elsewhere = OnDevice(jax.device_put(buf[9:11], jax.devices()[3]), 1)  # row 10
    puts = _Puts(monkeypatch)
    packed = PackedBlocks(LAYOUT, [buf[s] for s in slots] + [on_device, elsewhere], page_locked=page_locked)
    blocks = [10, 3, 17, 4, 21, 6, 12, 0, 9]
    cache = copier.write_packed(cache, blocks, packed)
    assert puts.host_arrays == 3  # [0..3], [7, 8], [4]
    assert ("pinned_host" in puts.kinds) != page_locked
    assert sorted(writes) == [1, 1, 2, 2, 4]  # a write per piece: the three host pieces and the two device ones
    got = np.asarray(block_copy.pack(gather(cache, np.array(blocks), copies=1)))
    np.testing.assert_array_equal(got, buf[slots + [11, 10]])
    assert copier._write_piece._cache_size() == 0 and copier._copy_out._cache_size() == 0


def _count_writes(copier) -> list[int]:
    """The rows of each piece a compiled write was dispatched with (appended per call)."""
    sizes = []
    for key, executable in list(copier._compiled.items()):
        if key[0] == "write_piece":
            copier._compiled[key] = lambda c, ids, piece, take, executable=executable: (
                sizes.append(piece.shape[0]) or executable(c, ids, piece, take))  # fmt: skip
    return sizes


def test_rows_of_one_piece_go_to_any_blocks_in_one_write():
    """Rows of one piece taken out of order, one of them into two blocks (more entries than the piece's rows: two
    writes), land where asked; a row of another type or a row count that differs from the blocks' is refused."""
    cache = _cache()
    copier = _copier(cache)
    writes = _count_writes(copier)
    host = np.random.default_rng(8).integers(0, 256, (4, LAYOUT.block_bytes), dtype=np.uint8)
    rows = copier.put_rows(host)
    assert len({id(r.piece) for r in rows}) == 1
    packed = PackedBlocks(LAYOUT, [rows[2], rows[0], rows[3], rows[1], rows[2]])
    blocks = [7, 1, 20, 11, 5]
    cache = copier.write_packed(cache, blocks, packed)
    assert writes == [4, 4]
    got = np.asarray(block_copy.pack(gather(cache, np.array(blocks), copies=1)))
    np.testing.assert_array_equal(got, host[[2, 0, 3, 1, 2]])
    with pytest.raises(TypeError, match="host rows .numpy. or block_copy.OnDevice rows"):
        copier.write_packed(cache, [1], PackedBlocks(LAYOUT, [jnp.asarray(host[0])]))
    with pytest.raises(ValueError, match="2 packed rows for 1 blocks"):
        copier.write_packed(cache, [1], PackedBlocks(LAYOUT, rows[:2]))
    assert copier.write_packed(cache, [], PackedBlocks(LAYOUT, rows[:2]), []) is cache  # nothing left to load
    assert writes == [4, 4]
    mixed = [rows[3], host[1], rows[0]]  # device rows and a host row, as one host array (a hand-off's relayout)
    np.testing.assert_array_equal(rows_to_host(mixed), host[[3, 1, 0]])


def test_pieces_of_a_hand_offs_buckets_compile_nothing_and_others_are_said(caplog):
    """A hand-off's pieces come in the gather buckets, past the landing piece size: copied out and written by
    executables compiled at warm-up; a piece of a size no bucket has (an engine of other buckets) compiles at once,
    said once."""
    cache = _cache(num_blocks=40)
    copier = BlockCopier(cache, LAYOUT, [4, 8, 16, 32], max_piece=8)
    for job in copier.jobs(cache, packed=True):
        job()
    host = np.random.default_rng(10).integers(0, 256, (32, LAYOUT.block_bytes), dtype=np.uint8)
    rows = copier.unstage([jnp.asarray(host)])
    cache = copier.write_packed(cache, list(range(32)), PackedBlocks(LAYOUT, rows))
    assert copier._copy_out._cache_size() == 0 and copier._write_piece._cache_size() == 0
    np.testing.assert_array_equal(np.asarray(block_copy.pack(gather(cache, np.arange(32), copies=1))), host)
    with caplog.at_level("WARNING", logger="rtpjax"):
        for _ in range(2):
            odd = copier.unstage([jnp.asarray(host[:12])])
            cache = copier.write_packed(cache, list(range(12)), PackedBlocks(LAYOUT, odd))
    assert caplog.text.count("a piece of 12 rows compiles copy_out now") == 1
    assert caplog.text.count("a piece of 12 rows compiles write_piece now") == 1


def test_staged_rows_count_the_whole_landing_pieces(monkeypatch):
    """A staging holds each landing piece whole until its rows are written (the last one rounded up to a power of
    two): what the tiers count against their staging bound. Without landing arrays the rows are exact."""
    _HostCopies(monkeypatch)
    cache = _cache()
    landed = _copier(cache, land=True)
    assert landed.piece == 16
    assert [landed.staged_rows(n) for n in (1, 9, 16, 17, 23, 32)] == [1, 16, 16, 17, 24, 32]
    buf = np.random.default_rng(11).integers(0, 256, (9, LAYOUT.block_bytes), dtype=np.uint8)
    got = landed.stage(list(buf), page_locked=True)
    assert {r.piece.shape[0] for r in got} == {landed.staged_rows(9)}
    assert [_copier(cache).staged_rows(n) for n in (9, 23)] == [9, 23]


def _host(rows) -> np.ndarray:
    return rows_to_host(rows)


def test_bad_host_row_is_refused():
    cache = _cache()
    copier = _copier(cache)
    with pytest.raises(ValueError, match="packed host row must be uint8"):
        copier.write_packed(cache, [1], PackedBlocks(LAYOUT, [np.zeros(LAYOUT.block_bytes, np.float32)]))


def test_without_pinned_host_the_pageable_path_works(monkeypatch, caplog):
    """A backend without pinned_host: rows go down through pageable memory and up directly, contents equal."""
    monkeypatch.setattr(block_copy, "pinned", lambda sharding: None)
    cache = _cache()
    copier = _copier(cache)
    (real, rows), = copier.gather_packed(cache, [3, 4])  # fmt: skip
    assert rows.sharding.memory_kind == "device"
    host = np.asarray(rows)[:real].copy()
    up = copier.put_rows(host)
    np.testing.assert_array_equal(_host(up), host)


def test_transfer_bench_runs_tiny(tmp_path):
    """The GPU stage's K/V copy measurements, tiny, on CPU: every old path and its new one moves the bytes."""
    import json

    from rtpjax.benchmarks import transfer_bench

    out = tmp_path / "transfer.json"
    transfer_bench.main(["--size-mib", "4", "--kv-tokens", "64", "--layers", "2", "--repeats", "1", "--out", str(out)])
    kv = json.loads(out.read_text())["kv"]
    assert kv["pinned_host"] and kv["pinned_asarray_copies"] is False  # the CPU backend: a view of the pinned buffer
    for key in ("d2h_pageable", "d2h_pinned", "h2d_rows_per_row", "h2d_rows_pieces", "h2d_rows_pieces_pinned",
                "pd_old", "pd_new", "crc32_64MiB", "adler32_64MiB"):  # fmt: skip
        assert kv[key + "_GBps"] > 0, key


def test_rows_in_registered_page_locked_memory_are_not_staged(monkeypatch):
    """Rows inside memory registered as page-locked (a pinned shared-memory mapping) cross directly; once it is
    unregistered they are staged through pinned_host again."""
    cache = _cache()
    copier = _copier(cache)
    host = np.random.default_rng(3).integers(0, 256, (6, LAYOUT.block_bytes), dtype=np.uint8)
    puts = _Puts(monkeypatch)
    block_copy.register_page_locked(host)
    try:
        rows = copier.put_rows(host[1:5])
    finally:
        block_copy.unregister_page_locked(host)
    assert "pinned_host" not in puts.kinds and puts.host_arrays == 1
    np.testing.assert_array_equal(_host(rows), host[1:5])
    copier.put_rows(host[1:5])
    assert "pinned_host" in puts.kinds


def test_stage_returns_rows_in_order_whichever_way_they_lie(monkeypatch):
    """A KV tier's staging: rows lying backwards in its buffer (written down tail first) and a lone one cross as one
    transfer per run and come back as device rows in the order asked, copies of the host rows."""
    cache = _cache()
    copier = _copier(cache)
    buf = np.random.default_rng(4).integers(0, 256, (8, LAYOUT.block_bytes), dtype=np.uint8)
    slots = [6, 5, 4, 3, 0]
    puts = _Puts(monkeypatch)
    rows = copier.stage([buf[s] for s in slots])
    sent = buf.copy()
    buf[:] = 0
    assert puts.host_arrays == 2 and len({id(r.piece) for r in rows}) == 2
    np.testing.assert_array_equal(_host(rows), sent[slots])


class _HostCopies:
    """The driver calls a landing copy makes, done by memmove: on the CPU a device array's buffer is host memory;
    installed as the process's driver."""

    def __init__(self, monkeypatch):
        from rtpjax.disagg import device_ipc

        self.copies, self.synced = [], 0
        ok = lambda *a: 0  # noqa: E731
        self.cuInit = self.cuCtxSetCurrent = self.cuMemcpyDtoDAsync_v2 = self.cuIpcOpenMemHandle_v2 = ok
        self.cuMemGetAddressRange_v2 = ok
        self.cuDeviceGet = lambda dev, ordinal: setattr(dev._obj, "value", ordinal) or 0
        self.cuDevicePrimaryCtxRetain = lambda ctx, dev: setattr(ctx._obj, "value", 1) or 0
        self.cuStreamCreate = lambda out, flags: setattr(out._obj, "value", 1) or 0
        self.cuStreamSynchronize = lambda stream: setattr(self, "synced", self.synced + 1) or 0

        def copy_up(dst, src, nbytes, stream):
            self.copies.append(nbytes)
            ctypes.memmove(dst, src, nbytes)
            return 0

        def copy_down(dst, src, nbytes, stream):
            self.down.append(nbytes)
            if self.fail_down:
                return 1
            ctypes.memmove(dst, src, nbytes)
            return 0

        self.down, self.fail_down = [], False
        self.cuGetErrorString = lambda result, text: setattr(text._obj, "value", b"fake failure") or 0
        self.cuMemcpyHtoDAsync_v2, self.cuMemcpyDtoHAsync_v2 = copy_up, copy_down
        monkeypatch.setattr(device_ipc, "_DRIVER", [device_ipc._Driver(self)])


def test_downloads_land_in_the_tiers_rows_by_the_driver(monkeypatch, caplog):
    """Gathered rows go straight into host rows (a tier's), one copy per run of rows adjacent on both sides, rows
    asked to be skipped untouched; a failing driver copy is said once, and the same rows come by device_put."""
    cuda = _HostCopies(monkeypatch)
    cache = _cache()
    copier = _copier(cache, land=True)
    want = np.asarray(copier.gather_packed(cache, [3, 1, 4, 5, 9], download=False)[0][1])[:5]
    bb = LAYOUT.block_bytes
    buf = np.zeros((8, bb), np.uint8)
    (real, rows), = copier.gather_packed(cache, [3, 1, 4, 5, 9], download=False)  # fmt: skip
    dests = [buf[2], buf[3], None, buf[0], buf[1]]
    wait, copy = copier.download_into(rows, dests)
    assert wait >= 0 and copy >= 0 and cuda.down == [2 * bb, 2 * bb]  # rows 0-1 into 2-3, rows 3-4 into 0-1
    np.testing.assert_array_equal(buf[[2, 3, 0, 1]], want[[0, 1, 3, 4]])
    assert not buf[4:].any()
    with pytest.raises(ValueError, match="9 host rows for a piece of 8 rows"):
        copier.download_into(rows, dests + [None] * 4)
    cuda.fail_down, buf[:] = True, 0
    with caplog.at_level("WARNING", logger="rtpjax"):
        copier.download_into(rows, dests)
        copier.download_into(rows, dests)
    assert len(cuda.down) == 3 and caplog.text.count("downloads through the CUDA driver failed") == 1
    np.testing.assert_array_equal(buf[[2, 3, 0, 1]], want[[0, 1, 3, 4]])


def test_staged_rows_land_in_reused_arrays_by_the_driver(monkeypatch):
    """Where the CUDA driver can copy (faked: memmove into the CPU array's buffer), a staging copies each run of
    back-to-back rows into a landing array made at warm-up (three of a piece, one of each smaller size): one copy per
    run of rows back to back in either direction, no device_put; the rows come back in order as copies, and a second
    staging reuses the array once the first's copy out has run without changing the first's rows."""
    cuda = _HostCopies(monkeypatch)
    cache = _cache()
    copier = _copier(cache, land=True)
    made = [a.shape[0] for a, _ in copier._landing.arrays._idle]
    assert sorted(made) == [1, 2, 4, 8, 16, 16, 16]
    rng = np.random.default_rng(5)
    buf = rng.integers(0, 256, (40, LAYOUT.block_bytes), dtype=np.uint8)
    slots = [0, 1, 2, 9, 8, 7, 20]  # a forward run, a backward run, a lone row
    puts = _Puts(monkeypatch)
    first = copier.stage([buf[s] for s in slots], page_locked=True)
    sent = buf.copy()
    buf[:] = rng.integers(0, 256, buf.shape, dtype=np.uint8)
    bb = LAYOUT.block_bytes
    assert puts.host_arrays == 0 and cuda.copies == [3 * bb, 3 * bb, bb] and cuda.synced == 1
    times = copier.last_stage  # the copy's parts: enqueuing them is part of the copy
    assert 0 < times.enqueue <= times.copy and times.lease >= 0 and times.copy_out > 0
    np.testing.assert_array_equal(_host(first), sent[slots])
    assert all(r.piece is not a for r in first for a, _ in copier._landing.arrays._idle)  # copies, not the arrays
    guards = {id(guard) for _, guard in copier._landing.arrays._idle if guard is not None}
    assert {id(r.piece) for r in first} <= guards  # each array reused only once its copy out has run
    idle = [a for a, _ in copier._landing.arrays._idle]
    second = copier.stage([buf[s] for s in range(18, 40)], page_locked=True)  # 22 rows: a piece of 16, then 8
    assert {id(a) for a, _ in copier._landing.arrays._idle} == {id(a) for a in idle}, "landing arrays were made anew"
    np.testing.assert_array_equal(_host(second), buf[18:40])
    np.testing.assert_array_equal(_host(first), sent[slots])  # untouched by the reuse


def test_the_next_pieces_copy_runs_while_a_copy_out_is_dispatched(monkeypatch):
    """A staging of several pieces copies piece i + 1 (on the landing thread) while piece i's copy out is dispatched,
    the rows coming back in order; a copy out that fails gives back every landing array, the one copied ahead too."""
    import time

    cuda = _HostCopies(monkeypatch)
    cache = _cache()
    copier = _copier(cache, land=True)
    piece, idle = copier.piece, len(copier._landing.arrays._idle)
    buf = np.random.default_rng(7).integers(0, 256, (3 * piece, LAYOUT.block_bytes), dtype=np.uint8)
    unstage, copied, fail = copier.unstage, [], []

    def copy_out(arrays):
        ahead = min(len(copied) + 2, 3)  # copies made by now if the next piece's runs ahead (one copy a piece)
        deadline = time.monotonic() + 2
        while len(cuda.copies) - base < ahead and time.monotonic() < deadline:
            time.sleep(0.001)
        copied.append(len(cuda.copies) - base)
        if fail and len(copied) == 2:
            raise RuntimeError("copy out failed")
        return unstage(arrays)

    monkeypatch.setattr(copier, "unstage", copy_out)
    base = 0
    got = copier.stage([buf[s] for s in range(3 * piece)], page_locked=True)
    assert copied == [2, 3, 3]
    np.testing.assert_array_equal(_host(got), buf)
    copied[:], fail[:], base = [], [True], 3
    with pytest.raises(RuntimeError, match="copy out failed"):
        copier.stage([buf[s] for s in range(3 * piece)], page_locked=True)
    assert copied == [2, 3] and len(copier._landing.arrays._idle) == idle  # every array back, none made anew


def test_a_tier_writes_down_through_the_driver_into_its_rows(monkeypatch):
    """KVTiers with a copier whose downloads go by the driver (faked by memmove): evicted blocks land in host-tier
    rows, one copy per run of rows adjacent on both sides, with the cache's contents; no row stays leased."""
    from rtpjax.kv.tiers.host import HostTier
    from rtpjax.kv.tiers.manager import KVTiers

    cuda = _HostCopies(monkeypatch)
    cache = _cache()
    copier = _copier(cache, land=True)
    tiers = KVTiers(LAYOUT, HostTier(8 * LAYOUT.block_bytes, LAYOUT.block_bytes), None)
    tiers.use_copier(copier, max_staged=8, max_gathered=8)
    want = np.asarray(block_copy.pack(gather(cache, np.array([5, 2, 7]), copies=1)))
    hashes = [bytes([b]) * 16 for b in (5, 2, 7)]
    for block, h in zip((5, 2, 7), hashes):
        tiers.write_down(block, h)
    tiers.dispatch(lambda blocks: copier.gather_packed(cache, blocks, download=False))
    assert tiers.flush() and not any(tiers.host.leases)
    assert cuda.down == [3 * LAYOUT.block_bytes]  # three fresh rows side by side: one copy
    for h, row in zip(hashes, want):
        np.testing.assert_array_equal(tiers.host.buf[tiers.host.index[h]], row)
    tiers.close()


@pytest.mark.parametrize("sharded", [False, True])
def test_first_runs_call_every_copy_once_and_change_nothing(sharded):
    """Warm-up runs each compiled packed copy once (its first run does the device's one-time setup, which a load
    would otherwise wait for mid-serving), tensor-parallel caches too; the cache's contents stay as they were."""
    cache = _cache()
    if sharded:
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tp",))
        heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tp"))
        cache = [tuple(jax.device_put(a, heads) for a in layer) for layer in cache]
    before = [tuple(np.asarray(a) for a in layer) for layer in cache]
    copier = _copier(cache)
    calls = {}
    for key, executable in list(copier._compiled.items()):
        copier._compiled[key] = lambda *a, key=key, executable=executable: (
            calls.__setitem__(key, calls.get(key, 0) + 1) or executable(*a))  # fmt: skip
    cache = copier.first_runs(cache)
    packed = {key for key in copier._compiled if key[0] in ("gather_packed", "write_piece", "copy_out")}
    assert calls == {key: 1 for key in packed}  # the tiers' copies (a request's move: its own, unpacked ones)
    assert {kind for kind, _ in calls} == {"gather_packed", "write_piece", "copy_out"}
    for layer, was in zip(cache, before):
        for a, b in zip(layer, was):
            np.testing.assert_array_equal(np.asarray(a), b)
    if sharded:
        assert cache[0][0].sharding.is_equivalent_to(heads, 4)


def test_first_runs_stage_a_row_where_rows_land_by_the_driver(monkeypatch):
    cuda = _HostCopies(monkeypatch)
    cache = _cache()
    copier = _copier(cache, land=True)
    copier.first_runs(cache)
    assert cuda.copies == cuda.down == [LAYOUT.block_bytes] and cuda.synced == 2  # a row up, a row down


class _Guard:
    """A landing array's last reader: not run until `ran`."""

    def __init__(self):
        self.ran, self.waited = False, 0

    def is_ready(self) -> bool:
        return self.ran

    def block_until_ready(self):
        self.waited += 1
        self.ran = True
        return self


def test_a_landing_array_is_reused_only_once_its_reader_has_run():
    """An idle array whose copy out has run is taken first; with none, the oldest waits for its reader (a new one would
    wait as long, for every step queued); only a size with no idle array at all gets a new one."""
    from rtpjax.kv.landing import Landing

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    landing = Landing(device, 8, keep_rows=16)
    landing.warm([4, 4])
    a, b = landing.lease(4), landing.lease(4)
    pending, ran = _Guard(), _Guard()
    ran.ran = True
    landing.give_back(a, pending)  # the oldest, its reader still queued
    landing.give_back(b, ran)
    assert landing.lease(4) is b and pending.waited == 0  # the one whose reader ran, without waiting
    assert landing.lease(4) is a and pending.waited == 1  # then the oldest, once its reader has run
    c = landing.lease(4)  # none idle: a new one
    assert c is not a and c is not b and c.shape == (4, 8)
    landing.give_back(a, None)
    landing.give_back(b, None)
    landing.give_back(c, None)
    landing.give_back(landing.lease(8), None)
    assert sum(x.shape[0] for x, _ in landing.arrays._idle) <= 16  # idle past keep_rows dropped, oldest first
    assert all(x is not a for x, _ in landing.arrays._idle)


def test_landing_copies_over_several_streams_land_every_byte(monkeypatch):
    """A landing whose copies go over 2 streams a device (device_ipc.split_moves): a run of rows crosses as page
    pieces on alternate streams, and the array holds exactly the host rows."""
    from rtpjax.kv import landing as landing_mod

    cuda = _HostCopies(monkeypatch)
    landing = landing_mod.Landing(jax.sharding.SingleDeviceSharding(jax.devices()[0]), 4096, keep_rows=8, streams=2)
    rows = np.random.default_rng(9).integers(0, 256, (3, 4096), dtype=np.uint8)
    array = landing.lease(4)
    landing.copy(array, landing_mod.moves(list(rows), [(0, 3, 1)]))
    np.testing.assert_array_equal(np.asarray(array)[:3], rows)
    assert cuda.copies == [8192, 4096] and cuda.synced == 2  # two pieces, two streams waited for


def test_staged_rows_land_on_every_device_of_a_tensor_parallel_cache(monkeypatch):
    """Under tensor parallelism the rows land whole on each device of the cache (each then takes its heads)."""
    cuda = _HostCopies(monkeypatch)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tp",))
    heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tp"))
    cache = [tuple(jax.device_put(a, heads) for a in layer) for layer in _cache()]
    copier = _copier(cache, land=True)
    buf = np.random.default_rng(6).integers(0, 256, (12, LAYOUT.block_bytes), dtype=np.uint8)
    slots = [3, 4, 5, 1, 0, 9]
    rows = copier.stage([buf[s] for s in slots], page_locked=True)
    assert len(cuda.copies) == 2 * 3 and cuda.synced == 2  # 3 copies (1 forward run, 1 backward run, 1 lone) each
    for row, s in zip(rows, slots):
        assert len(row.piece.addressable_shards) == 2
        for shard in row.piece.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data)[row.index], buf[s])

"""KV tiers: preemption by swap or recompute (and auto, by the measured costs), the writer's bounded backlog, and tier
hits counted once per admission."""

import threading
import time

import numpy as np
import pytest
from conftest import ENGINE_ARGS

from rtpjax import LLM, SamplingParams
from rtpjax.engine.scheduler import Scheduler
from rtpjax.engine.sequence import Sequence
from rtpjax.kv.block_copy import into_rows
from rtpjax.kv.block_pool import BlockPool, prefix_hashes
from rtpjax.kv.host_blocks import KVLayout
from rtpjax.kv.tiers.disk import DiskTier
from rtpjax.kv.tiers.host import HostTier
from rtpjax.kv.tiers import manager
from rtpjax.kv.tiers.manager import Costs, KVTiers, should_load

LAYOUT = KVLayout("float32", 16, 2, 2, 8)


def _row(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, LAYOUT.block_bytes, dtype=np.uint8)


# -- the decision ------------------------------------------------------------------------------------------------------


def test_should_load_follows_the_policy_and_the_costs():
    fast_load = Costs(onload_bytes_per_s=1e12, prefill_tokens_per_s=1e3)  # a block loads in ns, recomputes in ms
    slow_load = Costs(onload_bytes_per_s=1e3, prefill_tokens_per_s=1e12)
    args = (LAYOUT.block_bytes, LAYOUT.block_size, 3, 1)
    for preempted in (False, True):
        assert should_load("swap", preempted, slow_load, *args)
        assert should_load("auto", preempted, fast_load, *args)
        assert not should_load("auto", preempted, slow_load, *args)
        assert should_load("auto", preempted, None, *args)  # not measured yet (warm-up)
    assert not should_load("recompute", True, fast_load, *args)
    assert should_load("recompute", False, fast_load, *args) and not should_load("recompute", False, slow_load, *args)
    # a slow disk tips a load that pays from host memory
    disk = Costs(onload_bytes_per_s=1e9, prefill_tokens_per_s=1e6, disk_bytes_per_s=1e3)
    assert should_load("auto", False, disk, LAYOUT.block_bytes, LAYOUT.block_size, 4, 0)
    assert not should_load("auto", False, disk, LAYOUT.block_bytes, LAYOUT.block_size, 3, 1)


def test_slow_loads_turn_loading_off_until_the_estimate_recovers():
    """Loads whose transfers run far slower than the start measured make recomputing the choice (a tier is not
    slower than recomputing); with no load to measure, the estimate returns toward the start's and loads are tried
    again; fast loads keep it up."""
    bb, size = LAYOUT.block_bytes, LAYOUT.block_size
    costs = Costs(onload_bytes_per_s=4e9, prefill_tokens_per_s=size * 1e9 / bb)  # recompute = loading at 1 GB/s
    assert costs.load_pays(bb, size, 4, 0, now=0.0)
    for t in range(12):  # transfers at 0.1 GB/s
        costs.observe_onload(4 * bb, 4 * bb / 1e8, now=float(t))
    assert costs.onload_rate(now=12.0) < 1e9 and not costs.load_pays(bb, size, 4, 0, now=12.0)
    assert not costs.load_pays(bb, size, 4, 0, now=12.0), "declining alone moved the estimate"
    assert costs.load_pays(bb, size, 4, 0, now=12.0 + 6 * manager.ONLOAD_HALF_LIFE_S)  # unmeasured for a while
    assert costs.onload_rate(now=1e6) == pytest.approx(4e9)
    for t in range(20):  # fast transfers: the estimate follows them up
        costs.observe_onload(4 * bb, 4 * bb / 8e9, now=100.0 + t)
    assert costs.onload_rate(now=120.0) > 6e9 and costs.load_pays(bb, size, 4, 0, now=120.0)
    costs.observe_disk(bb, bb / 1e9)  # the first disk read sets its rate, later ones move it
    costs.observe_disk(bb, bb / 2e9)
    assert costs.disk_bytes_per_s == pytest.approx(1e9 + manager.DISK_WEIGHT * 1e9)


def test_each_staging_measures_the_onload():
    """The onload thread times each fetch's transfer into the costs: a transfer far slower than the start measured
    lowers the estimate at once."""
    from test_kv_tiers_transfer import _Copier, _tiers

    tiers, copier = _tiers(), _Copier()
    tiers.use_copier(copier, max_staged=4, max_gathered=8)
    tiers.costs = Costs(onload_bytes_per_s=1e12, prefill_tokens_per_s=1.0)
    rows = np.random.default_rng(5).integers(0, 256, (2, LAYOUT.block_bytes), dtype=np.uint8)
    hashes = [bytes([i + 40]) * 16 for i in range(2)]
    try:
        for h, row in zip(hashes, rows):
            tiers.host.put(h, row)
        fetch = tiers.fetch(hashes, 0)
        time.sleep(0.2)  # the transfer is in flight until the gate opens
        copier.gate.set()
        deadline = time.monotonic() + 30
        while not tiers.poll(fetch):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert tiers.costs.observed_at is not None and tiers.costs.onload_rate() < 0.9e12
        assert "onload" in tiers.report()
        tiers.take(fetch, 0, 2)
    finally:
        copier.gate.set()
        tiers.close()


def _measured(seconds: dict, disk=None):
    """measure_costs over a runner whose copies and steps take `seconds` (lists, one per call)."""
    from types import SimpleNamespace

    from rtpjax.kv.tiers.build import measure_costs

    def timed(name, result):
        def call(*_):
            time.sleep(seconds[name].pop(0))
            return result

        return call

    copier = SimpleNamespace(sizes=[4], num_blocks=100)
    copier.write_packed = timed("write_packed", np.zeros(1))
    runner = SimpleNamespace(copier=copier, cache=np.zeros(1), token_buckets=[64], _batch=lambda *_: (),
                             run_step=timed("run_step", np.zeros(1)), _seqs_for=lambda n: n)  # fmt: skip
    tiers = SimpleNamespace(host=HostTier(8 * LAYOUT.block_bytes, LAYOUT.block_bytes), layout=LAYOUT, disk=disk,
                            block_bytes=LAYOUT.block_bytes, block_size=LAYOUT.block_size)  # fmt: skip
    return measure_costs(runner, tiers)


def test_measured_costs_are_the_best_runs_so_one_slow_run_does_not_turn_loads_off():
    """A slow first onload (another process freeing its memory) once made the engine recompute every hit for its
    whole life: each cost is the best of its runs."""
    costs = _measured({"write_packed": [0.3, 0.01, 0.3, 0.01, 0.3], "run_step": [0.3, 0.02, 0.3, 0.02, 0.3]})
    assert costs.onload_bytes_per_s > 4 * LAYOUT.block_bytes / 0.05  # the 0.01 s runs, not the median 0.3 s
    assert costs.prefill_tokens_per_s > 64 / 0.05 and costs.disk_bytes_per_s is None


def test_a_restarted_disk_tier_is_measured_before_its_first_load(tmp_path, monkeypatch):
    """After a restart the first loads went to the disk before any read had measured it, even where recomputing is
    cheaper (the slow tail of the restart runs): its read rate is measured at start from the blocks it holds."""
    hashes = prefix_hashes(list(range(3, 3 + 64)), 16)
    empty = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"m": 1})
    assert _measured({"write_packed": [0] * 5, "run_step": [0] * 5}, empty).disk_bytes_per_s is None
    for i, h in enumerate(hashes):
        assert empty.write(h, _row(i))
    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"m": 1})  # the restart
    reads = []
    monkeypatch.setattr(disk, "read_into", lambda h, out: reads.append(h) or time.sleep(0.01) or True)
    costs = _measured({"write_packed": [0] * 5, "run_step": [0] * 5}, disk)
    assert sorted(reads) == sorted(hashes) and costs.disk_bytes_per_s < 4 * LAYOUT.block_bytes / 0.04  # 10 ms a read
    costs.onload_bytes_per_s, costs.prefill_tokens_per_s = 1e12, LAYOUT.block_size / 1e-3  # a block: 1 ms
    assert not should_load("auto", False, costs, LAYOUT.block_bytes, LAYOUT.block_size, 0, 4)  # 10 ms > 1 ms
    assert should_load("auto", False, costs, LAYOUT.block_bytes, LAYOUT.block_size, 4, 0)


# -- the writer's backlog ----------------------------------------------------------------------------------------------


def _gather(blocks):
    return [(len(blocks), np.stack([_row(b) for b in blocks]))]


def _stuck_disk(disk):
    """The disk's writes wait for `go` (set it to let them through); `entered` is set once one is waiting."""
    entered, go, write = threading.Event(), threading.Event(), disk.write

    def slow_write(h, row):
        entered.set()
        assert go.wait(10)
        return write(h, row)

    disk.write = slow_write
    return entered, go


class _GatedDownloads:
    """A copier's download that waits for `gate` (calling `on_call` first), so a test holds gathered blocks on the
    device as a download behind a long step would."""

    def __init__(self, gate: threading.Event, on_call=lambda: None):
        self.gate, self.on_call = gate, on_call

    def download_into(self, piece, dests):
        self.on_call()
        assert self.gate.wait(30)
        return into_rows(piece, dests)


def _until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_writer_backlog_is_bounded_and_a_slow_disk_holds_no_fetch(tmp_path):
    host = HostTier(8 * LAYOUT.block_bytes, LAYOUT.block_bytes)
    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})
    tiers = KVTiers(LAYOUT, host, disk, max_pending=2)
    entered, go = _stuck_disk(disk)
    h = [bytes([i]) * 16 for i in range(6)]
    tiers.write_down(0, h[0])
    tiers.dispatch(_gather)
    assert entered.wait(10)  # the disk writer now holds block 0
    for i in range(1, 4):
        began = time.perf_counter()
        tiers.write_down(i, h[i])
        tiers.dispatch(_gather)  # at once, though the disk is stuck
        assert time.perf_counter() - began < 1 and _until(lambda: h[i] in host)
    # host memory takes every block; the disk's backlog (block 0 being written, block 1 queued) drops blocks 2 and 3
    assert _until(lambda: all(x in host for x in h[:4]) and tiers.counters["disk"].dropped == 2)
    assert tiers.counters["host"].dropped == 0
    # a fetch waiting for a block on its way down gets it from host memory while the disk is still stuck
    tiers.write_down(4, h[4])
    fetch = tiers.fetch([h[4]], 0)
    assert fetch is not None and not fetch.ready
    tiers.dispatch(_gather)
    assert _until(lambda: fetch.ready) and not go.is_set()
    packed, _ = tiers.take(fetch, 0, 1)
    np.testing.assert_array_equal(packed.rows[0], _row(4))
    tiers.release(packed)
    go.set()
    tiers.flush()
    assert all(x in disk for x in h[:2]) and not any(x in disk for x in h[2:4])
    assert h[4] not in disk and tiers.counters["disk"].dropped == 3  # its disk write came past the backlog too
    np.testing.assert_array_equal(host.buf[host.lease(h[1])], _row(1))
    assert tiers.pending == 0 and tiers.disk_pending == 0 and not tiers.inflight and not tiers.disk_queued
    tiers.write_down(2, h[2])  # in host memory only: it goes down again, to the disk
    tiers.dispatch(_gather)
    tiers.flush()
    assert h[2] in disk
    stop = [(i, bytes([i]) * 16) for i in range(10, 15)]  # a clean stop drains more than the bound, dropping none
    tiers.drain(stop, _gather)
    assert all(x in disk for _, x in stop) and tiers.counters["disk"].dropped == 3
    tiers.close()
    assert not tiers._writer.is_alive() and not tiers._disk_writer.is_alive()


def test_a_clean_stop_drains_every_block_to_disk_past_the_disks_smaller_backlog(tmp_path, monkeypatch):
    from rtpjax.kv.tiers import manager

    monkeypatch.setattr(manager, "DISK_BACKLOG_BYTES", 2 * LAYOUT.block_bytes)  # the disk's bound below the host's
    host = HostTier(16 * LAYOUT.block_bytes, LAYOUT.block_bytes)
    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})
    tiers = KVTiers(LAYOUT, host, disk, max_pending=8)
    assert tiers.max_disk_pending == 2
    stop = [(i, bytes([i]) * 16) for i in range(7)]
    tiers.drain(stop, _gather)
    assert all(h in disk for _, h in stop) and tiers.counters["disk"].dropped == 0
    tiers.close()


def test_a_clean_stop_behind_a_busy_disk_writer_still_drains_every_block(tmp_path, monkeypatch):
    from rtpjax.kv.tiers import manager

    monkeypatch.setattr(manager, "DISK_BACKLOG_BYTES", 2 * LAYOUT.block_bytes)
    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})
    tiers = KVTiers(LAYOUT, HostTier(16 * LAYOUT.block_bytes, LAYOUT.block_bytes), disk, max_pending=8)
    entered, go = _stuck_disk(disk)
    for i in range(2):  # the disk's backlog is full when the stop begins
        tiers.write_down(i, bytes([i]) * 16)
    tiers.dispatch(_gather)
    assert entered.wait(10) and _until(lambda: tiers.disk_pending == 2)
    stop = [(i, bytes([i]) * 16) for i in range(10, 14)]
    drain = threading.Thread(target=tiers.drain, args=(stop, _gather))
    drain.start()
    time.sleep(0.2)
    go.set()
    drain.join(30)
    assert all(h in disk for _, h in stop) and tiers.counters["disk"].dropped == 0
    tiers.close()


def test_a_stop_on_a_hung_disk_ends_within_its_deadline(tmp_path, monkeypatch, caplog):
    from rtpjax.kv.tiers import manager

    monkeypatch.setattr(manager, "STOP_TIMEOUT_S", 0.5)
    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})
    tiers = KVTiers(LAYOUT, HostTier(16 * LAYOUT.block_bytes, LAYOUT.block_bytes), disk, max_pending=8)
    entered, go = _stuck_disk(disk)
    tiers.write_down(0, bytes([1]) * 16)
    tiers.dispatch(_gather)
    assert entered.wait(10)
    try:
        began = time.monotonic()
        tiers.drain([(i, bytes([i]) * 16) for i in range(10, 14)], _gather)
        tiers.close()
        assert time.monotonic() - began < 3, "a hung disk held the stop past its deadline"
        assert "a stop left 4 blocks unwritten" in caplog.text and "did not stop within" in caplog.text
    finally:
        go.set()
    assert _until(lambda: not tiers._disk_writer.is_alive())


def test_a_block_queued_for_the_disk_keeps_its_host_row_and_is_not_queued_twice(tmp_path):
    """The disk writer reads a queued block from its host row (leased until written, no copy): the row cannot be
    reused meanwhile, and the block coming down again is not queued a second time."""
    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})
    host = HostTier(4 * LAYOUT.block_bytes, LAYOUT.block_bytes)  # at most 2 rows leased for the disk
    tiers = KVTiers(LAYOUT, host, disk, max_pending=8)
    entered, go = _stuck_disk(disk)
    a, b, c = bytes([1]) * 16, bytes([2]) * 16, bytes([3]) * 16
    for block, h in ((0, a), (1, b), (2, a)):
        tiers.write_down(block, h)
        tiers.dispatch(_gather)
        assert _until(lambda: h in host)
    assert entered.wait(10) and tiers.disk_pending == 2 and tiers.disk_queued == {a, b}
    leased = {host.index[a], host.index[b]}
    for block, h in ((3, c), (4, bytes([4]) * 16), (5, bytes([5]) * 16)):  # the host tier's other rows turn over
        tiers.write_down(block, h)
        tiers.dispatch(_gather)
    assert tiers.flush(0.5) is False  # the disk still holds the writer up
    assert a in host and b in host and {host.index[a], host.index[b]} == leased
    np.testing.assert_array_equal(host.buf[host.index[a]], _row(0))
    go.set()
    assert tiers.flush() and a in disk and b in disk and tiers.disk_pending == 0 and not any(host.leases)
    tiers.close()


def test_a_block_the_host_tier_has_no_room_for_still_goes_to_disk(tmp_path):
    """Every host row is leased (fetches hold them): the evicted block is not put there, and the disk writer gets a
    copy of it instead of losing it."""
    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})
    host = HostTier(2 * LAYOUT.block_bytes, LAYOUT.block_bytes)
    tiers = KVTiers(LAYOUT, host, disk, max_pending=8)
    held = [host.reserve(), host.reserve()]
    z = bytes([9]) * 16
    tiers.write_down(7, z)
    tiers.dispatch(_gather)
    assert tiers.flush() and z not in host and z in disk and tiers.counters["host"].dropped == 1
    row = np.empty(LAYOUT.block_bytes, np.uint8)
    assert disk.read_into(z, row)
    np.testing.assert_array_equal(row, _row(7))
    for slot in held:
        host.release(slot)
    assert not any(host.leases)
    tiers.close()


def test_a_block_in_host_memory_going_down_again_survives_its_own_job(tmp_path):
    """A block the host tier holds (not yet on disk) is written down again with blocks that need its row: it is held
    while they land (rather than evicted as the least recently used), reaches the disk and is not copied anew."""
    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})
    host = HostTier(4 * LAYOUT.block_bytes, LAYOUT.block_bytes)
    tiers = KVTiers(LAYOUT, host, disk, max_pending=8)
    old = bytes([1]) * 16
    for i, h in enumerate([old] + [bytes([2 + i]) * 16 for i in range(3)]):
        host.put(h, _row(i))  # `old` the least recently used
    written = tiers.counters["host"].bytes_written
    for block, h in [(0, old)] + [(10 + i, bytes([20 + i]) * 16) for i in range(4)]:
        tiers.write_down(block, h)
    tiers.dispatch(_gather)
    assert tiers.flush() and old in host and old in disk and not any(host.leases)
    row = np.empty(LAYOUT.block_bytes, np.uint8)
    assert disk.read_into(old, row)
    np.testing.assert_array_equal(row, _row(0))  # the host row's content, not the gather's (row 0 of block 0)
    counters = tiers.counters["host"]
    assert counters.bytes_written - written == 3 * LAYOUT.block_bytes and counters.dropped == 1  # 4 rows, 1 held
    tiers.close()


def test_a_failed_download_gives_its_blocks_up_and_the_tiers_go_on(tmp_path, caplog):
    """The copy to the host fails: its blocks are counted as dropped in every tier, a fetch waiting for one fails
    (recomputed), no host row stays leased, and the next download works."""
    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})
    host = HostTier(4 * LAYOUT.block_bytes, LAYOUT.block_bytes)
    tiers = KVTiers(LAYOUT, host, disk, max_pending=8)
    calls = []

    class _Failing:
        def download_into(self, piece, dests):
            calls.append(len(dests))
            if len(calls) == 1:
                raise RuntimeError("copy failed")
            return into_rows(piece, dests)

    tiers.use_copier(_Failing(), max_staged=4, max_gathered=8)
    a, b = bytes([5]) * 16, bytes([6]) * 16
    with caplog.at_level("ERROR", logger="rtpjax"):
        tiers.write_down(3, a)
        fetch = tiers.fetch([a], 0)
        tiers.dispatch(_gather)
        assert tiers.flush()
    assert "copying 1 blocks to the host failed" in caplog.text
    assert a not in host and a not in disk and not any(host.leases) and not tiers.inflight
    assert tiers.counters["host"].dropped == 1 and tiers.counters["disk"].dropped == 1
    assert fetch is not None and fetch.ok == [False]
    tiers.write_down(4, b)
    tiers.dispatch(_gather)
    assert tiers.flush() and b in host and b in disk and not any(host.leases)
    tiers.close()


def test_blocks_waiting_on_the_device_for_their_download_are_bounded():
    """At most max_gathered blocks wait on the device for their download: past it dispatch (the engine's thread)
    waits for the download thread, batch by batch, and drops none."""
    tiers, gate, seen = KVTiers(LAYOUT, HostTier(8 * LAYOUT.block_bytes, LAYOUT.block_bytes), None, "swap"), \
        threading.Event(), []

    tiers.use_copier(_GatedDownloads(gate, lambda: seen.append(tiers.gathered)), max_staged=4, max_gathered=2)
    try:
        for b in range(5):
            tiers.write_down(b, bytes([b + 1]) * 16)
        opener = threading.Timer(0.3, gate.set)
        opener.start()
        began = time.monotonic()
        tiers.dispatch(_gather)  # 2 + 2 + 1: the second batch waits for the first's download
        assert time.monotonic() - began >= 0.25, "dispatch gathered past the bound without waiting"
        assert tiers.flush() and tiers.gathered == 0 and max(seen) <= 2
        assert all(bytes([b + 1]) * 16 in tiers.host for b in range(5)) and tiers.counters["host"].dropped == 0
    finally:
        gate.set()
        tiers.close()


def test_a_stuck_download_gives_the_engine_its_thread_back(monkeypatch):
    """A download that never ends: dispatch waits STOP_TIMEOUT_S at most for room, then drops the rest (counted) and
    returns, and the accounting balances once the stuck copy is let through."""
    from rtpjax.kv.tiers import manager

    monkeypatch.setattr(manager, "STOP_TIMEOUT_S", 0.2)
    tiers, gate = KVTiers(LAYOUT, HostTier(8 * LAYOUT.block_bytes, LAYOUT.block_bytes), None, "swap"), threading.Event()

    tiers.use_copier(_GatedDownloads(gate), max_staged=4, max_gathered=1)
    try:
        a, b = b"s" * 16, b"t" * 16
        tiers.write_down(0, a)
        tiers.write_down(1, b)
        fetch = tiers.fetch([b], 0)
        tiers.dispatch(_gather)
        assert tiers.counters["host"].dropped == 1 and fetch.ready and fetch.valid == 0
        gate.set()
        assert tiers.flush() and a in tiers.host and b not in tiers.host and tiers.pending == 0
        tiers.drop(fetch)
    finally:
        gate.set()
        tiers.close()


def test_load_waits_are_reported_per_phase():
    from rtpjax.kv.block_copy import StageTimes
    from rtpjax.kv.tiers.manager import LoadWaits

    waits = LoadWaits()
    assert waits.report() == "no loads"
    waits.add([1.0, 1.5, 1.75, 1.75, 2.0], 3.0, blocks=8, pieces=2)
    waits.add([1.0, None, None, None, None], 3.0)  # loaded without staging: no phases
    stage = StageTimes(0.0, 0.125, 0.0625, 0.03125)
    waits.add([0.0, 0.5, 1.25, 1.5, 1.75], 2.5, blocks=64, pieces=1, stage=stage)  # the slowest: 2.5 s in all
    assert waits.count == 2 and waits.total == [1.0, 1.0, 0.25, 0.5, 1.75]
    assert waits.longest == [0.5, 0.75, 0.25, 0.25, 1.0]
    assert waits.report() == ("2 loads waited (mean/max ms) rows 500.0/500.0, queued 500.0/750.0, onload 125.0/250.0, "
                              "transfer 250.0/250.0, admission 875.0/1000.0; the slowest 500.0 750.0 250.0 250.0 750.0 "
                              "(of its transfer: landing 0.0, copy 125.0 of which enqueuing 31.2, copy out 62.5) "
                              "(64 blocks, 1 runs)")  # fmt: skip


def test_downloads_are_reported_waiting_and_copying():
    from rtpjax.kv.tiers.manager import Downloads

    d = Downloads()
    assert d.report() == "no downloads"
    d.add(0.5, 0.25)
    d.add(0.125, 0.75)
    assert d.report() == "2 downloads (mean/max ms) waiting 312.5/500.0, copying 500.0/750.0"
    d.add_held(0.25, 700)
    d.add_held(0.5, 300)
    assert d.report().endswith("; the engine held 2 times by downloads, longest 500.0 ms, bursts up to 700 blocks")


# -- counting ----------------------------------------------------------------------------------------------------------


def test_a_failed_admission_is_not_counted_as_a_tier_hit():
    pool = BlockPool(4)
    held = pool.allocate(1)  # 3 free: enough for the 3 loaded blocks, not for the prompt's last one
    tiers = KVTiers(LAYOUT, HostTier(8 * LAYOUT.block_bytes, LAYOUT.block_bytes), None, policy="swap")
    sched = Scheduler(pool, 16, 4, 64, 256, tiers=tiers)
    prompt = list(range(3, 3 + 49))
    for i, h in enumerate(prefix_hashes(prompt, 16)):
        tiers.host.put(h, _row(i))
    seq = Sequence("r", 0, prompt, SamplingParams(max_tokens=4), seed=0, max_tokens=4)
    sched.add(seq)
    fetch = None
    for _ in range(3):
        schedule = sched.schedule()
        assert not schedule.items and not schedule.loads
        assert tiers.counters["host"].queries == 0 and tiers.counters["host"].hits == 0, "a failed try was counted"
        # it keeps its fetched rows while it waits for device blocks (not fetched, nor leased, again each round)
        assert fetch in (None, seq.tier_fetch) and sum(tiers.host.leases) == 3 and pool.num_free == 3
        fetch = seq.tier_fetch
    pool.release(held)
    schedule = sched.schedule()
    assert [item.seq for item in schedule.items] == [seq] and len(schedule.loads[0].blocks) == 3
    assert tiers.counters["host"].queries == 48 and tiers.counters["host"].hits == 48
    tiers.release(schedule.loads[0].kv)
    assert not any(tiers.host.leases)
    tiers.close()


def test_a_failed_admission_is_not_counted_as_a_device_hit():
    pool = BlockPool(4)
    prompt = list(range(3, 3 + 49))  # 4 blocks: 3 full, then 1 token
    cached = pool.allocate(2)
    for block, h in zip(cached, prefix_hashes(prompt, 16)):
        pool.register(block, h)
    pool.release(cached)  # free, still cached
    held = pool.allocate(2)  # the only fresh blocks: none left for the prompt's other two
    sched = Scheduler(pool, 16, 4, 64, 256)
    seq = Sequence("r", 0, prompt, SamplingParams(max_tokens=4), seed=0, max_tokens=4)
    sched.add(seq)
    for _ in range(3):
        assert not sched.schedule().items
        assert (pool.queries, pool.hits) == (0, 0), "a failed try was counted"
    pool.release(held)
    assert [item.seq for item in sched.schedule().items] == [seq]
    assert (pool.queries, pool.hits) == (49, 32)


def test_a_declined_load_gives_back_the_rows_it_reserved_for_disk_blocks(tmp_path):
    host = HostTier(4 * LAYOUT.block_bytes, LAYOUT.block_bytes)
    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})
    tiers = KVTiers(LAYOUT, host, disk)
    tiers.costs = Costs(onload_bytes_per_s=1.0, prefill_tokens_per_s=1e15)  # recomputing is the cheaper
    hashes = prefix_hashes(list(range(3, 3 + 48)), 16)
    host.put(hashes[0], _row(0))
    for i, h in enumerate(hashes[1:], 1):  # the rest only on disk: each reserves a host row to be read into
        assert disk.write(h, _row(i))
    for _ in range(3):  # a waiting sequence asks every round
        assert tiers.fetch(hashes, 0) is None
        assert not any(host.leases), "a declined fetch kept host rows"
    assert host.reserve() is not None and len(host.free) == 2  # all 4 rows usable again: 1 held its block, 3 free
    tiers.close()


# -- preemption --------------------------------------------------------------------------------------------------------

PARAMS = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def _prompts(seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, rng.integers(20, 40)).tolist() for _ in range(6)]


@pytest.fixture(scope="module")
def swap_llm(stories_dir, compile_cache):
    """10 device blocks for 6 sequences growing to 4-5 blocks each: they preempt each other."""
    return LLM(str(stories_dir), compilation_cache_dir=compile_cache, num_gpu_blocks=10, kv_offloading_size=0.01,
               preemption_mode="swap", **dict(ENGINE_ARGS, max_model_len=160))  # fmt: skip


@pytest.mark.parametrize("seed, mode, costs, loads", [  # each its own prompts: none left below by an earlier run
    (1, "swap", None, True),
    (2, "recompute", None, False),
    (3, "auto", Costs(onload_bytes_per_s=1e15, prefill_tokens_per_s=1.0), True),  # loading is the cheaper
    (4, "auto", Costs(onload_bytes_per_s=1.0, prefill_tokens_per_s=1e15), False),  # recomputing is the cheaper
])  # fmt: skip
def test_preemption_swaps_or_recomputes(swap_llm, stories_llm, seed, mode, costs, loads):
    prompts = _prompts(seed)
    want = [o.outputs[0].token_ids for o in stories_llm.generate(prompts, PARAMS)]
    e = swap_llm.engine
    measured = e.tiers.costs
    e.tiers.policy, e.tiers.costs = mode, costs
    try:
        preemptions, host = e.scheduler.num_preemptions, dict(vars(e.tiers.counters["host"]))
        got = [o.outputs[0].token_ids for o in swap_llm.generate(prompts, PARAMS)]
    finally:
        e.tiers.policy, e.tiers.costs = "swap", measured
    assert e.scheduler.num_preemptions > preemptions, "the test did not preempt"
    assert got == want
    now = e.tiers.counters["host"]
    if mode != "recompute":
        assert now.bytes_written > host["bytes_written"], "the preempted blocks did not go down"
    assert (now.hits > host["hits"]) == loads, f"{mode}: a preempted sequence's blocks were {'not ' * loads}loaded"
    assert e.tiers.flush()  # blocks queued for the disk hold their host rows until written
    assert e.pool.num_free == e.pool.num_blocks and not any(e.tiers.host.leases), "a block or host row leaked"

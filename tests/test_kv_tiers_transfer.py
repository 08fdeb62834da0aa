"""KV tiers and their copies: a block still on its way down is waited for, not recomputed (the writer fills the row
a fetch reserved for it), and one that never lands fails the fetch's run; the write-down reads the gathered pieces in
place; fetched rows reach the device before their sequence is admitted, so a slow onload never holds other requests'
steps."""

import re
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


def test_the_download_starts_off_the_dispatching_thread():
    """Copying gathered rows into pinned memory waits for the step ahead of the gather: dispatch (on the engine's
    thread) only queues it, and the block lands once the tiers' own thread has downloaded it."""
    tiers, gate, threads = _tiers(), threading.Event(), []
    rows = np.random.default_rng(4).integers(0, 256, (1, LAYOUT.block_bytes), dtype=np.uint8)

    class _Downloads:
        def download_into(self, piece, dests):
            threads.append(threading.current_thread())
            assert gate.wait(30)
            return into_rows(piece, dests)

    tiers.use_copier(_Downloads(), max_staged=4, max_gathered=8)
    try:
        tiers.write_down(0, b"d" * 16)
        tiers.dispatch(lambda blocks: [(len(blocks), rows)])
        assert b"d" * 16 not in tiers.host
        gate.set()
        assert tiers.flush()
        np.testing.assert_array_equal(tiers.host.buf[tiers.host.lease(b"d" * 16)], rows[0])
        assert threads and threading.current_thread() not in threads
    finally:
        gate.set()
        tiers.close()


def test_the_loop_log_names_the_engine_held_by_downloads():
    """Past max_gathered blocks waiting on the device, dispatch holds the engine's thread until the download thread
    has taken the ones before: the loop log says how often, for how long and for how large a burst."""
    tiers, gate = _tiers(), threading.Event()
    rows = np.random.default_rng(7).integers(0, 256, (3, LAYOUT.block_bytes), dtype=np.uint8)

    class _Downloads:
        def download_into(self, piece, dests):
            assert gate.wait(30)
            return into_rows(piece, dests)

    tiers.use_copier(_Downloads(), max_staged=4, max_gathered=1)
    release = threading.Timer(0.2, gate.set)
    try:
        for b in range(3):
            tiers.write_down(b, bytes([b]) * 16)
        assert "held" not in tiers.report()
        release.start()
        tiers.dispatch(lambda blocks: [(len(blocks), rows[blocks])])
        assert tiers.flush()
        report = tiers.report()
        held = re.search(r"the engine held (\d+) times by downloads, longest ([\d.]+) ms, bursts up to (\d+) blocks",
                         report)
        assert held, report
        assert int(held[1]) == 2 and float(held[2]) >= 150 and int(held[3]) == 3
        assert "held" not in tiers.report()  # counted since the last report
    finally:
        release.cancel()
        gate.set()
        tiers.close()


def test_a_fetch_gets_its_rows_without_waiting_for_the_writers_backlog():
    """Blocks are in the host tier as soon as their download lands, however far behind the writer is: a fetch that
    waited for one gets it then, and one that asks later leases it at once."""
    tiers, gate, entered = _tiers(), threading.Event(), threading.Event()
    rows = np.random.default_rng(5).integers(0, 256, (3, LAYOUT.block_bytes), dtype=np.uint8)
    first, second, third = b"e" * 16, b"f" * 16, b"g" * 16
    write = tiers._write

    def held_write(*job):  # the writer, held up on its first job
        entered.set()
        assert gate.wait(30)
        return write(*job)

    tiers._write = held_write
    try:
        tiers.write_down(0, first)
        tiers.dispatch(lambda blocks: [(len(blocks), rows[:1])])
        assert entered.wait(30)
        tiers.write_down(1, second)
        waiting = tiers.fetch([second], 0)
        assert waiting is not None and not waiting.ready
        tiers.write_down(2, third)
        tiers.dispatch(lambda blocks: [(len(blocks), rows[1:])])
        deadline = time.monotonic() + 30
        while not (waiting.ready and third in tiers.host):
            assert time.monotonic() < deadline, "the fetch waited for the writer's backlog"
            time.sleep(0.01)
        later = tiers.fetch([first, third], 0)  # both downloaded, neither written: leased at once
        assert later is not None and later.ready and later.valid == 2 and not gate.is_set()
        for fetch, want in ((waiting, rows[1:2]), (later, rows[[0, 2]])):
            packed, _ = tiers.take(fetch, 0, len(want))
            np.testing.assert_array_equal(np.stack(packed.rows), want)
            tiers.release(packed)
        gate.set()
        assert tiers.flush() and not any(tiers.host.leases) and not tiers.awaited and not tiers.inflight
        assert tiers.counters["host"].bytes_written == 3 * LAYOUT.block_bytes
    finally:
        gate.set()
        tiers.close()


def test_a_block_published_between_a_fetchs_lookup_and_its_wait_is_taken_at_once():
    """A block the download thread publishes after a fetch looked it up (not yet in the host tier) but before the
    fetch waits for it is copied from the host tier at once, not left for the writer."""
    tiers, landing, writing = _tiers(), threading.Event(), threading.Event()
    rows = np.random.default_rng(6).integers(0, 256, (1, LAYOUT.block_bytes), dtype=np.uint8)
    h = b"p" * 16
    write, reserve = tiers._write, tiers.host.reserve

    def held_write(*job):
        assert writing.wait(30)
        return write(*job)

    def reserve_while_it_lands():  # the fetch's reservation: the download lands and is published meanwhile
        slot = reserve()
        if threading.current_thread() is threading.main_thread() and not landing.is_set():
            landing.set()
            deadline = time.monotonic() + 30
            while h not in tiers.host:
                assert time.monotonic() < deadline, "the download was not published"
                time.sleep(0.01)
        return slot

    tiers._write, tiers.host.reserve = held_write, reserve_while_it_lands
    try:
        tiers.write_down(0, h)
        tiers.dispatch(lambda blocks: [(len(blocks), _Landing(rows, landing))])
        fetch = tiers.fetch([h], 0)
        assert fetch is not None and fetch.ready and fetch.valid == 1, "the fetch was left waiting for the writer"
        packed, _ = tiers.take(fetch, 0, 1)
        np.testing.assert_array_equal(packed.rows[0], rows[0])
        tiers.release(packed)
        writing.set()
        assert tiers.flush() and not any(tiers.host.leases) and not tiers.awaited and not tiers.inflight
    finally:
        landing.set()
        writing.set()
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


# -- onto the device before admission ----------------------------------------------------------------------------------


class _Copier:
    """Stages copies of the rows once `gate` is set (a transfer in flight until then)."""

    def __init__(self):
        self.gate, self.staged, self.last_stage = threading.Event(), [], None

    def stage(self, rows, page_locked):
        assert self.gate.wait(30)
        self.staged.append(len(rows))
        return [np.array(row) for row in rows]

    def staged_rows(self, n):
        return n


def _until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_fetched_rows_are_staged_on_the_device_within_a_bound():
    """Fetched rows go to the device within max_staged blocks (one fetch past it waits), a fetch dropped mid-transfer
    gives its rows back once landed, and each fetch staged wakes the engine's loop once (`wake`), a dropped one not."""
    tiers, copier = _tiers(), _Copier()
    tiers.use_copier(copier, max_staged=4, max_gathered=8)
    woke = []
    tiers.wake = lambda: woke.append(tiers.staged_blocks)
    rows = np.random.default_rng(2).integers(0, 256, (6, LAYOUT.block_bytes), dtype=np.uint8)
    hashes = [bytes([i]) * 16 for i in range(6)]
    try:
        for h, row in zip(hashes, rows):
            tiers.host.put(h, row)
        first = tiers.fetch(hashes[:3], 0)
        assert first.ready and not first.admissible, "admissible before its rows reached the device"
        second = tiers.fetch(hashes[3:], 0)  # 3 + 3 staged blocks > 4: held back
        assert not tiers.poll(second) and not second.onloading and tiers.staged_blocks == 3
        tiers.drop(first)  # while its transfer is in flight: its rows go back once it lands
        copier.gate.set()
        _until(lambda: sum(tiers.host.leases) == 3 and tiers.staged_blocks == 0)
        _until(lambda: tiers.poll(second) and woke)  # (the wake follows the staging, outside the lock)
        assert woke == [3], "a staged fetch did not wake the loop once (or a dropped one did)"
        packed, lookup = tiers.take(second, 1, 2)
        np.testing.assert_array_equal(np.stack(packed.rows), rows[4:6])
        assert packed.lease is None and lookup.from_host == 2 and copier.staged == [3, 3]
        assert not any(tiers.host.leases) and tiers.staged_blocks == 0, "staged rows kept host rows or the bound"
    finally:
        copier.gate.set()
        tiers.close()


def _in_host_tier(tiers, count: int, seed: int, first: int) -> tuple[np.ndarray, list[bytes]]:
    """`count` random rows put in the host tier and their hashes (hash i: byte first + i, 16 times)."""
    rows = np.random.default_rng(seed).integers(0, 256, (count, LAYOUT.block_bytes), dtype=np.uint8)
    hashes = [bytes([i + first]) * 16 for i in range(count)]
    for h, row in zip(hashes, rows):
        tiers.host.put(h, row)
    return rows, hashes


def test_the_staging_bound_counts_the_device_rows_a_staging_holds():
    """A copier whose staging holds more device rows than it stages (whole landing pieces): the bound counts those,
    so a second fetch of 2 blocks waits behind a first that holds 4, and goes once the first is taken."""
    tiers, copier = _tiers(), _Copier()
    copier.staged_rows = lambda n: 4  # as a landing piece of 4 rows would
    tiers.use_copier(copier, max_staged=6, max_gathered=8)
    _, hashes = _in_host_tier(tiers, 4, seed=3, first=60)
    try:
        first = tiers.fetch(hashes[:2], 0)
        second = tiers.fetch(hashes[2:], 0)  # 4 + 4 > 6: held back (2 + 2 rows would have fit)
        assert first.onloading and not second.onloading and tiers.staged_blocks == 4
        copier.gate.set()
        _until(lambda: tiers.poll(first))
        tiers.take(first, 0, 2)
        _until(lambda: tiers.poll(second))
        tiers.take(second, 0, 2)
        assert tiers.staged_blocks == 0
    finally:
        copier.gate.set()
        tiers.close()


def test_a_fetch_without_room_is_not_staged_and_holds_no_bound():
    """A ready fetch whose sequence the pool has no room for stays in host memory: it must not hold the staging bound
    while a later fetch, ready and with room, is staged; it is staged once the scheduler sees room."""
    tiers, copier = _tiers(), _Copier()
    tiers.use_copier(copier, max_staged=4, max_gathered=8)
    rows, hashes = _in_host_tier(tiers, 6, seed=3, first=16)
    try:
        big = tiers.fetch(hashes[:4], 0, room=False)
        assert big.ready and not tiers.poll(big, room=False) and not big.onloading and tiers.staged_blocks == 0
        small = tiers.fetch(hashes[4:], 0)  # room: staged at once, past the big one
        assert small.onloading and tiers.staged_blocks == 2
        copier.gate.set()
        _until(lambda: tiers.poll(small))
        packed, _ = tiers.take(small, 0, 2)
        np.testing.assert_array_equal(np.stack(packed.rows), rows[4:6])
        assert not tiers.poll(big, room=False) and not big.onloading, "staged without room"
        _until(lambda: tiers.poll(big, room=True))
        packed, _ = tiers.take(big, 0, 4)
        np.testing.assert_array_equal(np.stack(packed.rows), rows[:4])
        assert copier.staged == [2, 4] and tiers.staged_blocks == 0 and not any(tiers.host.leases)
    finally:
        copier.gate.set()
        tiers.close()


def _cache_on_device(pool: BlockPool, hashes: list[bytes]) -> None:
    """Blocks holding `hashes`, published in the prefix cache and free (as a finished sequence leaves them)."""
    blocks = pool.allocate(len(hashes))
    for block, h in zip(blocks, hashes):
        pool.register(block, h)
    pool.release(blocks)


def _loading_l_and_cached_x(pool: BlockPool, seed: int, len_x: int, l_on_device: int, x_on_device: int):
    """(tiers, copier, L, X): L (81 tokens, arrived first) with its first l_on_device blocks cached on the device and
    the next 2 in the host tier; X (len_x tokens) with its first x_on_device blocks cached on the device. The copier's
    gate is closed: L's rows wait to be staged until it is set."""
    tiers, copier = _tiers(slots=16), _Copier()
    tiers.use_copier(copier, max_staged=16, max_gathered=8)
    rng = np.random.default_rng(seed)
    prompt_l, prompt_x = rng.integers(3, 512, 81).tolist(), rng.integers(3, 512, len_x).tolist()
    hashes_l, hashes_x = prefix_hashes(prompt_l, 16), prefix_hashes(prompt_x, 16)
    _cache_on_device(pool, hashes_l[:l_on_device] + hashes_x[:x_on_device])
    for h in hashes_l[l_on_device : l_on_device + 2]:
        tiers.host.put(h, rng.integers(0, 256, LAYOUT.block_bytes, dtype=np.uint8))
    seq_l, seq_x = (Sequence(r, 0, p, SamplingParams(max_tokens=4), seed=0, max_tokens=4, arrival_order=i)
                    for i, (r, p) in enumerate((("L", prompt_l), ("X", prompt_x))))  # fmt: skip
    return tiers, copier, seq_l, seq_x


def test_lpm_passes_a_loading_sequence_by_taking_its_pins_not_by_stopping():
    """L (older) loads its rest from the host tier while pinning its 3 device blocks; X (younger) has 4 blocks on the
    device, so lpm tries it first, and it fits only without L's pins. X must take them back ("after it" is admission
    order, not arrival) rather than stop admission for good; once X finishes, L comes in."""
    pool = BlockPool(10)
    tiers, copier, seq_l, seq_x = _loading_l_and_cached_x(pool, 8, 113, l_on_device=3, x_on_device=4)
    sched = Scheduler(pool, 16, 4, 128, 256, tiers=tiers, policy="lpm")
    sched.add(seq_l)
    sched.schedule()
    assert len(seq_l.tier_pin) == 3
    sched.add(seq_x)
    copier.gate.set()
    admitted = []

    def admitted_now(seq):
        admitted.extend(item.seq for item in sched.schedule().items if item.seq not in admitted)
        return seq in admitted

    try:
        _until(lambda: admitted_now(seq_x), seconds=10)
        assert seq_l not in admitted and not seq_l.tier_pin
        sched.finish(seq_x, "length")
        _until(lambda: admitted_now(seq_l), seconds=10)
        assert admitted == [seq_x, seq_l]
    finally:
        tiers.close()


def _two_sequences(tiers: KVTiers, seed: int, lens: tuple[int, int], below: tuple[int, int]):
    """Sequences A and B (arriving in that order) of random prompts of `lens` tokens, the first below[i] full blocks
    of each in the host tier."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 512, n).tolist() for n in lens]
    for prompt, n in zip(prompts, below):
        for h in prefix_hashes(prompt, 16)[:n]:
            tiers.host.put(h, rng.integers(0, 256, LAYOUT.block_bytes, dtype=np.uint8))
    return tuple(Sequence(r, 0, p, SamplingParams(max_tokens=4), seed=0, max_tokens=4, arrival_order=i)
                 for i, (r, p) in enumerate(zip("ab", prompts)))  # fmt: skip


@pytest.mark.parametrize("budget", [64, 16])
def test_a_load_on_its_way_to_the_device_keeps_its_room_from_later_sequences(budget):
    """A's prefix is being staged (the pool had room for it when its transfer started); B, behind it and with nothing
    below, must not take that room meanwhile, or A waits for room again once its rows arrive. With 16-token steps B's
    first chunk (1 block) would fit beside A's room, all of it would not: nothing runs, but beside a load on its way B
    is not alone, and waits as it would beside a running sequence."""
    pool, tiers, copier = BlockPool(8), _tiers(), _Copier()
    tiers.use_copier(copier, max_staged=8, max_gathered=8)
    held = pool.allocate(2)  # 6 free: A's 3 loaded blocks and its last token's, or B's 4, not both
    sched = Scheduler(pool, 16, 4, budget, 256, tiers=tiers)
    a, b = _two_sequences(tiers, 5, (49, 49), (3, 0))
    sched.add(a)
    sched.add(b)
    try:
        schedule = sched.schedule()
        assert a.tier_fetch is not None and a.tier_fetch.onloading and not a.tier_fetch.admissible
        assert not schedule.items and pool.num_free == 6, "B took the room of A's load in flight"
        copier.gate.set()
        _until(lambda: a.tier_fetch.admissible)
        schedule = sched.schedule()
        assert [item.seq for item in schedule.items] == [a] and len(schedule.loads[0].blocks) == 3
        assert schedule.loads[0].kv.lease is None and not any(tiers.host.leases)  # staged: host rows given back
        pool.release(held)
        assert b in [item.seq for item in sched.schedule().items]
    finally:
        copier.gate.set()
        tiers.close()


@pytest.mark.parametrize("held, pins_taken", [(5, False), (4, True)])
def test_a_sequence_lacking_room_takes_later_pins_only_if_they_make_it(held, pins_taken):
    """lpm tries X (3 blocks on the device) before L (a load pinning its 2); X needs 8 blocks. With `held` of 12 taken
    by others, L's pins would give X 7 (5 held) or 8 (4 held) blocks: only the latter is worth restarting L's fetch."""
    pool = BlockPool(12)
    tiers, copier, seq_l, seq_x = _loading_l_and_cached_x(pool, 9, 120, l_on_device=2, x_on_device=3)
    taken = pool.allocate(held)  # fresh blocks go first: the cached ones stay
    sched = Scheduler(pool, 16, 4, 128, 256, tiers=tiers, policy="lpm")
    try:
        sched.add(seq_l)
        sched.schedule()
        assert len(seq_l.tier_pin) == 2
        sched.add(seq_x)
        admitted = sched.schedule().admitted
        assert (not seq_l.tier_pin) == pins_taken and admitted == ([seq_x] if pins_taken else [])
    finally:
        copier.gate.set()
        pool.release(taken)
        tiers.close()


def test_a_load_waiting_for_room_is_not_passed_by_younger_sequences():
    """A's prefix is in host memory but the pool lacks room for it; B, younger and with nothing below, would fit. B
    must wait behind A (admission in arrival order, as without tiers), or every block that frees up goes to younger
    sequences while A waits; once there is room for both, A's rows go up and B goes ahead around their room."""
    pool, tiers, copier = BlockPool(10), _tiers(), _Copier()
    tiers.use_copier(copier, max_staged=8, max_gathered=8)
    held = pool.allocate(6)  # 4 free: B's 4 blocks, but not A's 4 loaded blocks and its last token's
    sched = Scheduler(pool, 16, 4, 128, 256, tiers=tiers)
    a, b = _two_sequences(tiers, 6, (65, 49), (4, 0))
    sched.add(a)
    sched.add(b)
    try:
        for _ in range(3):
            schedule = sched.schedule()
            assert a.tier_fetch is not None and a.tier_fetch.ready and not a.tier_fetch.onloading
            assert not schedule.items and pool.num_free == 4, "B took the blocks A waits for"
        pool.release(held)  # room for both: A's rows go up, and B is admitted around the room they will take
        assert [item.seq for item in sched.schedule().items] == [b] and a.tier_fetch.onloading
        copier.gate.set()
        _until(lambda: a.tier_fetch.admissible)
        assert a in [item.seq for item in sched.schedule().items]
    finally:
        copier.gate.set()
        tiers.close()


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_a_load_waiting_for_room_takes_back_the_pins_of_younger_loads(policy):
    """A (older) waits for room for its 5 loaded blocks and its last token's; B (younger) pins its 3 device blocks
    while its rest loads. Once the running blocks are freed, only B's pins stand between A and its room, and (fcfs)
    B is held behind A: A must take them back, or neither is ever admitted (but not before they would make its
    room). With lpm, B (3 blocks on the device) goes first instead, in the room left beside its pins."""
    pool, tiers, copier = BlockPool(8), _tiers(slots=16), _Copier()
    tiers.use_copier(copier, max_staged=16, max_gathered=8)
    copier.gate.set()
    rng = np.random.default_rng(8)
    prompt_a, prompt_b = rng.integers(3, 512, 81).tolist(), rng.integers(3, 512, 81).tolist()
    hashes_b = prefix_hashes(prompt_b, 16)
    _cache_on_device(pool, hashes_b[:3])  # B's first 3 blocks
    held = pool.allocate(4)  # a running sequence's 4 blocks (fresh ones go first: B's cached blocks stay)
    assert pool.num_free == 4 and all(h in pool.cached for h in hashes_b[:3])
    rows = rng.integers(0, 256, (7, LAYOUT.block_bytes), dtype=np.uint8)
    for h, row in zip(prefix_hashes(prompt_a, 16) + hashes_b[3:], rows):
        tiers.host.put(h, row)
    a, b = (Sequence(r, 0, p, SamplingParams(max_tokens=4), seed=0, max_tokens=4) for r, p in (("a", prompt_a),
                                                                                              ("b", prompt_b)))
    sched = Scheduler(pool, 16, 4, 128, 256, tiers=tiers, policy=policy)
    sched.add(a)
    sched.add(b)
    first = a if policy == "fcfs" else b
    try:
        for _ in range(2):  # B pinned its device prefix; A has no room, which B's pins could not make: B keeps them
            sched.schedule()
            assert b.tier_pin and not a.tier_fetch.onloading
        pool.release(held)
        admitted = []

        def first_admitted():
            admitted.extend(item.seq for item in sched.schedule().items)
            return first in admitted

        _until(first_admitted)  # fails (times out) if B's pins keep A from its room
        assert admitted == [first] and not tiers.staged_blocks
        if policy == "lpm":  # A comes in once B is done
            sched.finish(b, "length")
            _until(lambda: first_admitted() and a in admitted)  # (each call schedules a round)
            assert admitted == [b, a]
    finally:
        tiers.close()


def test_a_load_held_only_by_the_staging_bound_lets_the_staged_younger_load_in():
    """Y (younger) was staged first; A (older) has room but the staging bound holds its rows back until Y is taken.
    A must not keep Y out meanwhile (neither could ever go on); once Y is admitted, A is staged, and admitted when
    there is room."""
    pool, tiers, copier = BlockPool(8), _tiers(slots=16), _Copier()
    tiers.use_copier(copier, max_staged=4, max_gathered=8)
    a, y = _two_sequences(tiers, 9, (65, 49), (4, 3))
    sched = Scheduler(pool, 16, 4, 128, 256, tiers=tiers)
    try:
        sched.add(y)
        assert not sched.schedule().items and y.tier_fetch.onloading  # Y's 3 rows on their way, A not yet here
        sched.add(a)  # older: first in line; its 4 rows and Y's 3 exceed the bound of 4
        assert not sched.schedule().items and not a.tier_fetch.onloading and a.tier_fetch.room
        copier.gate.set()
        _until(lambda: y.tier_fetch.admissible)
        admitted = [item.seq for item in sched.schedule().items]
        assert admitted == [y], f"the staged younger load was kept out: {admitted}"
        assert a.tier_fetch is not None and not a.tier_fetch.admissible
        sched.finish(y, "stop")  # its 4 blocks back: room for A's 4 loaded blocks and its last token's
        _until(lambda: a.tier_fetch is None or [item.seq for item in sched.schedule().items] == [a])
        assert a.status.name == "RUNNING" and tiers.staged_blocks == 0 and not any(tiers.host.leases)
    finally:
        copier.gate.set()
        tiers.close()


@pytest.mark.parametrize("beside", [False, True])
def test_the_room_a_load_needs_alone_is_its_loaded_rows_and_first_chunk_beside_others_all_of_it(beside):
    """Only A's first block is below the device, and chunks are 32 tokens. Alone, A needs 3 blocks (1 loaded, 2 for its
    first chunk), not the 13 its whole 200-token prompt fills, so with 8 free its row goes up at once. Beside a running
    sequence (1 block), it needs all 13: its row waits in host memory until the pool has them."""
    pool, tiers, copier = BlockPool(20), _tiers(), _Copier()
    tiers.use_copier(copier, max_staged=8, max_gathered=8)
    copier.gate.set()
    held = pool.allocate(11 if beside else 12)
    rng = np.random.default_rng(10)
    prompt = rng.integers(3, 512, 200).tolist()
    tiers.host.put(prefix_hashes(prompt, 16)[0], rng.integers(0, 256, LAYOUT.block_bytes, dtype=np.uint8))
    a = Sequence("a", 0, prompt, SamplingParams(max_tokens=4), seed=0, max_tokens=4, arrival_order=1)
    sched = Scheduler(pool, 16, 4, 32, 256, tiers=tiers)
    if beside:
        running = Sequence("r", 0, [5] * 8, SamplingParams(max_tokens=64), seed=0, max_tokens=64)
        sched.add(running)
        assert sched.schedule().admitted == [running] and pool.num_free == 8
    sched.add(a)
    admitted = []

    def a_admitted():
        admitted.extend(item.seq for item in sched.schedule().items)
        return a in admitted

    try:
        if beside:
            for _ in range(20):
                assert not a_admitted() and not a.tier_fetch.onloading, "staged without room for all of it"
                time.sleep(0.01)
            pool.release(held[:6])  # 14 free: all of A beside the running sequence
        _until(a_admitted, seconds=5)
        assert len(a.block_table) == 3 and a.num_computed == 16 + 32 - beside  # (beside the running one's token)
    finally:
        pool.release(held[6:] if beside else held)
        tiers.close()


def _b_below_the_device(stories_dir, compile_cache, stories_llm, seed: int):
    """A 16-block engine with a host tier, whose prompt B (70 tokens) ran and went down to the host tier: (engine, rng,
    B, greedy params, B's tokens from a fresh prefill)."""
    llm = LLM(str(stories_dir), compilation_cache_dir=compile_cache, num_gpu_blocks=16, kv_offloading_size=0.01,
              **dict(ENGINE_ARGS, max_model_len=192))  # fmt: skip
    e, rng = llm.engine, np.random.default_rng(seed)
    prompt_b, fillers = rng.integers(3, 512, 70).tolist(), [rng.integers(3, 512, 70).tolist() for _ in range(4)]
    greedy = SamplingParams(max_tokens=4, temperature=0)
    want = stories_llm.generate([prompt_b], greedy)[0].outputs[0].token_ids
    llm.generate([prompt_b], greedy)
    llm.generate(fillers, greedy)  # 20 blocks through a 16-block cache: B's go down to the host tier
    e.tiers.flush()
    below = prefix_hashes(prompt_b, 16)[:4]
    assert all(h in e.tiers.host and h not in e.pool.cached for h in below), "B's blocks are not (only) below"
    return e, rng, prompt_b, greedy, want


SLOW = 1.0  # seconds one host-to-device transfer of the tier's rows takes in the test below


def test_a_slow_onload_never_holds_other_requests_decode_steps(stories_dir, compile_cache, stories_llm, monkeypatch):
    """B's prefix comes back from the host tier through a transfer made to take SLOW seconds: A keeps decoding, each
    step far quicker than that transfer, while B waits "loading"; B then gives a fresh prefill's tokens."""
    e, rng, prompt_b, greedy, want = _b_below_the_device(stories_dir, compile_cache, stories_llm, seed=11)
    transfer = e.runner.copier._transfer

    def slow(pieces, page_locked):
        time.sleep(SLOW)
        return transfer(pieces, page_locked)

    monkeypatch.setattr(e.runner.copier, "_transfer", slow)
    hits = e.tiers.counters["host"].hits
    e.add_request(rng.integers(3, 512, 8).tolist(), SamplingParams(max_tokens=100, temperature=0, ignore_eos=True), "a")
    a_tokens, out_b, steps, decoded_while_loading = 0, None, [], 0
    while a_tokens < 2:
        a_tokens = max([len(o.outputs[0].token_ids) for o in e.step() if o.request_id == "a"] + [a_tokens])
    e.add_request(prompt_b, greedy, "b")
    deadline = time.monotonic() + 60
    while e.has_work():
        assert time.monotonic() < deadline, "the requests did not finish"
        loading, began = e.scheduler.loading(), time.perf_counter()
        outs = {o.request_id: o for o in e.step()}
        steps.append(time.perf_counter() - began)
        if "a" in outs:
            now = len(outs["a"].outputs[0].token_ids)
            decoded_while_loading += (now - a_tokens) * bool(loading)
            a_tokens = now
        out_b = outs.get("b", out_b)
    assert out_b.outputs[0].token_ids == want
    assert e.tiers.counters["host"].hits - hits == 4 * 16, "B's prefix was not loaded from the host tier"
    assert decoded_while_loading >= 5, f"A decoded {decoded_while_loading} tokens while B's blocks were loading"
    assert max(steps) < SLOW / 2, f"a step took {max(steps):.2f} s: it waited for B's onload"
    assert e.tiers.flush()  # blocks queued for the disk hold their host rows until written
    assert e.pool.num_free == e.pool.num_blocks and not any(e.tiers.host.leases) and e.tiers.staged_blocks == 0
    e.close()


def test_a_loading_sequence_keeps_its_device_prefix(stories_dir, compile_cache, stories_llm, monkeypatch):
    """A turn whose prefix is half on the device, half in the host tier, waits "loading" while its host half is staged;
    meanwhile the pool is emptied (other requests' blocks). Its device half is pinned: its fetch is never dropped and
    started again (each restart waited for blocks going down and staged them all anew), it loads only the host half,
    and gives a fresh prefill's tokens."""
    llm = LLM(str(stories_dir), compilation_cache_dir=compile_cache, num_gpu_blocks=16, kv_offloading_size=0.01,
              **dict(ENGINE_ARGS, max_model_len=192))  # fmt: skip
    e, rng = llm.engine, np.random.default_rng(12)
    first = rng.integers(3, 512, 70).tolist()  # 4 full blocks
    turn = first + rng.integers(3, 512, 30).tolist()
    greedy = SamplingParams(max_tokens=4, temperature=0)
    want = stories_llm.generate([turn], greedy)[0].outputs[0].token_ids
    llm.generate([first], greedy)
    hashes = prefix_hashes(first, 16)[:4]

    def evict(blocks: int) -> None:
        """Other requests' allocations: the `blocks` least recently freed blocks are reused (cached ones go down)."""
        taken = e.pool.allocate(blocks)
        e.tiers.dispatch(e._gather_down)
        e.tiers.flush()
        e.pool.release(taken)

    free = list(e.pool.free)
    evict(free.index(e.pool.cached[hashes[2]]) + 1)  # blocks 2 and 3 (freed first) go down, 0 and 1 stay
    assert [h in e.pool.cached for h in hashes] == [True, True, False, False] and hashes[3] in e.tiers.host
    gate, stage = threading.Event(), e.runner.copier.stage

    def gated(rows, page_locked=False):
        assert gate.wait(30)
        return stage(rows, page_locked)

    monkeypatch.setattr(e.runner.copier, "stage", gated)
    hits = e.tiers.counters["host"].hits
    e.add_request(turn, greedy, "turn")
    seq = e.scheduler.waiting[0]
    e.step()
    fetches = [seq.tier_fetch]

    def note(fetch) -> None:
        if fetch is not None and not any(fetch is f for f in fetches):
            fetches.append(fetch)

    assert seq.tier_fetch is not None and seq.tier_fetch.start == 2 and seq.tier_fetch.onloading
    evict(e.pool.num_free)  # everything that may be evicted is
    for _ in range(3):
        e.step()
        note(seq.tier_fetch)
    gate.set()
    out, deadline = None, time.monotonic() + 60
    while e.has_work():
        assert time.monotonic() < deadline, "the request did not finish"
        note(seq.tier_fetch)
        out = {o.request_id: o for o in e.step()}.get("turn", out)
    assert out.outputs[0].token_ids == want
    assert len(fetches) == 1, f"the fetch started {len(fetches)} times: its device prefix was evicted while it loaded"
    assert e.tiers.counters["host"].hits - hits == 2 * 16, "it loaded blocks its device prefix held"
    assert e.tiers.flush()  # blocks queued for the disk hold their host rows until written
    assert e.pool.num_free == e.pool.num_blocks and not any(e.tiers.host.leases) and e.tiers.staged_blocks == 0
    e.close()


def test_the_scheduler_stages_no_fetch_whose_sequence_has_no_room(stories_dir, compile_cache, stories_llm):
    """B's prefix is in the host tier while running requests fill the device pool: B stays loading with its rows in
    host memory (nothing staged, whatever else the round polls), and once the pool has room it is staged, admitted
    and gives a fresh prefill's tokens."""
    e, rng, prompt_b, greedy, want = _b_below_the_device(stories_dir, compile_cache, stories_llm, seed=12)
    for i in range(3):  # 3 x 5 blocks and growing: no room for B's 4 loaded blocks and its first chunk
        e.add_request(rng.integers(3, 512, 66).tolist(), SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                      f"f{i}")  # fmt: skip
    for _ in range(3):
        e.step()
    e.add_request(prompt_b, greedy, "b")
    b, out_b, held_back = e.requests["b"].seqs[0], None, 0
    deadline = time.monotonic() + 60
    while e.has_work():
        assert time.monotonic() < deadline, "the requests did not finish"
        outs = {o.request_id: o for o in e.step()}
        fetch = b.tier_fetch
        need = e.scheduler._load_need(b, e.scheduler._kept_for_running()) if fetch is not None else 0
        if fetch is not None and need > e.pool.num_free:
            assert not fetch.onloading and e.tiers.staged_blocks == 0, "staged without room"
            held_back += 1
        if "b" in outs and outs["b"].finished:
            out_b = outs["b"]
    assert held_back >= 1, "the pool always had room: the test did not test anything"
    assert out_b.outputs[0].token_ids == want
    assert e.pool.num_free == e.pool.num_blocks and e.tiers.staged_blocks == 0

"""The KV tiers below the device: what goes down, what comes back, on which thread, and what it cost.

Down: a block the device evicts (BlockPool's hook) or a preempted sequence's blocks are queued with their hashes;
the engine dispatches one packed gather for them right after scheduling, before the step (or a load) can overwrite
them. A download thread copies the gathered rows into host-tier rows it reserves for them (the copy waits for the
step ahead of the gather: never on the engine's thread; BlockCopier.download_into), publishes each block in host
memory (if it lacks it), fills the rows of fetches waiting for those blocks, and hands them to a writer thread, which
counts them and hands them to the disk's writer. At most
max_gathered blocks wait on the device for their download; only past that does the engine's thread wait for it
(which can mean for the step in flight, as every step's read does).

The disk has a writer thread of its own, fed by the host writer: a block lands in host memory (and fetches waiting
for it go on) without waiting for the disk writes queued before it. It reads each block from its host row, leased
until written (a copy where the block found no room there). The writers' backlogs are bounded (max_pending blocks; the
disk's also by DISK_BACKLOG_BYTES and half the host tier): past them a block is dropped and counted, so a slow disk
never holds the engine's thread or a fetch, nor piles up memory.

Up: for a waiting sequence whose prefix continues below the device, `fetch` leases the host rows that hold it, starts
reader threads on those only on disk (into leased host rows), and has leased rows filled for blocks still on their
way down (by the download thread as they land; a fetch made after that leases the published row, and the writer
fills only rows of blocks that found no host row; their device copies may be gone already: waiting beats
recomputing). The sequence waits ("loading")
while other requests run. Once every row is in host memory, an onload thread moves the intact run to the device
(`use_copier`: the runner's copier; at most max_staged blocks staged at a time) and gives the host rows back; only
when they have arrived does the scheduler admit the sequence, their device copies written into its blocks before its
first step, so no step (a decode of other requests) waits for a host-to-device transfer. Without a copier (unit
tests) the host rows themselves are the block load, given back once that step has run. Whether a hit is worth
loading is `should_load`: the policy, and measured costs (Costs): the onload and disk bandwidths (measured at start,
then by each load and read) against the time the step takes to recompute as many tokens. Hits and queries are
counted once per admission (`count`), never for a try that did not admit.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from rtpjax.distributed.messages import TierStats
from rtpjax.kv.block_copy import into_rows, runs
from rtpjax.kv.host_blocks import KVLayout, PackedBlocks
from rtpjax.kv.tiers.disk import DiskTier
from rtpjax.kv.tiers.host import HostTier

log = logging.getLogger("rtpjax")

POLICIES = ("auto", "swap", "recompute")
DISK_BACKLOG_BYTES = 4 << 30  # at most this much K/V waits (in leased host rows) for the disk writer
STOP_TIMEOUT_S = 20.0  # a clean stop waits at most this long for the writers (a stuck disk loses its last blocks)


ONLOAD_WEIGHT = 0.3  # each load's own transfer rate, in the moving estimate
DISK_WEIGHT = 0.1  # each disk read's rate, in the disk's
ONLOAD_HALF_LIFE_S = 10.0  # with no load to measure, the estimate returns halfway to the start's in this long


@dataclasses.dataclass
class Costs:
    """What loading a block and recomputing a token cost: measured at start, then by the loads themselves (onload:
    each transfer's rate; disk: each read's). Transfers slower than the start measured (the copies of a busy host)
    turn loads off, so a tier is not slower than recomputing; while they are off the estimate drifts back toward the
    start's measurement, so a load is tried, and measured, again."""

    onload_bytes_per_s: float  # host tier -> device cache, packed rows (at `observed_at`)
    prefill_tokens_per_s: float  # tokens a full step computes per second
    disk_bytes_per_s: float | None = None  # reads into the host tier, measured as they happen
    measured_onload: float = 0.0  # the start's onload rate (0: onload_bytes_per_s)
    observed_at: float | None = None  # time.monotonic() of the last load measured

    def __post_init__(self):
        self.measured_onload = self.measured_onload or self.onload_bytes_per_s

    def onload_rate(self, now: float | None = None) -> float:
        """The onload estimate now: the loads' moving rate, drifting back to the start's with their age."""
        if self.observed_at is None:
            return self.onload_bytes_per_s
        age = (time.monotonic() if now is None else now) - self.observed_at
        gap = self.onload_bytes_per_s - self.measured_onload
        return self.measured_onload + gap * 0.5 ** (max(age, 0.0) / ONLOAD_HALF_LIFE_S)

    def observe_onload(self, nbytes: int, seconds: float, now: float | None = None) -> None:
        """A load's transfer took `seconds` for `nbytes`."""
        now = time.monotonic() if now is None else now
        estimate = self.onload_rate(now)
        self.onload_bytes_per_s = estimate + ONLOAD_WEIGHT * (nbytes / max(seconds, 1e-9) - estimate)
        self.observed_at = now

    def observe_disk(self, nbytes: int, seconds: float) -> None:
        """A disk read took `seconds` for `nbytes` (the first one sets the rate)."""
        rate, old = nbytes / max(seconds, 1e-9), self.disk_bytes_per_s
        self.disk_bytes_per_s = rate if old is None else old + DISK_WEIGHT * (rate - old)

    def load_pays(self, block_bytes: int, block_size: int, from_host: int, from_disk: int,
                  now: float | None = None) -> bool:  # fmt: skip
        n = from_host + from_disk
        load = n * block_bytes / self.onload_rate(now)
        if from_disk and self.disk_bytes_per_s:
            load += from_disk * block_bytes / self.disk_bytes_per_s
        return load < n * block_size / self.prefill_tokens_per_s


def should_load(policy: str, preempted: bool, costs: Costs | None, block_bytes: int, block_size: int, from_host: int,
                from_disk: int) -> bool:  # fmt: skip
    """Load a sequence's blocks found below the device (True) or recompute them. swap: always load; recompute: a
    preempted sequence runs its tokens again; otherwise load when the measured load time is below the measured
    recompute time (before the costs are measured, at warm-up, load)."""
    if policy == "swap":
        return True
    if policy == "recompute" and preempted:
        return False
    return costs is None or costs.load_pays(block_bytes, block_size, from_host, from_disk)


@dataclasses.dataclass(eq=False)
class Fetch:
    """Blocks below the device that a waiting sequence will load: leased host rows, some still arriving from disk."""

    start: int  # index of its first block in the sequence's hash chain
    hashes: list[bytes]
    slots: list[int]
    from_disk: list[bool]
    ok: list[bool | None]  # None: a read in flight
    dropped: bool = False
    onload: bool = False  # its rows go to the device before it is admitted (KVTiers.use_copier)
    onloading: bool = False  # their transfer has started (staged_n blocks counted against max_staged)
    staged: list | None = None  # device copies of rows 0..staged_n once arrived
    staged_n: int = 0
    room: bool = True  # the device pool had room for the sequence when the scheduler last asked: staged only then
    # when it was made, had every row in host memory, was handed to the onload thread, which took it up and had it
    # on the device (time.monotonic)
    times: list[float | None] = dataclasses.field(default_factory=lambda: [time.monotonic(), None, None, None, None])
    runs: int = 0  # back-to-back runs its host rows crossed in (each one transfer or more)
    stage: object = None  # block_copy.StageTimes of its transfer
    arrived: bool = False  # `ready` seen true

    @property
    def ready(self) -> bool:
        """Every row is in host memory (or failed). Once true it stays true (a row never goes back to in flight): the
        scheduler asks for every waiting sequence each round, so the answer is kept rather than rescanned."""
        if not self.arrived:
            self.arrived = None not in self.ok
        return self.arrived

    @property
    def admissible(self) -> bool:
        """The sequence may be admitted: its rows are where the step's block load takes them from."""
        return self.ready and (not self.onload or self.staged is not None)

    @property
    def valid(self) -> int:
        """Leading rows that arrived intact (a bad one ends the run: the rest is recomputed)."""
        return next((i for i, ok in enumerate(self.ok) if not ok), len(self.ok))


@dataclasses.dataclass
class Lookup:
    """What one admission looked up below the device (blocks) and took from each tier; counted once it is admitted."""

    looked_up: int
    from_host: int
    from_disk: int


# a load's waits: Fetch.times' steps, then until taken ("onload": for the onload thread, busy with earlier loads)
LOAD_PHASES = ("rows", "queued", "onload", "transfer", "admission")


@dataclasses.dataclass
class LoadWaits:
    """How long loads admitted since the last report waited in each phase (LOAD_PHASES), and the slowest load's
    phases, blocks and runs, for the loop log."""

    count: int = 0
    total: list[float] = dataclasses.field(default_factory=lambda: [0.0] * len(LOAD_PHASES))
    longest: list[float] = dataclasses.field(default_factory=lambda: [0.0] * len(LOAD_PHASES))
    slowest: tuple | None = None  # (seconds in all, phases, blocks, runs, block_copy.StageTimes or None)

    def add(self, times: list[float | None], taken: float, blocks: int = 0, pieces: int = 0, stage=None) -> None:
        """A load's Fetch.times and when it was taken; `blocks`, `pieces` (runs), `stage`: what its transfer moved,
        and how (block_copy.StageTimes)."""
        if None in times:
            return  # loaded without staging (no copier): no phases to tell
        marks = times + [taken]
        self.count += 1
        phases = [b - a for a, b in zip(marks, marks[1:])]
        for i, seconds in enumerate(phases):
            self.total[i] += seconds
            self.longest[i] = max(self.longest[i], seconds)
        if self.slowest is None or taken - times[0] > self.slowest[0]:
            self.slowest = (taken - times[0], phases, blocks, pieces, stage)

    def report(self) -> str:
        if not self.count:
            return "no loads"
        phases = ", ".join(f"{name} {1e3 * t / self.count:.1f}/{1e3 * m:.1f}"
                           for name, t, m in zip(LOAD_PHASES, self.total, self.longest))  # fmt: skip
        _, worst, blocks, pieces, stage = self.slowest
        slowest = " ".join(f"{1e3 * t:.1f}" for t in worst)
        if stage is not None:  # the transfer's own parts
            enqueue = f" of which enqueuing {1e3 * stage.enqueue:.1f}" if stage.enqueue else ""  # (driver copies)
            slowest += (f" (of its transfer: landing {1e3 * stage.lease:.1f}, copy {1e3 * stage.copy:.1f}{enqueue}, "
                        f"copy out {1e3 * stage.copy_out:.1f})")  # fmt: skip
        slowest += f" ({blocks} blocks, {pieces} runs)"
        return f"{self.count} loads waited (mean/max ms) {phases}; the slowest {slowest}"


@dataclasses.dataclass
class DownRow:
    """Where one block lands in host memory on its way down: a host-tier row reserved for it (published as soon as
    its copy is done), the row that already holds it (`held`: leased, nothing copied), or, with no host row free, a
    row of its own (slot None) that only the disk tier gets."""

    slot: int | None
    row: np.ndarray
    held: bool = False
    new: bool = False  # published by this job (the host tier lacked it)


@dataclasses.dataclass
class Downloads:
    """Gathered pieces' copies into host rows since the last report (BlockCopier.download_into's two parts): waiting
    for the rows (the gather, behind the step ahead of it) and copying them, mean and longest; and the engine's
    thread held by `dispatch` past max_gathered (how often, the longest, the largest burst of blocks that held it),
    for the loop log."""

    count: int = 0
    wait: float = 0.0
    copy: float = 0.0
    longest_wait: float = 0.0
    longest_copy: float = 0.0
    held: int = 0
    longest_held: float = 0.0
    largest_burst: int = 0

    def add(self, wait: float, copy: float) -> None:
        self.count += 1
        self.wait, self.copy = self.wait + wait, self.copy + copy
        self.longest_wait, self.longest_copy = max(self.longest_wait, wait), max(self.longest_copy, copy)

    def add_held(self, seconds: float, burst: int) -> None:
        self.held += 1
        self.longest_held, self.largest_burst = max(self.longest_held, seconds), max(self.largest_burst, burst)

    def report(self) -> str:
        held = (f"; the engine held {self.held} times by downloads, longest {1e3 * self.longest_held:.1f} ms, "
                f"bursts up to {self.largest_burst} blocks" if self.held else "")  # fmt: skip
        if not self.count:
            return "no downloads" + held
        return (f"{self.count} downloads (mean/max ms) waiting {1e3 * self.wait / self.count:.1f}/"
                f"{1e3 * self.longest_wait:.1f}, copying {1e3 * self.copy / self.count:.1f}/"
                f"{1e3 * self.longest_copy:.1f}{held}")  # fmt: skip


@dataclasses.dataclass
class _Counters:
    queries: int = 0  # tokens looked up in this tier
    hits: int = 0  # of which found and loaded
    bytes_written: int = 0
    bytes_read: int = 0
    write_seconds: float = 0.0
    read_seconds: float = 0.0
    dropped: int = 0  # blocks not written down (the tier full of leased rows, a failed write)


class KVTiers:
    def __init__(self, layout: KVLayout, host: HostTier, disk: DiskTier | None, policy: str = "auto",
                 max_pending: int | None = None):  # fmt: skip
        if policy not in POLICIES:
            raise ValueError(f"--preemption-mode must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.layout, self.host, self.disk, self.policy = layout, host, disk, policy
        self.block_size, self.block_bytes = layout.block_size, layout.block_bytes
        self.costs: Costs | None = None  # set once measured; until then every hit is loaded
        self.counters = {t.name: _Counters() for t in self.tiers}
        self.queued: list[tuple[int, bytes]] = []  # (device block, hash) to gather before the next step
        self.inflight: set[bytes] = set()  # hashes on their way down
        self.awaited: dict[bytes, list[tuple[Fetch, int]]] = {}  # inflight hash -> (fetch, index) to fill once down
        self.lock = threading.Lock()
        self.max_pending = max_pending or host.num_slots  # blocks queued for the writer; more are dropped
        # blocks queued for the disk; more skip the disk
        # (their host slots stay leased until written: at most half the host tier)
        self.max_disk_pending = min(self.max_pending, max(1, host.num_slots // 2),
                                    max(1, DISK_BACKLOG_BYTES // layout.block_bytes))  # fmt: skip
        self.pending = self.disk_pending = 0
        self.disk_queued: set[bytes] = set()  # in host memory, queued for the disk writer
        self._downloads: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._disk_jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.closed = False
        self._downloader = threading.Thread(target=self._download_loop, name="rtpjax-kv-download", daemon=True)
        self._downloader.start()
        self._writer = threading.Thread(target=self._write_loop, name="rtpjax-kv-down", daemon=True)
        self._writer.start()
        self._disk_writer = threading.Thread(target=self._disk_loop, name="rtpjax-kv-disk", daemon=True)
        if disk is not None:
            self._disk_writer.start()
        self._readers = ThreadPoolExecutor(4, thread_name_prefix="rtpjax-kv-up")
        self.copier = None  # BlockCopier: downloads gathered rows; stages fetched rows before admission (use_copier)
        self.max_gathered: int | None = None  # blocks gathered on the device, not yet downloaded (None: no bound)
        self.gathered = 0
        self._gathered_cv = threading.Condition(self.lock)
        self.max_staged = 0  # blocks staged on the device and not yet taken; one fetch may exceed it alone
        self.staged_blocks = 0
        self._onloader = ThreadPoolExecutor(1, thread_name_prefix="rtpjax-kv-onload")
        self.wake = None  # called (on the onload thread) once a fetch's rows are on the device: the engine's loop,
        # waiting for nothing but loads, takes the sequence at once
        self.waits = LoadWaits()  # since the last report
        self.downloads = Downloads()  # since the last report

    def use_copier(self, copier, max_staged: int, max_gathered: int) -> None:
        """Download the rows that `dispatch`'s gathers leave on the device with `copier` (its download), at most
        `max_gathered` blocks waiting on the device for it, and stage fetched rows on its devices (its stage)
        before their sequence is admitted, at most `max_staged` blocks at a time (device memory outside the cache)."""
        if max_staged < 1 or max_gathered < 1:
            raise ValueError(f"max_staged and max_gathered must be >= 1 block, got {max_staged}, {max_gathered}")
        self.copier, self.max_staged, self.max_gathered = copier, max_staged, max_gathered

    @property
    def tiers(self) -> list:
        return [self.host] + ([self.disk] if self.disk is not None else [])

    def _below(self, h: bytes) -> bool:
        """(lock held) In every tier, or on its way to the disk from the host tier."""
        return h in self.host and (self.disk is None or h in self.disk or h in self.disk_queued)

    # -- down -------------------------------------------------------------------------------------------------------

    def write_down(self, block: int, h: bytes) -> None:
        """Queue a device block holding `h` for the tiers that lack it (BlockPool's eviction hook; preemption)."""
        with self.lock:
            if h in self.inflight or self._below(h):
                return
            self.inflight.add(h)
        self.queued.append((block, h))

    def dispatch(self, gather_packed) -> None:
        """Gather the queued blocks on the device now (`gather_packed(blocks)` -> (real count, rows) pieces: the
        runner's offload without its download when a copier is in use), before anything overwrites them; the download
        thread copies them to the host and the writer writes them down. At most max_gathered blocks wait on the device
        for their download: past it this (the engine's) thread waits for the download thread, in batches, rather than
        drop them (nothing can overwrite them meanwhile: the engine dispatches nothing while it waits)."""
        if not self.queued:
            return
        with self.lock:
            room = max(0, self.max_pending - self.pending)
            kept, dropped = self.queued[:room], self.queued[room:]
            self.pending += len(kept)
        self.queued = []
        if dropped:
            log.warning("KV tiers: %d blocks not written down (the writer is %d blocks behind)", len(dropped),
                        self.max_pending)  # fmt: skip
            self._give_up(dropped)
        batch = self.max_gathered or len(kept) or 1
        for i in range(0, len(kept), batch):
            part = kept[i : i + batch]
            with self._gathered_cv:
                began, full = time.perf_counter(), self.gathered + len(part) > batch
                room = self._gathered_cv.wait_for(lambda: self.gathered + len(part) <= batch,  # noqa: B023
                                                  timeout=STOP_TIMEOUT_S)  # fmt: skip
                if room:
                    self.gathered += len(part)
                else:
                    self.pending -= len(kept) - i  # given up below
            if full:  # the engine's thread waited for the download thread
                with self.lock:
                    self.downloads.add_held(time.perf_counter() - began, len(kept))
            if not room:
                log.warning("KV tiers: the download thread is stuck; %d blocks not written down", len(kept) - i)
                self._give_up(kept[i:])
                return
            blocks, hashes = [b for b, _ in part], [h for _, h in part]
            self._downloads.put((hashes, gather_packed(blocks), time.perf_counter()))

    def _give_up(self, blocks: list[tuple[int, bytes]]) -> None:
        """Queued (block, hash) pairs that will not be written down (not counted as pending): counted as dropped,
        fetches waiting for them fail (and recompute)."""
        with self.lock:
            for tier in self.tiers:
                self.counters[tier.name].dropped += len(blocks)
        for _, h in blocks:
            self._landed(h, None)

    def _download_loop(self) -> None:
        """Start each gather's copy to the host (the copier's download, where rows are left on the device) and pass
        it to the writer; flushes and the stop pass through in order."""
        while (job := self._downloads.get()) is not None:
            if isinstance(job, tuple):
                job = self._downloaded(*job)
            self._jobs.put(job)
            job = None  # noqa: F841 - its pieces are not held while this thread waits for the next
        self._jobs.put(None)

    def _downloaded(self, hashes: list[bytes], pieces, began: float):
        """The job with its blocks copied into host rows (`DownRow`s; None: the copy failed, the blocks are given up),
        published in the host tier at once, for the writer to count and hand to the disk: fetches waiting for any of
        them, and fetches that ask from now on, get them without waiting for the writer's backlog."""
        downs: list[DownRow] = []
        try:
            downs += [self._down_row(h) for h in hashes]
            dests = [None if d.held else d.row for d in downs]
            at = 0
            for real, piece in pieces:
                wait, copy = (self.copier.download_into(piece, dests[at : at + real]) if self.copier is not None
                              else into_rows(piece, dests[at : at + real]))  # fmt: skip
                at += real
                with self.lock:
                    self.downloads.add(wait, copy)
            for h, d in zip(hashes, downs):  # complete rows: leased until the writer is done with them
                d.new = d.slot is not None and not d.held and self.host.publish(h, d.slot)
        except Exception:  # noqa: BLE001 - the blocks are given up (recomputed when asked for)
            log.exception("KV tiers: copying %d blocks to the host failed", len(hashes))
            for d in downs:
                if d.slot is not None:
                    self.host.release(d.slot)
            return hashes, None, began
        finally:
            with self._gathered_cv:
                self.gathered -= len(hashes)  # off the device (or given up)
                self._gathered_cv.notify_all()
        with self.lock:
            awaited = [(h, d.row) for h, d in zip(hashes, downs) if h in self.awaited]
        for h, row in awaited:
            self._fill(h, row, final=False)
        return hashes, downs, began

    def _down_row(self, h: bytes) -> DownRow:
        slot = self.host.lease(h)
        if slot is not None:
            return DownRow(slot, self.host.buf[slot], held=True)
        slot = self.host.reserve()
        return DownRow(slot, self.host.buf[slot] if slot is not None else np.empty(self.block_bytes, np.uint8))

    def _write_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            if isinstance(job, threading.Event) and self.disk is not None:
                self._disk_jobs.put(job)  # flush: set once the disk writes before it are done too
            elif isinstance(job, threading.Event):
                job.set()  # flush: everything before it is written
            else:
                self._write(*job)
            job = None  # noqa: F841 - its pieces are not held while the writer waits for the next
        self._disk_jobs.put(None)

    def _disk_loop(self) -> None:
        while (job := self._disk_jobs.get()) is not None:
            if isinstance(job, threading.Event):
                job.set()
            else:
                self._write_disk(*job)
            job = None  # noqa: F841 - its rows are not held while the writer waits for the next

    def _write_disk(self, hashes: list[bytes], rows: list, slots: list[int]) -> None:
        """Rows into the disk tier, then the host rows leased for them (`slots`) given back."""
        try:
            self._store("disk", self.disk, self.disk.write, hashes, rows, time.perf_counter())
        except Exception:  # noqa: BLE001 - the blocks are only not kept on disk; the engine goes on
            log.exception("KV tiers: writing %d blocks to disk failed", len(hashes))
        finally:
            for slot in slots:
                self.host.release(slot)
            with self.lock:
                self.disk_queued.difference_update(hashes)
                self.disk_pending -= len(hashes)

    def _queue_for_disk(self, hashes: list[bytes], rows: list) -> None:
        """Hand blocks to the disk writer: from their host rows, leased until written (no copy), or as copies where
        the host tier had no room for them; past max_disk_pending blocks behind, they skip the disk tier and are
        counted as dropped."""
        with self.lock:
            keep = [(h, row) for h, row in zip(hashes, rows) if h not in self.disk and h not in self.disk_queued]
            room = max(0, self.max_disk_pending - self.disk_pending)
            keep, dropped = keep[:room], len(keep) - min(room, len(keep))
            self.disk_pending += len(keep)
            self.disk_queued.update(h for h, _ in keep)
            self.counters["disk"].dropped += dropped
        if not keep:
            return
        out, slots = [], []
        for h, row in keep:
            slot = self.host.lease(h)
            out.append(np.array(row) if slot is None else self.host.buf[slot])  # a copy: the piece is not held
            if slot is not None:
                slots.append(slot)
        self._disk_jobs.put(([h for h, _ in keep], out, slots))

    def _store(self, name: str, tier, put, hashes: list[bytes], rows, began: float) -> None:
        """Rows into one tier (those it lacks), counted: bytes kept, blocks it had no room for, time."""
        counters = self.counters[name]
        for h, row in zip(hashes, rows):
            if h not in tier:
                stored = put(h, row)
                with self.lock:  # (dropped is counted by other threads too)
                    counters.bytes_written += stored * row.nbytes
                    counters.dropped += not stored
        with self.lock:
            counters.write_seconds += time.perf_counter() - began

    def _write(self, hashes: list[bytes], downs: list[DownRow] | None, began: float) -> None:
        """Count downloaded blocks (`_downloaded` published them in the host tier), take them out of flight (fetches
        still waiting get them), hand them to the disk's writer, then give the host rows' leases back; downs None:
        the download failed."""
        landed, counters, found = 0, self.counters["host"], []
        try:
            if downs is None:
                self._give_up([(-1, h) for h in hashes])
                landed = len(hashes)
                return
            for h, d in zip(hashes, downs):
                with self.lock:
                    counters.bytes_written += d.new * self.block_bytes
                    counters.dropped += d.slot is None  # no host row was free: on its way to disk only
                self._landed(h, d.row)  # fetches that asked since the download get it
                landed += 1
                found.append((h, d.row))
            if self.disk is not None:
                self._queue_for_disk([h for h, _ in found], [row for _, row in found])
        except Exception:  # noqa: BLE001 - the blocks are only not kept below; the engine goes on
            log.exception("KV tiers: writing %d blocks down failed", len(hashes))
        finally:
            for h in hashes[landed:]:
                self._landed(h, None)
            for d in downs or ():
                if d.slot is not None:
                    self.host.release(d.slot)
            with self.lock:
                counters.write_seconds += time.perf_counter() - began
                self.pending -= len(hashes)

    def _landed(self, h: bytes, row) -> None:
        """Block `h` is down (`row`: its content) or will never be (None): no longer in flight; rows that fetches
        reserved for it are filled (or fail, and are recomputed)."""
        self._fill(h, row, final=True)

    def _fill(self, h: bytes, row, final: bool) -> None:
        """Fill the rows that fetches reserved for block `h` with `row` (None: fail them); `final`: `h` is no longer
        in flight (else later fetches of a block with no host row still wait for the writer)."""
        with self.lock:
            if final:
                self.inflight.discard(h)
            waiters = self.awaited.pop(h, [])
        for fetch, i in waiters:
            ok = row is not None
            try:
                if ok:
                    self.host.buf[fetch.slots[i]] = row
            except Exception:  # noqa: BLE001 - that row is recomputed; the other waiters still get theirs
                log.exception("KV tiers: filling a fetched row failed")
                ok = False
            with self.lock:
                fetch.ok[i] = ok
                if fetch.dropped:
                    self.host.release(fetch.slots[i])
            self._settle(fetch)

    def drain(self, blocks: list[tuple[int, bytes]], gather_packed) -> None:
        """Write (device block, hash) pairs down and wait, a backlog's worth at a time so none is dropped (a clean
        stop: the prefix cache goes to disk for the next start)."""
        deadline = time.monotonic() + STOP_TIMEOUT_S
        self.dispatch(gather_packed)  # what is queued already goes first, and the backlogs empty before the batches
        done = self.flush(STOP_TIMEOUT_S)
        step = self.max_disk_pending if self.disk is not None else self.max_pending  # each batch fits both backlogs
        for i in range(0, len(blocks), step):
            if not done:
                log.warning("KV tiers: a stop left %d blocks unwritten (the writers were still busy after %.0f s)",
                            len(blocks) - i, STOP_TIMEOUT_S)  # fmt: skip
                return
            for block, h in blocks[i : i + step]:
                self.write_down(block, h)
            self.dispatch(gather_packed)
            done = self.flush(max(0.0, deadline - time.monotonic()))

    def flush(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Wait until everything queued so far is written down (before a shutdown or a restart); False if it was not
        within `timeout` seconds."""
        done = threading.Event()
        self._downloads.put(done)
        if not done.wait(timeout):
            log.warning("KV tiers: blocks still being written down after %.0f s", timeout)
            return False
        return True

    # -- up ---------------------------------------------------------------------------------------------------------

    def fetch(self, hashes: list[bytes], start: int, preempted: bool = False, room: bool = True) -> Fetch | None:
        """Lease the leading run of `hashes` found below the device and start reading its disk-only blocks (a block
        still on its way down is waited for: the download thread, or the writer, fills the row reserved for it); None
        if none is found, or loading them does not pay (policy)."""
        if self.policy == "recompute" and preempted:
            return None  # (should_load's answer, without leasing anything)
        fetch, awaits = Fetch(start, [], [], [], [], onload=self.copier is not None, room=room), []
        for h in hashes:
            slot, ok = self.host.lease(h), True
            on_disk = slot is None and self.disk is not None and h in self.disk
            if slot is None:
                with self.lock:
                    coming = h in self.inflight
                if not (on_disk or coming) or (slot := self.host.reserve()) is None:
                    break
                ok = None
                if not on_disk:
                    awaits.append(len(fetch.hashes))
            fetch.hashes.append(h)
            fetch.slots.append(slot)
            fetch.from_disk.append(on_disk)
            fetch.ok.append(ok)
        if not fetch.hashes:
            return None
        from_disk = sum(fetch.from_disk)
        if not should_load(self.policy, preempted, self.costs, self.block_bytes, self.block_size,
                           len(fetch.hashes) - from_disk, from_disk):  # fmt: skip
            fetch.ok = [False if ok is None else ok for ok in fetch.ok]  # never read or waited for: given back
            self.drop(fetch)
            return None
        for i, on_disk in enumerate(fetch.from_disk):
            if on_disk:
                self._readers.submit(self._read, fetch, i)
        for i in awaits:
            with self.lock:  # (published since the lookup: `_landed_late` copies it from the host tier)
                if fetch.hashes[i] in self.inflight and fetch.hashes[i] not in self.host:
                    self.awaited.setdefault(fetch.hashes[i], []).append((fetch, i))
                    continue
            self._landed_late(fetch, i)
        self._settle(fetch)
        return fetch

    def _landed_late(self, fetch: Fetch, i: int) -> None:
        """A block that landed between the lookup and the wait: from the host tier if it went there, else missing."""
        slot = self.host.lease(fetch.hashes[i])
        if slot is not None:
            self.host.buf[fetch.slots[i]] = self.host.buf[slot]
            self.host.release(slot)
        with self.lock:
            fetch.ok[i] = slot is not None
            if fetch.dropped:
                self.host.release(fetch.slots[i])
        self._settle(fetch)

    def _read(self, fetch: Fetch, i: int) -> None:
        h, slot, began = fetch.hashes[i], fetch.slots[i], time.perf_counter()
        ok = self.disk.read_into(h, self.host.buf[slot])
        seconds = time.perf_counter() - began
        if ok:
            self.host.publish(h, slot)
        with self.lock:  # (several readers count and measure at once)
            if ok:
                disk = self.counters["disk"]
                disk.bytes_read += self.block_bytes
                disk.read_seconds += seconds
                if self.costs is not None:
                    self.costs.observe_disk(self.block_bytes, seconds)
            fetch.ok[i] = ok
            if fetch.dropped:
                self.host.release(slot)
        self._settle(fetch)

    # -- onto the device --------------------------------------------------------------------------------------------

    def poll(self, fetch: Fetch, room: bool | None = True) -> bool:
        """Whether the fetch's sequence may be admitted now (the engine's thread asks each round); starts a staging
        that max_staged, or the pool's lack of `room` for the sequence, held back (None: room as last told)."""
        if room is not None:
            with self.lock:
                fetch.room = room
        self._settle(fetch)
        return fetch.admissible

    def _settle(self, fetch: Fetch) -> None:
        """Once every row of the fetch is in host memory, start moving its intact run to the device (within
        max_staged, unless nothing else is staged), if the pool has room to admit its sequence: a staged sequence
        that cannot be admitted would hold the staging bound while others, ready and admissible, wait behind it."""
        with self.lock:
            if fetch.ready and fetch.times[1] is None:
                fetch.times[1] = time.monotonic()
            if not fetch.onload or fetch.onloading or fetch.dropped or not fetch.ready or not fetch.room:
                return
            n = fetch.valid
            held = self.copier.staged_rows(n) if n else 0  # device rows its staging holds (whole landing pieces)
            if n and self.staged_blocks and self.staged_blocks + held > self.max_staged:
                return  # poll starts it once staged blocks are taken
            fetch.onloading, fetch.staged_n = True, held
            fetch.times[2] = time.monotonic()
            self.staged_blocks += held
        if n:
            self._onloader.submit(self._onload, fetch, n)
        else:
            self._onloaded(fetch, [])

    def _onload(self, fetch: Fetch, n: int) -> None:
        """The onload thread: rows 0..n of the fetch onto the device, waited for here (not by a step); none for a fetch
        dropped while it queued (the transfers behind it would wait for nothing)."""
        with self.lock:
            dropped = fetch.dropped
        if dropped:
            self._onloaded(fetch, [])
            return
        try:
            began, fetch.times[3] = time.perf_counter(), time.monotonic()
            rows = [self.host.buf[s] for s in fetch.slots[:n]]
            fetch.runs = len(runs(rows))
            staged = self.copier.stage(rows, self.host.unpin is not None)
            fetch.stage = self.copier.last_stage
            with self.lock:
                if self.costs is not None:
                    self.costs.observe_onload(n * self.block_bytes, time.perf_counter() - began)
        except Exception:  # noqa: BLE001 - the blocks are recomputed instead
            log.exception("KV tiers: moving %d blocks to the device failed; they are recomputed", n)
            with self.lock:
                fetch.ok = [False] * len(fetch.ok)
            staged = []
        self._onloaded(fetch, staged)

    def _onloaded(self, fetch: Fetch, staged: list) -> None:
        """The staged copies are on the device: the host rows go back (the copies never alias them)."""
        with self.lock:
            for slot in fetch.slots:
                self.host.release(slot)
            fetch.slots = []
            if fetch.dropped:
                self._unstage(fetch)
                return
            fetch.staged, fetch.times[4] = staged, time.monotonic()
        if self.wake is not None:
            self.wake()

    def _unstage(self, fetch: Fetch) -> None:
        """(under self.lock) The fetch's staged blocks no longer count against max_staged."""
        self.staged_blocks -= fetch.staged_n
        fetch.staged_n = 0

    def drop(self, fetch: Fetch) -> None:
        """Give back every row of a fetch that will not be loaded (rows still being read or staged: once done) and
        its staged copies."""
        with self.lock:
            fetch.dropped = True
            if fetch.onloading:
                if fetch.staged is not None:  # staged already (else _onloaded gives back the rest)
                    fetch.staged = None
                    self._unstage(fetch)
                return
            for slot, ok in zip(fetch.slots, fetch.ok):
                if ok is not None:
                    self.host.release(slot)

    def take(self, fetch: Fetch, skip: int, limit: int) -> tuple[PackedBlocks | None, Lookup]:
        """Rows skip..skip+n of an admissible fetch (n <= limit: its intact run; staged: their device copies) and what
        was looked up and found (for `count`, once the sequence is admitted); the rest is given back."""
        n = max(0, min(fetch.valid - skip, limit))
        used = range(skip, skip + n)
        from_disk = sum(fetch.from_disk[i] for i in used)
        lookup = Lookup(len(fetch.hashes) - skip, n - from_disk, from_disk)
        if fetch.staged is not None:  # on the device already: no transfer left for the step
            with self.lock:
                self._unstage(fetch)
                if fetch.staged:  # (none: nothing intact, or the transfer failed)
                    self.waits.add(fetch.times, time.monotonic(), len(fetch.staged), fetch.runs, fetch.stage)
            staged, fetch.staged = fetch.staged, None
            return (PackedBlocks(self.layout, staged[skip : skip + n]) if n else None), lookup
        for i, slot in enumerate(fetch.slots):
            if i not in used:
                self.host.release(slot)
        if not n:
            return None, lookup
        slots = [fetch.slots[i] for i in used]
        return PackedBlocks(self.layout, [self.host.buf[s] for s in slots], lease=slots,
                            page_locked=self.host.unpin is not None), lookup

    def count(self, lookup: Lookup) -> None:
        """Count an admitted sequence's lookup as queries and hits, in tokens (the disk is asked for what the host
        tier lacked)."""
        host, disk = self.counters["host"], self.counters.get("disk")
        host.queries += lookup.looked_up * self.block_size
        host.hits += lookup.from_host * self.block_size
        host.bytes_read += (lookup.from_host + lookup.from_disk) * self.block_bytes
        if disk is not None:
            disk.queries += (lookup.looked_up - lookup.from_host) * self.block_size
            disk.hits += lookup.from_disk * self.block_size

    def release(self, packed: PackedBlocks) -> None:
        """The write that read these rows has run: they may be reused."""
        for slot in packed.lease:
            self.host.release(slot)

    # -- gauges -----------------------------------------------------------------------------------------------------

    def stats(self) -> list[TierStats]:
        out = []
        for tier in self.tiers:
            c = self.counters[tier.name]
            errors = getattr(tier, "errors", 0)
            out.append(TierStats(tier.name, tier.capacity_bytes, tier.used_bytes, c.queries, c.hits, c.bytes_written,
                                 c.bytes_read, c.write_seconds, c.read_seconds, errors, c.dropped))  # fmt: skip
        return out

    def report(self) -> str:
        """One line for the engine's loop log."""
        parts = []
        for s in self.stats():
            rate = s.hits / s.queries if s.queries else 0.0
            parts.append(f"{s.tier} {s.used_bytes / 2**30:.2f}/{s.capacity_bytes / 2**30:.2f} GiB, hits {rate:.0%} of "
                         f"{s.queries} tokens, {s.bytes_written / 2**20:.0f} MiB down, {s.bytes_read / 2**20:.0f} MiB up"
                         + (f", {s.errors} errors" if s.errors else ""))  # fmt: skip
        with self.lock:
            waits, self.waits = self.waits, LoadWaits()
            downloads, self.downloads = self.downloads, Downloads()
        onload = f"; onload {self.costs.onload_rate() / 1e9:.1f} GB/s" if self.costs is not None else ""
        return "KV tiers: " + "; ".join(parts) + f"; {waits.report()}{onload}; {downloads.report()}"

    def close(self) -> None:
        """Stop the writers (after the writes queued so far, within STOP_TIMEOUT_S in all), the readers and the
        onload thread; the manager takes no work after this."""
        self.closed = True
        deadline = time.monotonic() + STOP_TIMEOUT_S
        self._downloads.put(None)  # passed on to the writer, and by it to the disk writer
        self._downloader.join(timeout=STOP_TIMEOUT_S)
        self._writer.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.disk is not None:
            self._disk_writer.join(timeout=max(0.0, deadline - time.monotonic()))
        # a disk that hangs: its readers may too
        stuck = self._downloader.is_alive() or self._writer.is_alive() or self._disk_writer.is_alive()
        if stuck:
            log.warning("KV tiers: the writers did not stop within %.0f s; their blocks are lost", STOP_TIMEOUT_S)
        self._readers.shutdown(wait=not stuck, cancel_futures=stuck)
        self._onloader.shutdown(wait=not stuck, cancel_futures=stuck)

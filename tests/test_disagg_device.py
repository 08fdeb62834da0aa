"""The device-to-device hand-off path, no engines. CUDA IPC itself needs two processes on a CUDA host (gpu_run.sh pd
measures it and checks the bytes); here its driver is replaced by an in-process registry, so everything around it
runs for real: the offer of exported pieces, the copies checked by their device checksums, the hand-off released
once copied, the host staging left to a pull that asks for a host path, and clear failures."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_out

from rtpjax.disagg import channel, device_ipc, staging
from rtpjax.kv.block_copy import rows_to_host
from rtpjax.kv.host_blocks import KVLayout

LAYOUT = KVLayout("bfloat16", 4, 2, 2, 8)


def reference_checksum(rows: np.ndarray, real: int) -> list[int]:
    words = rows[:real].reshape(-1).view("<u4").astype(np.uint64)
    position = np.arange(words.size, dtype=np.uint64)
    return [int(words.sum() % 2**32), int((words * (2 * position + 1)).sum() % 2**32)]


def sums(parts):
    return device_ipc.checksums([(jnp.asarray(rows), real) for rows, real in parts])


def test_checksum_matches_its_reference_and_sees_flips_and_moves():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 256, (8, LAYOUT.block_bytes), dtype=np.uint8)
    for real in (1, 5, 8):
        assert sums([(rows, real)]) == [reference_checksum(rows, real)]
    base = sums([(rows, 5)])
    past = rows.copy()
    past[6, 3] ^= 0xFF  # padding rows do not count
    assert sums([(past, 5)]) == base
    for r, c in rng.integers(0, [5, LAYOUT.block_bytes], (20, 2)):
        flipped = rows.copy()
        flipped[r, c] ^= 1 << int(rng.integers(8))
        assert sums([(flipped, 5)]) != base
    moved = rows.copy()
    moved[0, :4], moved[1, :4] = rows[1, :4], rows[0, :4]  # two words swapped: the plain sum cannot see it
    assert not np.array_equal(moved, rows) and sums([(moved, 5)]) != base


def test_a_cpu_device_takes_the_host_paths():
    assert not device_ipc.available(jax.devices("cpu")[0])


class FakeDriver:
    """Exports by id into a registry; copies back from it (optionally flipping a byte, or failing as a driver does)."""

    def __init__(self):
        self.exported: dict[bytes, np.ndarray] = {}
        self.released: list[bytes] = []
        self.flip = self.fail = False

    def export_pieces(self, arrays):
        handle = len(self.exported).to_bytes(64, "little")
        self.exported[handle] = np.concatenate([np.asarray(a).reshape(-1).view(np.uint8) for a in arrays])
        offsets = np.cumsum([0] + [a.nbytes for a in arrays[:-1]]).tolist()
        return device_ipc.Exported(handle, offsets, lambda: self.released.append(handle))

    def copy_in(self, handle, parts, dtype, device):
        if self.fail:
            raise device_ipc.IPCError("cuIpcOpenMemHandle failed: invalid device context (201)")
        out = []
        for offset, shape in parts:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            data = self.exported[handle][offset : offset + nbytes].copy()
            if self.flip:
                data[len(data) // 3] ^= 0x10
            out.append(jax.device_put(data.view(dtype).reshape(shape), device))
        return out


@pytest.fixture
def served(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(device_ipc, "export_pieces", fake.export_pieces)
    monkeypatch.setattr(device_ipc, "copy_in", fake.copy_in)
    monkeypatch.setattr(staging, "CHUNK", 2 * LAYOUT.block_bytes)
    store = staging.HeldStore()
    server = channel.TransferServer(store, "127.0.0.1", 0)
    yield store, server, fake
    server.close()
    store.close()


def _hold(store, rows: np.ndarray, buckets: list[int], staged_by: list) -> None:
    """Offer `rows` as gathered device pieces, each padded to its bucket, staged for the host only on demand."""
    pieces, at = [], 0
    for bucket in buckets:
        real = min(bucket, len(rows) - at)
        padded = np.zeros((bucket, LAYOUT.block_bytes), np.uint8)
        padded[:real] = rows[at : at + real]
        pieces.append((real, jnp.asarray(padded)))
        at += real

    def stage():
        staged_by.append(True)
        return store.stage(list(pieces), LAYOUT)

    store.put("t", staging.Held(LAYOUT, len(rows), 4 * len(rows), [1], time.monotonic() + 30, None, pieces, stage))


def _take(layout, copied, pieces):
    return [row for rows, piece in zip(copied, pieces) for row in rows[: piece.real]]


TO_DEVICE = channel.DeviceLoad(jax.devices()[0], _take)


def _pull(server, path):
    return channel.pull("127.0.0.1", server.port, "t", path, time.monotonic() + 30, load_device=TO_DEVICE)


def _wait_released(fake):
    for _ in range(100):  # the serving thread releases the export just after the pull returns
        if fake.released == list(fake.exported):
            return
        time.sleep(0.02)
    assert fake.released == list(fake.exported), "an export buffer was never given back"


def test_device_pull_copies_the_pieces_and_never_stages(served):
    store, server, fake = served
    rows = np.random.default_rng(1).integers(0, 256, (5, LAYOUT.block_bytes), dtype=np.uint8)
    staged_by = []
    _hold(store, rows, [4, 2], staged_by)  # two pieces: 4 rows, then 1 of 2
    assert store.device_bytes() == 6 * LAYOUT.block_bytes  # what the prefill engine's hold budget counts
    got = _pull(server, "device")
    np.testing.assert_array_equal(np.stack([np.asarray(r) for r in got.rows]), rows)
    assert got.num_tokens == 20 and got.times.keys() == {"d2d_offer", "d2d_copy"}
    assert not staged_by, "a device pull staged the K/V in host memory"
    assert len(fake.exported) == 1
    _wait_released(fake)
    with pytest.raises(channel.TransferError, match="unknown, taken or expired"):
        _pull(server, "device")  # served once


@pytest.mark.parametrize("path", ["shm", "tcp"])
def test_a_host_pull_stages_a_device_hand_off_on_demand(served, path):
    store, server, fake = served
    rows = np.random.default_rng(2).integers(0, 256, (3, LAYOUT.block_bytes), dtype=np.uint8)
    staged_by = []
    _hold(store, rows, [4], staged_by)
    got = _pull(server, path)
    np.testing.assert_array_equal(np.stack(got.rows), rows)
    assert staged_by == [True] and not fake.exported


@pytest.mark.parametrize("fault, error, says", [("flip", channel.TransferError, "device checksum"),
                                                ("fail", channel.DeviceCopyError, "cuIpcOpenMemHandle")])
def test_a_bad_device_copy_is_refused_and_the_export_released(served, fault, error, says):
    store, server, fake = served
    setattr(fake, fault, True)
    _hold(store, np.full((2, LAYOUT.block_bytes), 7, np.uint8), [2], [])
    with pytest.raises(error, match=says):
        _pull(server, "device")
    _wait_released(fake)


def test_an_export_that_fails_serves_the_host_path(served, monkeypatch):
    store, server, fake = served

    def refuse(arrays):
        raise device_ipc.IPCError("no export buffer for 4096 bytes")

    monkeypatch.setattr(device_ipc, "export_pieces", refuse)
    rows = np.random.default_rng(4).integers(0, 256, (3, LAYOUT.block_bytes), dtype=np.uint8)
    staged_by = []
    _hold(store, rows, [4], staged_by)
    got = _pull(server, "device")
    np.testing.assert_array_equal(np.stack(got.rows), rows)
    assert staged_by == [True] and "d2d_offer" not in got.times


def test_a_device_offer_needs_a_device_copy(served):
    store, server, _ = served
    _hold(store, np.full((2, LAYOUT.block_bytes), 7, np.uint8), [2], [])
    with pytest.raises(channel.TransferError, match="cannot be taken here"):
        channel.pull("127.0.0.1", server.port, "t", "device", time.monotonic() + 30)


def test_copy_destinations_are_reused_and_bounded():
    """The decode side's arrays for the copies: one given back is the next lease of its shape; idle bytes bounded."""
    pool, device = device_ipc.ReusedArrays(600), jax.devices()[0]
    a = pool.lease((4, 64), jnp.dtype(jnp.uint8), device)
    assert a.shape == (4, 64) and not np.asarray(a).any()
    pool.give_back(a)
    assert pool.lease((4, 64), jnp.dtype(jnp.uint8), device) is a
    assert pool.lease((4, 64), jnp.dtype(jnp.uint8), device) is not a  # leased: never two holders
    arrays = [pool.lease((4, 64), jnp.dtype(jnp.uint8), device) for _ in range(3)]
    for array in arrays:
        pool.give_back(array)
    assert [id(x) for x, _ in pool._idle] == [id(x) for x in arrays[1:]]  # the oldest dropped past the bound (600 bytes: two of 256)


class FakeCuda:
    """The driver calls _Driver makes, recorded (ctypes.byref arguments filled as the driver fills them)."""

    def __init__(self):
        self.allocated, self.freed, self.closed, self.streams, self.synced, self.copies = [], [], [], 0, 0, []
        self.fail_copy_at = None
        self.buffer_size = 64 << 20  # of every peer's buffer opened
        ok = lambda *a: 0  # noqa: E731
        self.cuInit = self.cuCtxSetCurrent = ok
        self.cuDeviceGet = lambda dev, ordinal: setattr(dev._obj, "value", ordinal) or 0
        self.cuDevicePrimaryCtxRetain = lambda ctx, dev: setattr(ctx._obj, "value", 1) or 0
        self.cuGetErrorString = lambda result, text: setattr(text._obj, "value", b"fake failure") or 0
        self.cuMemFree_v2 = lambda address: self.freed.append(address) or 0
        self.cuIpcCloseMemHandle = lambda address: self.closed.append(address.value) or 0

        def alloc(address, size):
            address._obj.value = (len(self.allocated) + 1) << 40
            self.allocated.append(size.value)
            return 0

        def handle(out, address):
            out._obj.reserved[:8] = list(address.value.to_bytes(8, "little"))
            return 0

        def stream(out, flags):
            self.streams += 1
            out._obj.value = self.streams
            return 0

        def copy(dst, src, nbytes, stream):
            self.copies.append((dst, src, nbytes))
            return 1 if len(self.copies) == self.fail_copy_at else 0

        def synchronize(stream):
            self.synced += 1
            return 0

        def open_handle(ptr, handle, flags):
            ptr._obj.value = int.from_bytes(bytes(handle)[:8], "little") + (1 << 60)
            return 0

        def address_range(base, size, address):
            base._obj.value, size._obj.value = address, self.buffer_size
            return 0

        self.cuMemGetAddressRange_v2 = address_range
        self.cuMemAlloc_v2, self.cuIpcGetMemHandle, self.cuStreamCreate = alloc, handle, stream
        self.cuMemcpyDtoDAsync_v2, self.cuStreamSynchronize, self.cuIpcOpenMemHandle_v2 = copy, synchronize, open_handle
        self.cuMemcpyHtoDAsync_v2 = self.cuMemcpyDtoHAsync_v2 = copy


def test_export_buffers_are_reused_bounded_and_never_freed(monkeypatch):
    monkeypatch.setattr(device_ipc, "MAX_EXPORT_BYTES", 64 << 20)
    cuda = FakeCuda()
    driver = device_ipc._Driver(cuda)
    small, large = driver.lease(0, 1000), driver.lease(0, 20 << 20)
    assert (small.size, large.size) == (16 << 20, 32 << 20)  # powers of two from MIN_BUFFER
    assert len({small.handle, large.handle}) == 2
    driver.give_back(large)
    driver.give_back(small)
    assert driver.lease(0, 5000) is small  # the smallest idle buffer that fits
    assert driver.lease(0, 20 << 20) is large
    with pytest.raises(device_ipc.IPCError, match="no export buffer"):
        driver.lease(0, 20 << 20)  # both leased: 32 MiB more would pass the bound of 64
    assert cuda.freed == [] and driver.exported_bytes == 48 << 20 and len(cuda.allocated) == 2


def test_a_failed_copy_waits_for_those_already_enqueued():
    cuda = FakeCuda()
    driver = device_ipc._Driver(cuda)
    cuda.fail_copy_at = 2
    with pytest.raises(device_ipc.IPCError, match="cuMemcpyDtoDAsync failed: fake failure"):
        driver.copy(0, [(1, 2, 3), (4, 5, 6), (7, 8, 9)])
    assert len(cuda.copies) == 2 and cuda.synced == 1  # the first copy had landed before the error was raised
    driver.copy(0, [(1, 2, 3)])
    assert cuda.streams == 1  # the stream went back to the pool


def test_peers_buffers_stay_open_up_to_a_bound(monkeypatch):
    monkeypatch.setattr(device_ipc, "KEEP_OPENED", 2)
    cuda = FakeCuda()
    driver = device_ipc._Driver(cuda)
    handles = [i.to_bytes(8, "little") + bytes(56) for i in (1, 2, 3)]
    bases = [driver.opened(0, h)[0] for h in handles[:2]]
    assert driver.opened(0, handles[0]) == (bases[0], 64 << 20)  # kept open, now the most recent
    driver.opened(0, handles[2])
    assert cuda.closed == [bases[1]]  # the least recently used went


def test_a_peers_offsets_past_its_buffer_are_refused_before_any_copy(monkeypatch):
    """The decode side asks the driver how large the opened buffer is: an offer whose piece would read past it (a
    confused or hostile peer) fails as a device copy does (the request then recomputes), and nothing is copied."""
    cuda = FakeCuda()
    cuda.buffer_size = 4096
    monkeypatch.setattr(device_ipc, "_DRIVER", [device_ipc._Driver(cuda)])
    handle, device = (7).to_bytes(8, "little") + bytes(56), jax.devices()[0]
    (out,) = device_ipc.copy_in(handle, [(1024, (4, 512))], jnp.uint8, device)  # 2048 bytes ending at 3072: inside
    assert out.shape == (4, 512) and len(cuda.copies) == 1
    for offset in (2560, -1):  # ending at 4608, and before the start
        with pytest.raises(device_ipc.IPCError, match=f"2048 bytes at offset {offset} of an exported buffer of 4096"):
            device_ipc.copy_in(handle, [(offset, (4, 512))], jnp.uint8, device)
    assert len(cuda.copies) == 1


def test_a_prefill_engine_holds_hand_offs_on_its_device_within_a_budget(stories_llm, monkeypatch):
    """An engine whose device can export (faked here) keeps a hand-off on its device and says so in its
    kv_transfer_params; past its byte budget it stages at once as before. A device pull of the one held gives the
    gathered rows, as the decode engine's rows (Handoff._take_device), and the copies go back to their pool."""
    from rtpjax import SamplingParams
    from rtpjax.disagg import handoff as handoff_module
    from rtpjax.distributed.messages import KVTransferParams

    fake = FakeDriver()
    monkeypatch.setattr(device_ipc, "export_pieces", fake.export_pieces)
    monkeypatch.setattr(device_ipc, "copy_in", fake.copy_in)
    monkeypatch.setattr(device_ipc, "available", lambda device: True)
    returned = []
    monkeypatch.setattr(device_ipc, "give_back", returned.extend)
    engine = stories_llm.engine
    handoff = handoff_module.Handoff(engine, wake=lambda: None)
    assert handoff.ipc_device is not None

    def detach(rid: str, prompt: str):
        msg = engine.maker.message(prompt, SamplingParams(max_tokens=8, temperature=0), rid)
        msg.kv_transfer_params = KVTransferParams(do_remote_decode=True)
        assert handoff.add(msg) is None
        for _ in range(30):
            engine.step(as_deltas=True)
            if out := handoff.after_step():
                return out[0].kv_transfer_params
        raise AssertionError(f"{rid} was never handed off")

    try:
        first = detach("p", "Once upon a time, there was a little girl named Lily. She loved to")
        held = handoff.store._held["p"]
        assert first.remote_device_ipc and held.staged is None and held.pieces
        expected = np.concatenate([np.asarray(a)[:real] for real, a in held.pieces])
        pieces = len(held.pieces)
        monkeypatch.setattr(handoff_module, "DEVICE_HOLD_BYTES", handoff.store.device_bytes())  # now full
        second = detach("q", "Once upon a time, there was a big dog. It liked to run")
        assert not second.remote_device_ipc and handoff.store._held["q"].staged is not None
        got = channel.pull(first.remote_host, first.remote_port, "p", "device", time.monotonic() + 30, handoff._load,
                           channel.DeviceLoad(handoff.ipc_device, handoff._take_device))  # fmt: skip
        assert np.array_equal(rows_to_host(got.rows), expected)
        assert len(got.rows) == len(first.remote_block_ids) and len(returned) == pieces  # every copy back in the pool
    finally:
        for rid in list(engine.requests):
            engine.abort(rid)
        run_out(engine)
        handoff.close()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_copies_onto_several_devices_are_all_enqueued_before_any_wait():
    """Host rows going to every device of a tensor-parallel cache cross at once: each device's copies are enqueued
    on its own stream, and only then is each stream waited for; a failure stops the enqueueing but still waits for
    what was enqueued."""
    cuda, events, failing = FakeCuda(), [], set()
    cuda.cuMemcpyHtoDAsync_v2 = lambda dst, src, nbytes, stream: (
        events.append(("copy", stream.value, dst)) or int(dst in failing))  # fmt: skip
    cuda.cuStreamSynchronize = lambda stream: events.append(("wait", stream.value)) or time.sleep(0.05) or 0
    driver = device_ipc._Driver(cuda)
    began = time.perf_counter()
    enqueuing = driver.copy_each({0: [(1, 2, 3), (4, 5, 6)], 1: [(7, 8, 9)]}, "up")
    assert 0 <= enqueuing < 0.05 <= time.perf_counter() - began  # the waits are not counted as enqueuing
    assert events == [("copy", 1, 1), ("copy", 1, 4), ("copy", 2, 7), ("wait", 1), ("wait", 2)]
    events.clear()
    failing.add(4)
    with pytest.raises(device_ipc.IPCError, match="cuMemcpyHtoDAsync failed"):
        driver.copy_each({0: [(1, 2, 3), (4, 5, 6)], 1: [(7, 8, 9)]}, "up")
    assert events == [("copy", 1, 1), ("copy", 1, 4), ("wait", 1)]  # device 1 never started; device 0 waited for
    assert cuda.streams == 2  # both streams went back to their pools and were reused


def test_copies_spread_over_streams_cover_each_copy_once_in_pages():
    """streams > 1: each copy is cut into consecutive page-aligned pieces, one a stream (a copy smaller than a page
    a stream stays whole), every byte copied once, every stream waited for and given back."""
    moves = [(1 << 30, 1 << 20, 10 * 4096 + 5), (2 << 30, 3 << 20, 100)]
    for parts in (1, 2, 4):
        pieces = device_ipc.split_moves(moves, parts)
        covered = {}
        for dst, src, nbytes in pieces:
            assert nbytes > 0 and dst % 4096 == (1 << 30) % 4096 and (dst - src) in (1023 << 20, (2 << 30) - (3 << 20))
            covered[dst] = nbytes
        assert sum(covered.values()) == sum(n for _, _, n in moves) and len(covered) == len(pieces)
        assert len(pieces) == (2 if parts == 1 else parts + 1)
        ends = sorted((dst, dst + n) for dst, _, n in pieces)
        assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # no byte twice
    cuda, events = FakeCuda(), []
    cuda.cuMemcpyHtoDAsync_v2 = lambda dst, src, nbytes, stream: events.append((stream.value, nbytes)) or 0
    cuda.cuStreamSynchronize = lambda stream: events.append(("wait", stream.value)) or 0
    driver = device_ipc._Driver(cuda)
    driver.copy_each({0: [(0, 0, 3 * 4096)]}, "up", streams=3)
    assert events == [(1, 4096), (2, 4096), (3, 4096), ("wait", 1), ("wait", 2), ("wait", 3)]
    with pytest.raises(ValueError, match="at least one stream"):
        driver.copy_each({0: [(0, 0, 4096)]}, "up", streams=0)

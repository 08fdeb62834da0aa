"""The device-to-device hand-off path, no engines. CUDA IPC itself needs two processes on a CUDA host (gpu_run.sh pd
measures it and checks the bytes); here its driver is replaced by an in-process registry, so everything around it
runs for real: the offer of exported pieces, the copies checked by their device checksums, the hand-off released
once copied, the host staging left to a pull that asks for a host path, and clear failures."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.disagg import channel, device_ipc, staging
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
    if not np.array_equal(moved, rows):
        assert sums([(moved, 5)]) != base


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


def _load_device(layout, pieces):
    copied = channel.device_pieces(pieces, layout.block_bytes, jax.devices()[0])
    return [row for rows, piece in zip(copied, pieces) for row in rows[: piece.real]]


def _pull(server, path):
    return channel.pull("127.0.0.1", server.port, "t", path, time.monotonic() + 30, load_device=_load_device)


def _wait_empty(store):
    for _ in range(100):  # the serving thread releases the hand-off just after the pull returns
        if not len(store):
            return
        time.sleep(0.02)


def test_device_pull_copies_the_pieces_and_never_stages(served):
    store, server, fake = served
    rows = np.random.default_rng(1).integers(0, 256, (5, LAYOUT.block_bytes), dtype=np.uint8)
    staged_by = []
    _hold(store, rows, [4, 2], staged_by)  # two pieces: 4 rows, then 1 of 2
    got = _pull(server, "device")
    np.testing.assert_array_equal(np.stack([np.asarray(r) for r in got.rows]), rows)
    assert got.num_tokens == 20 and got.times.keys() == {"d2d_offer", "d2d_copy"}
    assert not staged_by, "a device pull staged the K/V in host memory"
    assert len(fake.exported) == 1
    for _ in range(100):  # the serving thread releases the buffer once the decode side answered
        if fake.released:
            break
        time.sleep(0.02)
    assert fake.released == list(fake.exported)
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


def test_a_corrupted_device_copy_is_refused(served):
    store, server, fake = served
    fake.flip = True
    _hold(store, np.full((2, LAYOUT.block_bytes), 7, np.uint8), [2], [])
    with pytest.raises(channel.TransferError, match="device checksum"):
        _pull(server, "device")
    _wait_empty(store)
    assert not len(store)


def test_a_failed_device_copy_says_so(served):
    store, server, fake = served
    fake.fail = True
    _hold(store, np.full((2, LAYOUT.block_bytes), 7, np.uint8), [2], [])
    with pytest.raises(channel.DeviceCopyError, match="cuIpcOpenMemHandle"):
        _pull(server, "device")


def test_a_device_offer_needs_a_device_copy(served):
    store, server, _ = served
    _hold(store, np.full((2, LAYOUT.block_bytes), 7, np.uint8), [2], [])
    with pytest.raises(channel.TransferError, match="cannot be taken here"):
        channel.pull("127.0.0.1", server.port, "t", "device", time.monotonic() + 30)


def test_copy_destinations_are_reused_and_bounded(monkeypatch):
    """The decode side's arrays for the copies: one given back is the next lease of its shape; idle bytes bounded."""
    pool, device = device_ipc._Destinations(), jax.devices()[0]
    a = pool.lease((4, 64), jnp.dtype(jnp.uint8), device)
    assert a.shape == (4, 64) and not np.asarray(a).any()
    pool.give_back([a])
    assert pool.lease((4, 64), jnp.dtype(jnp.uint8), device) is a
    assert pool.lease((4, 64), jnp.dtype(jnp.uint8), device) is not a  # leased: never two holders
    monkeypatch.setattr(device_ipc, "KEEP_DESTINATION_BYTES", 600)
    arrays = [pool.lease((4, 64), jnp.dtype(jnp.uint8), device) for _ in range(3)]
    pool.give_back(arrays)
    assert pool._idle == arrays[1:]  # the oldest dropped past the bound

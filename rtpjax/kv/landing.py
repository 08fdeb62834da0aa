"""Device arrays that host rows land in by the CUDA driver: reused, so a transfer never waits for the steps queued.

On GPUs XLA allocates in step order: a new device array may only be written once every computation queued before it
was made has run, so each `device_put` of host rows waits for the steps ahead of it on the device, under load far
longer than the copy itself. A KV tier's onload thread instead copies its rows, with
the driver's host-to-device copy on a stream of its own, into arrays made once and reused (`Landing`); the copy out
that reads them queues behind the steps as a step's write would, and an array is reused only after it has run.
This and disagg's device-to-device hand-off are where rtpjax writes device memory behind XLA's back; both write only
arrays that nothing else holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.disagg import device_ipc


class Landing:
    """Reusable [rows, row_bytes] uint8 arrays on the devices of `sharding` (replicated), for copies from the host."""

    def __init__(self, sharding: jax.sharding.Sharding, row_bytes: int, keep_rows: int, streams: int = 1):
        """`keep_rows`: idle arrays kept, in rows (more are dropped once given back); `streams`: each device's copies
        spread over that many streams (device_ipc.split_moves)."""
        self.sharding, self.row_bytes, self.keep_rows, self.streams = sharding, row_bytes, keep_rows, streams
        self.arrays = device_ipc.ReusedArrays(keep_rows * row_bytes)

    @staticmethod
    def usable(sharding: jax.sharding.Sharding) -> bool:
        """Whether the driver can copy onto every device of `sharding` (CUDA GPUs)."""
        return all(device_ipc.available(d) for d in sharding.device_set)

    def warm(self, sizes: list[int]) -> None:
        """Make an idle array of each of `sizes` rows now (at warm-up, while the device is idle: making one waits
        for the steps queued ahead of it)."""
        made = [self.lease(rows) for rows in sizes]  # (all leased at once: none is reused for the next size)
        for array in made:
            self.arrays.give_back(array)

    def lease(self, rows: int) -> jax.Array:
        """An array of `rows` rows that nothing reads any more (device_ipc.ReusedArrays.lease)."""
        return self.arrays.lease((rows, self.row_bytes), jnp.uint8, self.sharding)

    def give_back(self, array: jax.Array, guard: jax.Array | None) -> None:
        """`array` may be reused once `guard` (the output of its last reader, already dispatched) is ready."""
        self.arrays.give_back(array, guard)

    def copy(self, array: jax.Array, moves: list[tuple[int, int, int]]) -> float:
        """Copy each (row offset, host address, rows) into `array`, on every device it lies on at once; returns once
        landed (device_ipc.IPCError if a copy failed), with the seconds enqueuing the copies took."""
        return device_ipc.copy_up({shard.device.local_hardware_id: [
            (shard.data.unsafe_buffer_pointer() + at * self.row_bytes, address, n * self.row_bytes)
            for at, address, n in moves] for shard in array.addressable_shards}, self.streams)  # fmt: skip


def moves(rows: list[np.ndarray], runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(row offset, host address, rows) copies for host rows found in `runs` (block_copy.runs: start, count, step):
    one per run, a backward one landing reversed from its lowest address (`in_order` puts its rows back)."""
    return [(start, rows[start if step > 0 else start + count - 1].ctypes.data, count) for start, count, step in runs]


def in_order(landed: list, runs: list[tuple[int, int, int]]) -> list:
    """The rows of a landing array (in its row order) in the order of the host rows they came from: each
    backward run of `runs` landed reversed."""
    out = list(landed)
    for start, count, step in runs:
        if step < 0:
            out[start : start + count] = out[start : start + count][::-1]
    return out

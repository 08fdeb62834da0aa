"""Copies of whole KV blocks between the device cache and the host (`KVBlocks`), for moving requests and host tiers.

One gather and one write executable per block-count bucket (powers of two): ids are padded, a padded read takes block
0 and is cut off on the host, a padded write goes to an index past the cache and is dropped. Counts beyond the largest
bucket go in pieces of it. The executables are compiled at warm-up, so a copy never compiles while serving.

The cache is threaded through like a step's (the write donates it), so JAX orders a copy after every step dispatched
before it: a gather sees the K/V of a step still running. Under tensor parallelism a gather returns the model's KV
heads whole (one of each copy) and a write repeats them into the cache's copies, keeping the cache's sharding.

Host copies go through page-locked memory where the backend has JAX's "pinned_host" memory kind: a gather's rows
leave the device by `device_put` into pinned host memory (a DMA on a transfer stream, not the step's queue; the engine
thread only dispatches it), or, for a KV tier on CUDA GPUs, by the driver straight into the tier's own page-locked
rows (`download_into`), and host rows reach the device in runs of consecutive rows (forwards or backwards in
memory: a tier writes a sequence's blocks down tail first), one transfer per power-of-two piece (pageable rows staged
once into pinned memory, page-locked ones read directly). Rows on the device stay in the piece they crossed in
(`OnDevice`): a piece is one device array however many rows it holds, and the write before a step takes one piece
per dispatch. A KV tier stages its rows this way on its own thread (`stage`, waiting there for the transfer, not for
the piece's copy out of its landing array, which queues behind the steps like the write that reads its rows), so the
write before a step reads rows already on the device and neither the step nor the engine's thread waits for a
host-to-device copy.
Without pinned_host (logged once) the same calls copy through pageable memory.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.disagg import device_ipc
from rtpjax.disagg.device_ipc import IPCError
from rtpjax.kv import landing
from rtpjax.kv.host_blocks import KVBlocks, KVLayout, PackedBlocks
from rtpjax.kv.landing import Landing

log = logging.getLogger("rtpjax")
PINNED = "pinned_host"
_warned: set[str] = set()
_warned_sizes: set[tuple[str, int]] = set()  # (copy kind, rows) compiled at first use, said once
_locked: dict[int, int] = {}  # start address -> end of host memory mapped for the devices' DMA (dma_mapper)
_locked_lock = threading.Lock()


def register_page_locked(buf: np.ndarray) -> None:
    """`buf` is mapped for the devices' DMA until unregistered: rows inside it cross without a staging copy."""
    with _locked_lock:
        _locked[buf.ctypes.data] = buf.ctypes.data + buf.nbytes


def unregister_page_locked(buf: np.ndarray) -> None:
    with _locked_lock:
        _locked.pop(buf.ctypes.data, None)


def is_page_locked(a: np.ndarray) -> bool:
    """Whether host array `a` lies inside a registered page-locked buffer."""
    start = a.ctypes.data
    with _locked_lock:
        return any(lo <= start and start + a.nbytes <= hi for lo, hi in _locked.items())


def pinned(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding | None:
    """`sharding` in page-locked host memory, or None (said once per platform) where a device lacks that kind."""
    devices = sharding.device_set
    if all(PINNED in {m.kind for m in d.addressable_memories()} for d in devices):
        return sharding.with_memory_kind(PINNED)
    platform = next(iter(devices)).platform
    if platform not in _warned:
        _warned.add(platform)
        log.info("KV block copies go through pageable host memory: %s devices have no %s memory", platform, PINNED)
    return None


def runs(rows: list) -> list[tuple[int, int, int]]:
    """(start, count, step) of each run of host rows that lie back to back in one buffer, each row right after the
    one before it in memory (step 1) or right before it (step -1): one transfer can take a run either way."""
    out = []
    for i, row in enumerate(rows):
        if out:
            start, count, step = out[-1]
            if count == 1 and not _adjacent(rows[i - 1], row, 1) and _adjacent(rows[i - 1], row, -1):
                step = -1  # a run's second row sets its direction
            if _adjacent(rows[i - 1], row, step):
                out[-1] = (start, count + 1, step)
                continue
        out.append((i, 1, 1))
    return out


def _adjacent(prev, row, step: int) -> bool:
    """`row` lies right after `prev` in the same buffer (step 1), or right before it (step -1)."""
    return (isinstance(prev, np.ndarray) and isinstance(row, np.ndarray) and prev.flags.c_contiguous
            and row.flags.c_contiguous and prev.base is not None and row.base is prev.base
            and row.ctypes.data == prev.ctypes.data + step * prev.nbytes)  # fmt: skip


def down_moves(device_address: int, row_bytes: int, dests: list) -> list[tuple[int, int, int]]:
    """(host address, device address, bytes) copies of device rows at `device_address` into host rows `dests` (None:
    skipped), one per run of rows adjacent on both sides."""
    out: list[list[int]] = []
    for i, dest in enumerate(dests):
        if dest is None:
            continue
        host, device = dest.ctypes.data, device_address + i * row_bytes
        if out and out[-1][0] + out[-1][2] == host and out[-1][1] + out[-1][2] == device:
            out[-1][2] += row_bytes
        else:
            out.append([host, device, row_bytes])
    return [(h, d, n) for h, d, n in out]


def into_rows(rows, dests: list) -> tuple[float, float]:
    """Rows on their way to the host (a download started, or host rows) copied into host rows `dests` (None: that
    row skipped): the seconds waiting for them and copying."""
    began = time.perf_counter()
    host = np.asarray(rows)
    ready = time.perf_counter()
    for i, dest in enumerate(dests):
        if dest is not None:
            dest[:] = host[i]
    return ready - began, time.perf_counter() - ready


def powers(count: int, largest: int) -> list[int]:
    """Piece sizes covering `count`: `largest` (a power of two) as often as it fits, then the binary digits of the
    rest, largest first."""
    out = [largest] * (count // largest)
    rest = count % largest
    out += [1 << b for b in range(rest.bit_length() - 1, -1, -1) if rest >> b & 1]
    return out


def runs_of_layers(cache) -> list[tuple[int, int]]:
    """(first layer, layers) of each run of consecutive layers of one storage type (KVLayout.groups' runs)."""
    out: list[tuple[int, int]] = []
    for i, layer in enumerate(cache):
        if out and layer[0].dtype == cache[out[-1][0]][0].dtype:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def gather(cache, ids, *, copies: int):
    """Blocks `ids` of every layer: per run of layers of one dtype (`runs_of_layers`), per part of its layers (k, v[,
    k_scale, v_scale]), an array [layers, kv_heads, len(ids), ...]."""
    return tuple(jnp.stack([layer[part][::copies, ids] for layer in cache[first : first + n]])
                 for first, n in runs_of_layers(cache) for part in range(len(cache[first])))  # fmt: skip


def write(cache, ids, parts, *, copies: int):
    """Write parts (`gather`'s) into blocks `ids` (ids past the cache are dropped)."""
    out, at = [], 0
    for first, n in runs_of_layers(cache):
        mine = parts[at : at + len(cache[first])]
        at += len(mine)
        out += [tuple(buf.at[:, ids].set(jnp.repeat(new[i], copies, axis=0).astype(buf.dtype), mode="drop")
                      for buf, new in zip(cache[first + i], mine)) for i in range(n)]  # fmt: skip
    return out


def pack(parts):
    """Parts [layers, kv_heads, n, ...] (`gather`'s) -> uint8 [n, block_bytes]: each block one contiguous row (per run
    of layers, every layer's keys, then values, then scales), so a tier moves a block in one transfer."""
    n = parts[0].shape[2]
    return jnp.concatenate([jax.lax.bitcast_convert_type(jnp.moveaxis(p, 2, 0), jnp.uint8).reshape(n, -1)
                            for p in parts], axis=1)  # fmt: skip


def unpack(rows, layout: KVLayout):
    """uint8 [n, block_bytes] -> parts [layers, kv_heads, n, ...] (pack's inverse)."""
    n, offset, parts = rows.shape[0], 0, []
    for dtype, shape in layout.block_parts():
        size = int(np.prod(shape)) * dtype.itemsize
        chunk = rows[:, offset : offset + size].reshape((n, *shape) + ((dtype.itemsize,) if dtype.itemsize > 1 else ()))
        parts.append(jnp.moveaxis(jax.lax.bitcast_convert_type(chunk, dtype), 0, 2))
        offset += size
    return tuple(parts)


@dataclasses.dataclass
class StageTimes:
    """Where `stage`'s last call spent its time (seconds): waiting for landing arrays to be free, the copies (and
    their wait), dispatching the copies out of the landing arrays; of the copies, enqueuing them (the driver's calls,
    before the wait). Copies run on the landing thread beside the copies out, so the parts may add up to more than the
    call took."""

    lease: float = 0.0
    copy: float = 0.0
    copy_out: float = 0.0
    enqueue: float = 0.0


@dataclasses.dataclass(frozen=True, eq=False)
class OnDevice:
    """Row `index` of `piece` (uint8 [n, block_bytes] on the cache's devices). Rows stay in the piece they crossed in:
    splitting a piece into one device array per row cost a dispatch that grew with its rows, and so did a write
    taking one argument per row."""

    piece: jax.Array
    index: int


def rows_to_host(rows: list) -> np.ndarray:
    """Rows (host rows or OnDevice) as one host array [n, block_bytes], each piece read once."""
    pieces: dict[int, np.ndarray] = {}
    return np.stack([row if isinstance(row, np.ndarray) else
                     pieces.setdefault(id(row.piece), np.asarray(row.piece))[row.index] for row in rows])  # fmt: skip


# a pytree whose leaf is the piece: jax.block_until_ready(rows) waits for the rows' pieces (a host buffer they were
# copied from may be reused only then)
jax.tree_util.register_dataclass(OnDevice, data_fields=["piece"], meta_fields=["index"])


class BlockCopier:
    """Gathers blocks of a cache to the host and writes host blocks into it, per block-count bucket."""

    def __init__(self, cache, layout: KVLayout, sizes: list[int], use_pinned: bool = True, max_piece: int = 64,
                 land: bool | None = None, land_streams: int = 1):  # fmt: skip
        """`use_pinned` False, `max_piece` 1: the pageable, row-by-row copies (benchmarks compare them). `land`: stage
        through reused landing arrays by the CUDA driver (None: where the devices allow it; kv/landing.py), each
        device's copies over `land_streams` streams."""
        self.layout, self.sizes = layout, sizes
        self.num_blocks = cache[0][0].shape[1]
        layout.require(KVLayout.of([layer[0].dtype for layer in cache], layout.block_size, layout.num_kv_heads,
                                   layout.head_dim))  # fmt: skip
        copies = cache[0][0].shape[0] // layout.num_kv_heads
        shardings = jax.tree.map(lambda x: x.sharding, cache)
        # packed rows go straight to every device of the cache (tensor parallel: each then takes its heads)
        first = cache[0][0].sharding
        self._rows_at = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
                         if isinstance(first, jax.sharding.NamedSharding) else first)  # fmt: skip
        self._gather = jax.jit(lambda c, ids: gather(c, ids, copies=copies))
        self._write = jax.jit(lambda c, ids, parts: write(c, ids, parts, copies=copies), donate_argnums=(0,),
                              out_shardings=shardings)  # fmt: skip
        # rows whole on every device of the cache, so any one device's copy is all of them (`download`)
        self._gather_packed = jax.jit(lambda c, ids: pack(gather(c, ids, copies=copies)), out_shardings=self._rows_at)
        # rows `take` of one piece into blocks `ids` (a write dispatched per piece, whatever its rows)
        self._write_piece = jax.jit(lambda c, ids, piece, take: write(c, ids, unpack(piece[take], layout),
                                                                      copies=copies),
                                    donate_argnums=(0,), out_shardings=shardings)  # fmt: skip
        self._compiled: dict[tuple[str, int], object] = {}  # (kind, bucket) -> executable
        self._on_cpu = any(d.platform == "cpu" for d in first.device_set)
        self.use_pinned = use_pinned
        self._staging = pinned(self._rows_at) if use_pinned else None  # pageable rows pass here on their way up
        # named, not None: a device_put that leaves the memory kind open keeps a pinned_host array where it is
        self._in_device = self._rows_at.with_memory_kind(next(iter(first.device_set)).default_memory().kind)
        self._host_at: dict[int, jax.sharding.Sharding | None] = {}  # device id -> its pinned memory (rows going down)
        # rows per host-to-device transfer: a power of two, by default at most 64 blocks (8B's: 128 MiB)
        self.piece = 1 << (min(max_piece, max(sizes)).bit_length() - 1)
        self._copy_out = jax.jit(jnp.copy)  # a landed piece out of its reused array (a fresh array, the same rows)
        if land is None:
            land = use_pinned and not self._on_cpu and Landing.usable(self._rows_at)
        # Arrays to land in (`jobs`): three of a piece and one of each smaller size, so that a load of up to four
        # pieces (a long history) never waits for a piece's copy out, which runs behind the steps queued on the device.
        self._landing = Landing(self._rows_at, layout.block_bytes, 4 * self.piece, land_streams) if land else None
        self._lander = ThreadPoolExecutor(1, thread_name_prefix="rtpjax-kv-land") if land else None  # (`_land`)
        self._down_by_driver = land  # download_into by the driver's copies (the same devices and memory land needs)
        self.landing_rows = self._landing.keep_rows if land else 0  # device memory outside the cache, in blocks
        self.last_stage = StageTimes()  # set by `stage` (one thread stages, and reads it after each call)

    def jobs(self, cache, packed: bool = False) -> list:
        """One callable per executable to compile (the runner's warm-up runs them in its thread pool); `packed`: also
        those of the KV tiers (packed rows)."""
        kinds = ("gather", "write") + (("gather_packed",) if packed else ())
        jobs = [lambda n=n, kind=kind: self._compile(cache, kind, n) for n in self.sizes for kind in kinds]
        if packed:
            jobs += [lambda n=n, kind=kind: self._compile(cache, kind, n) for kind, n in self._piece_kinds()]
        if packed and self._landing is not None:  # arrays for `stage` to land in: three of a piece, one of each less
            jobs.append(lambda: self._landing.warm([*self._piece_sizes(), self.piece, self.piece]))
        return jobs

    def _piece_sizes(self) -> list[int]:
        """Rows of the pieces rows cross in (powers of two up to `piece`)."""
        return [1 << b for b in range(self.piece.bit_length())]

    def _piece_kinds(self) -> list[tuple[str, int]]:
        """The executables packed rows go up by: a copy out of a reused array and a write, per piece size (landing
        pieces) and per gather bucket (a hand-off's pieces come in those of an engine with this one's buckets)."""
        sizes = sorted(set(self._piece_sizes()) | set(self.sizes))
        return [(kind, n) for kind in ("copy_out", "write_piece") for n in sizes]

    def staged_rows(self, n: int) -> int:
        """Device rows that staging n host rows holds until they are written: a landing piece is copied out whole, so
        a last piece of fewer rows than `piece` holds the power of two above them."""
        if self._landing is None or n % self.piece == 0:
            return n
        return n - n % self.piece + (1 << (n % self.piece - 1).bit_length())

    def _executable(self, kind: str, n: int, fallback):
        """The compiled `kind` for pieces of n rows; one of a size warm-up did not compile (a hand-off from an
        engine of other buckets) compiles now, said once per size."""
        executable = self._compiled.get((kind, n))
        if executable is None and (kind, n) not in _warned_sizes:
            _warned_sizes.add((kind, n))
            log.warning("KV block copies: a piece of %d rows compiles %s now (not a size of this engine's buckets: "
                        "give both engines of a hand-off the same --max-model-len)", n, kind)  # fmt: skip
        return executable or fallback

    def _compile(self, cache, kind: str, n: int) -> None:
        ids = jax.ShapeDtypeStruct((n,), jnp.int32)
        if kind in ("gather", "gather_packed"):
            fn = self._gather if kind == "gather" else self._gather_packed
            self._compiled[kind, n] = fn.lower(cache, ids).compile()
        elif kind == "write":
            self._compiled[kind, n] = self._write.lower(cache, ids, self._part_shapes(n)).compile()
        elif kind in ("copy_out", "write_piece"):
            piece = jax.ShapeDtypeStruct((n, self.layout.block_bytes), jnp.uint8, sharding=self._rows_at)
            if kind == "copy_out":
                self._compiled[kind, n] = self._copy_out.lower(piece).compile()
            else:
                self._compiled[kind, n] = self._write_piece.lower(cache, ids, piece, ids).compile()
        else:
            raise ValueError(f"no block copy of kind {kind!r}")

    def _part_shapes(self, n: int) -> tuple:
        """`gather`'s parts for n blocks."""
        parts = self.layout.block_parts()
        return tuple(jax.ShapeDtypeStruct((*shape[:2], n, *shape[2:]), dtype) for dtype, shape in parts)

    def _pieces(self, count: int):
        """(start, real, bucket) pieces covering `count` blocks."""
        largest = self.sizes[-1]
        for start in range(0, count, largest):
            real = min(largest, count - start)
            yield start, real, next(s for s in self.sizes if s >= real)

    def gather(self, cache, blocks: list[int]) -> KVBlocks:
        """The contents of `blocks` (in order) on the host. Waits for the steps that write them."""
        reals, pieces = [], []
        for start, real, bucket in self._pieces(len(blocks)):
            ids = np.zeros(bucket, np.int32)  # padding reads block 0, cut off below
            ids[:real] = blocks[start : start + real]
            reals.append(real)
            pieces.append(self._compiled.get(("gather", bucket), self._gather)(cache, ids))
        host = jax.device_get(pieces)  # one wait for all pieces
        empty = [np.zeros(s.shape, s.dtype) for s in self._part_shapes(0)]
        return KVBlocks.from_arrays(self.layout, [
            np.concatenate([e] + [piece[p][:, :, :real] for real, piece in zip(reals, host)], axis=2)
            for p, e in enumerate(empty)
        ])  # fmt: skip

    def write(self, cache, blocks: list[int], kv: KVBlocks, rows: list[int]):
        """The cache with rows `rows` of `kv` written into `blocks`; the cache passed in is donated."""
        self.layout.require(kv.layout)
        arrays = kv.arrays()
        for start, real, bucket in self._pieces(len(blocks)):
            ids = np.full(bucket, self.num_blocks, np.int32)  # past the cache: dropped
            ids[:real] = blocks[start : start + real]
            take = np.zeros(bucket, np.int64)
            take[:real] = rows[start : start + real]
            parts = tuple(np.take(a, take, axis=2) for a in arrays)
            cache = self._compiled.get(("write", bucket), self._write)(cache, ids, parts)
        return cache

    def gather_packed(self, cache, blocks: list[int], download: bool = True) -> list[tuple[int, jax.Array]]:
        """Queue copies of `blocks` as packed rows, already on their way to the host (`download`; else still on the
        device, for `download` later): (real count, uint8 [bucket, block_bytes] array) per piece. Returns at once;
        dispatched before any later write of those blocks, it reads their contents as of now."""
        pieces = []
        for start, real, bucket in self._pieces(len(blocks)):
            ids = np.zeros(bucket, np.int32)
            ids[:real] = blocks[start : start + real]
            rows = self._compiled.get(("gather_packed", bucket), self._gather_packed)(cache, ids)
            pieces.append((real, self.download(rows) if download else rows))
        return pieces

    def download(self, rows: jax.Array) -> jax.Array:
        """Start the copy of gathered rows to the host: into pinned host memory by DMA (one device's copy of them:
        `_gather_packed` replicates them), else into pageable memory. np.asarray of the result waits for it."""
        one = rows.addressable_shards[0].data if len(rows.sharding.device_set) > 1 else rows
        device = next(iter(one.sharding.device_set))
        if device.id not in self._host_at:
            self._host_at[device.id] = pinned(jax.sharding.SingleDeviceSharding(device)) if self.use_pinned else None
        at = self._host_at[device.id]
        if at is None:
            one.copy_to_host_async()
            return one
        return jax.device_put(one, at)

    def download_into(self, rows: jax.Array, dests: list) -> tuple[float, float]:
        """Copy gathered rows (a `gather_packed` piece left on the device) into host rows `dests` (uint8 [block_bytes]
        each, in order; None: skip that row). Where the CUDA driver can, one device's copy goes straight into them
        (a tier's page-locked rows: no page-locked buffer allocated per download, which grows a pool whose new
        regions stall every thread's driver calls, and no second host copy); else by `download`, then a host copy.
        Returns the seconds waiting for the rows (the gather, behind the steps ahead of it; by `download`: and its
        copy) and the seconds copying into `dests`."""
        if len(dests) > rows.shape[0]:
            raise ValueError(f"{len(dests)} host rows for a piece of {rows.shape[0]} rows")
        one = rows.addressable_shards[0].data if len(rows.sharding.device_set) > 1 else rows
        began = time.perf_counter()
        if self._down_by_driver:
            jax.block_until_ready(one)
            ready = time.perf_counter()
            try:
                device_ipc.copy_down({next(iter(one.sharding.device_set)).local_hardware_id: down_moves(
                    one.unsafe_buffer_pointer(), self.layout.block_bytes, dests)})  # fmt: skip
                return ready - began, time.perf_counter() - ready
            except IPCError as e:
                log.warning("KV block downloads through the CUDA driver failed (%s); by device_put from now on", e)
                self._down_by_driver = False
        wait, copy = into_rows(self.download(one), dests)
        return time.perf_counter() - began - copy, copy

    def first_runs(self, cache):
        """Run each compiled packed copy once (the KV tiers'), one at a time, on inputs that change nothing: a gather
        of block 0 and its download, writes to ids past the cache, a copy of zeros, one staged row; as the runner
        runs each step shape, since an executable's first run does one-time setup on the device, which a load would
        otherwise wait for in the step's queue. Returns the cache (the writes donate it)."""
        bb, smallest = self.layout.block_bytes, None
        for (kind, n), executable in sorted(self._compiled.items()):
            if kind == "gather_packed":
                rows = jax.block_until_ready(executable(cache, np.zeros(n, np.int32)))
                smallest = rows if smallest is None or n < smallest.shape[0] else smallest
            elif kind == "copy_out":
                jax.block_until_ready(executable(jnp.zeros((n, bb), jnp.uint8, device=self._rows_at)))
            elif kind == "write_piece":
                piece, past = jnp.zeros((n, bb), jnp.uint8, device=self._rows_at), np.full(n, self.num_blocks, np.int32)
                cache = jax.block_until_ready(executable(cache, past, piece, np.zeros(n, np.int32)))
        if smallest is not None:  # a download into a host row, as a KV tier's
            self.download_into(smallest, [np.empty(bb, np.uint8)])
        if self._landing is not None:
            jax.block_until_ready(self.stage([np.zeros(bb, np.uint8)]))
        return cache

    def compile_packed(self, cache, kind: str) -> None:
        """Compile the packed copies one way ("gather_packed": down, "write_packed": up) now, not at first use: an
        engine that hands K/V over moves blocks as packed rows."""
        wanted = [("gather_packed", n) for n in self.sizes] if kind == "gather_packed" else self._piece_kinds()
        for kind_n in wanted:
            if kind_n not in self._compiled:
                self._compile(cache, *kind_n)

    def put_rows(self, rows: np.ndarray, page_locked: bool = False) -> list[OnDevice]:
        """Host rows uint8 [k, block_bytes] on every device of the cache, as write_packed takes them: copies, never
        views of `rows` (whose memory may be reused once they are ready). `page_locked`: `rows` lie in memory mapped
        for the devices' DMA (not staged)."""
        return self._up(list(rows), page_locked)

    def _up(self, rows: list, page_locked: bool) -> list[OnDevice]:
        """Rows as rows on the cache's devices (rows already there stay; a piece on other devices is put there once):
        each run of back-to-back host rows crosses in power-of-two pieces, one transfer each."""
        rows = self._checked(rows)
        out, on_host, placed = list(rows), False, {}  # placed: id(piece) -> the piece where rows go
        for i, row in enumerate(rows):
            if isinstance(row, np.ndarray):
                on_host = True
                continue
            piece = placed.get(id(row.piece))
            if piece is None:
                same = row.piece.sharding.is_equivalent_to(self._rows_at, 2)
                piece = placed[id(row.piece)] = row.piece if same else jax.device_put(row.piece, self._rows_at)
            if piece is not row.piece:
                out[i] = OnDevice(piece, row.index)
        for start, got in self._move(rows, page_locked) if on_host else ():
            out[start : start + len(got)] = got
        return out

    def stage(self, rows: list[np.ndarray], page_locked: bool = False) -> list[OnDevice]:
        """Host rows as rows on the cache's devices (in order, as write_packed takes them), returned once they have
        arrived: a KV tier calls this off the engine's thread, so neither a step (nor the write before one) nor the
        engine's thread waits for the transfer. A landed piece's copy out of its landing array is only queued: it
        runs on the device behind the steps queued there, as the write that takes its rows will (waiting for it here
        would wait for those steps). The rows never alias `rows`, and `rows` may be reused once this returns."""
        rows = self._checked(rows)
        if not all(isinstance(row, np.ndarray) for row in rows):
            raise ValueError("stage takes host rows (numpy arrays) only")
        if self._landing is not None:
            try:
                return self._land(rows)
            except IPCError as e:
                log.warning("KV block copies through the CUDA driver failed (%s); staging by device_put from now on", e)
                self._landing = None
        began = time.perf_counter()
        out = [row for _, got in self._move(rows, page_locked, wait=True) for row in got]
        self.last_stage = StageTimes(copy=time.perf_counter() - began)
        return out

    def _land(self, rows: list[np.ndarray]) -> list[OnDevice]:
        """`stage` through landing arrays: each `piece` rows copied into one (a copy per run of back-to-back rows,
        either way in memory), then copied out into a fresh array; the next piece's copy runs on the landing thread
        while this one's copy out is dispatched. An array is reused once its copy out has run."""
        chunks = [rows[i : i + self.piece] for i in range(0, len(rows), self.piece)]
        out, times = [], StageTimes()
        ahead = None
        for i, chunk in enumerate(chunks):  # (a failed copy raises here, its array given back, none ahead)
            land, chunk_runs = ahead.result() if ahead is not None else self._land_piece(chunk, times)
            ahead = self._lander.submit(self._land_piece, chunks[i + 1], times) if i + 1 < len(chunks) else None
            began = time.perf_counter()
            try:
                got = landing.in_order(self.unstage([land])[: len(chunk)], chunk_runs)
            except Exception:
                self._landing.give_back(land, None)
                if ahead is not None and ahead.exception() is None:  # (waits for the copy: nothing left writing)
                    self._landing.give_back(ahead.result()[0], None)
                raise
            self._landing.give_back(land, got[0].piece)
            out += got
            times.copy_out += time.perf_counter() - began
        self.last_stage = times
        return out

    def _land_piece(self, chunk: list[np.ndarray], times: StageTimes) -> tuple[jax.Array, list]:
        """(The landing thread) a landing array leased for `chunk` and its rows copied in, once landed: (the array,
        the runs they crossed in); a failed copy gives the array back and raises."""
        began = time.perf_counter()
        land = self._landing.lease(1 << (len(chunk) - 1).bit_length())
        leased = time.perf_counter()
        try:
            chunk_runs = runs(chunk)
            times.enqueue += self._landing.copy(land, landing.moves(chunk, chunk_runs))
        except Exception:
            self._landing.give_back(land, None)  # (a failed copy may have landed in part: nothing reads it)
            raise
        times.lease, times.copy = times.lease + leased - began, times.copy + time.perf_counter() - leased
        return land, chunk_runs

    def unstage(self, pieces: list[jax.Array]) -> list[OnDevice]:
        """Pieces [n, block_bytes] on the device, in arrays that will be reused, as rows of fresh copies of them."""
        return [row for piece in pieces
                for row in self._rows_of(self._executable("copy_out", piece.shape[0], self._copy_out)(piece))]

    @staticmethod
    def _rows_of(piece: jax.Array, backwards: bool = False) -> list[OnDevice]:
        """A piece's rows in the order of the host rows they came from (`backwards`: they lay backwards in memory)."""
        rows = [OnDevice(piece, i) for i in range(piece.shape[0])]
        return rows[::-1] if backwards else rows

    def _move(self, rows: list, page_locked: bool, wait: bool = False) -> list[tuple[int, list[OnDevice]]]:
        """(index of the first, device rows) for each piece of the host rows among `rows` (`_host_pieces`); `wait`:
        for the transfers."""
        pieces = self._host_pieces(rows)
        moved = self._transfer([view for _, view, _ in pieces], page_locked) if pieces else []
        if wait:
            jax.block_until_ready(moved)
        return [(start, self._rows_of(piece, backwards)) for (start, _, backwards), piece in zip(pieces, moved)]

    def _checked(self, rows: list) -> list:
        bb = self.layout.block_bytes
        for row in rows:
            if isinstance(row, OnDevice):
                if row.piece.dtype != np.uint8 or row.piece.ndim != 2 or row.piece.shape[1] != bb:
                    raise ValueError(f"a packed device piece must be uint8 [n, {bb}], got {row.piece.dtype} "
                                     f"{list(row.piece.shape)}")  # fmt: skip
            elif not isinstance(row, np.ndarray):
                raise TypeError(f"packed rows are host rows (numpy) or block_copy.OnDevice rows, got {type(row)}")
            elif row.dtype != np.uint8 or row.shape != (bb,):
                raise ValueError(f"a packed host row must be uint8 [{bb}], got {row.dtype} {list(row.shape)}")
        return [np.ascontiguousarray(r) if isinstance(r, np.ndarray) else r for r in rows]

    def _host_pieces(self, rows: list) -> list[tuple[int, np.ndarray, bool]]:
        """(index of its first row, view, backwards) of each power-of-two piece of each run of back-to-back host rows
        (`runs`): a view of the piece's rows in memory order ([n, block_bytes]), and whether that order is the run's
        reversed."""
        out = []
        for start, count, step in runs(rows):
            if not isinstance(rows[start], np.ndarray):
                continue
            size = rows[start].size
            for n in powers(count, self.piece):
                low = rows[start + n - 1] if step < 0 else rows[start]  # the piece's first row in memory
                view = np.lib.stride_tricks.as_strided(low, (n, size), (size, 1), writeable=False)
                out.append((start, view, step < 0 and n > 1))
                start += n
        return out

    def _transfer(self, pieces: list[np.ndarray], page_locked: bool) -> list[jax.Array]:
        """Host pieces on the cache's devices; pageable ones through pinned memory where the backend has it (one host
        copy, then a DMA), page-locked ones (a DMA-mapped tier) directly. The results never alias the pieces."""
        page_locked = page_locked or all(map(is_page_locked, pieces))
        if self._on_cpu:  # the CPU client may alias suitably aligned host memory whatever may_alias says
            pieces = [np.array(p) for p in pieces]
        if self._staging is not None and not page_locked:
            return jax.device_put(jax.device_put(pieces, self._staging, may_alias=False), self._in_device)
        return jax.device_put(pieces, self._rows_at, may_alias=False)

    def write_packed(self, cache, blocks: list[int], packed: PackedBlocks, take: list[int] | None = None):
        """The cache with packed rows (rows `take` of them, else all in order) written into `blocks`, one write per
        piece the rows lie in. Host rows cross in runs (`_up`: from page-locked memory where the tier could map it, no
        staging copy) to every device the cache spans, not the default one (rows already there stay), all before the
        first write; the cache passed in is donated."""
        self.layout.require(packed.layout)
        if not blocks:  # (an adopted request whose every row the prefix cache held)
            return cache
        chosen = self._up(packed.rows if not take else [packed.rows[r] for r in take], packed.page_locked)
        if len(chosen) != len(blocks):
            raise ValueError(f"{len(chosen)} packed rows for {len(blocks)} blocks")
        for piece, ids, rows in self._by_piece(blocks, chosen):
            cache = self._executable("write_piece", piece.shape[0], self._write_piece)(cache, ids, piece, rows)
        return cache

    def _by_piece(self, blocks: list[int], rows: list[OnDevice]):
        """(piece, block ids, row indices) per write: the blocks whose rows lie in one piece, as many per write as
        the piece has rows (ids padded past the cache: dropped); more when a row goes into several blocks."""
        grouped: dict[int, tuple[jax.Array, list[tuple[int, int]]]] = {}
        for block, row in zip(blocks, rows):
            grouped.setdefault(id(row.piece), (row.piece, []))[1].append((block, row.index))
        for piece, entries in grouped.values():
            n = piece.shape[0]
            for at in range(0, len(entries), n):
                ids, take = np.full(n, self.num_blocks, np.int32), np.zeros(n, np.int32)
                part = entries[at : at + n]
                ids[: len(part)], take[: len(part)] = [b for b, _ in part], [i for _, i in part]
                yield piece, ids, take

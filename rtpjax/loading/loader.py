"""Hugging Face safetensors checkpoints (one file or a sharded index) -> a sharded parameter pytree, fast.

Knows files and shardings, not models' maths: the family's `weight_names` says which tensors make each parameter and
`decoder.param_shapes` what shape it must have. Loading is planned from the headers alone: every tensor is read in
file and byte order, in large batches, by a pool of threads into a few reusable host buffers, while the batch before is
being sent to the devices. Each device receives only the slices its sharding holds; casts and expert stacking run on
the device. Any mismatch fails naming the tensor and its file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import SingleDeviceSharding

from rtpjax.models import decoder
from rtpjax.models.config import ModelConfig
from rtpjax.loading.quantization import check_method, is_quantized_param, quantize_on_device, quantizer
from rtpjax.parallel.sharding import param_shardings
from rtpjax.parallel.stages import PipelineMesh, stage_param_shardings

log = logging.getLogger("rtpjax")
_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
# Tensors checkpoints carry that no supported model reads.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it claims to be, naming the tensor and file."""


def read_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} from a safetensors header, validated against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: bad safetensors header (claims {header_len} bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: bad safetensors header ({e})") from e
    header.pop("__metadata__", None)
    data_size = size - 8 - header_len
    for name, info in header.items():
        if info.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r} spans {end - begin} bytes, its shape needs {expected}")
        if end > data_size:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} ends at byte {end} of {data_size} data bytes")
        info["data_start"] = 8 + header_len + begin
    return header


class Checkpoint:
    """The validated headers of a checkpoint folder's files, and which file holds each tensor."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
        self.where: dict[str, Path] = {}
        self.headers: dict[Path, dict] = {}
        for name in files:
            path = model_dir / name
            if not path.is_file():
                raise CheckpointError(f"{index}: lists {name}, which is missing")
            self.headers[path] = read_header(path)
            for tensor in self.headers[path]:
                self.where[tensor] = path

    def names(self) -> set[str]:
        return set(self.where)


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How to read: `threads` concurrent reads of `read_chunk` bytes into `buffers` host buffers of `batch_bytes`."""

    threads: int = min(16, os.cpu_count() or 4)
    batch_bytes: int = 256 << 20
    read_chunk: int = 32 << 20
    buffers: int = 3
    direct_io: bool = False  # O_DIRECT: skip the page cache (cold reads of checkpoints larger than host memory)
    pinned: bool = True  # page-lock the buffers on GPUs: transfers skip the runtime's staging copy


@dataclasses.dataclass(frozen=True)
class TensorRead:
    """A tensor, or a piece of its rows (`first_row` on, `shape[0]` of them) when it is larger than a batch."""

    name: str
    path: Path
    start: int  # absolute byte offset in the file
    nbytes: int
    dtype: np.dtype
    shape: tuple[int, ...]
    first_row: int = 0


@dataclasses.dataclass(frozen=True)
class ReadBatch:
    """Tensors lying back to back in one file: one contiguous byte range, one buffer."""

    path: Path
    start: int
    end: int
    tensors: tuple[TensorRead, ...]


def target_shardings(shapes: dict, family, mesh, cfg: ModelConfig) -> dict:
    """Each parameter's sharding on `mesh` by the family's rules; without a mesh, the first device."""
    if mesh is None:
        return dict.fromkeys(shapes, SingleDeviceSharding(jax.devices()[0]))
    if isinstance(mesh, PipelineMesh):  # each parameter on its pipeline stage's mesh
        return stage_param_shardings(shapes, lambda m: decoder.partition_rules(cfg, family.PARTITION_RULES, m), mesh)
    return param_shardings(shapes, decoder.partition_rules(cfg, family.PARTITION_RULES, mesh), mesh)


def _row_pieces(read: TensorRead, batch_bytes: int) -> list[TensorRead]:
    """A tensor larger than a batch, cut into pieces of whole rows that fit one: the host buffers stay batch-sized
    (an 8B model's 1 GiB embedding would otherwise size every buffer, and page-locking costs ~100 ms per GiB)."""
    if read.nbytes <= batch_bytes or len(read.shape) == 0 or read.shape[0] < 2:
        return [read]
    row_bytes = read.nbytes // read.shape[0]
    rows = max(1, batch_bytes // row_bytes)
    return [
        dataclasses.replace(read, start=read.start + r * row_bytes, nbytes=min(rows, read.shape[0] - r) * row_bytes,
                            shape=(min(rows, read.shape[0] - r), *read.shape[1:]), first_row=r)  # fmt: skip
        for r in range(0, read.shape[0], rows)
    ]


def plan_reads(ckpt: Checkpoint, names, batch_bytes: int) -> list[ReadBatch]:
    """The tensors to read, in file and byte order, grouped into contiguous batches of about `batch_bytes`."""
    reads = []
    for name in names:
        path = ckpt.where[name]
        info = ckpt.headers[path][name]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        begin, end = info["data_offsets"]
        read = TensorRead(name, path, info["data_start"], end - begin, dtype, tuple(info["shape"]))
        reads += _row_pieces(read, batch_bytes)
    reads.sort(key=lambda r: (str(r.path), r.start))
    batches: list[ReadBatch] = []
    group: list[TensorRead] = []
    for read in reads:
        if group and (
            read.path != group[0].path
            or read.start != group[-1].start + group[-1].nbytes  # a gap: a tensor we skip lies between
            or read.start + read.nbytes - group[0].start > batch_bytes
        ):
            batches.append(ReadBatch(group[0].path, group[0].start, group[-1].start + group[-1].nbytes, tuple(group)))
            group = []
        group.append(read)
    if group:
        batches.append(ReadBatch(group[0].path, group[0].start, group[-1].start + group[-1].nbytes, tuple(group)))
    return batches


_ALIGN = 4096  # O_DIRECT wants offsets, sizes and buffer addresses on this boundary


def _aligned_buffer(nbytes: int) -> np.ndarray:
    # (Transparent huge pages were measured slower here: page-locking 3 GiB took 0.6-0.9 s instead of 0.3-0.4.)
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    skip = -raw.ctypes.data % _ALIGN
    return raw[skip : skip + nbytes]


def _pread_into(fd: int, view: memoryview, offset: int, need: int, path: Path) -> None:
    """Fill `view` from `offset`; at least `need` bytes must exist (O_DIRECT reads may stop at end of file)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    if done < need:
        raise CheckpointError(f"{path}: truncated: read {done} of {need} bytes at offset {offset}")


def dma_mapper(devices):
    """A function that page-locks a host buffer for DMA by the devices' client, or None where that is unsupported.

    Transfers from page-locked memory skip the runtime's staging copy into its own pinned buffer: on an H100 host
    that is 45-53 GB/s instead of 19-27 (benchmarks/transfer_bench.py). Mapping costs 35-100 ms per GiB, once per buffer.
    """
    devices = list(devices)
    if not devices or any(d.platform not in ("gpu", "cuda", "rocm") for d in devices):
        return None
    client = devices[0].client
    if not hasattr(client, "dma_map"):
        return None

    def pin(buf: np.ndarray):
        try:
            client.dma_map(buf.ctypes.data, buf.nbytes)
        except Exception as e:  # a runtime without it: transfers are staged, slower but correct
            log.debug("dma_map unavailable (%s); transfers will be staged", e)
            return None
        return lambda: client.dma_unmap(buf.ctypes.data)

    return pin


class FileOrderReader:
    """Yields (batch, bytes) in plan order while later batches are being read; `recycle` hands a buffer back.

    `pin`, if given, page-locks each buffer once (see `dma_mapper`), after its first fill and before it is yielded.
    `reuse` False: each batch is read into a new buffer (the CPU's arrays alias them, see `_Placer.put`); a recycled
    buffer then only frees its place among the `opts.buffers` read ahead.
    """

    def __init__(self, batches: list[ReadBatch], opts: LoadOptions, pin=None, reuse: bool = True):
        self.batches, self.opts, self.pin, self.reuse = batches, opts, pin, reuse
        self.unpins: list = []
        self.fds: dict[Path, tuple[int, bool]] = {}
        for path in sorted({b.path for b in batches}):
            self.fds[path] = self._open(path)
        capacity = -(-(max((b.end - b.start for b in batches), default=0) + 2 * _ALIGN) // _ALIGN) * _ALIGN
        self.free: queue.Queue = queue.Queue()
        self.capacity = capacity
        for _ in range(max(2, opts.buffers)):
            self.free.put(_aligned_buffer(capacity) if reuse else None)
        self.pinned: set[int] = set()
        self.pin_seconds = 0.0
        self.ready: queue.Queue = queue.Queue()
        self.pool = ThreadPoolExecutor(opts.threads, thread_name_prefix="rtpjax-read")
        self.closed = False
        self.producer = threading.Thread(target=self._produce, daemon=True, name="rtpjax-read-plan")
        self.producer.start()

    def _open(self, path: Path) -> tuple[int, bool]:
        if self.opts.direct_io and hasattr(os, "O_DIRECT"):
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT), True
            except OSError as e:  # e.g. tmpfs has no direct I/O
                log.warning("%s: direct I/O unavailable (%s); reading through the page cache", path, e)
        return os.open(path, os.O_RDONLY), False

    def _produce(self) -> None:
        chunk = max(_ALIGN, self.opts.read_chunk // _ALIGN * _ALIGN)
        for batch in self.batches:
            buf = self.free.get()
            if self.closed:
                return
            if buf is None:
                buf = _aligned_buffer(self.capacity)
            fd, direct = self.fds[batch.path]
            first = batch.start - batch.start % _ALIGN if direct else batch.start
            last = -(-batch.end // _ALIGN) * _ALIGN if direct else batch.end
            view = memoryview(buf)
            try:
                futures = [
                    self.pool.submit(_pread_into, fd, view[a - first : min(a + chunk, last) - first], a,
                                     min(a + chunk, batch.end) - a, batch.path)  # fmt: skip
                    for a in range(first, last, chunk)
                ]
            except RuntimeError:  # closed (after an error) while this batch was being planned
                return
            self.ready.put((batch, buf, batch.start - first, futures))

    def __iter__(self):
        for _ in self.batches:
            batch, buf, skip, futures = self.ready.get()
            for f in futures:
                f.result()
            if self.pin is not None and buf.ctypes.data not in self.pinned:
                # After the first fill: the reading threads have faulted its pages in, in parallel, so locking them
                # costs ~100 ms per GiB on the H100 host instead of ~160 (locking first faults them in one thread).
                self.pinned.add(buf.ctypes.data)
                began = time.perf_counter()
                unpin = self.pin(buf)
                self.pin_seconds += time.perf_counter() - began
                if unpin is not None:
                    self.unpins.append(unpin)
            yield batch, buf, buf[skip : skip + batch.end - batch.start]

    def recycle(self, buf: np.ndarray) -> None:
        self.free.put(buf if self.reuse else None)

    def close(self) -> None:
        self.closed = True
        self.free.put(0)  # wake the producer if it waits for a buffer
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.producer.join()
        for unpin in self.unpins:  # callers have waited for the transfers out of these buffers
            unpin()
        for fd, _ in self.fds.values():
            os.close(fd)


def _check_shapes(ckpt: Checkpoint, sources, shapes) -> None:
    for path, source in sources.items():
        expected = shapes[path][1:] if len(source.names) > 1 else shapes[path]
        for name in source.names:
            got = tuple(ckpt.headers[ckpt.where[name]][name]["shape"])
            if got != tuple(expected):
                raise CheckpointError(
                    f"{ckpt.where[name]}: tensor {name!r} has shape {list(got)}, expected {list(expected)} "
                    f"(for parameter {path})"
                )


def _sliced_shape(shape: tuple[int, ...], index: tuple) -> tuple[int, ...]:
    return tuple(len(range(*sl.indices(n))) for sl, n in zip(index, shape)) + tuple(shape[len(index):])


_join = jax.jit(lambda *rows: jnp.concatenate(rows))
_casts: dict = {}
_ahead: dict[tuple, object] = {}  # executable key -> Future of the executable, for the whole process
_ahead_pool = ThreadPoolExecutor(2, thread_name_prefix="rtpjax-compile-ahead")


def _cast(dtype):
    return _casts.setdefault(np.dtype(dtype), jax.jit(lambda x: x.astype(dtype)))


# The keys under which finishing executables are compiled ahead and then looked up: one definition for both sides.
def _join_key(shapes, dtype, device) -> tuple:
    return "join", tuple(tuple(s) for s in shapes), np.dtype(dtype), device


def _cast_key(shape, dtype, target, device) -> tuple:
    return "cast", tuple(shape), np.dtype(dtype), np.dtype(target), device


def _quantize_key(method, shape, dtype, sharding) -> tuple:
    return "quantize", method, tuple(shape), np.dtype(dtype), sharding


class _Placer:
    """Sends each tensor's per-device slices as they arrive; finishes a parameter once all its pieces are there.

    Finishing (joining row pieces, casting, quantizing) runs executables that are new in each process; they are
    compiled on a thread while the reads run (`compile_ahead`), instead of when the last piece lands (the 8B
    embedding's join alone took 0.18 s of a 0.8 s load, int8 quantizers most of a second).
    """

    def __init__(self, sources, shapes, shardings, dtype, batches: list[ReadBatch], quantization: str | None,
                 reused: bool = True):  # fmt: skip
        """reused: the host buffers are read into again (so a CPU array, which may alias them, gets a copy)."""
        self.shapes, self.shardings, self.dtype, self.reused = shapes, shardings, np.dtype(dtype), reused
        self.batches, self.quantization = batches, quantization
        self.owner = {name: (path, i) for path, src in sources.items() for i, name in enumerate(src.names)}
        self.count = dict.fromkeys(sources, 0)  # pieces still to arrive per parameter
        for batch in batches:
            for read in batch.tensors:
                self.count[self.owner[read.name][0]] += 1
        self.stacked = {path for path, src in sources.items() if len(src.names) > 1}
        self.pieces: dict[str, dict] = {}  # path -> device -> {index in stack: [(first row, array), ...]}
        self.done: dict[str, jax.Array] = {}
        self.finish_seconds = 0.0  # joins, casts, stacking and quantization (their dispatch)
        self.runs = self.runs_ahead = 0  # finishing executables run, and how many of them were compiled ahead
        self.deferred: list[str] = []  # complete, but their joins are still compiling: finished after the reads
        self.num_deferred = 0
        self.submitted: list[tuple] = []  # compile-ahead keys this load queued

    def _targets(self, read: TensorRead):
        """(device, index into the piece, first row) for every device that holds part of this tensor or piece."""
        path, i = self.owner[read.name]
        shape, sharding = self.shapes[path], self.shardings[path]
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            if path in self.stacked:
                if not (index[0].start or 0) <= i < (shape[0] if index[0].stop is None else index[0].stop):
                    continue
                index = index[1:]
            first = read.first_row
            if index:  # the device's rows of this piece, counted from the piece's first row
                end = first + read.shape[0]
                lo, hi = max(index[0].start or 0, first), min(end if index[0].stop is None else index[0].stop, end)
                if lo >= hi:
                    continue
                index, first = (slice(lo - read.first_row, hi - read.first_row), *index[1:]), lo
            yield device, index, first

    def compile_ahead(self) -> None:
        """Queue the compilation of every join, cast and quantizer the plan will need."""
        rows: dict[tuple, list] = {}  # (path, device, stack index) -> [(first row, piece shape), ...]
        dtypes: dict[str, np.dtype] = {}
        for batch in self.batches:
            for read in batch.tensors:
                path, i = self.owner[read.name]
                dtypes[path] = np.dtype(jax.dtypes.canonicalize_dtype(read.dtype))  # as it lands (float64 -> 32)
                for device, index, first in self._targets(read):
                    rows.setdefault((path, device, i), []).append((first, _sliced_shape(read.shape, index)))

        def compile_(key, jitted, *structs):
            if key not in _ahead:
                _ahead[key] = _ahead_pool.submit(lambda: jitted.lower(*structs).compile())
                self.submitted.append(key)

        for (path, device, _), parts in rows.items():
            device_sharding = SingleDeviceSharding(device)
            parts = [shape for _, shape in sorted(parts)]
            if len(parts) > 1:
                structs = [jax.ShapeDtypeStruct(p, dtypes[path], sharding=device_sharding) for p in parts]
                compile_(_join_key(parts, dtypes[path], device), _join, *structs)
            if dtypes[path] != self.dtype and path not in self.stacked:
                joined = (sum(p[0] for p in parts), *parts[0][1:]) if parts[0] else parts[0]
                struct = jax.ShapeDtypeStruct(joined, dtypes[path], sharding=device_sharding)
                compile_(_cast_key(joined, dtypes[path], self.dtype, device), _cast(self.dtype), struct)
        if self.quantization:
            for path, shape in self.shapes.items():
                if is_quantized_param(path):
                    struct = jax.ShapeDtypeStruct(shape, self.dtype, sharding=self.shardings[path])
                    key = _quantize_key(self.quantization, shape, self.dtype, self.shardings[path])
                    compile_(key, quantizer(self.quantization, tuple(shape), self.shardings[path]), struct)

    def _run(self, key, fn, *args):
        """The executable compiled ahead for `key` if there is one, else `fn` as usual."""
        future = _ahead.get(key)
        self.runs += 1
        if future is not None:
            try:
                compiled = future.result()
            except Exception as e:  # noqa: BLE001 - e.g. out of memory while compiling: jit's own path still works
                log.debug("compiling %s ahead failed (%s); compiling it where it is needed", key[0], e)
                _ahead.pop(key, None)
            else:
                self.runs_ahead += 1
                return compiled(*args)
        return fn(*args)

    def cancel_ahead(self) -> None:
        """After a failed load: drop the compilations it queued that have not started."""
        for key in self.submitted:
            future = _ahead.get(key)
            if future is not None and future.cancel():
                _ahead.pop(key, None)

    def put(self, tensors: list[tuple[TensorRead, np.ndarray]]) -> list[jax.Array]:
        """Send one batch's tensors (or row pieces) in a single batched transfer (JAX overlaps its copies)."""
        keys, pieces, devices = [], [], []
        for read, host in tensors:
            path, i = self.owner[read.name]
            for device, index, first in self._targets(read):
                piece = host[index]
                if device.platform == "cpu" and self.reused:
                    piece = np.array(piece)  # the CPU backend may alias host memory, and our buffer will be reused
                keys.append((path, i, device, first))
                pieces.append(piece)
                devices.append(device)
        sent = jax.device_put(pieces, devices) if pieces else []
        for (path, i, device, first), array in zip(keys, sent):
            self.pieces.setdefault(path, {}).setdefault(device, {}).setdefault(i, []).append((first, array))
        for read, _ in tensors:
            path, _ = self.owner[read.name]
            self.count[path] -= 1
            if self.count[path] == 0:
                if any(not _ahead[key].done() for key in self._join_keys(path) if key in _ahead):
                    self.deferred.append(path)  # its pieces wait on the device until their join has compiled
                    self.num_deferred += 1
                else:
                    self._finish(path)
        self.finish_deferred(wait=False)
        return sent

    def finish_deferred(self, wait: bool = True) -> None:
        """Finish deferred parameters: all of them, or (wait=False) those whose joins have compiled by now."""
        for path in list(self.deferred):
            if wait or all(_ahead[key].done() for key in self._join_keys(path) if key in _ahead):
                self.deferred.remove(path)
                self._finish(path)

    def _join_keys(self, path: str):
        for device, per_index in self.pieces[path].items():
            for rows in per_index.values():
                if len(rows) > 1:
                    yield _join_key([a.shape for _, a in sorted(rows, key=lambda r: r[0])], rows[0][1].dtype, device)

    def _finish(self, path: str) -> None:
        began = time.perf_counter()
        per_device = self.pieces.pop(path)
        arrays = []
        for device in self.shardings[path].addressable_devices_indices_map(self.shapes[path]):
            parts = []
            for _, rows in sorted(per_device[device].items()):
                rows = [a for _, a in sorted(rows, key=lambda r: r[0])]
                key = _join_key([r.shape for r in rows], rows[0].dtype, device)
                parts.append(self._run(key, _join, *rows) if len(rows) > 1 else rows[0])  # on the device
            array = jnp.stack(parts) if path in self.stacked else parts[0]
            if array.dtype != self.dtype:
                key = _cast_key(array.shape, array.dtype, self.dtype, device)
                array = self._run(key, _cast(self.dtype), array)
            arrays.append(array)
        array = jax.make_array_from_single_device_arrays(self.shapes[path], self.shardings[path], arrays)
        if self.quantization and is_quantized_param(path):  # the full-precision copy is dropped right here
            key = _quantize_key(self.quantization, self.shapes[path], self.dtype, self.shardings[path])
            array = self._run(key, quantizer(self.quantization, tuple(self.shapes[path]), self.shardings[path]), array)
        self.done[path] = array
        self.finish_seconds += time.perf_counter() - began


def _check_names(ckpt: Checkpoint, wanted: set[str], cfg: ModelConfig, model_dir) -> None:
    """A CheckpointError naming the tensors the model needs and the checkpoint lacks, or those it has and the model
    does not know (tied checkpoints' spare lm_head and `_IGNORED_SUFFIXES` aside)."""
    missing = sorted(wanted - ckpt.names())
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint lacks tensor(s) {', '.join(missing[:8])}")
    unexpected = ckpt.names() - wanted
    if cfg.tie_word_embeddings:
        unexpected.discard("lm_head.weight")  # some tied checkpoints still carry a copy
    unexpected = sorted(n for n in unexpected if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise CheckpointError(f"{ckpt.where[unexpected[0]]}: unexpected tensor(s) {', '.join(unexpected[:8])} for a "
                              f"{cfg.architecture}")  # fmt: skip


def load_params(
    model_dir: str | Path,
    cfg: ModelConfig,
    family,
    mesh=None,
    progress: bool = False,
    options: LoadOptions | None = None,
    quantization: str | None = None,
) -> dict:
    """Read, check and place every parameter; returns the nested pytree `forward` takes.

    quantization: a `quantization.METHODS` name replaces linear weights by `QuantizedWeight`s, quantized on the device.
    """
    from rtpjax.progress import progress_bar

    opts = options or LoadOptions()
    began = time.perf_counter()
    ckpt = Checkpoint(model_dir)
    sources = family.weight_names(cfg)
    shapes = decoder.param_shapes(cfg)
    assert set(sources) == set(shapes), f"{family.__name__}: weight map and param shapes disagree"  # a bug, not input
    wanted = {name for source in sources.values() for name in source.names}
    _check_names(ckpt, wanted, cfg, model_dir)
    _check_shapes(ckpt, sources, shapes)
    shardings = target_shardings(shapes, family, mesh, cfg)
    batches = plan_reads(ckpt, wanted, opts.batch_bytes)
    total = sum(b.end - b.start for b in batches)
    devices = {d for s in shardings.values() for d in s.addressable_devices}
    # CPU devices only: each batch gets a buffer of its own that the arrays alias, instead of a reused buffer and a
    # copy of every tensor out of it (the copy and its page faults were most of a warm CPU load).
    pin = dma_mapper(devices) if opts.pinned else None
    reuse = pin is not None or any(d.platform != "cpu" for d in devices)
    placer = _Placer(sources, shapes, shardings, cfg.jnp_dtype, batches, check_method(quantization), reused=reuse)
    placer.compile_ahead()
    reader = FileOrderReader(batches, opts, pin=pin, reuse=reuse)
    planned = time.perf_counter() - began
    in_flight: list[tuple[np.ndarray, list]] = []
    waited = {"reads": 0.0, "transfers": 0.0}  # where the main thread stood still: says which side is the bottleneck
    try:
        with progress_bar(total, "loading weights", "B", progress, unit_scale=True) as bar:
            batches_read = iter(reader)
            while True:
                t0 = time.perf_counter()
                item = next(batches_read, None)
                waited["reads"] += time.perf_counter() - t0
                if item is None:
                    break
                batch, buf, data = item
                views = []
                for t in batch.tensors:
                    offset = t.start - batch.start
                    views.append((t, data[offset : offset + t.nbytes].view(t.dtype).reshape(t.shape)))
                sent = placer.put(views)
                in_flight.append((buf, sent))
                if len(in_flight) > 1:  # the batch before has had this batch's transfers' time to land
                    old, arrays = in_flight.pop(0)
                    t0 = time.perf_counter()
                    jax.block_until_ready(arrays)
                    waited["transfers"] += time.perf_counter() - t0
                    reader.recycle(old)
                bar.update(batch.end - batch.start)
        placer.finish_deferred()
        params = decoder.nest(placer.done)
        jax.block_until_ready(params)
    except BaseException:
        placer.cancel_ahead()
        raise
    finally:
        for _, arrays in in_flight:  # no buffer is unmapped or reused under a transfer, even after an error
            try:
                jax.block_until_ready(arrays)
            except Exception:  # noqa: BLE001 - the error being raised already says what went wrong
                pass
        reader.close()
    seconds = time.perf_counter() - began
    line = f"loaded {total / 1e9:.2f} GB in {seconds:.2f} s ({total / 1e9 / seconds:.2f} GB/s) from {model_dir}"
    log.info(line)
    log.debug("loading waited %.2f s for reads and %.2f s for transfers; page-locking %d buffers took %.2f s; "
              "planning %.2f s; finishing parameters (joins, casts, quantization) %.2f s, %d of %d executables compiled "
              "ahead, %d parameters finished later than their last piece (join still compiling)", waited["reads"],
              waited["transfers"], len(reader.unpins), reader.pin_seconds, planned, placer.finish_seconds,
              placer.runs_ahead, placer.runs, placer.num_deferred)  # fmt: skip
    return params


def random_params(cfg: ModelConfig, family, mesh=None, seed: int = 0, scale: float = 0.02,
                  quantization: str | None = None) -> dict:  # fmt: skip
    """Random weights (norms 1) drawn on the devices, each straight into its sharding: vLLM's `load_format=dummy`."""
    check_method(quantization)
    shapes = decoder.param_shapes(cfg)
    shardings = target_shardings(shapes, family, mesh, cfg)
    makers: dict = {}  # one jitted maker per (shape, sharding, kind): an 8B model needs about ten, not 291

    def maker(shape, sharding, ones: bool):
        if (shape, sharding, ones) not in makers:
            if ones:
                make = lambda k: jnp.ones(shape, cfg.jnp_dtype)  # noqa: E731
            else:
                make = lambda k: (scale * jax.random.normal(k, shape, jnp.float32)).astype(cfg.jnp_dtype)  # noqa: E731
            makers[shape, sharding, ones] = jax.jit(make, out_shardings=sharding)
        return makers[shape, sharding, ones]

    key = jax.random.key(seed)
    flat = {}
    for i, (path, shape) in enumerate(sorted(shapes.items())):
        flat[path] = maker(tuple(shape), shardings[path], path.endswith("norm"))(jax.random.fold_in(key, i))
        if quantization and is_quantized_param(path):
            flat[path] = quantize_on_device(flat[path], quantization)
    return decoder.nest(flat)

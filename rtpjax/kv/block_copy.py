"""Copies of whole KV blocks between the device cache and the host (`KVBlocks`), for moving requests and host tiers.

One gather and one write executable per block-count bucket (powers of two): ids are padded, a padded read takes block
0 and is cut off on the host, a padded write goes to an index past the cache and is dropped. Counts beyond the largest
bucket go in pieces of it. The executables are compiled at warm-up, so a copy never compiles while serving.

The cache is threaded through like a step's (the write donates it), so JAX orders a copy after every step dispatched
before it: a gather sees the K/V of a step still running. Under tensor parallelism a gather returns the model's KV
heads whole (one of each copy) and a write repeats them into the cache's copies, keeping the cache's sharding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.kv.host_blocks import KVBlocks, KVLayout, PackedBlocks


def gather(cache, ids, *, copies: int):
    """Blocks `ids` of every layer: per part (k, v[, k_scale, v_scale]) an array [layers, kv_heads, len(ids), ...]."""
    return tuple(jnp.stack([layer[part][::copies, ids] for layer in cache]) for part in range(len(cache[0])))


def write(cache, ids, parts, *, copies: int):
    """Write parts [layers, kv_heads, len(ids), ...] into blocks `ids` (ids past the cache are dropped)."""
    return [
        tuple(buf.at[:, ids].set(jnp.repeat(new[i], copies, axis=0).astype(buf.dtype), mode="drop")
              for buf, new in zip(layer, parts))
        for i, layer in enumerate(cache)
    ]  # fmt: skip


def pack(parts):
    """Parts [layers, kv_heads, n, ...] -> uint8 [n, block_bytes]: each block one contiguous row, every layer's keys,
    then values (then scales), so a tier moves a block in one transfer."""
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


class BlockCopier:
    """Gathers blocks of a cache to the host and writes host blocks into it, per block-count bucket."""

    def __init__(self, cache, layout: KVLayout, sizes: list[int]):
        self.layout, self.sizes = layout, sizes
        self.num_blocks = cache[0][0].shape[1]
        # Layers of different dtypes (--kv-cache-dtypes) have no one host layout yet: their blocks stay on the device.
        self.mixed = len({layer[0].dtype for layer in cache}) > 1
        copies = cache[0][0].shape[0] // layout.num_kv_heads
        shardings = jax.tree.map(lambda x: x.sharding, cache)
        # packed rows go straight to every device of the cache (tensor parallel: each then takes its heads)
        first = cache[0][0].sharding
        self._rows_at = (jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
                         if isinstance(first, jax.sharding.NamedSharding) else first)  # fmt: skip
        self._gather = jax.jit(lambda c, ids: gather(c, ids, copies=copies))
        self._write = jax.jit(lambda c, ids, parts: write(c, ids, parts, copies=copies), donate_argnums=(0,),
                              out_shardings=shardings)  # fmt: skip
        self._gather_packed = jax.jit(lambda c, ids: pack(gather(c, ids, copies=copies)))
        self._write_packed = jax.jit(
            lambda c, ids, rows: write(c, ids, unpack(jnp.stack(rows), layout), copies=copies),
            donate_argnums=(0,), out_shardings=shardings)  # fmt: skip
        self._compiled: dict[tuple[str, int], object] = {}  # (kind, bucket) -> executable
        self._zero_row = None  # the padding row of packed writes, made once on the device
        self._on_cpu = any(d.platform == "cpu" for d in first.device_set)

    def jobs(self, cache, packed: bool = False) -> list:
        """One callable per executable to compile (the runner's warm-up runs them in its thread pool); `packed`: also
        those of the KV tiers (packed rows)."""
        if self.mixed:
            return []
        kinds = ("gather", "write") + (("gather_packed", "write_packed") if packed else ())
        return [lambda n=n, kind=kind: self._compile(cache, kind, n) for n in self.sizes for kind in kinds]

    def _compile(self, cache, kind: str, n: int) -> None:
        ids = jax.ShapeDtypeStruct((n,), jnp.int32)
        if kind in ("gather", "gather_packed"):
            fn = self._gather if kind == "gather" else self._gather_packed
            self._compiled[kind, n] = fn.lower(cache, ids).compile()
        elif kind == "write":
            self._compiled[kind, n] = self._write.lower(cache, ids, self._part_shapes(n)).compile()
        else:
            row = jax.ShapeDtypeStruct((self.layout.block_bytes,), jnp.uint8, sharding=self._rows_at)
            self._compiled[kind, n] = self._write_packed.lower(cache, ids, (row,) * n).compile()

    def _part_shapes(self, n: int) -> tuple:
        lay = self.layout
        head = (lay.num_layers, lay.num_kv_heads, n, lay.block_size)
        kv = jax.ShapeDtypeStruct(head + (lay.head_dim,), jnp.dtype(lay.dtype))
        scale = jax.ShapeDtypeStruct(head, jnp.float32)
        return (kv, kv, scale, scale) if lay.quantized else (kv, kv)

    def _check(self) -> None:
        if self.mixed:
            raise ValueError("KV blocks cannot move between this cache and the host: its layers differ in dtype "
                             "(--kv-cache-dtypes); use one --kv-cache-dtype to move requests or use host tiers")

    def _pieces(self, count: int):
        """(start, real, bucket) pieces covering `count` blocks."""
        largest = self.sizes[-1]
        for start in range(0, count, largest):
            real = min(largest, count - start)
            yield start, real, next(s for s in self.sizes if s >= real)

    def gather(self, cache, blocks: list[int]) -> KVBlocks:
        """The contents of `blocks` (in order) on the host. Waits for the steps that write them."""
        self._check()
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
        self._check()
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

    def gather_packed(self, cache, blocks: list[int]) -> list[tuple[int, jax.Array]]:
        """Queue copies of `blocks` as packed rows, already on their way to the host: (real count, uint8 [bucket,
        block_bytes] array) per piece. Returns at once; dispatched before any later write of those blocks, it reads
        their contents as of now."""
        pieces = []
        for start, real, bucket in self._pieces(len(blocks)):
            ids = np.zeros(bucket, np.int32)
            ids[:real] = blocks[start : start + real]
            rows = self._compiled.get(("gather_packed", bucket), self._gather_packed)(cache, ids)
            rows.copy_to_host_async()
            pieces.append((real, rows))
        return pieces

    def compile_packed(self, cache, kind: str) -> None:
        """Compile one kind of packed copy ("gather_packed", "write_packed") now, not at first use: an engine that
        hands K/V over moves blocks as packed rows."""
        if not self.mixed:
            for n in self.sizes:
                if (kind, n) not in self._compiled:
                    self._compile(cache, kind, n)

    def put_rows(self, rows: np.ndarray) -> list[jax.Array]:
        """Host rows uint8 [k, block_bytes] on every device of the cache, as write_packed takes them: copies, never
        views of `rows` (whose memory may be reused once they are ready)."""
        if self._on_cpu:  # the CPU client may alias suitably aligned host memory whatever may_alias says
            rows = np.array(rows)
        return jax.device_put(list(rows), self._rows_at, may_alias=False)

    def write_packed(self, cache, blocks: list[int], packed: PackedBlocks, take: list[int] | None = None):
        """The cache with packed rows (rows `take` of them, else all in order) written into `blocks`, each row its own
        host-to-device transfer (from page-locked memory where the tier could map it: no staging copy) to every
        device the cache spans, not the default one (rows already there stay); the cache passed in is donated."""
        self.layout.require(packed.layout)
        if self._zero_row is None:
            self._zero_row = jax.device_put(np.zeros(self.layout.block_bytes, np.uint8), self._rows_at)
        chosen = packed.rows if not take else [packed.rows[r] for r in take]
        for start, real, bucket in self._pieces(len(blocks)):
            ids = np.full(bucket, self.num_blocks, np.int32)  # past the cache: dropped
            ids[:real] = blocks[start : start + real]
            rows = jax.device_put(chosen[start : start + real], self._rows_at)
            rows = tuple(rows) + (self._zero_row,) * (bucket - real)
            cache = self._compiled.get(("write_packed", bucket), self._write_packed)(cache, ids, rows)
        return cache

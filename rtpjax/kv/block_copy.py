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

from rtpjax.kv.host_blocks import KVBlocks, KVLayout


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


class BlockCopier:
    """Gathers blocks of a cache to the host and writes host blocks into it, per block-count bucket."""

    def __init__(self, cache, layout: KVLayout, sizes: list[int]):
        self.layout, self.sizes = layout, sizes
        self.num_blocks = cache[0][0].shape[1]
        # Layers of different dtypes (--kv-cache-dtypes) have no one host layout yet: their blocks stay on the device.
        self.mixed = len({layer[0].dtype for layer in cache}) > 1
        copies = cache[0][0].shape[0] // layout.num_kv_heads
        shardings = jax.tree.map(lambda x: x.sharding, cache)
        self._gather = jax.jit(lambda c, ids: gather(c, ids, copies=copies))
        self._write = jax.jit(lambda c, ids, parts: write(c, ids, parts, copies=copies), donate_argnums=(0,),
                              out_shardings=shardings)  # fmt: skip
        self._compiled: dict[tuple[str, int], object] = {}  # ("gather" | "write", bucket) -> executable

    def jobs(self, cache) -> list:
        """One callable per executable to compile (the runner's warm-up runs them in its thread pool)."""
        if self.mixed:
            return []
        return [lambda n=n, kind=kind: self._compile(cache, kind, n) for n in self.sizes for kind in ("gather", "write")]

    def _compile(self, cache, kind: str, n: int) -> None:
        ids = jax.ShapeDtypeStruct((n,), jnp.int32)
        if kind == "gather":
            self._compiled[kind, n] = self._gather.lower(cache, ids).compile()
        else:
            self._compiled[kind, n] = self._write.lower(cache, ids, self._part_shapes(n)).compile()

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

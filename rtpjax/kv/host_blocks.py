"""KV blocks on the host: the form in which a cache's blocks leave one engine and enter another (request migration,
prefill/decode hand-off) or wait in host memory (a host KV tier).

The contents are plain bytes with their layout recorded, so they travel through msgspec between processes and hosts,
and a receiver refuses blocks it cannot hold with a one-line reason. Heads are the model's KV heads: a cache that holds
copies of them under tensor parallelism (kv_cache.cache_heads) sends one of each and makes its copies on arrival, so
blocks move between engines of any tensor-parallel size.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp  # names bfloat16 and float8 dtypes, which numpy knows only through ml_dtypes
import msgspec
import numpy as np


class KVLayout(msgspec.Struct, frozen=True):
    """What one block holds: its storage type, tokens, layers, KV heads and head size."""

    dtype: str  # numpy/JAX name of the storage type: "float32", "bfloat16", "int8", "float8_e4m3fn", ...
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def quantized(self) -> bool:
        """int8 / fp8 blocks carry a float32 scale per token and head."""
        return self.dtype in ("int8", "float8_e4m3fn")

    def block_parts(self) -> list[tuple[np.dtype, tuple[int, ...]]]:
        """(dtype, shape) of each part of one block: keys, values[, key scales, value scales], [layers, heads, ...]."""
        head = (self.num_layers, self.num_kv_heads, self.block_size)
        kv = (jnp.dtype(self.dtype), head + (self.head_dim,))
        scale = (np.dtype(np.float32), head)
        return [kv, kv, scale, scale] if self.quantized else [kv, kv]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block packed as one contiguous row (every layer's keys, values and scales): a tier's unit."""
        return sum(int(np.prod(shape)) * dtype.itemsize for dtype, shape in self.block_parts())

    def require(self, other: KVLayout) -> None:
        """Raise ValueError naming the first field in which `other` (arriving blocks) differs from this cache."""
        for field in self.__struct_fields__:
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                raise ValueError(f"KV blocks with {field}={theirs!r} cannot enter a cache with {field}={mine!r}")


class KVBlocks(msgspec.Struct):
    """num_blocks blocks of K/V: keys and values [num_layers, num_kv_heads, num_blocks, block_size, head_dim] in
    layout.dtype, C order; for quantized layouts also key/value scales [num_layers, num_kv_heads, num_blocks,
    block_size] float32 (empty otherwise)."""

    layout: KVLayout
    num_blocks: int
    keys: bytes
    values: bytes
    key_scales: bytes = b""
    value_scales: bytes = b""

    @classmethod
    def from_arrays(cls, layout: KVLayout, arrays) -> KVBlocks:
        """From (keys, values[, key_scales, value_scales]) host arrays shaped as the class describes."""
        parts = [np.ascontiguousarray(a).tobytes() for a in arrays]
        blocks = cls(layout, int(np.shape(arrays[0])[2]), *parts)
        blocks.arrays()  # checks the shapes against the layout
        return blocks

    def arrays(self) -> tuple[np.ndarray, ...]:
        """Read-only array views of the contents: (keys, values) or (keys, values, key_scales, value_scales)."""
        lay = self.layout
        head = (lay.num_layers, lay.num_kv_heads, self.num_blocks, lay.block_size)
        parts = [(self.keys, jnp.dtype(lay.dtype), head + (lay.head_dim,)),
                 (self.values, jnp.dtype(lay.dtype), head + (lay.head_dim,))]  # fmt: skip
        if lay.quantized:
            parts += [(self.key_scales, np.dtype(np.float32), head), (self.value_scales, np.dtype(np.float32), head)]
        elif self.key_scales or self.value_scales:
            raise ValueError(f"KV blocks of dtype {lay.dtype} carry scales; only int8 / fp8 blocks have them")
        out = []
        for data, dtype, shape in parts:
            want = int(np.prod(shape)) * dtype.itemsize
            if len(data) != want:
                raise ValueError(f"KV blocks hold {len(data)} bytes where {self.num_blocks} blocks of layout {lay} "
                                 f"need {want}")  # fmt: skip
            out.append(np.frombuffer(data, dtype).reshape(shape))
        return tuple(out)


@dataclasses.dataclass
class PackedBlocks:
    """Blocks as a tier holds them: each one contiguous row of layout.block_bytes bytes (block_copy.pack's order), so a
    block crosses to the device in one transfer instead of one strided slice per layer and part (rows back to back in
    one buffer cross together). The rows are views of a tier's buffer, leased until the write that reads them has run
    (`lease` gives them back); `page_locked`: that buffer is mapped for the devices' DMA (no staging copy)."""

    layout: KVLayout
    rows: list  # uint8 [block_bytes] each: host rows, or rows already on the device
    lease: object = None
    page_locked: bool = False


@dataclasses.dataclass
class BlockLoad:
    """Host contents to write into device blocks before a step runs: rows `rows` of `kv` go to cache blocks `blocks`
    (an adopted request's KV), or, for PackedBlocks from a KV tier, its rows in order (`rows` unused)."""

    blocks: list[int]
    kv: KVBlocks | PackedBlocks
    rows: list[int] = dataclasses.field(default_factory=list)

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
    """What one block holds: its storage type, tokens, layers, KV heads and head size. Layers may differ in storage
    type (rtpjax.quant.kv_precision's per-layer maps): then `dtype` is "mixed" and `layer_dtypes` names each layer's."""

    dtype: str  # numpy/JAX name of the storage type: "float32", "bfloat16", "int8", "float8_e4m3fn", ... or "mixed"
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layer_dtypes: tuple[str, ...] = ()  # one name per layer where they differ (dtype "mixed"), else empty

    @classmethod
    def of(cls, dtypes: list, block_size: int, num_kv_heads: int, head_dim: int) -> KVLayout:
        """The layout of a cache whose layers store `dtypes` (one per layer, any dtype-like)."""
        names = tuple(jnp.dtype(d).name for d in dtypes)
        if len(set(names)) == 1:
            return cls(names[0], block_size, len(names), num_kv_heads, head_dim)
        return cls("mixed", block_size, len(names), num_kv_heads, head_dim, names)

    def groups(self) -> list[tuple[str, int]]:
        """(dtype, layers) of each run of consecutive layers of one storage type, in layer order."""
        names = self.layer_dtypes or (self.dtype,) * self.num_layers
        if len(names) != self.num_layers or (self.dtype == "mixed") != bool(self.layer_dtypes):
            raise ValueError(f"KV layout {self}: dtype 'mixed' goes with one layer dtype per layer, and only then")
        out: list[tuple[str, int]] = []
        for name in names:
            if out and out[-1][0] == name:
                out[-1] = (name, out[-1][1] + 1)
            else:
                out.append((name, 1))
        return out

    def _parts(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
        """(KVBlocks field, dtype, shape) of each part of one block: per run of layers (`groups`) its keys, values[,
        key scales, value scales] (int8 / fp8 blocks carry a float32 scale per token and head), [layers, heads, ...]."""
        out = []
        for name, layers in self.groups():
            head = (layers, self.num_kv_heads, self.block_size)
            kv = jnp.dtype(name)
            out += [("keys", kv, head + (self.head_dim,)), ("values", kv, head + (self.head_dim,))]
            if name in QUANTIZED:
                out += [("key_scales", np.dtype(np.float32), head), ("value_scales", np.dtype(np.float32), head)]
        return out

    def block_parts(self) -> list[tuple[np.dtype, tuple[int, ...]]]:
        """(dtype, shape) of each part of one block, in the order a packed row holds them (`_parts`)."""
        return [(dtype, shape) for _, dtype, shape in self._parts()]

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


QUANTIZED = ("int8", "float8_e4m3fn")  # storage types that carry a float32 scale per token and head


class KVBlocks(msgspec.Struct):
    """num_blocks blocks of K/V, per run of layers of one storage type (layout.groups; one run unless layers differ):
    keys and values [layers, num_kv_heads, num_blocks, block_size, head_dim] in that type, C order; for int8 / fp8
    runs also key/value scales [layers, num_kv_heads, num_blocks, block_size] float32. Each field holds its runs'
    arrays back to back."""

    layout: KVLayout
    num_blocks: int
    keys: bytes
    values: bytes
    key_scales: bytes = b""
    value_scales: bytes = b""

    @classmethod
    def from_arrays(cls, layout: KVLayout, arrays) -> KVBlocks:
        """From host arrays shaped as `arrays` returns them, in its order."""
        fields: dict[str, list[bytes]] = {"keys": [], "values": [], "key_scales": [], "value_scales": []}
        parts = layout._parts()
        if len(arrays) != len(parts):
            raise ValueError(f"KV blocks of layout {layout} have {len(parts)} parts, got {len(arrays)}")
        for (field, _, _), a in zip(parts, arrays):
            fields[field].append(np.ascontiguousarray(a).tobytes())
        blocks = cls(layout, int(np.shape(arrays[0])[2]), **{f: b"".join(v) for f, v in fields.items()})
        blocks.arrays()  # checks the shapes against the layout
        return blocks

    def arrays(self) -> tuple[np.ndarray, ...]:
        """Read-only array views of the contents, per run of layers its (keys, values[, key_scales, value_scales])."""
        shapes = [(field, dtype, (layers, heads, self.num_blocks, *rest))
                  for field, dtype, (layers, heads, *rest) in self.layout._parts()]  # fmt: skip
        need = dict.fromkeys(("keys", "values", "key_scales", "value_scales"), 0)
        for field, dtype, shape in shapes:
            need[field] += int(np.prod(shape)) * dtype.itemsize
        for field, want in need.items():
            if len(getattr(self, field)) != want:
                raise ValueError(f"KV blocks hold {len(getattr(self, field))} bytes where {self.num_blocks} blocks of "
                                 f"layout {self.layout} need {want} ({field})")  # fmt: skip
        at, out = dict.fromkeys(need, 0), []
        for field, dtype, shape in shapes:
            count = int(np.prod(shape))
            out.append(np.frombuffer(getattr(self, field), dtype, count, at[field]).reshape(shape))
            at[field] += count * dtype.itemsize
        return tuple(out)


@dataclasses.dataclass
class PackedBlocks:
    """Blocks as a tier holds them: each one contiguous row of layout.block_bytes bytes (block_copy.pack's order), so a
    block crosses to the device in one transfer instead of one strided slice per layer and part (rows back to back in
    one buffer cross together). The rows are views of a tier's buffer, leased until the write that reads them has run
    (`lease` gives them back); `page_locked`: that buffer is mapped for the devices' DMA (no staging copy)."""

    layout: KVLayout
    rows: list  # host rows (uint8 [block_bytes] each), or rows already on the device (block_copy.OnDevice)
    lease: object = None
    page_locked: bool = False


@dataclasses.dataclass
class BlockLoad:
    """Host contents to write into device blocks before a step runs: rows `rows` of `kv` go to cache blocks `blocks`
    (an adopted request's KV), or, for PackedBlocks from a KV tier, its rows in order (`rows` unused)."""

    blocks: list[int]
    kv: KVBlocks | PackedBlocks
    rows: list[int] = dataclasses.field(default_factory=list)

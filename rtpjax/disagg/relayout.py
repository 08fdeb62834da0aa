"""K/V blocks of one engine laid out for another: the prompt's blocks cut to its computed positions and cut again into
the receiver's block size. Tensor-parallel sizes need nothing here: blocks always hold the model's KV heads whole
(kv_cache.cache_heads' copies are made on arrival).

The hand-off moves packed rows (block_copy.pack's order); only a receiver of another block size unpacks them, on the
host (shapes differ per prompt: on the device each would compile)."""

from __future__ import annotations

import msgspec
import numpy as np

from rtpjax.kv.host_blocks import KVBlocks, KVLayout


def unpack(layout: KVLayout, rows: np.ndarray) -> KVBlocks:
    """Packed rows uint8 [n, block_bytes] as KVBlocks (block_copy.unpack on the host)."""
    n, at, parts = rows.shape[0], 0, []
    for dtype, shape in layout.block_parts():
        size = int(np.prod(shape)) * dtype.itemsize
        part = np.ascontiguousarray(rows[:, at : at + size]).view(dtype).reshape(n, *shape)
        parts.append(np.moveaxis(part, 0, 2))
        at += size
    return KVBlocks.from_arrays(layout, parts)


def pack(kv: KVBlocks) -> np.ndarray:
    """KVBlocks as packed rows uint8 [n, block_bytes] (block_copy.pack on the host)."""
    n = kv.num_blocks
    return np.concatenate([np.ascontiguousarray(np.moveaxis(a, 2, 0)).view(np.uint8).reshape(n, -1)
                           for a in kv.arrays()], axis=1)  # fmt: skip


def relayout(kv: KVBlocks, num_tokens: int, target: KVLayout) -> KVBlocks:
    """The first `num_tokens` positions of `kv` in blocks of `target.block_size`. Raises ValueError naming the
    difference when the blocks cannot enter such a cache at all (another model, dtype or head layout)."""
    src = kv.layout
    if src.block_size == target.block_size:
        target.require(src)
        return kv
    msgspec.structs.replace(src, block_size=target.block_size).require(target)
    if num_tokens > kv.num_blocks * src.block_size:
        raise ValueError(f"{num_tokens} tokens claimed in {kv.num_blocks} blocks of {src.block_size}")
    blocks = -(-num_tokens // target.block_size)
    out = []
    for a in kv.arrays():
        layers, heads = a.shape[:2]
        flat = a.reshape(layers, heads, -1, *a.shape[4:])[:, :, :num_tokens]
        pad = [(0, 0)] * flat.ndim
        pad[2] = (0, blocks * target.block_size - num_tokens)
        out.append(np.pad(flat, pad).reshape(layers, heads, blocks, target.block_size, *a.shape[4:]))
    return KVBlocks.from_arrays(target, out)

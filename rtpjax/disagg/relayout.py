"""K/V blocks of one engine laid out for another: the prompt's blocks only, cut to its computed positions and cut
again into the receiver's block size. Tensor-parallel sizes need nothing here: KVBlocks always hold the model's KV
heads whole (kv_cache.cache_heads' copies are made on arrival)."""

from __future__ import annotations

import numpy as np

from rtpjax.kv.host_blocks import KVBlocks, KVLayout


def select(kv: KVBlocks, rows: list[int]) -> KVBlocks:
    """Rows `rows` of `kv`, in that order (the blocks of one completion of a snapshot)."""
    if rows == list(range(kv.num_blocks)):
        return kv
    return KVBlocks.from_arrays(kv.layout, [np.take(a, rows, axis=2) for a in kv.arrays()])


def relayout(kv: KVBlocks, num_tokens: int, target: KVLayout) -> KVBlocks:
    """The first `num_tokens` positions of `kv` in blocks of `target.block_size`. Raises ValueError naming the
    difference when the blocks cannot enter such a cache at all (another model, dtype or head layout)."""
    src = kv.layout
    if src.block_size == target.block_size:
        target.require(src)
        return kv
    KVLayout(src.dtype, target.block_size, src.num_layers, src.num_kv_heads, src.head_dim).require(target)
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

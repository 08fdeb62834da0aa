"""The paged KV cache as device arrays: one (k, v) pair per layer, each [kv_heads, num_blocks, block_size, head_dim].

Block accounting (which blocks a sequence owns) is host-side and lives elsewhere; this module only knows the layout,
the memory it costs and its sharding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rtpjax.models.config import ModelConfig
from rtpjax.sharding import kv_cache_sharding


def block_shape(cfg: ModelConfig, num_blocks: int, block_size: int) -> tuple[int, int, int, int]:
    return (cfg.num_kv_heads, num_blocks, block_size, cfg.head_dim)


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype=None) -> int:
    itemsize = jnp.dtype(dtype or cfg.jnp_dtype).itemsize
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize


def allocate(cfg: ModelConfig, num_blocks: int, block_size: int, mesh=None, dtype=None) -> list:
    """Zeroed cache, sharded over KV heads when a mesh is given."""
    shape = block_shape(cfg, num_blocks, block_size)
    sharding = kv_cache_sharding(shape, mesh) if mesh is not None else None
    make = jax.jit(lambda: jnp.zeros(shape, dtype or cfg.jnp_dtype), out_shardings=sharding)
    return [(make(), make()) for _ in range(cfg.num_layers)]

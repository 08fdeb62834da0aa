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


KV_DTYPES = {"auto": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32,
             "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}  # fmt: skip


def storage_dtype(cfg: ModelConfig, kv_dtype: str = "auto"):
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unsupported kv_cache_dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    return jnp.dtype(KV_DTYPES[kv_dtype] or cfg.jnp_dtype)


def is_quantized(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def bytes_per_block(cfg: ModelConfig, block_size: int, kv_dtype: str = "auto") -> int:
    dtype = storage_dtype(cfg, kv_dtype)
    per_token = cfg.head_dim * dtype.itemsize + (4 if is_quantized(dtype) else 0)  # + a float32 scale
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * per_token


def allocate(cfg: ModelConfig, num_blocks: int, block_size: int, mesh=None, kv_dtype: str = "auto") -> list:
    """Zeroed cache (plus unit scales when quantized), sharded over KV heads when a mesh is given."""
    dtype = storage_dtype(cfg, kv_dtype)
    shape = block_shape(cfg, num_blocks, block_size)
    sharding = kv_cache_sharding(shape, mesh) if mesh is not None else None
    make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    if not is_quantized(dtype):
        return [(make(), make()) for _ in range(cfg.num_layers)]
    scale_sharding = kv_cache_sharding(shape[:3], mesh) if mesh is not None else None
    ones = jax.jit(lambda: jnp.ones(shape[:3], jnp.float32), out_shardings=scale_sharding)
    return [(make(), make(), ones(), ones()) for _ in range(cfg.num_layers)]

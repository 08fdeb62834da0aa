"""The paged KV cache as device arrays: one (k, v) pair per layer, each [heads, num_blocks, block_size, head_dim].

Block accounting (which blocks a sequence owns) is host-side and lives elsewhere; this module only knows the layout,
the memory it costs and its sharding. `heads` is the model's KV heads, or copies of them where they do not split
evenly over the tensor-parallel devices (see `cache_heads`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rtpjax.models.config import ModelConfig
from rtpjax.parallel.sharding import kv_cache_sharding, tensor_ways
from rtpjax.parallel.stages import PipelineMesh, split_layers


def cache_heads(cfg: ModelConfig, ways: int) -> int:
    """KV heads the cache holds on `ways` tensor-parallel devices: the least multiple of the KV heads that splits evenly
    over the devices (each KV head copied as often as needed), if the query heads split over those too.

    With fewer KV heads than devices (2 KV heads on 8 GPUs) each device then holds exactly the one head its queries read
    (vLLM's replication); with 6 KV heads on 4 devices, 3 of 12 copies each instead of all 6. Attention runs per device
    with no gather. Otherwise (query heads that do not split evenly) the model's own count, replicated on every device.
    """
    kv = cfg.num_kv_heads
    heads = math.lcm(kv, ways)
    return heads if cfg.num_heads % heads == 0 else kv


def block_shape(cfg: ModelConfig, num_blocks: int, block_size: int, mesh=None) -> tuple[int, int, int, int]:
    return (cache_heads(cfg, tensor_ways(mesh)), num_blocks, block_size, cfg.head_dim)


KV_DTYPES = {"auto": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32,
             "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}  # fmt: skip


def storage_dtype(cfg: ModelConfig, kv_dtype: str = "auto"):
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unsupported kv_cache_dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    return jnp.dtype(KV_DTYPES[kv_dtype] or cfg.jnp_dtype)


def layer_dtypes(cfg: ModelConfig, kv_dtype: str | tuple[str, ...] = "auto") -> list:
    """Each layer's storage dtype: one name for every layer, or one per layer (rtpjax.quant.kv_precision's maps)."""
    names = (kv_dtype,) * cfg.num_layers if isinstance(kv_dtype, str) else tuple(kv_dtype)
    if len(names) != cfg.num_layers:
        raise ValueError(f"per-layer KV cache dtypes name {len(names)} layers; the model has {cfg.num_layers}")
    return [storage_dtype(cfg, name) for name in names]


def is_quantized(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def bytes_per_block(cfg: ModelConfig, block_size: int, kv_dtype: str | tuple[str, ...] = "auto", ways: int = 1,
                    stages: int = 1) -> int:  # fmt: skip
    """Bytes one block costs each device of `ways` tensor-parallel devices (all of it on one device); with pipeline
    stages, a device of the stage whose layers cost most (each stage holds only its layers' KV)."""
    per_layer = [cfg.head_dim * d.itemsize + (4 if is_quantized(d) else 0)  # + a float32 scale
                 for d in layer_dtypes(cfg, kv_dtype)]  # fmt: skip
    heads = cache_heads(cfg, ways)
    per_device = heads // ways if heads % ways == 0 else heads  # split over the devices, or replicated on each
    per_stage = max(sum(per_layer[i] for i in layers) for layers in split_layers(cfg.num_layers, stages))
    return 2 * block_size * per_device * per_stage


def allocate(cfg: ModelConfig, num_blocks: int, block_size: int, mesh=None,
             kv_dtype: str | tuple[str, ...] = "auto") -> list:  # fmt: skip
    """Zeroed cache (plus unit scales for int8 / fp8 layers), sharded over KV heads when a mesh is given. Layers may
    differ in dtype: each layer's cache is its own buffer, and its attention reads whichever it is given. Under
    pipeline stages (a PipelineMesh) each layer's cache lies on its stage's devices only."""
    shape = block_shape(cfg, num_blocks, block_size, mesh)
    meshes = [mesh.stages[mesh.stage_of(i)] if isinstance(mesh, PipelineMesh) else mesh for i in range(cfg.num_layers)]
    makers: dict = {}
    layers = []
    for m, dtype in zip(meshes, layer_dtypes(cfg, kv_dtype)):
        if (m, dtype) not in makers:  # one pair of programs per distinct mesh and dtype
            sharding = kv_cache_sharding(shape, m) if m is not None else None
            scale_sharding = kv_cache_sharding(shape[:3], m) if m is not None else None
            makers[m, dtype] = (jax.jit(lambda d=dtype: jnp.zeros(shape, d), out_shardings=sharding),
                                jax.jit(lambda: jnp.ones(shape[:3], jnp.float32), out_shardings=scale_sharding))  # fmt: skip
        make, ones = makers[m, dtype]
        layers.append((make(), make(), ones(), ones()) if is_quantized(dtype) else (make(), make()))
    return layers

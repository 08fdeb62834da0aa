"""Writing a step's new K/V into the paged cache in Pallas (Triton lowering): the GPU alternative to XLA's scatter in
`rtpjax.kernels.attention.write_kv`; the engine picks one per step size, by measurement, unless its kv_write option
says which (`chosen`).

One program per (KV head, run of `TOKENS` tokens) loads the tokens' rows, quantizes them when the cache is int8 / fp8
(the same `quantize` as the reference), and stores each row at its slot of the head's flat [slots, head_dim] view;
padding tokens (slot < 0) store nothing. The cache is aliased to the output, so only the new rows move. Not fused into
the attention kernel: its programs read blocks that other programs of the same launch would write, and a launch
orders nothing between programs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

TOKENS = 16  # token rows per program
MIN_TOKENS = 128  # smaller steps keep XLA's scatter (benchmarks/RESULTS.md)


def chosen(num_tokens: int, choice: str = "auto") -> bool:
    """Whether a step of `num_tokens` is written through this kernel; `choice` is the engine's kv_write option
    (AttentionMetadata.kv_write): "pallas" or "xla" for every step, or "auto": by measurement on an H200 (Llama-3-8B,
    device time per step) the kernel writes 3-9x faster than XLA's scatter, but its K/V inputs cost two more small
    fusions per layer that the scatter fuses away; from 128 tokens the step is 2-3% faster, at 32 (decode) 1-3%
    slower."""
    if choice not in ("auto", "pallas", "xla"):
        raise ValueError(f"kv_write={choice!r}: choose auto, pallas or xla")
    return choice == "pallas" or (choice == "auto" and num_tokens >= MIN_TOKENS)


def _kernel(slots_ref, k_ref, v_ref, *refs, quantized: bool):
    from rtpjax.kernels.reference import quantize

    outs = refs[len(refs) // 2 :]  # the cache, aliased to the inputs before them
    rows = pl.ds(pl.program_id(1) * TOKENS, TOKENS)
    slots = slots_ref[rows]
    keep = (slots >= 0) & (slots < outs[0].shape[0])  # as XLA's scatter: out-of-range slots dropped
    # Masked rows never touch memory on the GPU; the CPU interpreter stores them too (their old values), at an index
    # past the end that it drops, so they cannot clash with a real slot.
    slots = jnp.where(keep, slots, outs[0].shape[0])
    # Rows addressed as (slot, column) pairs: the CPU interpreter cannot store through an index array and a slice.
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, outs[0].shape[1]), 1)
    for new_ref, buf, scale_buf in ((k_ref, outs[0], outs[2] if quantized else None),
                                    (v_ref, outs[1], outs[3] if quantized else None)):  # fmt: skip
        new = new_ref[rows]  # [TOKENS, head_dim]
        if quantized:
            new, scale = quantize(new, buf.dtype)
            plgpu.store(scale_buf.at[slots], scale, mask=keep)
        plgpu.store(buf.at[slots[:, None], cols], new.astype(buf.dtype), mask=keep[:, None])


def write_kv(cache: tuple, k: jax.Array, v: jax.Array, slot_mapping: jax.Array, *, interpret: bool = False) -> tuple:
    """`rtpjax.kernels.attention.write_kv` as one kernel: k, v [T, Hkv, D] into cache slots `slot_mapping` [T] (< 0: none;
    unique, as there)."""
    heads, num_blocks, block_size, head_dim = cache[0].shape
    quantized = len(cache) == 4
    if not quantized:
        k, v = k.astype(cache[0].dtype), v.astype(cache[1].dtype)
    pad = -k.shape[0] % TOKENS  # whole runs of TOKENS: padding rows have slot -1
    if pad:
        k, v = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (k, v))
        slot_mapping = jnp.pad(slot_mapping, (0, pad), constant_values=-1)
    num_tokens = k.shape[0]
    flat = tuple(c.reshape(heads, num_blocks * block_size, *c.shape[3:]) for c in cache)  # free views
    whole = pl.BlockSpec((num_tokens,), lambda h, t: (0,))
    new_spec = pl.BlockSpec((num_tokens, None, head_dim), lambda h, t: (0, h, 0))
    per_head = lambda c: pl.BlockSpec((None, *c.shape[1:]), lambda h, t: (h,) + (0,) * (c.ndim - 1))  # noqa: E731
    cache_specs = [per_head(c) for c in flat]
    outs = pl.pallas_call(
        functools.partial(_kernel, quantized=quantized),
        grid=(heads, num_tokens // TOKENS),
        in_specs=[whole, new_spec, new_spec, *cache_specs],
        out_specs=cache_specs,
        out_shape=[jax.ShapeDtypeStruct(c.shape, c.dtype) for c in flat],
        input_output_aliases={3 + i: i for i in range(len(flat))},
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="kv_write",
    )(slot_mapping.astype(jnp.int32), k, v, *flat)
    return tuple(o.reshape(c.shape) for o, c in zip(outs, cache))

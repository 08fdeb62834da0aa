"""Plain-jnp paged attention and KV-cache writes in float32: the CPU path, and the ground truth every kernel is
tested against. Also the int8/fp8 per-token quantization the kernels share."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rtpjax.kernels.metadata import AttentionMetadata, LayerCache, token_layout

QUANT_MAX = {jnp.dtype(jnp.int8): 127.0, jnp.dtype(jnp.float8_e4m3fn): 448.0}


def quantize(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-vector quantization over the last axis: x ~= q * scale."""
    qmax = QUANT_MAX[jnp.dtype(dtype)]
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    y = x.astype(jnp.float32) / scale[..., None]
    if jnp.issubdtype(dtype, jnp.integer):
        y = round_half_even(jnp.clip(y, -qmax, qmax))
    return y.astype(dtype), scale


ROUND_TRIPS = (None, jnp.int8, jnp.float8_e4m3fn)  # round_trip's modes: 0 the model's dtype, 1 int8, 2 fp8


def round_trip(x: jax.Array, mode: jax.Array) -> jax.Array:
    """What attention reads back, in float32, for x written to a cache of ROUND_TRIPS[mode]: x rounded to its own
    dtype (mode 0: the model-dtype cache), or quantized and times its scale (as `dequantize` gives an int8 / fp8
    cache). The mode is traced, so one program serves every choice: KV-precision calibration measures each layer's
    with one compile, through a float32 cache that holds these values exactly."""
    info = jnp.finfo(x.dtype)  # reduce_precision, not a cast pair, which XLA may fold away (excess precision)
    kept = [jax.lax.reduce_precision(x.astype(jnp.float32), exponent_bits=info.nexp, mantissa_bits=info.nmant)]
    kept += [scaled(*quantize(x, dtype)) for dtype in ROUND_TRIPS[1:]]
    return jax.lax.select_n(mode, *kept)


def scaled(q: jax.Array, scale: jax.Array) -> jax.Array:
    """Quantized values times their per-vector scales, in float32."""
    return q.astype(jnp.float32) * scale[..., None]


def round_half_even(y: jax.Array) -> jax.Array:
    """jnp.round of float32 values in int32 range (not NaN), from truncation: the Triton lowering has no round
    (kv_write), and XLA folds the float adder trick ((y + 1.5 * 2**23) - 1.5 * 2**23) away."""
    whole = y.astype(jnp.int32)  # toward zero
    rest = y - whole.astype(jnp.float32)  # exact, in (-1, 1)
    up = (jnp.abs(rest) > 0.5) | ((jnp.abs(rest) == 0.5) & ((whole & 1) == 1))
    return (whole + jnp.where(up, jnp.where(rest > 0, 1, -1), 0)).astype(jnp.float32)


def dequantize(cache: LayerCache) -> tuple[jax.Array, jax.Array]:
    """Float32 K and V of a layer's cache, whatever its storage type."""
    if len(cache) == 4:
        return scaled(cache[0], cache[2]), scaled(cache[1], cache[3])
    return cache[0].astype(jnp.float32), cache[1].astype(jnp.float32)


def write_kv(cache: LayerCache, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> LayerCache:
    """Scatter the step's K/V ([T, Hkv, D]) into their slots, quantizing for an int8/fp8 cache; slots < 0 dropped.
    Slots must be unique (the scheduler only ever writes a sequence's own new positions)."""
    heads, num_blocks, block_size, dim = cache[0].shape
    num_slots = num_blocks * block_size
    if slot_mapping.shape[0] == 1:  # one row more, dropped: XLA turns a one-row scatter into a dynamic-update-slice,
        # and copies the whole layer cache around each one where a program writes a layer more than once (multi-step)
        k, v = (jnp.concatenate([x, jnp.zeros_like(x)]) for x in (k, v))
        slot_mapping = jnp.concatenate([slot_mapping, jnp.full((1,), -1, slot_mapping.dtype)])
    slots = jnp.where(slot_mapping < 0, num_slots, slot_mapping)  # out of range -> dropped, never wrapped

    def scatter(buf, new):  # new: [T, H, ...] -> buf[:, slot, ...]
        flat = buf.reshape(heads, num_slots, *buf.shape[3:])
        return flat.at[:, slots].set(new.swapaxes(0, 1).astype(buf.dtype), mode="drop").reshape(buf.shape)

    if len(cache) == 2:
        return scatter(cache[0], k), scatter(cache[1], v)
    (kq, ks), (vq, vs) = quantize(k, cache[0].dtype), quantize(v, cache[1].dtype)
    return scatter(cache[0], kq), scatter(cache[1], vq), scatter(cache[2], ks), scatter(cache[3], vs)


def reference_attention(
    q: jax.Array,
    cache: LayerCache,
    meta: AttentionMetadata,
    *,
    scale: float,
    window: int | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Plain-jnp paged attention in float32. q: [T, Hq, D] -> [T, Hq, D]; padding tokens give zeros."""
    k_cache, v_cache = dequantize(cache)
    num_tokens, num_heads, dim = q.shape
    kv_heads, _, block_size, _ = k_cache.shape
    group = num_heads // kv_heads
    seq, position, valid = meta.plan.get("token_layout") or token_layout(meta, num_tokens)
    if seq.shape != (num_tokens,):
        raise ValueError(f"meta.plan was made for {seq.shape[0]} tokens, this call has {num_tokens}: remake it with "
                         "plan_step when the step's shapes change")  # fmt: skip

    # Every token gathers its own sequence's whole context: simple and exact, not fast.
    blocks = meta.block_tables[seq]  # [T, B]
    slots = (blocks[:, :, None] * block_size + jnp.arange(block_size)[None, None, :]).reshape(num_tokens, -1)
    keys = k_cache.reshape(kv_heads, -1, dim)[:, slots]  # [Hkv, T, C, D]
    values = v_cache.reshape(kv_heads, -1, dim)[:, slots]

    qg = q.astype(jnp.float32).reshape(num_tokens, kv_heads, group, dim)
    scores = jnp.einsum("thgd,htcd->thgc", qg, keys) * scale
    if soft_cap is not None:
        scores = soft_cap * jnp.tanh(scores / soft_cap)
    key_pos = jnp.arange(keys.shape[2])[None, :]
    visible = key_pos <= position[:, None]
    if window is not None:
        visible &= key_pos > position[:, None] - window
    scores = jnp.where(visible[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("thgc,htcd->thgd", probs, values).reshape(num_tokens, num_heads, dim)
    return jnp.where(valid[:, None, None], out, 0.0).astype(q.dtype)

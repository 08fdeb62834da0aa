"""The layers every family shares, written once: RMSNorm, RoPE, GQA attention, SwiGLU MLP, sparse MoE.

All take parameters as plain dicts of arrays and activations as [tokens, features]; there is no batch axis, because
a step is one ragged token axis. Linear weights are stored [out, in] as in Hugging Face checkpoints, so loading needs
no transpose; XLA folds the transpose of `linear` into the matmul.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.kernels.metadata import AttentionMetadata, LayerCache
from rtpjax.kernels.attention import paged_attention
from rtpjax.models import moe
from rtpjax.models.config import ModelConfig, RopeScaling
from rtpjax.loading.quantization import QuantizedWeight
from rtpjax.quant.matmul import linear


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Normalise in float32, scale in the input dtype (as Hugging Face does)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)




def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Inverse frequencies, a host-side constant of the config (float32, as transformers computes them)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv_freq = inv_freq.astype(np.float32)
    if scaling.kind == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    if scaling.kind == "llama3":
        low_wavelen = scaling.original_max_position / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (the Hugging Face convention). x: [T, H, D], positions: [T]."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]  # [T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention(
    p: dict,
    cfg: ModelConfig,
    x: jax.Array,
    positions: jax.Array,
    cache: LayerCache,
    meta: AttentionMetadata,
    window: int | None = None,
) -> tuple[jax.Array, LayerCache]:
    """GQA self-attention with optional q/k/v bias (Qwen2), q/k RMSNorm (Qwen3) and sliding window (Mistral)."""
    tokens = x.shape[0]
    q, k, v = linear(x, p["wq"]), linear(x, p["wk"]), linear(x, p["wv"])
    if cfg.attention_bias:
        q, k, v = q + p["bq"], k + p["bk"], v + p["bv"]
    q = q.reshape(tokens, cfg.num_heads, cfg.head_dim)
    k = k.reshape(tokens, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(tokens, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
    inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    out, cache = paged_attention(q, k, v, cache, meta, scale=cfg.head_dim**-0.5, window=window)
    return linear(out.reshape(tokens, cfg.num_heads * cfg.head_dim), p["wo"]), cache


def swiglu_mlp(p: dict, x: jax.Array) -> jax.Array:
    return linear(jax.nn.silu(linear(x, p["w_gate"])) * linear(x, p["w_up"]), p["w_down"])


def moe_mlp(p: dict, cfg: ModelConfig, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Softmax top-k routed experts (Qwen3-MoE), run as `cfg.moe_impl` says (models/moe.py), and the tokens each
    expert received from the real (`valid`) tokens: [num_experts] int32."""
    ids, weights = moe.route(p["router"], x, cfg.num_experts_per_tok, cfg.norm_topk_prob)
    return moe.run_experts(p, x, ids, weights, cfg.moe_impl), moe.expert_load(ids, valid, cfg.num_experts)

"""The decoder-only transformer all supported families share: embed -> N x (attention, MLP or MoE) -> norm -> logits.

`forward` is the pure function the runner jits. Parameters are a nested dict whose layout `param_shapes` spells out;
the family files map Hugging Face tensor names onto it and add partition rules.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rtpjax.kernels.metadata import AttentionMetadata, LayerCache
from rtpjax.kernels.attention import plan_step
from rtpjax.models import layers
from rtpjax.models.config import ModelConfig
from rtpjax.parallel.sharding import tensor_ways

KVCache = list[LayerCache]


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """Where a parameter comes from in a Hugging Face checkpoint.

    Several names are stacked on a new leading axis (one per expert). Everything else is kept as stored: linear
    weights stay [out, in] as torch writes them, so loading is pure I/O with no transpose.
    """

    names: tuple[str, ...]


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Dotted parameter path -> shape, for every parameter the config calls for."""
    h, d, q, kv = cfg.hidden_size, cfg.head_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"embed": (cfg.vocab_size, h), "final_norm": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, h)
    for i in range(cfg.num_layers):
        L = f"layers.{i}"
        shapes |= {f"{L}.input_norm": (h,), f"{L}.post_attn_norm": (h,)}
        shapes |= {f"{L}.attn.wq": (q, h), f"{L}.attn.wk": (kv, h), f"{L}.attn.wv": (kv, h), f"{L}.attn.wo": (h, q)}
        if cfg.attention_bias:
            shapes |= {f"{L}.attn.bq": (q,), f"{L}.attn.bk": (kv,), f"{L}.attn.bv": (kv,)}
        if cfg.qk_norm:
            shapes |= {f"{L}.attn.q_norm": (d,), f"{L}.attn.k_norm": (d,)}
        if cfg.is_moe_layer(i):
            e, m = cfg.num_experts, cfg.moe_intermediate_size
            shapes |= {f"{L}.moe.router": (e, h), f"{L}.moe.w_gate": (e, m, h), f"{L}.moe.w_up": (e, m, h)}
            shapes[f"{L}.moe.w_down"] = (e, h, m)
        else:
            f = cfg.intermediate_size
            shapes |= {f"{L}.mlp.w_gate": (f, h), f"{L}.mlp.w_up": (f, h), f"{L}.mlp.w_down": (h, f)}
    return shapes


def partition_rules(cfg: ModelConfig, rules, mesh) -> tuple:
    """The family's partition rules, with the k/v projections kept whole where the KV heads do not split evenly over
    the tensor axis: every device then computes all KV heads (a small matmul) and keeps the ones its query heads read
    (`kv_cache.cache_heads`), instead of trading pieces of heads every layer (9 collectives per layer for 4 KV heads
    on 8 devices, on the CPU mesh)."""
    if cfg.num_kv_heads % tensor_ways(mesh):
        return ((r"\.attn\.[wb][kv]$", P()), *rules)
    return tuple(rules)


def nest(flat: dict[str, object]) -> dict:
    """{"layers.0.attn.wq": a, ...} -> {"layers": [{"attn": {"wq": a}}], ...}: the pytree `forward` takes."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    if "layers" in tree:
        tree["layers"] = [tree["layers"][str(i)] for i in range(len(tree["layers"]))]
    return tree


def flatten(params: dict) -> dict[str, object]:
    """Inverse of `nest`."""
    flat = {}
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(params):
        flat[".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in key_path)] = leaf
    return flat


def decoder_layer(p: dict, x, positions, cache: LayerCache, meta: AttentionMetadata, valid, *, cfg: ModelConfig,
                  window: int | None, moe: bool):  # fmt: skip
    """One layer: (x, cache, the tokens each expert received: [num_experts] int32 on MoE layers, else None)."""
    attn_out, cache = layers.attention(
        p["attn"], cfg, layers.rms_norm(x, p["input_norm"], cfg.rms_norm_eps), positions, cache, meta, window=window
    )
    x = x + attn_out
    h = layers.rms_norm(x, p["post_attn_norm"], cfg.rms_norm_eps)
    if not moe:
        return x + layers.swiglu_mlp(p["mlp"], h), cache, None
    out, load = layers.moe_mlp(p["moe"], cfg, h, valid)
    return x + out, cache, load


# Layers of one kind (window, dense or MoE) share one jitted function: a step is traced and lowered once per kind
# instead of once per layer (an 8B model: ~10x less lowering, seconds off every start). XLA inlines the calls, so
# the compiled program is the same.
_layer_fns: dict = {}


def _layer_fn(cfg: ModelConfig, window: int | None, moe: bool):
    key = (cfg, window, moe)
    if key not in _layer_fns:
        _layer_fns[key] = jax.jit(functools.partial(decoder_layer, cfg=cfg, window=window, moe=moe))
    return _layer_fns[key]


def run_layers(layer_params: list, first: int, cfg: ModelConfig, x, positions, kv_cache: KVCache,
               meta: AttentionMetadata):  # fmt: skip
    """Layers first, first + 1, ... (their parameters and caches in `layer_params` / `kv_cache`) on hidden states x
    [T, H]: the whole model, or one pipeline stage's share of it (rtpjax/parallel/pipeline.py). Returns x, the
    updated caches and the stacked expert load of the MoE layers among them (None if none)."""
    meta = plan_step(meta, x.shape[0], cfg.num_heads, kv_cache[0][0].shape[0])  # the cache's heads
    valid = jnp.arange(x.shape[0]) < meta.query_start_loc[-1]
    new_cache, loads = [], []
    for i, p in enumerate(layer_params, start=first):
        x, layer_cache, load = _layer_fn(cfg, cfg.window(i), cfg.is_moe_layer(i))(p, x, positions, kv_cache[i - first],
                                                                                  meta, valid)  # fmt: skip
        new_cache.append(layer_cache)
        if load is not None:
            loads.append(load)
    return x, new_cache, jnp.stack(loads) if loads else None


def hidden_states(params: dict, cfg: ModelConfig, tokens, positions, kv_cache: KVCache, meta: AttentionMetadata,
                  aux_layers: tuple[int, ...] = ()):  # fmt: skip
    """Final-normed hidden states [T, H] for every token, the updated cache, and the expert load of the step's real
    tokens: [MoE layers, num_experts] int32 (None for a dense model). `aux_layers`: also the inputs of these layers
    (the residual stream; 0 is the embedding), concatenated: [T, len(aux_layers) * H], what EAGLE-3 heads read."""
    x, new_cache, loads, aux = params["embed"][tokens], [], [], []
    cuts = sorted(set(aux_layers))
    for first, end in zip([0, *cuts], [*cuts, cfg.num_layers]):  # one run without aux layers
        if end > first:
            x, cache, load = run_layers(params["layers"][first:end], first, cfg, x, positions, kv_cache[first:end], meta)
            new_cache += cache
            loads += [] if load is None else [load]
        if end < cfg.num_layers:
            aux.append((end, x))
    load = None if not loads else loads[0] if len(loads) == 1 else jnp.concatenate(loads)
    out = layers.rms_norm(x, params["final_norm"], cfg.rms_norm_eps), new_cache, load
    if not aux_layers:
        return out
    taken = dict(aux)
    return (*out, jnp.concatenate([taken[i] for i in aux_layers], axis=-1))


def logits(params: dict, cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
    """Float32 logits; the head is the embedding itself when the model ties them, unless quantized (a copy of its own:
    `quantization.quantize_head`)."""
    head = params["lm_head"] if "lm_head" in params or not cfg.tie_word_embeddings else params["embed"]
    return layers.linear(hidden, head).astype(jnp.float32)


def forward(
    params: dict,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    kv_cache: KVCache,
    meta: AttentionMetadata,
    logits_indices: jax.Array | None = None,
    expert_load: bool = False,
    aux_layers: tuple[int, ...] = (),
) -> tuple[jax.Array, KVCache]:
    """tokens, positions: [T] (ragged, padded). Returns logits for the tokens at `logits_indices` (all when None).

    The engine asks only for each sequence's last token; tests ask for all of them. `expert_load` (MoE models): a
    third output, the tokens each expert of each MoE layer received ([MoE layers, num_experts] int32). `aux_layers`
    (an EAGLE-3 proposer): a last output, the inputs of those layers at every token ([T, len(aux_layers) * H]).
    """
    hidden, kv_cache, load, *aux = hidden_states(params, cfg, tokens, positions, kv_cache, meta, aux_layers)
    if logits_indices is not None:
        hidden = hidden[logits_indices]
    return (logits(params, cfg, hidden), kv_cache) + ((load,) if expert_load else ()) + tuple(aux)

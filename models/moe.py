"""Routed experts (Qwen3-MoE): routing, the expert compute, expert parallelism and the load each expert gets.

Two ways to run the experts, both exact (no token is ever dropped):

- dense: every expert runs on every token and a [T, E] combine matrix keeps the top-k. Reads each expert's weights
  once and spends E/k times the needed FLOPs: the right shape when a step's tokens touch every expert anyway.
- grouped: the T*k (token, expert) assignments are sorted by expert into tiles of `t` rows that each belong to one
  expert (an expert's group is padded to whole tiles); each tile gathers its expert's weights and runs one small
  batched matmul. FLOPs scale with k, not E. Static shapes without dropping tokens: the tile count is the worst case
  over all routings, sum(ceil(g_e / t)) <= (A + min(E, A) * (t - 1)) / t for A assignments.

`auto` picks per compiled step shape (the token count is static) whichever a bandwidth/compute model says is cheaper:
a gathered tile costs three passes over its weights (read, write the copy, read it), a dense expert one, and a row of
compute costs t / RIDGE of a weight pass (RIDGE: an H200's FLOPs per byte). Decode at batch 1 is grouped (8 expert
reads instead of 128 for Qwen3-30B-A3B), decode at batch 32 dense (its tokens touch nearly every expert), prefill
grouped with large tiles.

Under a mesh with "expert" / "tensor" axes the experts run in `shard_map`: tokens are replicated (attention is tensor
parallel), so the token exchange is implicit in the layout; each device computes the assignments routed to its own
experts with its slice of the intermediate dimension, and one explicit `psum` over ("expert", "tensor") combines
the partial outputs (the reduce-scatter + all-gather pair XLA picks for an all-reduce).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rtpjax.loading.quantization import QuantizedWeight, dequantize

IMPLS = ("auto", "grouped", "dense")

# How the expert stacks split over the mesh; the family's partition rules and the shard_map specs both read these.
SPECS = {"w_gate": P("expert", "tensor", None), "w_up": P("expert", "tensor", None), "w_down": P("expert", None, "tensor")}
RIDGE = 184.0  # FLOPs per byte where an H200 turns from bandwidth- to compute-bound (790 TFLOP/s / 4.3 TB/s)
_TILES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def route(router: jax.Array, x: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """Softmax over the router's logits, then the top-k: (expert ids [T, k] int32, weights [T, k] in x's dtype)."""
    logits = (x @ router.T).astype(jnp.float32)
    top_p, top_i = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
    if norm_topk_prob:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    return top_i.astype(jnp.int32), top_p.astype(x.dtype)


def expert_load(ids: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
    """Tokens routed to each expert this step, real tokens only (padding rows are routed too, but not counted)."""
    return jnp.zeros(num_experts, jnp.int32).at[ids.reshape(-1)].add(jnp.repeat(valid, ids.shape[1]).astype(jnp.int32))


def num_tiles(assignments: int, experts: int, tile: int) -> int:
    """Worst-case tile count of `assignments` rows over `experts` groups, each padded to whole tiles."""
    return max(1, min(assignments, (assignments + min(experts, assignments) * (tile - 1)) // tile))


def plan(assignments: int, experts: int, tokens: int, impl: str) -> int:
    """The tile size for grouped compute, or 0 for dense (`auto`: the cheaper by the cost model in the docstring)."""
    grouped = {t: num_tiles(assignments, experts, t) * (3 + t / RIDGE) for t in _TILES}
    best = min(grouped, key=grouped.get)
    if impl == "grouped":
        return best
    if impl == "dense" or experts * (1 + tokens / RIDGE) <= grouped[best]:
        return 0
    return best


def _weights(w, dtype):
    """Expert stacks as arrays of the compute dtype (a quantized stack is dequantized where it is read)."""
    return dequantize(w, dtype) if isinstance(w, QuantizedWeight) else w


def _take(w, index: jax.Array, dtype):
    """Rows `index` of an expert stack; a quantized stack is gathered quantized, then dequantized."""
    if isinstance(w, QuantizedWeight):
        return dequantize(QuantizedWeight(jnp.take(w.q, index, 0), jnp.take(w.scale, index, 0)), dtype)
    return jnp.take(w, index, 0)


def dense_experts(x, ids, weights, w_gate, w_up, w_down, first: int | jax.Array = 0) -> jax.Array:
    """Experts [first, first + E) on every token; assignments to other experts (other devices') weigh zero."""
    experts = w_gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(ids - first, experts, dtype=x.dtype) * weights[..., None], axis=1)  # [T, E]
    w_gate, w_up, w_down = (_weights(w, x.dtype) for w in (w_gate, w_up, w_down))
    hidden = jax.nn.silu(jnp.einsum("th,eih->tei", x, w_gate)) * jnp.einsum("th,eih->tei", x, w_up)
    return jnp.einsum("tei,ehi,te->th", hidden, w_down, combine)


def grouped_experts(x, ids, weights, w_gate, w_up, w_down, tile: int, first: int | jax.Array = 0) -> jax.Array:
    """Experts [first, first + E) on the tokens routed to them, sorted into tiles of `tile` rows (module docstring)."""
    tokens, k = ids.shape
    experts, rows = w_gate.shape[0], tokens * k
    local = ids.reshape(rows) - first
    key = jnp.where((local >= 0) & (local < experts), local, experts)  # other devices' assignments sort last
    order = jnp.argsort(key, stable=True)
    sorted_key = key[order]
    counts = jnp.zeros(experts + 1, jnp.int32).at[key].add(1)[:experts]
    tiles = (counts + tile - 1) // tile
    tile_end = jnp.cumsum(tiles)
    row_begin = jnp.cumsum(counts) - counts
    n = num_tiles(rows, experts, tile)
    e = jnp.minimum(sorted_key, experts - 1)
    slot = (tile_end[e] - tiles[e]) * tile + jnp.arange(rows) - row_begin[e]
    slot = jnp.where(sorted_key < experts, slot, n * tile)  # out of range: dropped by the scatter, 0 from the gather
    tile_expert = jnp.minimum(jnp.searchsorted(tile_end, jnp.arange(n), side="right"), experts - 1)
    xs = jnp.zeros((n * tile, x.shape[1]), x.dtype).at[slot].set(x[order // k], mode="drop").reshape(n, tile, -1)
    g, u, d = (_take(w, tile_expert, x.dtype) for w in (w_gate, w_up, w_down))
    hidden = jax.nn.silu(jnp.einsum("nth,nmh->ntm", xs, g)) * jnp.einsum("nth,nmh->ntm", xs, u)
    y = jnp.einsum("ntm,nhm->nth", hidden, d).reshape(n * tile, -1)
    contrib = y.at[slot].get(mode="fill", fill_value=0) * weights.reshape(rows)[order][:, None]
    unsorted = jnp.zeros_like(contrib).at[order].set(contrib).reshape(tokens, k, -1)
    return jnp.sum(unsorted.astype(jnp.float32), axis=1).astype(x.dtype)


def _fitted(w, spec: P, mesh) -> P:
    """The spec the loader gave an expert stack on `mesh` (axes that do not divide its dimension dropped)."""
    from rtpjax.parallel.sharding import fit_spec

    return fit_spec(spec, w.shape, mesh)


def _in_spec(w, spec: P):
    return QuantizedWeight(spec, P(*spec[:-1])) if isinstance(w, QuantizedWeight) else spec


def run_experts(p: dict, x, ids, weights, impl: str) -> jax.Array:
    """The experts' weighted sum for each token, on one device or expert/tensor parallel over the weights' mesh.

    The mesh is the one the expert weights were placed on (their abstract mesh under jit), so every caller of the
    model function gets expert parallelism from the parameters alone."""
    stacks = [p[name] for name in ("w_gate", "w_up", "w_down")]
    w0 = stacks[0].q if isinstance(stacks[0], QuantizedWeight) else stacks[0]
    mesh = jax.typeof(w0).sharding.mesh
    specs = [_fitted(w, SPECS[name], mesh) for w, name in zip(stacks, ("w_gate", "w_up", "w_down"))] if mesh.shape \
        else []  # fmt: skip
    axes = tuple(a for a in ("expert", "tensor") if specs and a in tuple(specs[0]))  # the axes that split the experts
    experts = w0.shape[0] // (mesh.shape["expert"] if "expert" in axes else 1)  # per device
    tile = plan(ids.size, experts, x.shape[0], impl)

    def compute(x, ids, weights, w_gate, w_up, w_down):
        first = jax.lax.axis_index("expert") * experts if "expert" in axes else 0
        if tile == 0:
            return dense_experts(x, ids, weights, w_gate, w_up, w_down, first)
        return grouped_experts(x, ids, weights, w_gate, w_up, w_down, tile, first)

    if not axes:
        return compute(x, ids, weights, *stacks)
    return jax.shard_map(lambda *a: jax.lax.psum(compute(*a), axes), mesh=mesh,
                         in_specs=(P(), P(), P(), *(_in_spec(w, s) for w, s in zip(stacks, specs))), out_specs=P(),
                         check_vma=False)(x, ids, weights, *stacks)  # fmt: skip


# -- static expert placement (the map an EPLB-style rebalancer writes) ------------------------------------------------


def read_placement(path: str, cfg) -> dict[int, list[int]]:
    """A JSON object {"<layer index>": [physical slot of logical expert 0, 1, ...]}, checked against the model: each
    value a permutation of the layer's experts, each key a MoE layer. Layers left out keep the checkpoint's order."""
    import json

    try:
        raw = json.loads(open(path).read())
    except (OSError, ValueError) as e:
        raise ValueError(f"--expert-placement {path}: cannot read it as JSON ({e})") from None
    if not cfg.num_experts:
        raise ValueError(f"--expert-placement {path}: the model has no experts")
    if not isinstance(raw, dict):
        raise ValueError(f"--expert-placement {path}: expected an object of layer index -> list of slots")
    placement = {}
    for key, slots in raw.items():
        if not (str(key).isdigit() and int(key) < cfg.num_layers and cfg.is_moe_layer(int(key))):
            raise ValueError(f"--expert-placement {path}: {key!r} is not a MoE layer of this model")
        if not isinstance(slots, list) or sorted(slots) != list(range(cfg.num_experts)):
            raise ValueError(f"--expert-placement {path}: layer {key} must map its {cfg.num_experts} experts to a "
                             f"permutation of 0..{cfg.num_experts - 1}")  # fmt: skip
        placement[int(key)] = slots
    return placement


def apply_placement(params: dict, placement: dict[int, list[int]]) -> dict:
    """Reorder each placed layer's experts (and the router's rows, so routing picks physical slots) on the devices,
    keeping each array's sharding: expert parallelism then gives slot s to device s // experts-per-device."""
    import numpy as np

    for layer, slots in placement.items():
        logical = jnp.asarray(np.argsort(np.asarray(slots)), jnp.int32)  # physical slot -> logical expert
        block = params["layers"][layer]["moe"]
        for name, w in block.items():
            block[name] = jax.tree.map(
                lambda a: jax.jit(lambda a, i: jnp.take(a, i, 0), out_shardings=a.sharding, donate_argnums=0)(a, logical),
                w,
            )
    return params


def logical_load(load, cfg, placement: dict[int, list[int]]):
    """Per-slot counts ([MoE layers, experts], the model's order) -> per logical expert, as the rebalancer reads them."""
    import numpy as np

    load = np.array(load)
    moe_layers = [i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]
    for row, layer in enumerate(moe_layers):
        if layer in placement:
            load[row] = load[row][np.asarray(placement[layer])]
    return load

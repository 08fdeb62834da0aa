"""Routed experts (Qwen3-MoE): routing, the expert compute, expert parallelism and the load each expert gets.

Three ways to run the experts, all exact (no token is ever dropped):

- dense: every expert runs on every token and a [T, E] combine matrix keeps the top-k. Reads each expert's weights
  once and spends E/k times the needed FLOPs: the right shape when a step's tokens touch every expert anyway.
- grouped: the T*k (token, expert) assignments are sorted by expert into tiles of `t` rows that each belong to one
  expert (an expert's group is padded to whole tiles); each tile gathers its expert's weights and runs one small
  batched matmul. FLOPs scale with k, not E. Static shapes without dropping tokens: the tile count is the worst case
  over all routings, sum(ceil(g_e / t)) <= (A + min(E, A) * (t - 1)) / t for A assignments.
- pallas: the same tiles through the grouped-matmul kernel (rtpjax/kernels/grouped_matmul.py), which reads each
  tile's expert weights in place instead of gathering a copy; tiles of 16 to 128 rows (`kernel_rows`), or, for the
  few assignments of a decode step, one-row tiles in routing order (`in_order`: no sort, no padding rows).
  Interpreted (slowly) off the GPU; unquantized stacks whose dimensions are multiples of 16 only.

On a GPU `auto` takes the kernel wherever it can run: each used tile reads its own expert's weights once, in place,
so a step reads about the experts its tokens chose (at most all of them, plus one more read per extra tile of a busy
expert) and computes k/E of dense's FLOPs. Elsewhere, and for stacks the kernel does not take, `auto` picks per
compiled step shape (the token count is static) whichever a bandwidth/compute model says is cheaper: a gathered
tile costs three passes over its weights (read, write the copy, read it), a dense expert one, and a row of compute
costs t / RIDGE of a weight pass (RIDGE: an H200's FLOPs per byte). Decode at batch 1 is grouped (8 expert reads
instead of 128 for Qwen3-30B-A3B), decode at batch 32 dense (its tokens touch nearly every expert), prefill grouped
with large tiles.

Under a mesh with "expert" / "tensor" axes the experts run in `shard_map`: tokens are replicated (attention is tensor
parallel), so the token exchange is implicit in the layout; each device computes the assignments routed to its own
experts with its slice of the intermediate dimension, and one explicit `psum` over ("expert", "tensor") combines
the partial outputs (the reduce-scatter + all-gather pair XLA picks for an all-reduce).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rtpjax.kernels import grouped_matmul
from rtpjax.loading.quantization import QuantizedWeight, dequantize

IMPLS = ("auto", "grouped", "dense", "pallas")

# How the expert stacks split over the mesh; the family's partition rules and the shard_map specs both read these.
SPECS = {"w_gate": P("expert", "tensor", None), "w_up": P("expert", "tensor", None), "w_down": P("expert", None, "tensor")}
RIDGE = 184.0  # FLOPs per byte where an H200 turns from bandwidth- to compute-bound (790 TFLOP/s / 4.3 TB/s)
_TILES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# One-row tiles in routing order up to this many assignments (8 tokens at top-8): faster than sorted 16-row tiles at
# every decode size measured, 1 to 8 tokens. Their blocks: 8 outputs x 512 inputs for one token (more programs to
# spread its few experts' reads over the SMs), 16 x 256 for more; 8 warps (benchmarks/moe_block.py's sweep, RESULTS.md).
ONE_ROW_MAX = 64
ONE_TOKEN_BLOCKS = dict(block_n=8, block_k=512, num_warps=8)
ONE_ROW_BLOCKS = dict(block_n=16, block_k=256, num_warps=8)


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


def kernel_rows(assignments: int, experts: int) -> int:
    """Rows per tile in the kernel: one (each assignment its own tile, unsorted) up to ONE_ROW_MAX assignments, else
    about one busy expert's share of them, from 16 (the tensor-core dot's minimum) to 128."""
    if assignments <= ONE_ROW_MAX:
        return 1
    share = -(-assignments // min(experts, assignments))
    return min(128, max(grouped_matmul.MIN_BLOCK, 1 << (share - 1).bit_length()))


def use_kernel(impl: str, w) -> bool:
    """Whether the experts (a device's stack `w`, [E, I, H]) run in the grouped-matmul kernel: when asked for (the
    stack must suit it) or, for `auto`, on a GPU where it does."""
    if impl not in ("pallas", "auto"):
        return False
    quantized = isinstance(w, QuantizedWeight)
    why = "quantized expert weights" if quantized else grouped_matmul.unsupported(*w.shape, w.dtype)
    if impl == "pallas" and why:
        raise ValueError(f"moe_impl='pallas': the grouped-matmul kernel does not take {why}; use grouped or auto")
    return why is None and (impl == "pallas" or jax.default_backend() == "gpu")


def _weights(w, dtype):
    """Expert stacks as arrays of the compute dtype (a quantized stack is dequantized where it is read)."""
    return dequantize(w, dtype) if isinstance(w, QuantizedWeight) else w


def _take(w, index: jax.Array, dtype):
    """Rows `index` of an expert stack; a quantized stack is gathered quantized, then dequantized."""
    if isinstance(w, QuantizedWeight):
        return dequantize(dataclasses.replace(w, q=jnp.take(w.q, index, 0), scale=jnp.take(w.scale, index, 0)), dtype)
    return jnp.take(w, index, 0)


def dense_experts(x, ids, weights, w_gate, w_up, w_down, first: int | jax.Array = 0) -> jax.Array:
    """Experts [first, first + E) on every token; assignments to other experts (other devices') weigh zero."""
    experts = w_gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(ids - first, experts, dtype=x.dtype) * weights[..., None], axis=1)  # [T, E]
    w_gate, w_up, w_down = (_weights(w, x.dtype) for w in (w_gate, w_up, w_down))
    hidden = jax.nn.silu(jnp.einsum("th,eih->tei", x, w_gate)) * jnp.einsum("th,eih->tei", x, w_up)
    return jnp.einsum("tei,ehi,te->th", hidden, w_down, combine)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """A step's T*k (token, expert) assignments sorted by expert into tiles of `tile` rows, one expert per tile (each
    expert's group padded to whole tiles; the tile count is the worst case over all routings, `num_tiles`)."""

    tile: int
    row: jax.Array | None  # [T*k] the padded row of each assignment (token-major); out of range when not this
    # device's; None: unsorted one-row tiles, assignment i in row i (`in_order`)
    expert: jax.Array  # [tiles] the expert of each tile; -1 for spare tiles past the last used one (or not this device's)

    @property
    def rows(self) -> int:
        return self.expert.shape[0] * self.tile

    def gather(self, x: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Each padded row's token ([rows, H], zeros in padding) and routing weight ([rows], zero in padding), for
        sorted tiles (one-row tiles in routing order need no copy: the kernel reads x in place, `pallas_experts`)."""
        tokens, k = weights.shape
        token = jnp.full(self.rows, tokens, jnp.int32).at[self.row].set(jnp.arange(tokens * k) // k, mode="drop")
        weight = jnp.zeros(self.rows, weights.dtype).at[self.row].set(weights.reshape(-1), mode="drop")
        return jnp.take(x, token, 0, mode="fill", fill_value=0), weight

    def combine(self, y: jax.Array, k: int) -> jax.Array:
        """Per token, the sum of its assignments' rows of y ([rows, H], already weighted) in float32, cast to y's."""
        per = y if self.row is None else y.at[self.row].get(mode="fill", fill_value=0)
        per = per.reshape(-1, k, y.shape[1])
        return jnp.sum(per.astype(jnp.float32), axis=1).astype(y.dtype)


def sort_into_tiles(ids: jax.Array, experts: int, tile: int, first: int | jax.Array = 0) -> Tiles:
    """Assignments to experts [first, first + experts) sorted into tiles; the others (other devices') get no row."""
    rows = ids.size
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
    slot = jnp.where(sorted_key < experts, slot, n * tile)  # out of range: no row
    index = jnp.arange(n)
    # compare_all: one vectorized comparison; the default binary search is a loop, slow on GPU for small arrays
    expert = jnp.minimum(jnp.searchsorted(tile_end, index, side="right", method="compare_all"), experts - 1)
    expert = jnp.where(index < tile_end[-1], expert, -1).astype(jnp.int32)
    return Tiles(tile, jnp.zeros(rows, jnp.int32).at[order].set(slot), expert)


def in_order(ids: jax.Array, experts: int, first: int | jax.Array | None = 0) -> Tiles:
    """Each assignment its own one-row tile in routing order (no sort, no padding); other devices' tiles get -1
    (`first` None: every expert is on this device, and the ids are the tiles' experts as they are: no kernel)."""
    if first is None:
        return Tiles(1, None, ids.reshape(-1).astype(jnp.int32))
    local = ids.reshape(-1) - first
    return Tiles(1, None, jnp.where((local >= 0) & (local < experts), local, -1).astype(jnp.int32))


def grouped_experts(x, ids, weights, w_gate, w_up, w_down, tile: int, first: int | jax.Array = 0) -> jax.Array:
    """Experts [first, first + E) on the tokens routed to them, sorted into tiles of `tile` rows (module docstring);
    each tile gathers its expert's weights in XLA."""
    tiles = sort_into_tiles(ids, w_gate.shape[0], tile, first)
    xs, row_weight = tiles.gather(x, weights)
    xs = xs.reshape(-1, tile, x.shape[1])
    g, u, d = (_take(w, jnp.maximum(tiles.expert, 0), x.dtype) for w in (w_gate, w_up, w_down))
    hidden = jax.nn.silu(jnp.einsum("nth,nmh->ntm", xs, g)) * jnp.einsum("nth,nmh->ntm", xs, u)
    y = jnp.einsum("ntm,nhm->nth", hidden, d).reshape(tiles.rows, -1)
    return tiles.combine(y * row_weight[:, None], ids.shape[1])


def pallas_experts(x, ids, weights, w_gate, w_up, w_down, tile: int, first: int | jax.Array | None = 0,
                   **blocks) -> jax.Array:  # fmt: skip
    """The grouped path with the grouped-matmul kernel (rtpjax/kernels/grouped_matmul.py): each tile reads its
    expert's weights in place. `first`: this device's first expert (None: it holds them all, and assignments need
    no masking). `blocks`: the kernel's block_n, block_k, num_warps, num_stages, interpret; for one-row tiles,
    `fused`: the one-kernel MLP's blocks instead (grouped_matmul.fused_expert_mlp; benchmarks/moe_block.py sweeps
    it)."""
    experts = w_gate.shape[0]
    fused = blocks.pop("fused", None)
    if fused is not None and (tile != 1 or set(blocks) - {"interpret"}):
        raise ValueError(f"pallas_experts: the one-kernel MLP takes one-row tiles and its own blocks only, got tiles "
                         f"of {tile} and {sorted(blocks)}")  # fmt: skip
    if fused is not None:
        tiles = in_order(ids, experts, first)
        y = grouped_matmul.fused_expert_mlp(x, tiles.expert, w_gate, w_up, w_down, weights.reshape(-1),
                                            x_repeat=ids.shape[1], **fused, **blocks)  # fmt: skip
        return tiles.combine(y, ids.shape[1])
    if tile == 1:  # in routing order: the kernel reads each token's row for its k tiles (no repeated copy of x)
        defaults = ONE_TOKEN_BLOCKS if ids.shape[0] == 1 else ONE_ROW_BLOCKS
        tiles, blocks = in_order(ids, experts, first), {**defaults, **blocks}
        xs, row_weight, blocks["x_repeat"] = x, weights.reshape(-1), ids.shape[1]
    else:
        tiles = sort_into_tiles(ids, experts, tile, 0 if first is None else first)
        xs, row_weight = tiles.gather(x, weights)
    y = grouped_matmul.expert_mlp(xs, tiles.expert, w_gate, w_up, w_down, row_weight, block_m=tile, **blocks)
    return tiles.combine(y, ids.shape[1])


def _fitted(w, spec: P, mesh) -> P:
    """The spec the loader gave an expert stack on `mesh` (axes that do not divide its dimension dropped)."""
    from rtpjax.parallel.sharding import fit_spec

    return fit_spec(spec, w.shape, mesh)


def _in_spec(w, spec: P):
    return dataclasses.replace(w, q=spec, scale=P(*spec[:-1])) if isinstance(w, QuantizedWeight) else spec


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

    def compute(x, ids, weights, w_gate, w_up, w_down):
        first = jax.lax.axis_index("expert") * experts if "expert" in axes else 0
        if use_kernel(impl, w_gate):  # the device's own slice of the stacks
            return pallas_experts(x, ids, weights, w_gate, w_up, w_down, kernel_rows(ids.size, experts),
                                  first if "expert" in axes else None)  # fmt: skip
        tile = plan(ids.size, experts, x.shape[0], impl)
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

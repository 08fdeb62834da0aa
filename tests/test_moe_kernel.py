"""The grouped-matmul kernel (rtpjax/kernels/grouped_matmul.py) in Pallas' interpreter on CPU: against a plain-jnp
reference on fresh random inputs, every output element written (the interpreter starts outputs as NaN, so a tile the
kernel skips shows up), any routing (empty experts, all tokens on one expert, spare tiles), float32 and bfloat16."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels import grouped_matmul as gm
from rtpjax.loading.quantization import Scheme, quantize
from rtpjax.models import moe

HI = jax.lax.Precision.HIGHEST
TOL = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def reference(x, tile_expert, weights, scale, block_m):
    """Tile by tile in plain jnp: rows of tile i times expert tile_expert[i]'s weights (zeros for -1), float32 sums."""
    x32 = x.astype(jnp.float32).reshape(len(tile_expert), block_m, -1)
    ws = [w.astype(jnp.float32)[np.maximum(np.asarray(tile_expert), 0)] for w in weights]  # [n, N, K]
    outs = [jnp.einsum("tmk,tnk->tmn", x32, w, precision=HI) for w in ws]
    out = jax.nn.silu(outs[0]) * outs[1] if len(outs) == 2 else outs[0]
    out = jnp.where(np.asarray(tile_expert)[:, None, None] >= 0, out, 0).reshape(x.shape[0], -1)
    return (out if scale is None else out * scale.astype(jnp.float32)[:, None]).astype(x.dtype)


def stacks(experts, n, k, dtype, seed, count=1):
    keys = jax.random.split(jax.random.key(seed), count)
    return tuple((jax.random.normal(key, (experts, n, k)) * k**-0.5).astype(dtype) for key in keys)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tile_expert, block_m, block_n, block_k, glu, split_k, one_row_sum", [
    ([2, 0, 3, -1, -1], 16, 16, 16, True, 1, "step"),  # spare tiles write zeros, read nothing
    ([1, 1, 1, 1], 16, 64, 32, False, 1, "step"),  # every tile on one expert
    ([3, 0, 1, 2, 3, -1], 32, 32, 64, True, 1, "end"),  # (one_row_sum: one-row tiles only)
    ([0], 16, 64, 128, False, 1, "step"),  # one tile, whole dimensions in one block
    ([2, 0, -1], 16, 16, 16, True, 2, "step"),  # split-K: partial sums added before SiLU and the product
    ([1, -1, 3], 16, 32, 16, False, 4, "step"),  # ... and before the rows' scales
    ([2, 0, -1, 3, 2], 1, 16, 32, True, 1, "step"),  # one-row tiles (decode): vector products, not tensor-core dots
    ([1, -1, 3, 0], 1, 32, 16, False, 2, "step"),
    ([0, 3, -1, 3], 1, 16, 16, True, 1, "end"),  # ... their products summed once, at the end
    ([2, -1, 1], 1, 32, 32, False, 2, "end"),
    ([1, 3, -1, 0], 1, 4, 32, True, 1, "end"),  # ... in output blocks narrower than a tensor-core tile
    ([3, 0, 2], 1, 8, 16, False, 1, "step"),
])  # fmt: skip
def test_kernel_matches_reference(dtype, tile_expert, block_m, block_n, block_k, glu, split_k, one_row_sum):
    seed = len(tile_expert) * 7 + block_n
    experts, n, k = 4, 48, 64  # 48: blocks shrink to a power of two that divides it (16)
    weights = stacks(experts, n, k, dtype, seed, 2 if glu else 1)
    rng = np.random.default_rng(seed)
    rows = len(tile_expert) * block_m
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    scale = None if glu else jnp.asarray(rng.random(rows), dtype)
    te = jnp.asarray(tile_expert, jnp.int32)
    got = gm.grouped_matmul(x, te, weights, scale, block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                            one_row_sum=one_row_sum, interpret=True)  # fmt: skip
    assert got.shape == (rows, n) and got.dtype == dtype
    assert not np.isnan(np.asarray(got, np.float32)).any(), "an output element was never written"
    want = reference(x, te, weights, scale, block_m)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[dtype])


@pytest.mark.parametrize("x_repeat, split_k", [(2, 1), (3, 2)])
def test_one_row_tiles_read_each_token_row_for_its_tiles(x_repeat, split_k):
    """x_repeat: x holds one row per token and tile i reads row i // x_repeat (a token's k assignments in routing
    order): the same as the kernel on x repeated, every output element written; other tiles are refused."""
    experts, n, k, tokens = 4, 32, 64, 3
    weights = stacks(experts, n, k, jnp.float32, 11, 2)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((tokens, k)), jnp.float32)
    te = jnp.asarray(np.random.default_rng(5).integers(-1, experts, tokens * x_repeat), jnp.int32)
    got = gm.grouped_matmul(x, te, weights, block_m=1, block_n=8, block_k=32, split_k=split_k, x_repeat=x_repeat,
                            interpret=True)  # fmt: skip
    assert got.shape == (tokens * x_repeat, n) and not np.isnan(np.asarray(got)).any()
    want = reference(jnp.repeat(x, x_repeat, axis=0), te, weights, None, 1)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL[jnp.float32])
    with pytest.raises(ValueError, match="x_repeat"):
        gm.grouped_matmul(jnp.repeat(x, 16, axis=0), jnp.zeros(3 * x_repeat, jnp.int32), weights, block_m=16,
                          x_repeat=x_repeat, interpret=True)  # fmt: skip


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("inter, block_i, block_k, block_h, x_repeat", [
    (64, 16, 32, 16, 1), (64, 8, 64, 64, 2), (64, 32, 16, 32, 3), (48, 32, 64, 64, 2)])  # fmt: skip
def test_fused_expert_mlp_matches_the_two_projections(dtype, inter, block_i, block_k, block_h, x_repeat):
    """One-row tiles' whole MLP in one kernel (slices of the intermediate channels, their down partials summed):
    the reference's gate/up then down, spare tiles zero, every partial written."""
    experts, hidden, tokens = 4, 96, 2  # 96 and 48: blocks shrink to powers of two dividing them
    g, u = stacks(experts, inter, hidden, dtype, 31 + block_i, 2)
    (d,) = stacks(experts, hidden, inter, dtype, 32 + block_h)
    rng = np.random.default_rng(block_k)
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), dtype)
    te = jnp.asarray(rng.integers(-1, experts, tokens * x_repeat), jnp.int32).at[0].set(-1)
    scale = jnp.asarray(rng.random(tokens * x_repeat), dtype)
    got = gm.fused_expert_mlp(x, te, g, u, d, scale, block_i=block_i, block_k=block_k, block_h=block_h,
                              x_repeat=x_repeat, interpret=True)  # fmt: skip
    assert got.shape == (tokens * x_repeat, hidden) and got.dtype == dtype
    assert not np.isnan(np.asarray(got, np.float32)).any(), "a partial was never written"
    hidden_rows = reference(jnp.repeat(x, x_repeat, axis=0).astype(jnp.float32), te, (g, u), None, 1)
    want = reference(hidden_rows, te, (d,), scale, 1)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **TOL[dtype])
    assert not np.asarray(got[0], np.float32).any()  # the spare tile
    with pytest.raises(ValueError, match="tile experts"):
        gm.fused_expert_mlp(x, te[:-1], g, u, d, scale, x_repeat=x_repeat, interpret=True)
    with pytest.raises(ValueError, match="up"):  # (a mismatched stack would be read out of bounds on the GPU)
        gm.fused_expert_mlp(x, te, g, u[:, :-16], d, scale, x_repeat=x_repeat, interpret=True)


def test_pallas_experts_fused_under_expert_parallel_masking():
    """moe.pallas_experts with fused blocks: the two-kernel path's output, also when this device holds experts
    [2, 6) of 8 (others' assignments masked to spare tiles); other tiles or blocks beside `fused` are refused."""
    g, u = stacks(4, 32, 64, jnp.float32, 41, 2)
    (d,) = stacks(4, 64, 32, jnp.float32, 42)
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 8, (3, 2)), jnp.int32)
    wt = jnp.asarray(rng.random((3, 2)), jnp.float32)
    fused = dict(block_i=16, block_k=32, block_h=32)
    for first in (None, 2):
        want = moe.pallas_experts(x, ids % 4 if first is None else ids, wt, g, u, d, 1, first, interpret=True)
        got = moe.pallas_experts(x, ids % 4 if first is None else ids, wt, g, u, d, 1, first, fused=fused,
                                 interpret=True)  # fmt: skip
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL[jnp.float32])
    with pytest.raises(ValueError, match="one-row tiles and its own blocks only"):
        moe.pallas_experts(x, ids % 4, wt, g, u, d, 16, None, fused=fused, interpret=True)
    with pytest.raises(ValueError, match="one-row tiles and its own blocks only"):
        moe.pallas_experts(x, ids % 4, wt, g, u, d, 1, None, fused=fused, block_n=8, interpret=True)


def test_down_projection_takes_blocks_of_its_own(tmp_path):
    """expert_mlp's `down`: other blocks (and split) for the down projection give the same result; moe_block sweeps
    them with each gate/up block and names them."""
    from rtpjax.benchmarks import moe_block

    experts, inter, hidden, rows = 4, 32, 64, 6
    g, u = stacks(experts, inter, hidden, jnp.float32, 21, 2)
    (d,) = stacks(experts, hidden, inter, jnp.float32, 22)
    x = jnp.asarray(np.random.default_rng(8).standard_normal((rows, hidden)), jnp.float32)
    te, scale = jnp.asarray([0, 3, -1, 2, 1, 3], jnp.int32), jnp.linspace(0.5, 1.5, rows)
    same = gm.expert_mlp(x, te, g, u, d, scale, block_m=1, block_n=16, block_k=32, interpret=True)
    other = gm.expert_mlp(x, te, g, u, d, scale, block_m=1, block_n=16, block_k=32, interpret=True,
                          down=dict(block_n=32, block_k=16, split_k=2))  # fmt: skip
    np.testing.assert_allclose(np.asarray(other), np.asarray(same), **TOL[jnp.float32])
    with pytest.raises(ValueError, match="one_row_sum 'never'"):  # (reaches the down projection's kernel only)
        gm.expert_mlp(x, te, g, u, d, scale, block_m=1, interpret=True, down=dict(one_row_sum="never"))
    out = tmp_path / "moe_block.json"
    moe_block.main(["--experts", "8", "--top-k", "2", "--hidden", "64", "--inter", "32", "--batch-sizes", "1",
                    "--impls", "pallas", "--pallas-blocks", "16x16", "--pallas-down-blocks", "16x32,32x16",
                    "--repeats", "1", "--out", str(out)])  # fmt: skip
    sweep = json.loads(out.read_text())["rows"][0]["pallas_sweep"]
    assert sorted((r["down"]["block_n"], r["down"]["block_k"]) for r in sweep if "us" in r) == [(16, 32), (32, 16)]
    moe_block.main(["--experts", "8", "--top-k", "2", "--hidden", "64", "--inter", "32", "--batch-sizes", "1",
                    "--impls", "pallas", "--pallas-rows", "1", "--pallas-blocks", "16x16", "--pallas-fused-blocks",
                    "16x32x16,8x64x32x8x2", "--repeats", "1", "--out", str(out)])  # fmt: skip
    fused = [r["fused"] for r in json.loads(out.read_text())["rows"][0]["pallas_sweep"] if "fused" in r and "us" in r]
    assert sorted(f["block_i"] for f in fused) == [8, 16] and {f.get("num_warps") for f in fused} == {None, 8}


def routing(kind, tokens, experts, top_k, rng):
    if kind == "uniform":
        return np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)])
    if kind == "one":  # every token's first choice the same expert; a group larger than a tile
        others = [e for e in range(experts) if e != 5]
        return np.stack([[5, *rng.permutation(others)[: top_k - 1]] for _ in range(tokens)])
    return np.tile(np.arange(top_k) * 2, (tokens, 1))  # "even": the odd experts get nothing


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("tokens, kind", [(1, "uniform"), (5, "even"), (37, "one"), (64, "uniform")])
def test_expert_mlp_matches_dense_experts(dtype, tokens, kind):
    """The kernel path of models/moe.py (sort into tiles, two kernels, combine) against the dense all-experts
    reference, on the whole stack and on a device's half of it (expert parallelism: the other half's assignments
    contribute nothing)."""
    experts, hidden, inter, top_k = 8, 64, 32, 3
    rng = np.random.default_rng(tokens)
    w = [(jax.random.normal(jax.random.key(tokens + i), s) * s[-1] ** -0.5).astype(dtype) for i, s in
         enumerate([(experts, inter, hidden)] * 2 + [(experts, hidden, inter)])]  # fmt: skip
    x = jnp.asarray(rng.standard_normal((tokens, hidden)), dtype)
    ids = jnp.asarray(routing(kind, tokens, experts, top_k, rng), jnp.int32)
    weights = jnp.asarray(rng.random((tokens, top_k)), dtype)
    tile = moe.kernel_rows(ids.size, experts)
    f32 = [a.astype(jnp.float32) for a in (x, *w)]
    for first, part in ((0, slice(None)), (None, slice(None)), (4, slice(4, 8))):  # None: every expert here
        got = jax.jit(moe.pallas_experts, static_argnums=(6,))(x, ids, weights, *(a[part] for a in w), tile, first)
        assert not np.isnan(np.asarray(got, np.float32)).any()
        with jax.default_matmul_precision("highest"):
            want = moe.dense_experts(f32[0], ids, weights.astype(jnp.float32), *(a[part] for a in f32[1:]),
                                     first or 0)  # fmt: skip
        np.testing.assert_allclose(np.asarray(got, np.float32), want, **TOL[dtype])


def quantized_stacks():
    w = stacks(8, 32, 64, jnp.float32, 3, 2) + stacks(8, 64, 32, jnp.float32, 4)
    return [quantize(a, Scheme("int8")) for a in w]


def test_quantized_stacks_take_the_grouped_path():
    """Quantized expert stacks (which the kernel does not take): `auto` and `grouped` gather them quantized."""
    q = quantized_stacks()
    rng = np.random.default_rng(0)
    x, ids = jnp.asarray(rng.standard_normal((5, 64)), jnp.float32), jnp.asarray(routing("uniform", 5, 8, 2, rng))
    weights = jnp.asarray(rng.random((5, 2)), jnp.float32)
    p = dict(w_gate=q[0], w_up=q[1], w_down=q[2])
    want = moe.dense_experts(x, ids, weights, *q)
    np.testing.assert_allclose(moe.run_experts(p, x, ids, weights, "grouped"), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(moe.run_experts(p, x, ids, weights, "auto"), want, rtol=1e-4, atol=1e-4)


def test_kernel_rows_and_choice():
    quantized = quantized_stacks()[0]
    assert moe.kernel_rows(8, 128) == 1  # decode at batch 1: each assignment its own one-row tile, unsorted
    assert moe.kernel_rows(moe.ONE_ROW_MAX, 128) == 1 and moe.kernel_rows(moe.ONE_ROW_MAX + 1, 128) == 16
    assert moe.kernel_rows(32 * 8, 128) == 16
    assert moe.kernel_rows(2048 * 8, 128) == 128
    w = jnp.zeros((4, 32, 64), jnp.bfloat16)
    assert moe.use_kernel("pallas", w) and not moe.use_kernel("grouped", w) and not moe.use_kernel("dense", w)
    assert moe.use_kernel("auto", w) == (jax.default_backend() == "gpu")  # off the GPU `auto` is unchanged
    with pytest.raises(ValueError, match="does not take quantized expert weights"):
        moe.use_kernel("pallas", quantized)
    with pytest.raises(ValueError, match=r"expert dimensions 24 x 64 \(each must be a multiple of 16\)"):
        moe.use_kernel("pallas", jnp.zeros((4, 24, 64)))
    assert not moe.use_kernel("auto", jnp.zeros((4, 24, 64)))
    with pytest.raises(ValueError, match=r"256 x 2048 x 7168 weights \(2\^31 elements or more\)"):
        moe.use_kernel("pallas", jax.ShapeDtypeStruct((256, 2048, 7168), jnp.bfloat16))
    with pytest.raises(ValueError, match=r"rows 32 in tiles of 8 \(1, or >= 16\)"):
        gm.grouped_matmul(jnp.zeros((32, 64)), jnp.zeros(4, jnp.int32), (w,), block_m=8, interpret=True)
    with pytest.raises(ValueError, match="rows 40 in tiles of 16"):
        gm.grouped_matmul(jnp.zeros((40, 64)), jnp.zeros(3, jnp.int32), (w,), block_m=16, interpret=True)
    with pytest.raises(ValueError, match="one_row_sum 'never': choose one of step, end"):
        gm.grouped_matmul(jnp.zeros((32, 64)), jnp.zeros(32, jnp.int32), (w,), block_m=1, one_row_sum="never")
    with pytest.raises(ValueError, match="split_k 3 must divide the 2 input blocks of 32"):
        gm.grouped_matmul(jnp.zeros((32, 64)), jnp.zeros(2, jnp.int32), (w,), block_m=16, block_k=32, split_k=3,
                          interpret=True)  # fmt: skip
    # expert_mlp fits one split_k to both projections: gate/up over 2048 inputs (16 blocks), down over 768 (6)
    assert (gm._fit_split(4, 2048, 128), gm._fit_split(4, 768, 128), gm._fit_split(8, 768, 256)) == (4, 3, 3)


def test_block_bench_runs_on_cpu(tmp_path):
    """benchmarks/moe_block.py with tiny shapes (the kernel interpreted): every implementation timed, the kernel's
    block sweep sorted fastest first (a configuration that fails recorded, not fatal), the speedups and the bound on
    them recorded."""
    from rtpjax.benchmarks import moe_block

    out = tmp_path / "moe_block.json"
    moe_block.main(["--experts", "8", "--top-k", "2", "--hidden", "64", "--inter", "32", "--batch-sizes", "1,40",
                    "--impls", "dense,grouped,pallas", "--pallas-blocks", "16x16,32x32x4x2,8x8", "--repeats", "1",
                    "--one-row-sums", "step,end", "--out", str(out)])  # fmt: skip
    rows = json.loads(out.read_text())["rows"]
    assert moe_block.parse_blocks("64x128x4x3x4")[0]["split_k"] == 4  # a fifth field: split-K
    assert [r["tokens"] for r in rows] == [1, 40]
    for row in rows:
        sweep = row["pallas_sweep"]
        ran = 4 if row["tokens"] == 1 else 2  # one-row tiles: each block both ways (--one-row-sums)
        assert sorted((r["block_n"], r["block_k"], r.get("one_row_sum")) for r in sweep[:ran]) == sorted(
            (n, n, s) for n in (16, 32) for s in (["step", "end"] if ran == 4 else [None]))  # fmt: skip
        assert sweep[0]["us"] <= sweep[1]["us"] and row["pallas_best"]["us"] == sweep[0]["us"]
        assert all("us" not in r and "grouped_matmul: rows" in r["error"] for r in sweep[ran:])  # 8 wide: refused
        tile = 1 if row["tokens"] == 1 else 16  # 2 assignments: one-row tiles; 80: sorted tiles of 16
        assert row["pallas"]["tile"] == tile and row["pallas"]["vs_dense"] > 0 and row["pallas_best"]["vs_grouped"] > 0
        assert row["bound_vs_dense"] == pytest.approx(row["dense"]["us"] / row["floor_us"])


def test_fused_kernel_lowers_to_triton(triton_verified):
    """The one-kernel MLP for one-row tiles, lowered for CUDA at Qwen3-30B-A3B's shape (see the test below)."""
    e, i, h, k = 16, 768, 2048, 8
    w = [jax.ShapeDtypeStruct((e, i, h), jnp.bfloat16)] * 2 + [jax.ShapeDtypeStruct((e, h, i), jnp.bfloat16)]
    args = (jax.ShapeDtypeStruct((1, h), jnp.bfloat16), jax.ShapeDtypeStruct((1, k), jnp.int32),
            jax.ShapeDtypeStruct((1, k), jnp.bfloat16), *w)  # fmt: skip
    fused = dict(block_i=16, block_k=512, block_h=256)
    fn = jax.jit(lambda x, ids, wt, g, u, d: moe.pallas_experts(x, ids, wt, g, u, d, 1, None, fused=fused,
                                                                interpret=False))  # fmt: skip
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1 and triton_verified == [True]


@pytest.mark.parametrize("tile, block_n, block_k, split_k, one_row_sum", [
    (16, 64, 128, 1, "step"), (16, 256, 64, 1, "step"), (16, 64, 128, 4, "step"), (1, 32, 256, 1, "step"),
    (1, 64, 128, 2, "step"), (1, 16, 256, 1, "end"), (1, 32, 128, 2, "end"), (1, 4, 512, 1, "end"),
    (1, 8, 256, 1, "step")])  # fmt: skip
def test_kernel_lowers_to_triton(tile, block_n, block_k, split_k, one_row_sum, triton_verified):
    """Lowered for CUDA on this CPU: Pallas' Triton lowering builds the kernel's Triton IR (a load or store Triton
    cannot take, e.g. a block that is not a power of two, fails here) and each module passes MLIR's verifier, as the
    GPU's Triton parser requires (a loop bound of the wrong integer type failed only there); compiling needs the GPU."""
    e, i, h, t, k = 16, 768, 2048, 32, 8  # 768: Qwen3-30B-A3B's expert width, not a power of two
    w = [jax.ShapeDtypeStruct((e, i, h), jnp.bfloat16)] * 2 + [jax.ShapeDtypeStruct((e, h, i), jnp.bfloat16)]
    args = (jax.ShapeDtypeStruct((t, h), jnp.bfloat16), jax.ShapeDtypeStruct((t, k), jnp.int32),
            jax.ShapeDtypeStruct((t, k), jnp.bfloat16), *w)  # fmt: skip
    fn = jax.jit(lambda x, ids, wt, g, u, d: moe.pallas_experts(x, ids, wt, g, u, d, tile, block_n=block_n,
                                                                block_k=block_k, split_k=split_k,
                                                                one_row_sum=one_row_sum, interpret=False))  # fmt: skip
    text = fn.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2  # the two kernels, as Triton custom calls
    assert triton_verified == [True, True]

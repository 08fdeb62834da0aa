"""The quantized linear path: int4 packing bit for bit, the W8A8 maths against a dequantized float32 reference, and the
small-M Pallas kernel (interpreted on the CPU, and lowered to Triton) against the plain-jnp reference, every output
element."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels.reference import quantize as quantize_rows
from rtpjax.loading.quantization import (METHODS, STORAGE, QuantizedWeight, Scheme, dequantize, pack_int4, quantize,
                                        unpack_int4)
from rtpjax.quant.matmul import linear, uses_small_kernel
from rtpjax.quant.small_matmul import ONE_ROW_TILES, Plan, Tiles, plan, quantized_matmul, small_matmul


def test_int4_packing_is_the_documented_layout():
    # one row, one group of 8 inputs: byte j holds input j (low nibble) and input j + 4 (high nibble)
    u = jnp.asarray([[1, 2, 3, 4, 9, 10, 11, 15]], jnp.uint8)
    packed = pack_int4(u, 8)
    assert packed.dtype == jnp.uint8 and np.asarray(packed).tolist() == [[0x91, 0xA2, 0xB3, 0xF4]]
    rng = np.random.default_rng(0)
    u = jnp.asarray(rng.integers(0, 16, (2, 3, 256)), jnp.uint8)
    assert np.array_equal(np.asarray(unpack_int4(pack_int4(u, 128), 128)), np.asarray(u))


@pytest.mark.parametrize("method", ["int4", "int4-asym"])
def test_int4_rounds_to_the_nearest_step_of_each_group(method):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, 256)).astype(np.float32) * rng.uniform(0.1, 5, (32, 2)).repeat(128, 1)
    w[3, :128] = 0.0  # an all-zero group keeps a finite scale and comes back zero
    qw = quantize(jnp.asarray(w), method)
    assert qw.q.shape == (32, 128) and qw.scale.shape == (32, 2) and qw.shape == (32, 256)
    assert (qw.zero is None) == (method == "int4")
    back = np.asarray(dequantize(qw, jnp.float32))
    step = np.asarray(qw.scale).repeat(128, 1)
    assert np.all(np.abs(back - w) <= step * 0.5 * 1.0001) and np.all(back[3, :128] == 0)
    if method == "int4":
        absmax = np.abs(w).reshape(32, 2, 128).max(-1)
        assert np.allclose(np.asarray(qw.scale), np.where(absmax > 0, absmax / 7, 1.0))
    else:  # the group's range spans the 16 levels
        span = w.reshape(32, 2, 128).max(-1).clip(0) - w.reshape(32, 2, 128).min(-1).clip(None, 0)
        assert np.allclose(np.asarray(qw.scale)[span > 0], span[span > 0] / 15)


def reference_w8a8(x, qw):
    """Activations quantized per token (per token and input block when the weight has blocks), both sides dequantized,
    multiplied in float32."""
    scheme = qw.scheme
    group = scheme.group_size(x.shape[-1])
    xq, xs = quantize_rows(x.reshape(x.shape[0], -1, group), STORAGE[scheme.act][0])
    xd = (xq.astype(jnp.float32) * xs[..., None]).reshape(x.shape)
    return np.asarray(xd @ dequantize(qw, jnp.float32).T)


W8A8 = {
    "fp8": METHODS["fp8"],
    "int8": METHODS["int8"],
    "fp8-block": Scheme("fp8", act="fp8", group=128, block_rows=128),  # DeepSeek / Qwen fp8 checkpoints
    "int8-block": Scheme("int8", act="int8", group=128, block_rows=64),
}


@pytest.mark.parametrize("name", sorted(W8A8))
def test_w8a8_is_the_dequantized_product_of_quantized_activations(name):
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((256, 384)) * rng.uniform(0.01, 3, (256, 1)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((7, 384)) * rng.uniform(0.1, 30, (7, 1)), jnp.float32)
    qw = quantize(w, W8A8[name])
    assert qw.q.dtype == STORAGE[W8A8[name].weight][0]
    assert qw.scale.shape == ((256, 1) if W8A8[name].group == 0 else (256 // W8A8[name].block_rows, 3))
    got = np.asarray(jax.jit(linear)(x, qw))
    want = reference_w8a8(x, qw)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max()), np.abs(got - want).max()
    # and the quantization error against the float32 product stays that of 1-byte values
    exact = np.asarray(x @ w.T)
    limit = 0.02 if W8A8[name].weight == "int8" else 0.08
    assert np.abs(got - exact).max() <= limit * np.abs(exact).max()
    assert linear(x.astype(jnp.bfloat16), qw).dtype == jnp.bfloat16


@pytest.mark.parametrize("method", ["int4", "int4-asym", "int8-weight-only", "fp8-weight-only"])
def test_weight_only_linear_is_the_dequantized_product(method):
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((48, 64)), jnp.float32)  # 64 inputs: int4's group of 128 becomes the row
    qw = quantize(w, method)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    want = np.asarray(x @ dequantize(qw, jnp.float32).T)
    assert np.allclose(np.asarray(linear(x, qw)), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_act_order_permutation_reads_the_inputs_in_stored_order():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((64, 256)), jnp.float32)
    perm = jnp.asarray(rng.permutation(256), jnp.int32)
    stored = quantize(w[:, perm], "int4-asym")  # q's column c is input perm[c]
    qw = dataclasses.replace(stored, perm=perm)
    x = jnp.asarray(rng.standard_normal((3, 256)), jnp.float32)
    deq = dequantize(qw, jnp.float32)
    assert np.allclose(np.asarray(deq[:, perm]), np.asarray(dequantize(stored, jnp.float32)))
    assert np.allclose(np.asarray(linear(x, qw)), np.asarray(x @ deq.T), rtol=1e-5, atol=1e-4)


SMALL = [  # method, rows, dtype, tiles: every format, padded and full row tiles, split-K off / on / auto; 768 inputs
    ("fp8", 1, jnp.float32, Tiles(block_n=32, block_k=128, split_k=1)),
    ("int8", 19, jnp.float32, Tiles(block_n=64, block_k=128, split_k=3)),
    ("fp8-weight-only", 64, jnp.bfloat16, Tiles()),
    ("int4", 16, jnp.float32, Tiles(block_n=32, block_k=128, split_k=1)),  # one group per step, two below
    ("int4-asym", 5, jnp.bfloat16, Tiles(block_n=16, split_k=3)),
    ("int4-asym", 33, jnp.float32, Tiles()),
    ("int4", 7, jnp.bfloat16, Tiles(unpack="magic")),  # nibbles by their bits: each activation dtype's constant
    ("int4-asym", 16, jnp.float32, Tiles(block_k=128, unpack="magic")),
    ("int4-asym", 3, jnp.float16, Tiles(split_k=1, unpack="magic")),
    ("int4-asym", 16, jnp.bfloat16, Tiles(unpack="asm")),  # interpreted: the magic path (the PTX: test_ptx.py)
    # one row on the vector units: each format, split-K, both unpackings; and one row padded to a tensor-core dot
    ("int8", 1, jnp.bfloat16, Tiles(block_k=128, split_k=2, one_row=True)),
    ("fp8-weight-only", 1, jnp.float32, ONE_ROW_TILES["fp8"]),
    ("int4", 1, jnp.bfloat16, Tiles(block_n=16, split_k=3, unpack="magic", one_row=True)),
    ("int4-asym", 1, jnp.float32, Tiles(block_n=32, block_k=384, one_row=True)),
    ("int4-asym", 1, jnp.float16, ONE_ROW_TILES["int4"]),
    ("fp8", 1, jnp.bfloat16, Tiles()),
    # more rows than a decode step's: tiled over the rows (padded last tile), with and without split-K
    ("int8", 80, jnp.float32, Tiles()),
    ("fp8-weight-only", 130, jnp.bfloat16, Tiles(block_k=128, row_tile=32, split_k=2)),
    ("int4-asym", 200, jnp.float32, Tiles(block_n=32, unpack="magic")),
    ("int4", 96, jnp.bfloat16, Tiles(row_tile=16, split_k=1)),
]


@pytest.mark.parametrize("method,rows,dtype,tiles", SMALL,
                         ids=[f"{m}-{r}-{t}" for m, r, _, t in SMALL])  # fmt: skip
def test_small_kernel_matches_the_reference_everywhere(method, rows, dtype, tiles):
    rng = np.random.default_rng(rows)  # fresh inputs per case
    w = jnp.asarray(rng.standard_normal((96, 768)) * rng.uniform(0.01, 2, (96, 1)), jnp.float32)
    qw = quantize(w, method)
    x = jnp.asarray(rng.standard_normal((rows, 768)) * rng.uniform(0.1, 10, (rows, 1)), dtype)
    # interpret mode starts outputs as NaN: an element no program writes stays NaN
    got = np.asarray(quantized_matmul(x, qw, tiles, interpret=True), np.float32)
    assert got.shape == (rows, 96) and np.isfinite(got).all()
    want = np.asarray(x.astype(jnp.float32) @ dequantize(qw, jnp.float32).T)
    tol = {jnp.float32: 1e-5, jnp.float16: 2**-10}.get(dtype, 2**-8)  # the output's rounding (weights are exact)
    assert np.all(np.abs(got - want) <= tol * (np.abs(want) + np.abs(want).max() * 0.1)), np.abs(got - want).max()


def test_small_kernel_rejects_shapes_it_cannot_tile():
    x = jnp.ones((4, 384), jnp.float32)
    qw = quantize(jnp.ones((90, 384), jnp.float32), "int8")
    with pytest.raises(ValueError, match="output 90 and input 384 must be multiples of 16"):
        quantized_matmul(x, qw, interpret=True)
    with pytest.raises(ValueError, match="0 rows: the kernel takes 1 or more"):
        small_matmul(jnp.ones((0, 384)), qw.q[:64], qw.scale[:64], fmt="int8", interpret=True)
    with pytest.raises(ValueError, match="row_tile 24 must be a power of two >= 16"):
        small_matmul(jnp.ones((65, 384)), qw.q[:64], qw.scale[:64], fmt="int8", tiles=Tiles(row_tile=24),
                     interpret=True)  # fmt: skip
    with pytest.raises(ValueError, match="split_k 5 does not divide the 3 steps of 128 inputs"):
        small_matmul(x, qw.q[:64], qw.scale[:64], fmt="int8", tiles=Tiles(block_k=128, split_k=5), interpret=True)
    with pytest.raises(ValueError, match="unpack 'lut'"):
        small_matmul(x, qw.q[:64], qw.scale[:64], fmt="int8", tiles=Tiles(unpack="lut"), interpret=True)
    with pytest.raises(ValueError, match="int4 group 48"):
        small_matmul(x, qw.q[:64, :192], qw.scale[:64], fmt="int4", group=48, interpret=True)
    # 224 programs of the default 64 channels: two splits fill 132 SMs twice; 448 programs of 32 channels need none
    assert plan(16, 14336, 4096, "fp8") == Plan(block_m=16, block_n=64, step=256, split_k=2)
    assert plan(16, 14336, 4096, "fp8", tiles=Tiles(block_n=32, num_warps=2)).split_k == 1
    assert plan(2, 4096, 14336, "int4", 128) == Plan(block_m=16, block_n=64, step=256, split_k=8)  # two groups a step
    assert plan(1, 4096, 14336, "int4", 128, ONE_ROW_TILES["int4"]).block_m == 1  # one row: the vector units
    assert plan(1, 4096, 14336, "int4", 128).block_m == 16
    # past a decode step's rows: tiles of 64 rows, the rows' programs filling the SMs without a split
    assert plan(300, 4096, 14336, "int4", 128) == Plan(block_m=64, block_n=64, step=256, split_k=1, row_tiles=5)
    assert plan(200, 4096, 14336, "int4", 128).split_k == 2  # 64 x 4 programs: short of 2 per SM


@pytest.mark.parametrize("method", ["fp8", "int8", "int4-asym", "int4"])
def test_small_kernel_lowers_to_triton(method, triton_verified):
    """The GPU lowering (Pallas to Triton IR) runs on any host: unsupported ops or casts fail here, and each module
    passes MLIR's verifier as the GPU's Triton parser requires; compiling needs the GPU."""
    qw = quantize(jnp.ones((256, 512), jnp.float32), method)
    # the format's default tiles, split-K's float32 partials; int4 nibbles by their bits too
    one_row = ONE_ROW_TILES[qw.scheme.weight]
    cases = ((16, None), (16, Tiles(split_k=2) if method[:4] != "int4" else Tiles(split_k=2, unpack="magic")),
             (1, one_row), (1, dataclasses.replace(one_row, block_k=128, split_k=2, unpack="convert")),
             (200, None))  # fmt: skip
    cases = [(rows, tiles, jnp.bfloat16) for rows, tiles in cases]
    if method[:4] == "int4":  # the nibbles by inline PTX: in a tensor-core dot (bfloat16, float16), one row (in
        # float32, its pairs in the activations' 16-bit dtype)
        cases += [(16, Tiles(unpack="asm"), jnp.bfloat16), (16, Tiles(unpack="asm"), jnp.float16),
                  (1, dataclasses.replace(one_row, unpack="magic"), jnp.bfloat16),
                  (1, one_row, jnp.float16)]  # fmt: skip
    for rows, tiles, dtype in cases:  # tensor-core dots; one row on the vector units; rows tiled
        step = jax.jit(lambda x, w: quantized_matmul(x, w, tiles))
        text = step.trace(jnp.ones((rows, 512), dtype), qw).lower(lowering_platforms=("cuda",)).as_text()
        assert f"small_matmul_{qw.scheme.weight}" in text and "triton" in text
        assert ("prmt.b32" in text) == (tiles is not None and tiles.unpack == "asm")  # the PTX is in the kernel
        assert ("sub.rn.f16x2" in text) == (tiles is not None and tiles.unpack == "asm" and dtype == jnp.float16)
    assert triton_verified == [True] * len(cases)


def test_int4_defaults_take_the_ptx_only_where_the_gpu_runs_it(monkeypatch):
    """int4's default tiles unpack by the PTX on a GPU that runs it (sm_90 for bfloat16), else by the magic: named
    tiles are taken as they are."""
    from rtpjax.kernels import ptx

    qw = quantize(jnp.ones((256, 512), jnp.float32), "int4")
    lowered = lambda dtype: jax.jit(lambda x, w: quantized_matmul(x, w)).trace(
        jnp.ones((16, 512), dtype), qw).lower(lowering_platforms=("cuda",)).as_text()  # noqa: E731
    if jax.default_backend() == "cpu":
        assert "prmt.b32" not in lowered(jnp.bfloat16) + lowered(jnp.float16)
    monkeypatch.setattr(ptx, "runs", lambda x_dtype: jnp.dtype(x_dtype) == jnp.float16)  # a GPU before sm_90
    jax.clear_caches()  # (the choice is made once per traced shape: a process's GPU does not change)
    try:
        assert "prmt.b32" not in lowered(jnp.bfloat16) and "sub.rn.f16x2" in lowered(jnp.float16)
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("platform, cc, want", [
    ("cuda 13.0", "9.0", ((9, 0), True, True)), ("cuda 12.8", "10.0", ((10, 0), True, True)),
    ("cuda 12.8", "8.0", ((8, 0), False, True)), ("rocm 6.2", "gfx90a", (None, False, False)),
])  # fmt: skip
def test_ptx_runs_where_the_gpu_has_its_instructions(monkeypatch, platform, cc, want):
    """compute_capability: a CUDA GPU's (major, minor), None elsewhere; bfloat16 pairs need sm_90, float16 any CUDA."""
    from types import SimpleNamespace

    from rtpjax.kernels import ptx

    device = SimpleNamespace(compute_capability=cc, client=SimpleNamespace(platform_version=platform))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "local_devices", lambda backend=None: [device])
    assert (ptx.compute_capability(), ptx.runs(jnp.bfloat16), ptx.runs(jnp.float16)) == want
    assert ptx.runs(jnp.float32) == want[1]  # float32 activations take bfloat16 pairs


def test_small_steps_on_a_gpu_take_the_kernel():
    def weight(method, whole=True):
        scheme = method if isinstance(method, Scheme) else METHODS[method]
        return quantize(jnp.ones((128, 256), jnp.float32), dataclasses.replace(scheme, whole=whole))

    for method in ["fp8", "int8", "fp8-weight-only", "int8-weight-only", "int4", "int4-asym"]:
        assert uses_small_kernel(1, weight(method), "gpu") and uses_small_kernel(64, weight(method), "gpu")
        assert not uses_small_kernel(65, weight(method), "gpu")  # compute-bound: the W8A8 / XLA dot
        assert not uses_small_kernel(1, weight(method), "cpu")
        assert not uses_small_kernel(1, weight(method, whole=False), "gpu")  # sharded: no custom call
    assert not uses_small_kernel(1, weight(W8A8["fp8-block"]), "gpu")


@pytest.mark.parametrize("method", ["fp8", "int8", "int8-weight-only", "int4"])
def test_quantized_decode_xla_takes_the_weight_only_dot(method):
    """`--quantized-decode xla`: decode-sized steps on a GPU skip the kernel and, W8A8 weights included, multiply the
    unquantized activations by the weight converted inside XLA's dot (the kernel's maths); larger steps keep W8A8."""
    from rtpjax.quant.matmul import decode_by

    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.standard_normal((64, 256)), jnp.float32)
    params = {"layer": {"w": quantize(w, dataclasses.replace(METHODS[method], whole=True))}, "norm": jnp.ones(4)}
    assert uses_small_kernel(16, params["layer"]["w"], "gpu")
    xla = decode_by(params, "xla")
    qw = xla["layer"]["w"]
    assert qw.scheme.decode_kernel == 0 and not uses_small_kernel(16, qw, "gpu") and xla["norm"] is params["norm"]
    assert decode_by(xla, "pallas")["layer"]["w"].scheme == params["layer"]["w"].scheme
    x = jnp.asarray(rng.standard_normal((16, 256)), jnp.float32)
    weight_only = np.asarray(x @ dequantize(qw, jnp.float32).T)
    np.testing.assert_allclose(np.asarray(linear(x, qw, backend="gpu")), weight_only, rtol=1e-5, atol=1e-4)
    big = jnp.concatenate([x] * 5)  # 80 rows: past decode size, the scheme's own maths
    want = reference_w8a8(big, qw) if qw.scheme.act else np.asarray(big @ dequantize(qw, jnp.float32).T)
    np.testing.assert_allclose(np.asarray(linear(big, qw, backend="gpu")), want, rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="auto, pallas, xla"):
        decode_by(params, "triton")
    # the default: the kernel for int4, XLA for one-byte weights
    auto = decode_by(params, "auto")["layer"]["w"]
    assert auto.scheme.decode_kernel == {"int4": 64}.get(auto.scheme.weight, 0)
    for rows in (1, 2, 64):
        assert uses_small_kernel(rows, auto, "gpu") == (method == "int4")
    # a weight the kernel cannot run (sharded: not whole) multiplies decode steps as weight-only too; one row of a
    # one-byte weight as XLA's row reduction (no dot in the program), the same product
    sharded = dataclasses.replace(auto, scheme=dataclasses.replace(auto.scheme, whole=False))
    for w in (auto, sharded):
        for rows in (1, 16):
            if w is sharded or method != "int4":
                assert not uses_small_kernel(rows, w, "gpu")
                np.testing.assert_allclose(np.asarray(linear(x[:rows], w, backend="gpu")), weight_only[:rows],
                                           rtol=1e-5, atol=1e-4)  # fmt: skip
        one_row = str(jax.make_jaxpr(lambda v, w=w: linear(v, w, backend="gpu"))(x[:1]))
        assert ("dot_general" in one_row) == (method == "int4"), one_row


def test_load_model_sends_decode_steps_where_asked(tiny_checkpoints):
    """`quantized_decode` reaches every quantized weight load_model returns (the engine's and a draft model's
    loading both go through it); unquantized weights are untouched."""
    from rtpjax.loading.model_source import load_model

    def schemes(params):
        leaves = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, QuantizedWeight))
        return [w.scheme.decode_kernel for w in leaves if isinstance(w, QuantizedWeight)]

    for choice, kernel in (("pallas", 64), ("xla", 0), ("auto", 0)):  # int8: XLA unless asked
        kinds = schemes(load_model(tiny_checkpoints["llama3"], quantization="int8", quantized_decode=choice)[2])
        assert kinds and set(kinds) == {kernel}
    assert not schemes(load_model(tiny_checkpoints["llama3"], quantized_decode="xla")[2])

"""The quantized linear path: int4 packing bit for bit, the W8A8 maths against a dequantized float32 reference, and the
fused int4 Pallas kernel (interpreted on the CPU) against the plain-jnp reference, every output element."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels.reference import quantize as quantize_rows
from rtpjax.loading.quantization import METHODS, STORAGE, Scheme, dequantize, pack_int4, quantize, unpack_int4
from rtpjax.quant.int4_matmul import int4_matmul
from rtpjax.quant.matmul import linear


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


@pytest.mark.parametrize("method,rows,dtype", [("int4", 1, jnp.float32), ("int4-asym", 19, jnp.float32),
                                               ("int4-asym", 5, jnp.bfloat16)])  # fmt: skip
def test_int4_kernel_matches_the_reference_everywhere(method, rows, dtype):
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((96, 384)) * rng.uniform(0.01, 2, (96, 1)), jnp.float32)
    qw = quantize(w, method)
    x = jnp.asarray(rng.standard_normal((rows, 384)), dtype)
    got = np.asarray(int4_matmul(x, qw.q, qw.scale, qw.zero, group=128, interpret=True), np.float32)
    assert got.shape == (rows, 96)
    want = np.asarray(x.astype(jnp.float32) @ dequantize(qw, dtype).astype(jnp.float32).T)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2  # bfloat16: the kernel rounds its output, as the matmul does
    assert np.all(np.abs(got - want) <= tol * (1 + np.abs(want))), np.abs(got - want).max()
    with pytest.raises(ValueError, match="int4_matmul: group 128, output 90"):
        int4_matmul(x, qw.q[:90], qw.scale[:90], None, group=128, interpret=True)

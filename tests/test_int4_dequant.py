"""int4 weights written out by the Pallas kernel large steps take on a GPU (`rtpjax.quant.int4_dequant`): interpreted on
the CPU, every element equals the plain-jnp dequantization (fresh random weights, both zero-point forms, several
programs per axis); the GPU lowering passes Triton's verifier; `linear` takes it on a GPU past decode-sized steps."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.loading.quantization import METHODS, dequantize, quantize
from rtpjax.quant import int4_dequant
from rtpjax.quant.int4_dequant import applies, dequantize_int4
from rtpjax.quant.matmul import SMALL_ROWS, linear


def weight(shape, method="int4", whole=True, group=None, seed=0):
    scheme = dataclasses.replace(METHODS[method], whole=whole, **({} if group is None else {"group": group}))
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return quantize(jnp.asarray(w), scheme)


@pytest.mark.parametrize("method", ["int4", "int4-asym"])
@pytest.mark.parametrize("shape, group", [((96, 512), None), ((256, 2048), None), ((48, 256), 32), ((16, 1024), 256),
                                          ((64, 2048), 0)])  # (0: one group the whole row, as GPTQ's group -1)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_is_the_reference_dequantization_everywhere(method, shape, group, dtype):
    qw = weight(shape, method, group=group, seed=shape[0] + shape[1])
    got = dequantize_int4(qw, dtype, interpret=True)  # (interpreted, outputs start as NaN: unwritten ones stay so)
    want = dequantize(qw, dtype, stored_order=True)
    assert got.shape == shape and got.dtype == dtype
    assert not np.isnan(np.asarray(got, np.float32)).any(), "an output element was never written"
    # nibbles equal to their zero dequantize to 0: each must still be written (the reference's exact value)
    assert np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert np.count_nonzero(np.asarray(want, np.float32)) > 0.7 * want.size  # a wrong or unwritten element shows


def test_every_element_is_written():
    """Weights of magnitude 0.5-1 of each group's largest: no nibble equals the zero point, so every reference element
    is nonzero and an element the kernel left unwritten (NaN, the interpreter's poison, or zero) cannot match it."""
    rng = np.random.default_rng(7)
    w = rng.choice([-1.0, 1.0], (128, 1024)) * rng.uniform(0.55, 1.0, (128, 1024))
    qw = quantize(jnp.asarray(w, jnp.float32), dataclasses.replace(METHODS["int4"], whole=True))
    want = np.asarray(dequantize(qw, jnp.float32, stored_order=True))
    assert np.all(want != 0)
    assert np.array_equal(np.asarray(dequantize_int4(qw, jnp.float32, interpret=True)), want)


def test_applies_only_where_the_kernel_can_run():
    assert applies(weight((64, 512)))
    assert not applies(weight((64, 512), whole=False))  # sharded: no custom call
    assert not applies(weight((64, 512), "int8-weight-only"))
    assert not applies(weight((64, 480), group=96))  # groups not a power of two
    assert not applies(weight((40, 512)))  # channels not a multiple of 16
    with pytest.raises(ValueError, match="int4_dequant: weight"):
        dequantize_int4(weight((64, 512), whole=False), jnp.bfloat16, interpret=True)


@pytest.mark.parametrize("method", ["int4", "int4-asym"])
def test_kernel_lowers_to_triton(method, triton_verified):
    """Every tiling the benchmark sweeps lowers to Triton that passes MLIR's verifier (compiling needs a GPU)."""
    from rtpjax.benchmarks.kernels.quant_bench import DEQUANT_SWEEP

    qw = weight((256, 1024), method)
    row = weight((64, 4096), method, group=0)  # a whole-row group: fewer channels per program, the same bytes
    text = jax.jit(lambda w: dequantize_int4(w, jnp.bfloat16)).trace(row).lower(lowering_platforms=("cuda",)).as_text()
    assert "int4_dequant" in text
    for tiles in DEQUANT_SWEEP:
        step = jax.jit(lambda w, tiles=tiles: dequantize_int4(w, jnp.bfloat16, tiles=tiles))
        text = step.trace(qw).lower(lowering_platforms=("cuda",)).as_text()
        assert "int4_dequant" in text and "triton" in text
    assert triton_verified == [True] * (1 + len(DEQUANT_SWEEP))


def test_linear_takes_the_kernel_on_a_gpu_past_decode_steps(monkeypatch):
    """On a GPU a step past the small kernel's rows writes the weight by the kernel, then one 16-bit dot; the same
    product the CPU's path gives (here the kernel is interpreted)."""
    calls = []
    real = int4_dequant.dequantize_int4

    def interpreted(w, dtype, interpret):
        calls.append(w.shape)
        assert interpret  # on the CPU
        return real(w, dtype, interpret=True)

    monkeypatch.setattr(int4_dequant, "dequantize_int4", interpreted)
    qw = weight((128, 512))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((SMALL_ROWS + 8, 512)), jnp.bfloat16)
    got = linear(x, qw, backend="gpu")
    assert calls == [(128, 512)]
    want = linear(x, qw, backend="cpu")
    assert calls == [(128, 512)] and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    linear(x, weight((128, 512), whole=False), backend="gpu")  # sharded: XLA's dequantization
    assert calls == [(128, 512)]

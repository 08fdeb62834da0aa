"""The Mosaic GPU int4 matmul (rtpjax/quant/int4_mosaic.py) in JAX's Mosaic GPU interpreter on CPU, against the
dequantized weight's float32 product on fresh random inputs. The interpreter fills outputs with NaN first, so a
NaN-free result means every element was written; its race detector is on (producer and consumers share slots)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

from rtpjax.loading.quantization import METHODS, dequantize, quantize
from rtpjax.quant import int4_mosaic


def weight(out, inp, method="int4", seed=0, **scheme):
    w = jax.random.normal(jax.random.key(seed), (out, inp), jnp.float32)
    return quantize(w, dataclasses.replace(METHODS[method], whole=True, **scheme))


@pytest.mark.parametrize("method, tokens, out, inp, stages, splits", [
    ("int4", 150, 256, 640, 2, 1),  # two token tiles (the last partly padding), two channel tiles, slots reused
    ("int4-asym", 37, 128, 384, 3, 1),  # zero points; as many groups as slots
    ("int4", 128, 128, 256, 4, 1),  # fewer groups than slots
    ("int4-asym", 100, 256, 768, 2, 2),  # two splits of three groups each, summed in float32
    ("int4", 70, 128, 512, 3, 0),  # splits as splits_for picks them (every group its own)
])  # fmt: skip
def test_matches_the_dequantized_product(method, tokens, out, inp, stages, splits):
    w = weight(out, inp, method, seed=tokens)
    x = jax.random.normal(jax.random.key(tokens + 1), (tokens, inp), jnp.bfloat16)
    got = np.asarray(int4_mosaic.int4_matmul(x, w, stages=stages, splits=splits, interpret=True), np.float32)
    want = np.asarray(jnp.dot(x.astype(jnp.float32), dequantize(w, jnp.bfloat16).astype(jnp.float32).T))
    assert got.shape == (tokens, out) and not np.isnan(got).any()
    assert np.abs(got - want).max() <= 4e-3 * np.abs(want).max()  # bfloat16 output rounding
    assert not gpu_callbacks.get_races().races_found


def test_splits_fill_the_sms_with_whole_groups():
    assert int4_mosaic.splits_for(14336, 128, 32, sms=132) == 2  # 112 programs: two splits of 16 groups
    assert int4_mosaic.splits_for(4096, 128, 112, sms=132) == 7  # 32 programs: 7 splits of 16 groups
    assert int4_mosaic.splits_for(4096, 512, 32, sms=132) == 2  # 128 programs
    assert int4_mosaic.splits_for(128, 128, 3, sms=132) == 3  # never past the groups (nor MAX_SPLITS)
    assert int4_mosaic.splits_for(28672, 256, 32, sms=132) == 1


def test_takes_only_what_it_runs():
    w = weight(128, 256)
    assert int4_mosaic.applies(1, w) and int4_mosaic.applies(300, w)
    assert not int4_mosaic.applies(0, w)
    assert not int4_mosaic.applies(64, weight(64, 256))  # channels % 128
    assert not int4_mosaic.applies(64, weight(128, 256, group=64))
    assert not int4_mosaic.applies(64, dataclasses.replace(w, scheme=dataclasses.replace(w.scheme, whole=False)))
    assert not int4_mosaic.applies(64, weight(128, 256, "int8"))
    assert not int4_mosaic.applies(64, weight(128, 320))  # inputs not whole groups
    assert int4_mosaic.applies(64, dataclasses.replace(w, perm=jnp.arange(256)))  # act-order: x comes permuted
    with pytest.raises(ValueError, match="int4_matmul: x float32"):
        int4_mosaic.int4_matmul(jnp.zeros((4, 256), jnp.float32), w, interpret=True)
    with pytest.raises(ValueError, match="splits dividing the 2 groups"):
        int4_mosaic.int4_matmul(jnp.zeros((4, 256), jnp.bfloat16), w, splits=3, interpret=True)


@pytest.mark.parametrize("method, stages, splits", [("int4", 4, 1), ("int4-asym", 3, 2), ("int4", 2, 4)])
def test_the_gpu_form_lowers_for_hopper(method, stages, splits):
    """The GPU form (register layouts, wgmma with the weight tile from registers), lowered for CUDA on this CPU: what
    the interpreter does not run still builds a Mosaic GPU kernel whose dots are bfloat16 wgmmas of 64 x 128 tiles,
    with bfloat16 results or float32 partials."""
    w = weight(256, 512, method)
    f = jax.jit(lambda x, w: int4_mosaic.int4_matmul(x, w, stages=stages, splits=splits))
    text = f.trace(jnp.zeros((200, 512), jnp.bfloat16), w).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in text


def test_linear_routes_past_decode_rows_only_when_opted_in(monkeypatch):
    """RTPJAX_INT4_MOSAIC (ENABLED) on a Hopper GPU: `linear`'s int4 steps of 65-512 bfloat16 tokens take the kernel,
    with the dequantized product's values; decode-sized and larger steps, float32 x, or the switch off, do not."""
    from rtpjax.quant import matmul

    w = weight(128, 256)
    x = jax.random.normal(jax.random.key(5), (80, 256), jnp.bfloat16)
    monkeypatch.setattr(int4_mosaic, "available", lambda: True)
    assert not int4_mosaic.routed(x, w)  # off by default
    monkeypatch.setattr(int4_mosaic, "ENABLED", True)
    assert int4_mosaic.routed(x, w) and int4_mosaic.routed(jnp.zeros((512, 256), jnp.bfloat16), w)
    for rows, dtype in ((64, jnp.bfloat16), (513, jnp.bfloat16), (80, jnp.float32)):
        assert not int4_mosaic.routed(jnp.zeros((rows, 256), dtype), w)
    taken, real = [], int4_mosaic.int4_matmul

    def counted(*args, **kwargs):
        taken.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(int4_mosaic, "int4_matmul", counted)
    got = np.asarray(matmul.linear(x, w, backend="gpu"), np.float32)
    want = np.asarray(jnp.dot(x.astype(jnp.float32), dequantize(w, jnp.bfloat16).astype(jnp.float32).T))
    assert taken and np.abs(got - want).max() <= 4e-3 * np.abs(want).max()

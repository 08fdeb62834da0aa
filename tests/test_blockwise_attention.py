"""The engine's CPU attention (blockwise, online softmax) against the plain-jnp ground truth, on fresh random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels.blockwise import blockwise_attention
from rtpjax.kernels.reference import quantize, reference_attention
from rtpjax.runner.step_inputs import SeqChunk, build_step

BLOCK = 16
SPECS = {  # (new tokens, tokens already cached) per sequence
    "decode": [(1, 0), (1, 15), (1, 16), (1, 17), (1, 100), (1, 300)],
    "prefill": [(37, 0), (16, 0), (5, 0)],
    "mixed": [(1, 40), (20, 11), (1, 0), (33, 17), (1, 255), (9, 16)],
}


def make_case(rng, spec, kv_heads=2, group=3, head_dim=32, num_tokens=96, num_seqs=8, num_blocks=48):
    free = list(rng.permutation(num_blocks))
    chunks = [SeqChunk([0] * n, start, [int(free.pop()) for _ in range(-(-(start + n) // BLOCK))]) for n, start in spec]
    meta = jax.tree.map(jnp.asarray, build_step(chunks, BLOCK, num_tokens=num_tokens, num_seqs=num_seqs,
                                                max_blocks=24).meta)  # fmt: skip
    shape = (kv_heads, num_blocks, BLOCK, head_dim)
    q = jnp.asarray(rng.standard_normal((num_tokens, kv_heads * group, head_dim)), jnp.float32)
    return q, (jnp.asarray(rng.standard_normal(shape), jnp.float32), jnp.asarray(rng.standard_normal(shape), jnp.float32)), meta


@pytest.mark.parametrize("case", sorted(SPECS))
@pytest.mark.parametrize("window, soft_cap", [(None, None), (7, None), (None, 20.0), (24, 5.0)])
def test_matches_the_reference(case, window, soft_cap):
    rng = np.random.default_rng(hash((case, window, soft_cap)) % 2**32)
    q, cache, meta = make_case(rng, SPECS[case])
    kw = dict(scale=32**-0.5, window=window, soft_cap=soft_cap)
    out = np.asarray(jax.jit(lambda q, c, m: blockwise_attention(q, c, m, **kw))(q, cache, meta))
    ref = np.asarray(reference_attention(q, cache, meta, **kw))
    real = int(meta.query_start_loc[-1])
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:real], ref[:real], rtol=2e-5, atol=2e-5)
    assert np.all(out[real:] == 0)  # padding tokens


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float8_e4m3fn])
def test_quantized_cache_matches_the_reference(dtype):
    rng = np.random.default_rng(3)
    q, (k, v), meta = make_case(rng, SPECS["mixed"])
    (kq, ks), (vq, vs) = quantize(k, dtype), quantize(v, dtype)
    cache = (kq, vq, ks, vs)
    out = blockwise_attention(q, cache, meta, scale=0.2)
    np.testing.assert_allclose(out, reference_attention(q, cache, meta, scale=0.2), rtol=2e-5, atol=2e-5)


def test_a_sequence_gives_the_same_bits_whatever_it_is_batched_with():
    """Extra iterations for a longer neighbour must leave a short sequence's result bit for bit unchanged."""
    rng = np.random.default_rng(5)
    shape = (2, 48, BLOCK, 32)
    cache = (jnp.asarray(rng.standard_normal(shape), jnp.float32), jnp.asarray(rng.standard_normal(shape), jnp.float32))
    q = jnp.asarray(rng.standard_normal((16, 6, 32)), jnp.float32)
    short = SeqChunk([0] * 3, 20, [4, 9])
    alone = build_step([short], BLOCK, num_tokens=16, num_seqs=4, max_blocks=24).meta
    beside = build_step([short, SeqChunk([0], 300, list(range(10, 29)))], BLOCK, num_tokens=16, num_seqs=4,
                        max_blocks=24).meta  # fmt: skip
    run = jax.jit(lambda q, m: blockwise_attention(q, cache, m, scale=0.3))
    a, b = np.asarray(run(q, jax.tree.map(jnp.asarray, alone))), np.asarray(run(q, jax.tree.map(jnp.asarray, beside)))
    assert np.array_equal(a[:3], b[:3])

"""The Pallas KV-cache write (interpret mode on CPU) against XLA's scatter in rtpjax.kernels.attention.write_kv, bit for bit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels.metadata import AttentionMetadata
from rtpjax.kernels.attention import paged_attention
from rtpjax.kernels.reference import round_half_even, write_kv
from rtpjax.kernels import kv_write
from rtpjax.parallel.sharding import make_mesh

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


def bits(x):
    return np.asarray(jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]))


def random_cache(rng, shape, dtype):
    """A cache already holding random data (and random scales): every slot the write must leave alone is checked."""
    cache = tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype) for _ in range(2))
    if dtype in (jnp.int8, jnp.float8_e4m3fn):
        cache += tuple(jnp.asarray(rng.uniform(0.1, 2.0, shape[:3]), jnp.float32) for _ in range(2))
    return cache


@pytest.mark.parametrize("kv", sorted(DTYPES))
@pytest.mark.parametrize("num_tokens, head_dim, block_size", [(37, 64, 16), (16, 128, 8), (1, 64, 32), (50, 128, 16)])
def test_matches_xla_scatter_bit_for_bit(kv, num_tokens, head_dim, block_size):
    rng = np.random.default_rng(num_tokens * 31 + head_dim)
    heads, num_blocks = 3, 12
    cache = random_cache(rng, (heads, num_blocks, block_size, head_dim), DTYPES[kv])
    k, v = (jnp.asarray(rng.standard_normal((num_tokens, heads, head_dim)) * 3, jnp.bfloat16) for _ in range(2))
    slots = rng.permutation(num_blocks * block_size)[:num_tokens].astype(np.int32)
    slots[rng.random(num_tokens) < 0.2] = -1  # padding tokens anywhere: nothing written for them
    if num_tokens > 1:
        slots[-1] = -1
        slots[0] = num_blocks * block_size  # past the cache: dropped, as XLA's scatter drops it
    want = write_kv(cache, k, v, jnp.asarray(slots))
    # On a GPU the compiled kernel (where a store missing its mask would write another head's slots).
    got = kv_write.write_kv(cache, k, v, jnp.asarray(slots), interpret=jax.default_backend() == "cpu")
    assert len(got) == len(cache)
    for g, w in zip(got, want):  # the whole cache: slots outside the step's untouched
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(bits(g), bits(w))


def test_round_half_even_is_jnp_round_where_the_kernel_lacks_it():
    ties = np.arange(-130, 130, 0.5, dtype=np.float32)
    near = np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))
    spread = np.random.default_rng(0).uniform(-127, 127, 10000).astype(np.float32)
    y = jnp.asarray(np.concatenate([ties, *near, spread]))
    for f in (round_half_even, jax.jit(round_half_even)):  # jitted: XLA folds the float adder trick, not this
        np.testing.assert_array_equal(np.asarray(f(y)), np.round(np.asarray(y)))


def test_the_engine_switch_picks_the_write():
    rng = np.random.default_rng(5)
    cache = random_cache(rng, (2, 6, 16, 64), jnp.int8)
    q = jnp.asarray(rng.standard_normal((8, 4, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((8, 2, 64)), jnp.bfloat16) for _ in range(2))
    meta = AttentionMetadata(jnp.asarray([0, 5, 6, 6], jnp.int32), jnp.asarray([5, 20, 0], jnp.int32),
                             jnp.asarray([[0, 1], [2, 3], [0, 0]], jnp.int32),
                             jnp.asarray([0, 1, 2, 3, 4, 51, -1, -1], jnp.int32), impl="pallas")  # fmt: skip
    assert not kv_write.chosen(64) and kv_write.chosen(kv_write.MIN_TOKENS)  # auto: by the step's size
    split = dataclasses.replace(meta, mesh=make_mesh(tensor=2))  # the kernel per tensor shard (shard_map)
    results = {}
    for choice in ("xla", "pallas"):
        assert kv_write.chosen(8, choice) == kv_write.chosen(4096, choice) == (choice == "pallas")
        metas = [dataclasses.replace(m, kv_write=choice) for m in (meta, split)]
        results[choice] = [paged_attention(q, k, v, cache, m, scale=0.125) for m in metas]
    for a, b in zip(jax.tree.leaves(results["xla"]), jax.tree.leaves(results["pallas"])):
        np.testing.assert_array_equal(bits(a), bits(b))
    with pytest.raises(ValueError, match="kv_write='triton'"):
        paged_attention(q, k, v, cache, dataclasses.replace(meta, kv_write="triton"), scale=0.125)

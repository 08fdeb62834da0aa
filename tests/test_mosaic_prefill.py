"""The Mosaic GPU paged prefill prototype (benchmarks/kernels/mosaic_prefill.py), both forms, in JAX's Mosaic GPU
interpreter on CPU against the engine's float32 reference, on fresh random inputs. The interpreter fills every output
and scratch buffer with NaN first, so a NaN-free result means every element was written; its race detector is on (the
pipelined form's producer and consumers share shared-memory slots), and it fails a kernel that leaves a barrier phase
unobserved."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from rtpjax.benchmarks.kernels.mosaic_prefill import (engine_reference, paged_prefill, paged_prefill_pipelined,
                                                      random_case)  # fmt: skip

CASES = [
    (128, 0, 2, 1, 64, jnp.bfloat16, 1e-2),  # no cache before the chunk; fewer pages than 3 stages
    (128, 70, 4, 2, 128, jnp.bfloat16, 1e-2),  # context ends mid-page; GQA 2
    (128, 200, 8, 2, 64, jnp.float16, 2e-3),  # GQA 4, four pages of context
    (256, 64, 3, 1, 64, jnp.float16, 2e-3),  # context exactly one page; GQA 3; several query tiles
]  # fmt: skip
KERNELS = {"sequential": paged_prefill, "pipelined": paged_prefill_pipelined,
           "pipelined_3_stages": functools.partial(paged_prefill_pipelined, stages=3)}  # fmt: skip


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("tokens,context,q_heads,kv_heads,head_dim,dtype,bound", CASES)
def test_matches_the_engine_reference(kernel, tokens, context, q_heads, kv_heads, head_dim, dtype, bound):
    q, k, v, table, ctx = random_case(tokens, context, q_heads, kv_heads, head_dim, dtype, seed=tokens + context)
    scale = head_dim**-0.5
    out = KERNELS[kernel](q, jnp.swapaxes(k, 2, 3), v, table, ctx, scale=scale, interpret=True)
    out, ref = np.asarray(out, np.float32), np.asarray(engine_reference(q, k, v, table, context, scale))
    assert not np.isnan(out).any()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < bound
    assert not gpu_callbacks.get_races().races_found


def test_rejects_layouts_it_cannot_tile():
    q, k, v, table, ctx = random_case(128, 0, 2, 1, 128, jnp.float16)  # head_dim 128: K [.., 64, 128] is untransposed
    kt = jnp.swapaxes(k, 2, 3)
    with pytest.raises(ValueError, match="multiple of 64"):
        paged_prefill(q[:48], kt, v, table, ctx, scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        paged_prefill_pipelined(q[:64], kt, v, table, ctx, scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="K pages"):
        paged_prefill(q, k, v, table, ctx, scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="block_table"):
        paged_prefill(q, kt, v, table[:3], ctx, scale=0.1, interpret=True)

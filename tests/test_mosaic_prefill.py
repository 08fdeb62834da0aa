"""The Mosaic GPU paged prefill prototype (benchmarks/kernels/mosaic_prefill.py), both forms, in JAX's Mosaic GPU
interpreter on CPU against the engine's float32 reference, on fresh random inputs: single chunks and ragged steps of
several sequences. The interpreter fills every output and scratch buffer with NaN first, so NaN-free outputs mean
every token's row was written; its race detector is on (the pipelined form's producer and consumers share slots),
and it fails a kernel that leaves a barrier phase unobserved."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from rtpjax.benchmarks.kernels.mosaic_prefill import engine_reference, paged_prefill, prefill_plan, random_case

CASES = [  # chunks [(queries, cached tokens before them)], query heads, KV heads, head_dim, dtype, error bound
    ([(128, 0)], 2, 1, 64, jnp.bfloat16, 1e-2),  # one chunk, nothing cached; fewer pages than 3 stages
    ([(128, 70)], 4, 2, 128, jnp.bfloat16, 1e-2),  # context ends mid-page; GQA 2
    ([(64, 200)], 8, 2, 64, jnp.float16, 2e-3),  # GQA 4; half a pipelined tile
    ([(70, 0), (1, 130), (150, 64), (5, 3)], 3, 1, 64, jnp.float16, 2e-3),  # ragged: tiles end inside sequences
]  # fmt: skip
KERNELS = {"tiles_of_2_pages": paged_prefill, "tiles_of_1_page": functools.partial(paged_prefill, kv_pages=1),
           "3_stages_of_1_page": functools.partial(paged_prefill, kv_pages=1, stages=3)}  # fmt: skip


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("chunks,q_heads,kv_heads,head_dim,dtype,bound", CASES)
def test_matches_the_engine_reference(kernel, chunks, q_heads, kv_heads, head_dim, dtype, bound):
    q, k, v, tables, qsl, lens = random_case(chunks, q_heads, kv_heads, head_dim, dtype, seed=len(chunks) + head_dim)
    scale = head_dim**-0.5
    out = KERNELS[kernel](q, jnp.swapaxes(k, 2, 3), v, tables, qsl, lens, scale=scale, interpret=True)
    out, ref = np.asarray(out, np.float32), np.asarray(engine_reference(q, k, v, tables, qsl, lens, scale))
    assert out.shape == q.shape and not np.isnan(out).any()
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < bound
    for s in range(len(chunks)):  # every sequence on its own, not only the step as a whole
        rows = slice(int(qsl[s]), int(qsl[s + 1]))
        assert np.linalg.norm(out[rows] - ref[rows]) / np.linalg.norm(ref[rows]) < bound
    assert not gpu_callbacks.get_races().races_found


def test_plan_covers_each_sequence_with_whole_tiles_and_marks_the_rest_unused():
    qsl = jnp.asarray([0, 70, 71, 221, 221], jnp.int32)  # the last sequence is padding (no queries)
    lens = jnp.asarray([70, 131, 214, 0], jnp.int32)
    plan = np.asarray(prefill_plan(qsl, lens, rows=64, num_tiles=8))
    # (first row, first query's position, sequence, sequence length)
    assert plan[:6].tolist() == [[0, 0, 0, 70], [64, 64, 0, 70], [70, 130, 1, 131], [71, 64, 2, 214],
                                 [135, 128, 2, 214], [199, 192, 2, 214]]  # fmt: skip
    assert (plan[6:, 3] == 0).all()


def test_rejects_layouts_it_cannot_tile():
    q, k, v, tables, qsl, lens = random_case([(128, 0)], 2, 1, 128, jnp.float16)  # K [.., 64, 128]: untransposed
    kt = jnp.swapaxes(k, 2, 3)
    with pytest.raises(ValueError, match="K pages"):
        paged_prefill(q, k, v, tables, qsl, lens, scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="page_tables"):
        paged_prefill(q, kt, v, tables[:, :, None], qsl, lens, scale=0.1, interpret=True)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill(q, kt, v, tables, qsl[:1], lens, scale=0.1, interpret=True)

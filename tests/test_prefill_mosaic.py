"""The Mosaic GPU prefill kernel (rtpjax/kernels/prefill_mosaic.py) in JAX's Mosaic GPU interpreter on CPU,
against the engine's float32 reference on fresh random inputs; and the engine's "pallas" attention splitting a step
between it and the Triton kernel. The interpreter fills every output and scratch buffer with NaN first, so NaN-free
rows mean every row the kernel answers was written; its race detector is on (producer and consumers share slots), and
it fails a kernel that leaves a barrier phase unobserved."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

from rtpjax.kernels.attention import IMPLEMENTATIONS, plan_step
from rtpjax.kernels.metadata import AttentionMetadata
from rtpjax.kernels.reference import reference_attention
from rtpjax.kernels import prefill_mosaic


def mixed_step(chunks, q_heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """A step of `chunks` [(queries, cached tokens before them)] per sequence, blocks scattered over a larger pool,
    every block already holding its K/V (the step's slots are -1: nothing to write)."""
    rng = np.random.default_rng(seed)
    q_lens, lens = [n for n, _ in chunks], [n + c for n, c in chunks]
    blocks = [-(-length // block_size) for length in lens]
    pool = 2 * sum(blocks) + 3
    tables = np.zeros((len(chunks), max(blocks) + 1), np.int32)
    order = rng.permutation(pool)
    for s, (n, start) in enumerate(zip(blocks, np.cumsum([0] + blocks[:-1]))):
        tables[s, :n] = order[start : start + n]
    q = jnp.asarray(rng.standard_normal((sum(q_lens), q_heads, head_dim)), dtype)
    cache = tuple(jnp.asarray(rng.standard_normal((kv_heads, pool, block_size, head_dim)), dtype) for _ in "kv")
    meta = AttentionMetadata(jnp.asarray(np.cumsum([0] + q_lens), jnp.int32), jnp.asarray(lens, jnp.int32),
                             jnp.asarray(tables), jnp.full(sum(q_lens), -1, jnp.int32))  # fmt: skip
    return q, cache, meta


def relative_error(out, ref, rows):
    out, ref = np.asarray(out, np.float32)[rows], np.asarray(ref, np.float32)[rows]
    assert not np.isnan(out).any()
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


CASES = [  # chunks, query heads, KV heads, head_dim, block size, dtype, error bound
    ([(128, 0)], 2, 1, 64, 16, jnp.bfloat16, 1e-2),  # one chunk, nothing cached: fewer KV tiles than stages
    ([(128, 70)], 2, 1, 128, 64, jnp.bfloat16, 1e-2),  # context ends mid-block; GQA 2; blocks of 64
    ([(64, 200)], 4, 1, 64, 32, jnp.float16, 2e-3),  # GQA 4; half a tile of queries
    ([(70, 0), (1, 130), (100, 64), (5, 3), (64, 10)], 3, 1, 64, 16, jnp.float16, 2e-3),  # ragged, short ones skipped
]  # fmt: skip


@pytest.mark.parametrize("chunks,q_heads,kv_heads,head_dim,block_size,dtype,bound", CASES)
def test_kernel_matches_the_engine_reference(chunks, q_heads, kv_heads, head_dim, block_size, dtype, bound):
    q, cache, meta = mixed_step(chunks, q_heads, kv_heads, head_dim, block_size, dtype, seed=len(chunks) + head_dim)
    step = prefill_mosaic.plan(meta, q.shape[0])
    out = prefill_mosaic.prefill_attention(q, cache, meta.block_tables, step, scale=head_dim**-0.5, interpret=True)
    ref = reference_attention(q.astype(jnp.float32), cache, meta, scale=head_dim**-0.5)
    mine = np.asarray(step["mine"])
    qsl = np.asarray(meta.query_start_loc)
    for s, (n, _) in enumerate(chunks):  # each sequence on its own: the long ones answered here, the short ones not
        rows = np.arange(qsl[s], qsl[s + 1])
        assert mine[rows].all() == (n >= prefill_mosaic.MIN_QUERIES) and mine[rows].any() == mine[rows].all()
        if n >= prefill_mosaic.MIN_QUERIES:
            assert relative_error(out, ref, rows) < bound
    assert not gpu_callbacks.get_races().races_found


def test_plan_gives_each_long_sequence_whole_tiles():
    _, _, meta = mixed_step([(70, 0), (1, 130), (150, 64), (0, 0)], 1, 1, 64, 16, jnp.float16)
    step = prefill_mosaic.plan(meta, 221)
    tiles = np.asarray(step["tiles"])[:, :4]  # (first token, its position, sequence, length)
    assert tiles[:3].tolist() == [[0, 0, 0, 70], [71, 64, 2, 214], [199, 192, 2, 214]]
    assert tiles.shape[0] == 221 // 64  # a sequence of q >= 64 queries takes at most q / 64 tiles
    assert np.asarray(step["q_rows"])[:128].tolist() == list(range(70)) + [69] * 58  # rows past the end repeat it
    out_rows = np.asarray(step["out_rows"])
    assert out_rows[:70].tolist() == list(range(70)) and out_rows[71:221].tolist() == list(range(128, 278))
    assert np.asarray(step["mine"]).tolist() == [True] * 70 + [False] + [True] * 150


def test_block_tables_reach_the_kernel_as_a_fresh_padded_buffer():
    """Never a view of the caller's array (the Mosaic GPU call rejects inputs that are not 256-byte aligned, and a
    view into the runner's packed step inputs can start anywhere): one row of padding at least, even when the width
    is already whole rows."""
    tables = jnp.arange(2 * 64, dtype=jnp.int32).reshape(2, 64)
    rows = prefill_mosaic.table_rows(tables)
    assert rows.shape == (2, 3, 32) and (np.asarray(rows).reshape(2, -1)[:, :64] == np.asarray(tables)).all()
    assert prefill_mosaic.table_rows(tables[:, :40]).shape == (2, 2, 32)
    assert prefill_mosaic.table_rows(jnp.zeros((1, prefill_mosaic.MAX_TABLE), jnp.int32)).shape[1] == 256  # TMA box


def test_supports_only_what_the_kernel_runs():
    q = jnp.zeros((4, 4, 128), jnp.bfloat16)
    cache = (jnp.zeros((2, 8, 16, 128), jnp.bfloat16),) * 2
    assert prefill_mosaic.supports(q, cache, None, None, max_blocks=64)
    assert not prefill_mosaic.supports(q.astype(jnp.float32), cache, None, None, 64)
    assert not prefill_mosaic.supports(q, cache + (jnp.zeros((2, 8, 16)),) * 2, None, None, 64)  # quantized
    assert not prefill_mosaic.supports(q, cache, 128, None, 64)  # window
    assert not prefill_mosaic.supports(q, cache, None, 30.0, 64)  # soft-cap
    assert not prefill_mosaic.supports(q, tuple(c[:, :, :12] for c in cache), None, None, 64)  # blocks of 12
    assert not prefill_mosaic.supports(q, cache, None, None, prefill_mosaic.MAX_TABLE + 1)
    assert not prefill_mosaic.supports(q[..., :96], tuple(c[..., :96] for c in cache), None, None, 64)
    _, _, meta = mixed_step([(64, 0)], 4, 2, 128, 16, jnp.bfloat16)
    with pytest.raises(ValueError, match="prefill_attention needs bfloat16/float16 queries"):  # called directly
        prefill_mosaic.prefill_attention(q.astype(jnp.float32), cache, meta.block_tables, {}, scale=0.1)


@pytest.mark.slow
def test_engine_attention_splits_a_step_between_the_two_kernels(monkeypatch):
    """impl "pallas" where the Mosaic kernel is available: long chunks there, decode rows and short chunks to the
    Triton kernel, every token's row from the kernel that answered it; and the whole step as the reference gives it."""
    monkeypatch.setattr(prefill_mosaic, "available", lambda: True)  # a Hopper GPU
    monkeypatch.setattr(prefill_mosaic, "MIN_TOKENS", 0)
    q, cache, meta = mixed_step([(1, 40), (130, 20), (9, 40), (1, 5), (64, 0)], 2, 1, 64, 16, jnp.bfloat16, seed=3)
    assert "prefill_tiles" not in plan_step(dataclasses.replace(meta, impl="pallas"), q.shape[0], 2, 1).plan  # off
    meta = plan_step(dataclasses.replace(meta, impl="pallas", mosaic_prefill=True), q.shape[0], 2, 1)
    assert {"prefill_tiles", "other_query_blocks"} <= set(meta.plan)
    decode_shaped = dataclasses.replace(meta, query_start_loc=meta.query_start_loc[:3], seq_lens=meta.seq_lens[:2],
                                        block_tables=meta.block_tables[:2], slot_mapping=meta.slot_mapping[:4])
    assert "prefill_tiles" not in plan_step(decode_shaped, 4, 2, 1).plan  # 4 tokens for 2 sequences
    new_kv = jnp.zeros((q.shape[0], 1, 64), q.dtype)
    out, _ = IMPLEMENTATIONS["pallas"](q, new_kv, new_kv, cache, meta, scale=0.125, window=None, soft_cap=None)
    ref = reference_attention(q.astype(jnp.float32), cache, meta, scale=0.125)
    assert relative_error(out, ref, slice(None)) < 1e-2
    assert np.asarray(meta.plan["prefill_tiles"]["mine"]).sum() == 194
    # a layer the Mosaic kernel cannot run (soft-cap) falls back to the Triton kernel for the whole step
    out, _ = IMPLEMENTATIONS["pallas"](q, new_kv, new_kv, cache, meta, scale=0.125, window=None, soft_cap=50.0)
    ref = reference_attention(q.astype(jnp.float32), cache, meta, scale=0.125, soft_cap=50.0)
    assert relative_error(out, ref, slice(None)) < 1e-2


@pytest.mark.slow
def test_engine_scores_a_long_prompt_through_the_mosaic_kernel(tmp_path, stories_dir, compile_cache, monkeypatch):
    """The runner with the split on (as on Hopper, interpreted here): a long prompt's prefill goes through the Mosaic
    kernel inside the compiled step and scores as the reference attention scores it; decode steps stay off it."""
    import shutil

    from conftest import ENGINE_ARGS, make_tiny_checkpoint
    from rtpjax import LLM, SamplingParams

    model = make_tiny_checkpoint("llama3", tmp_path / "llama3_hd64", head_dim=64, num_attention_heads=2,
                                 num_key_value_heads=1, num_hidden_layers=1)  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(stories_dir / name, model / name)
    args = dict(ENGINE_ARGS, max_num_batched_tokens=128, dtype="bfloat16", compilation_cache_dir=compile_cache,
                warmup=False)  # compile only the shapes these prompts use
    prompt = [int(t) for t in np.random.default_rng(5).integers(3, 256, 100)]
    scored = SamplingParams(prompt_logprobs=1, max_tokens=4, temperature=0, ignore_eos=True)
    want = LLM(str(model), attention_impl="reference", **args).generate([prompt], scored)[0]

    calls = []
    run = prefill_mosaic.prefill_attention
    monkeypatch.setattr(prefill_mosaic, "available", lambda: True)  # a Hopper GPU
    monkeypatch.setattr(prefill_mosaic, "MIN_TOKENS", 64)  # the 128-token step, not the 16-token decode steps
    monkeypatch.setattr(prefill_mosaic, "prefill_attention", lambda *a, **k: calls.append(1) or run(*a, **k))
    # One device: the interpreter's kernels on several CPU devices wait for each other in a host barrier, which can
    # hang on a small host (the split per tensor shard is the Triton kernel's shard_map, tested in
    # test_pallas_attention).
    got = LLM(str(model), attention_impl="pallas", mosaic_prefill=True, **args).generate([prompt], scored)[0]
    assert calls  # traced into the steps of >= 64 tokens (per layer)
    w, g = want.prompt_logprobs[1:], got.prompt_logprobs[1:]
    # Every prompt token's log-probability, and the best one at each position (a near tie may swap which token it
    # is): bfloat16 throughout.
    np.testing.assert_allclose([e[t] for e, t in zip(w, prompt[1:])], [e[t] for e, t in zip(g, prompt[1:])],
                               1e-2, 0.05)  # fmt: skip
    np.testing.assert_allclose([max(e.values()) for e in w], [max(e.values()) for e in g], 1e-2, 0.05)
    assert len(got.outputs[0].token_ids) == 4


def test_the_gpu_form_lowers_for_hopper():
    """The GPU form (register layouts, wgmma accumulators, transposed K), lowered for CUDA on this CPU: what the
    interpreter does not run still builds a Mosaic GPU kernel of bfloat16 wgmmas."""
    q, cache, meta = mixed_step([(128, 64)], 2, 1, 128, 16, jnp.bfloat16)
    step = prefill_mosaic.plan(meta, q.shape[0])
    f = jax.jit(lambda q, cache, tables, step: prefill_mosaic.prefill_attention(q, cache, tables, step, scale=0.1))
    text = f.trace(q, cache, meta.block_tables, step).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16" in text

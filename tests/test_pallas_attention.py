"""The Pallas ragged paged attention kernel (interpret mode on CPU) against the plain-jnp float32 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas import primitives as pallas_primitives

from rtpjax.kernels.reference import quantize, reference_attention, write_kv
from rtpjax.kernels.ragged_paged_attention import ragged_paged_attention
from rtpjax.runner.step_inputs import SeqChunk, build_step

BLOCK = 16


def make_case(rng, spec, kv_heads, group, head_dim, dtype, num_tokens, num_seqs, num_blocks=48):
    """spec: (new tokens, tokens already cached) per sequence; blocks handed out in random order."""
    free = list(rng.permutation(num_blocks))
    chunks = []
    for n, start in spec:
        table = [int(free.pop()) for _ in range(-(-(start + n) // BLOCK))]
        chunks.append(SeqChunk([0] * n, start, table))
    step = build_step(chunks, BLOCK, num_tokens=num_tokens, num_seqs=num_seqs, max_blocks=24)
    meta = jax.tree.map(jnp.asarray, step.meta)
    shape = (kv_heads, num_blocks, BLOCK, head_dim)
    q = jnp.asarray(rng.standard_normal((num_tokens, kv_heads * group, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal(shape), dtype)
    v = jnp.asarray(rng.standard_normal(shape), dtype)
    return q, (k, v), meta


def rel(out, ref):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert not np.isnan(out).any()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


SPECS = {
    "decode": [(1, 0), (1, 15), (1, 16), (1, 17), (1, 100), (1, 300)],  # contexts 1, at and across block edges
    "prefill": [(37, 0), (16, 0), (5, 0)],
    "mixed": [(1, 40), (20, 11), (1, 0), (33, 17), (1, 255), (9, 16)],
}


def test_interpret_mode_poisons_unwritten_outputs():
    # An element the kernel never writes would be NaN, which every comparison below rejects.
    assert jnp.isnan(pallas_primitives.uninitialized_value((), jnp.float32))


@pytest.mark.parametrize("case", sorted(SPECS))
@pytest.mark.parametrize("group, head_dim", [(1, 64), (3, 64), (4, 128), (8, 64), (2, 256)])
@pytest.mark.parametrize("splits", [1, 3])
def test_matches_reference_float32(case, group, head_dim, splits):
    rng = np.random.default_rng(hash((case, group, head_dim, splits)) % 2**32)
    q, cache, meta = make_case(rng, SPECS[case], 2, group, head_dim, jnp.float32, num_tokens=96, num_seqs=8)
    kw = dict(scale=head_dim**-0.5)
    out = ragged_paged_attention(q, cache, meta, num_splits=splits, interpret=True, **kw)
    assert rel(out, reference_attention(q, cache, meta, **kw)) < 1e-5
    assert np.all(np.asarray(out)[int(meta.query_start_loc[-1]) :] == 0)  # padding tokens


@pytest.mark.parametrize("window, soft_cap", [(7, None), (None, 20.0), (24, 5.0)])
def test_window_and_soft_cap(window, soft_cap):
    rng = np.random.default_rng(7)
    q, cache, meta = make_case(rng, SPECS["mixed"], 2, 4, 64, jnp.float32, num_tokens=96, num_seqs=8)
    kw = dict(scale=0.125, window=window, soft_cap=soft_cap)
    for splits in (1, 2):
        out = ragged_paged_attention(q, cache, meta, num_splits=splits, interpret=True, **kw)
        assert rel(out, reference_attention(q, cache, meta, **kw)) < 1e-5


@pytest.mark.parametrize("block_q, pages_per_tile", [(1, 1), (4, 2), (16, 4)])
def test_tilings(block_q, pages_per_tile):
    rng = np.random.default_rng(8)
    q, cache, meta = make_case(rng, SPECS["mixed"], 2, 2, 64, jnp.float32, num_tokens=96, num_seqs=8)
    out = ragged_paged_attention(q, cache, meta, scale=0.125, block_q=block_q, pages_per_tile=pages_per_tile,
                                 interpret=True)  # fmt: skip
    assert rel(out, reference_attention(q, cache, meta, scale=0.125)) < 1e-5


def test_bfloat16_error_bound():
    rng = np.random.default_rng(9)
    q, cache, meta = make_case(rng, SPECS["mixed"], 2, 4, 128, jnp.bfloat16, num_tokens=96, num_seqs=8)
    out = ragged_paged_attention(q, cache, meta, scale=128**-0.5, interpret=True)
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), (q, cache))
    err = rel(out, reference_attention(*f32, meta, scale=128**-0.5))
    print(f"bf16 relative error {err:.2e}")
    assert err < 1e-2


@pytest.mark.parametrize("dtype, bound, unpack", [(jnp.int8, 2e-2, "convert"), (jnp.int8, 2e-2, "asm"),
                                                   (jnp.float8_e4m3fn, 6e-2, "convert")])  # fmt: skip
def test_quantized_cache_error_against_bf16(dtype, bound, unpack):
    rng = np.random.default_rng(10)
    q, (k, v), meta = make_case(rng, SPECS["mixed"], 2, 4, 128, jnp.bfloat16, num_tokens=96, num_seqs=8)
    (kq, ks), (vq, vs) = quantize(k, dtype), quantize(v, dtype)
    quant = (kq, vq, ks, vs)
    out = ragged_paged_attention(q, quant, meta, scale=128**-0.5, kv_unpack=unpack, interpret=True)
    # The kernel computes exactly what the dequantizing reference computes ...
    assert rel(out, reference_attention(q.astype(jnp.float32), quant, meta, scale=128**-0.5)) < 1e-2
    # ... and loses this much against the unquantized bf16 cache.
    err = rel(out, reference_attention(q.astype(jnp.float32), (k, v), meta, scale=128**-0.5))
    print(f"{jnp.dtype(dtype).name} KV cache: relative error {err:.2e} against bf16")
    assert err < bound


def test_fp8_cache_of_small_values_over_a_long_context():
    # The fp8 path runs its dots in float16: probabilities times small value scales (amax / 448) would underflow
    # float16 if multiplied before the cast (1.1e-2 error here); the tile's largest scale is applied after the dot.
    from rtpjax.kernels.metadata import AttentionMetadata

    rng = np.random.default_rng(15)
    ctx, dim = 4096, 64
    shape = (1, ctx // BLOCK, BLOCK, dim)
    k = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    v = jnp.asarray(0.005 * rng.standard_normal(shape), jnp.float32)
    q = jnp.asarray(rng.standard_normal((1, 4, dim)), jnp.float32)
    k = k.at[0, 7, 3].set(q[0, 0] / jnp.linalg.norm(q[0, 0]) * dim**0.5)  # one sharp peak among many small weights
    meta = AttentionMetadata(jnp.asarray([0, 1], jnp.int32), jnp.asarray([ctx], jnp.int32),
                             jnp.arange(ctx // BLOCK, dtype=jnp.int32)[None], jnp.zeros(1, jnp.int32))  # fmt: skip
    (kq, ks), (vq, vs) = quantize(k, jnp.float8_e4m3fn), quantize(v, jnp.float8_e4m3fn)
    cache = (kq, vq, ks, vs)
    out = ragged_paged_attention(q.astype(jnp.bfloat16), cache, meta, scale=dim**-0.5, interpret=True)
    assert rel(out, reference_attention(q, cache, meta, scale=dim**-0.5)) < 5e-3


def test_int8_cache_by_ptx_lowers_to_triton(triton_verified):
    """kv_unpack="asm" (int8 tiles to float16 pairs by inline PTX) builds a valid Triton module for the GPU; an unknown
    unpacking is refused."""
    rng = np.random.default_rng(11)
    q, (k, v), meta = make_case(rng, SPECS["mixed"], 2, 4, 128, jnp.bfloat16, num_tokens=96, num_seqs=8)
    (kq, ks), (vq, vs) = quantize(k, jnp.int8), quantize(v, jnp.int8)
    fn = jax.jit(lambda q, c: ragged_paged_attention(q, c, meta, scale=128**-0.5, kv_unpack="asm"))
    text = fn.trace(q, (kq, vq, ks, vs)).lower(lowering_platforms=("cuda",)).as_text()
    assert "ragged_paged_attention" in text and "prmt.b32" in text and triton_verified == [True]
    with pytest.raises(ValueError, match="kv_unpack 'lut'"):
        ragged_paged_attention(q, (kq, vq, ks, vs), meta, scale=1.0, kv_unpack="lut", interpret=True)


@pytest.mark.parametrize("capability, dtype, unpack, ptx_wanted", [
    ((9, 0), jnp.bfloat16, None, True), ((8, 0), jnp.float16, None, True), (None, jnp.bfloat16, None, False),
    ((9, 0), jnp.float32, None, False), ((9, 0), jnp.bfloat16, "convert", False)])  # fmt: skip
def test_int8_cache_takes_the_ptx_wherever_the_gpu_runs_it(monkeypatch, capability, dtype, unpack, ptx_wanted):
    """With no kv_unpack named, an int8 cache's tiles go by the PTX for 16-bit queries on any CUDA GPU (float16 pairs
    need sm_53); by conversion without one, for float32 queries (kept in float32), or when named."""
    from rtpjax.kernels import ptx

    monkeypatch.setattr(ptx, "compute_capability", lambda: capability)
    rng = np.random.default_rng(12)
    q, (k, v), meta = make_case(rng, SPECS["mixed"], 2, 4, 128, dtype, num_tokens=96, num_seqs=8)
    (kq, ks), (vq, vs) = quantize(k, jnp.int8), quantize(v, jnp.int8)
    fn = jax.jit(lambda q, c: ragged_paged_attention(q, c, meta, scale=128**-0.5, kv_unpack=unpack))
    text = fn.trace(q, (kq, vq, ks, vs)).lower(lowering_platforms=("cuda",)).as_text()
    assert ("prmt.b32" in text) == ptx_wanted


def test_quantized_write_roundtrip():
    rng = np.random.default_rng(11)
    cache = (jnp.zeros((2, 4, BLOCK, 64), jnp.int8), jnp.zeros((2, 4, BLOCK, 64), jnp.int8),
             jnp.ones((2, 4, BLOCK)), jnp.ones((2, 4, BLOCK)))  # fmt: skip
    k = jnp.asarray(rng.standard_normal((5, 2, 64)), jnp.float32)
    slots = jnp.asarray([3, 17, 18, -1, 40], jnp.int32)
    kq, vq, ks, vs = write_kv(cache, k, 2 * k, slots)
    back = (kq.astype(jnp.float32) * ks[..., None]).reshape(2, -1, 64)
    for i, slot in enumerate([3, 17, 18, None, 40]):
        if slot is not None:
            np.testing.assert_allclose(back[:, slot], k[i].T.T, atol=float(jnp.abs(k[i]).max()) / 127)
    assert int(jnp.count_nonzero(kq)) > 0 and float(ks.reshape(2, -1)[0, 0]) == 1.0  # untouched slots stay put


def test_unsupported_head_dim_is_refused():
    from rtpjax.kernels.attention import resolve_impl

    rng = np.random.default_rng(12)
    q, cache, meta = make_case(rng, SPECS["decode"], 2, 4, 64, jnp.float32, num_tokens=8, num_seqs=8)
    with pytest.raises(ValueError, match="head_dim a power of two >= 16"):
        ragged_paged_attention(q[..., :8], (cache[0][..., :8], cache[1][..., :8]), meta, scale=1.0, interpret=True)
    with pytest.raises(ValueError, match="this model has 8"):
        resolve_impl("pallas", 8)
    assert resolve_impl("auto", 8) == "reference" and resolve_impl("pallas", 64) == "pallas"


@pytest.mark.parametrize("case", ["decode", "mixed"])
def test_step_plan_gives_the_same_output(case):
    # The query blocks made once per step (plan_step) are the ones each call would make; an explicit block_q, or a
    # plan made for other shapes, is not silently used with the wrong blocks.
    import dataclasses

    from rtpjax.kernels.attention import plan_step

    rng = np.random.default_rng(13)
    q, cache, meta = make_case(rng, SPECS[case], 2, 4, 64, jnp.float32, num_tokens=96, num_seqs=8)
    kw = dict(scale=0.125, interpret=True)
    planned = plan_step(dataclasses.replace(meta, impl="pallas"), 96, 8, 2)
    assert set(planned.plan) == {"query_blocks"}
    expected = ragged_paged_attention(q, cache, meta, **kw)
    assert np.array_equal(np.asarray(ragged_paged_attention(q, cache, planned, **kw)), np.asarray(expected))
    tiled = ragged_paged_attention(q, cache, planned, block_q=1, **kw)
    assert rel(tiled, reference_attention(q, cache, meta, scale=0.125)) < 1e-5
    with pytest.raises(ValueError, match="query blocks"):
        ragged_paged_attention(q[:48], cache, planned, **kw)
    # The reference's own plan (token layout) gives it the same output too.
    ref_planned = plan_step(meta, 96, 8, 2)
    assert set(ref_planned.plan) == {"token_layout"}
    np.testing.assert_array_equal(reference_attention(q, cache, ref_planned, scale=0.125),
                                  reference_attention(q, cache, meta, scale=0.125))  # fmt: skip


def test_layers_do_not_rebuild_the_step_plan(tiny_checkpoints):
    # The decoder makes the kernel's query blocks once per step: no layer's traced body rebuilds them (their cumulative
    # sum over the sequences is the signature), which on the GPU saves four small kernels per layer.
    import dataclasses

    from rtpjax.loading.loader import random_params
    from rtpjax.models import load_config
    from rtpjax.models.decoder import forward

    cfg, family = load_config(tiny_checkpoints["llama3"])
    params = random_params(cfg, family)
    rng = np.random.default_rng(14)
    group = cfg.num_heads // cfg.num_kv_heads
    _, cache, meta = make_case(rng, SPECS["mixed"], cfg.num_kv_heads, group, cfg.head_dim, jnp.float32, 96, 8)
    meta = dataclasses.replace(meta, impl="pallas")
    tokens = jnp.zeros(96, jnp.int32)
    jaxpr = jax.make_jaxpr(lambda t, c, m: forward(params, cfg, t, t, c, m))(tokens, [cache] * cfg.num_layers, meta)
    layers = [e for e in jaxpr.eqns if e.params.get("name") == "decoder_layer"]
    assert len(layers) == cfg.num_layers
    assert any("cumsum" in str(e) for e in jaxpr.eqns if all(e is not layer for layer in layers))  # made once
    assert not any("cumsum" in str(layer.params["jaxpr"]) for layer in layers)


@pytest.mark.slow
def test_engine_runs_the_kernel_through_one_switch(tiny_checkpoints, stories_dir, tmp_path, compile_cache):
    import shutil

    from conftest import ENGINE_ARGS
    from rtpjax import LLM, SamplingParams

    model = tmp_path / "llama3"  # head_dim 16; borrow a tokenizer (the prompts stay inside its 256-token vocabulary)
    shutil.copytree(tiny_checkpoints["llama3"], model)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(stories_dir / name, model / name)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[1], [1, 45, 39, 200]]
    args = dict(ENGINE_ARGS, max_num_batched_tokens=16, compilation_cache_dir=compile_cache, warmup=False)
    reference = LLM(str(model), attention_impl="reference", **args)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    pallas = LLM(str(model), attention_impl="pallas", **args)
    assert pallas.engine.runner.attention_impl == "pallas" and pallas.engine.runner.attention_mesh is None
    assert [o.outputs[0].token_ids for o in pallas.generate(prompts, params)] == expected
    split = LLM(str(model), attention_impl="pallas", tensor_parallel_size=2, one_row_decode=True,
                **args)  # the kernel per tensor shard; a lone stream's decode steps as one row (a GPU's default)
    assert split.engine.runner.attention_mesh.shape["tensor"] == 2 and split.engine.runner.token_buckets[0] == 1
    assert [o.outputs[0].token_ids for o in split.generate(prompts, params)] == expected
    assert split.generate([prompts[1]], params)[0].outputs[0].token_ids == expected[1]
    # 8 devices for 4 KV heads: each device keeps a copy of the one KV head its 1 query head reads.
    spread = LLM(str(model), attention_impl="pallas", tensor_parallel_size=8, **args)
    assert {s.data.shape[0] for s in spread.engine.runner.cache[0][0].addressable_shards} == {1}
    assert [o.outputs[0].token_ids for o in spread.generate(prompts, params)] == expected
    scored = SamplingParams(prompt_logprobs=1, max_tokens=1)  # the prompt scored over a scratch cache split the same way
    long_prompt = [int(t) for t in np.random.default_rng(3).integers(3, 256, 70)]  # more blocks than cache heads
    for llm in (split, spread):
        want, got = (m.generate([prompts[1], long_prompt], scored) for m in (reference, llm))
        for w, g in zip(want, got):
            w, g = w.prompt_logprobs[1:], g.prompt_logprobs[1:]
            assert [list(e) for e in w] == [list(e) for e in g]
            values = [[v for e in entries for v in e.values()] for entries in (w, g)]
            np.testing.assert_allclose(*values, atol=1e-4)
    for kv in ("int8", "fp8"):
        quant = LLM(str(model), attention_impl="pallas", kv_cache_dtype=kv, **args)
        assert len(quant.engine.runner.cache[0]) == 4
        quant_ref = LLM(str(model), attention_impl="reference", kv_cache_dtype=kv, **args)
        # The kernel over a quantized cache gives the dequantizing reference's tokens.
        got = [o.outputs[0].token_ids for o in quant.generate(prompts, params)]
        assert got == [o.outputs[0].token_ids for o in quant_ref.generate(prompts, params)]
        # The step's K/V written by the Pallas kernel (chosen for steps of >= 128 tokens; forced for these small ones):
        # the same tokens as XLA's scatter gives.
        written = LLM(str(model), attention_impl="pallas", kv_cache_dtype=kv, tensor_parallel_size=2,
                      kv_write="pallas", **args)  # fmt: skip
        assert [o.outputs[0].token_ids for o in written.generate(prompts, params)] == got


def test_speculation_through_the_kernel_equals_plain_decoding(tiny_checkpoints, stories_dir, tmp_path, compile_cache,
                                                              monkeypatch):  # fmt: skip
    """Verify steps give the kernel several query rows per sequence over a cache holding rejected drafts' K/V past the
    context (the GPU's path; the speculation tests run the reference attention): greedy tokens equal plain decoding at
    every acceptance length, drafts replayed from the plain run so each verify step yields exactly that many."""
    import shutil

    from conftest import ENGINE_ARGS
    from rtpjax import LLM, SamplingParams
    from rtpjax.benchmarks.spec_bench import ReplayProposer
    from rtpjax.runner import model_runner

    model = tmp_path / "llama3"
    shutil.copytree(tiny_checkpoints["llama3"], model)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(stories_dir / name, model / name)
    llm = LLM(str(model), attention_impl="pallas", speculative_config={"method": "ngram", "num_speculative_tokens": 4},
              one_row_decode=True, **dict(ENGINE_ARGS, compilation_cache_dir=compile_cache, warmup=False))  # fmt: skip
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, 250, n).tolist() for n in (5, 30)]
    plain, spec = (SamplingParams(temperature=0, max_tokens=24, speculative=s, ignore_eos=True) for s in (False, True))
    picked, pick = [], model_runner.pick
    monkeypatch.setattr(model_runner, "pick", lambda sizes, n: picked.append(pick(sizes, n)) or picked[-1])
    want = {tuple(p): llm.generate([p], plain)[0].outputs[0].token_ids for p in prompts}
    assert picked.count(1) >= 2 * 20  # plain decoding of a lone stream ran as one row
    counters = llm.engine.speculator.counters
    for length in (2, 4):
        llm.engine.speculator.proposer = ReplayProposer(want, length, 256)
        accepted, drafts = counters.num_accepted_tokens, counters.num_drafts
        for p in prompts:
            assert llm.generate([p], spec)[0].outputs[0].token_ids == want[tuple(p)]
        steps = counters.num_drafts - drafts  # the last steps of a run may hold fewer drafts than length - 1
        assert 0.8 * (length - 1) * steps <= counters.num_accepted_tokens - accepted <= (length - 1) * steps


def test_decode_splits_give_int8_caches_two_at_two_to_four_pairs_per_sm():
    from rtpjax.kernels.ragged_paged_attention import decode_splits

    def splits(seqs: int, dtype, kv_heads: int = 8, block_q: int = 4) -> int:  # a decode step: one token a sequence
        return decode_splits(kv_heads * (seqs // block_q + seqs), kv_heads * seqs, dtype)

    assert [splits(s, jnp.int8) for s in (32, 64, 128)] == [1, 2, 1]  # 256 / 512 / 1024 pairs on 132 SMs
    assert [splits(s, d) for s in (32, 64, 128) for d in (jnp.bfloat16, jnp.float8_e4m3fn)] == [1] * 6
    assert splits(4, jnp.int8) == splits(4, jnp.bfloat16) == 12  # few pairs: long contexts split to fill the GPU


def test_one_row_decode_is_on_by_default_only_on_a_gpu_without_pipeline_stages():
    from rtpjax.runner.model_runner import one_row

    assert one_row(None, False, "gpu") and not one_row(None, True, "gpu") and not one_row(None, False, "cpu")
    assert not one_row(None, False, "gpu", quantized=True) and one_row(True, False, "gpu", quantized=True)
    assert one_row(True, False, "cpu") and not one_row(False, False, "gpu")
    with pytest.raises(ValueError, match="--one-row-decode does not work with --pipeline-parallel-size"):
        one_row(True, True, "gpu")


def test_one_row_decode_gives_the_padded_steps_tokens(tiny_checkpoints, stories_dir, tmp_path, compile_cache,
                                                      monkeypatch):  # fmt: skip
    """`one_row_decode`: a lone sequence's decode runs as a 1-token step through the kernel (not padded to 16 rows),
    with the same greedy tokens as the padded steps, and the extra bucket compiled at warm-up, none after."""
    import shutil

    from conftest import ENGINE_ARGS
    from rtpjax import LLM, SamplingParams
    from rtpjax.runner import model_runner
    from rtpjax.runner.model_runner import CompileCounter

    model = tmp_path / "llama3"
    shutil.copytree(tiny_checkpoints["llama3"], model)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        shutil.copy(stories_dir / name, model / name)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompts = [[1, 45, 39, 200], [1, 7]]
    args = dict(ENGINE_ARGS, max_num_batched_tokens=16, compilation_cache_dir=compile_cache, attention_impl="pallas")
    padded = LLM(str(model), warmup=False, one_row_decode=False, **args)
    assert padded.engine.runner.token_buckets == [16]
    want = [padded.generate([p], params)[0].outputs[0].token_ids for p in prompts]
    want_both = [o.outputs[0].token_ids for o in padded.generate(prompts, params)]
    one_row = LLM(str(model), one_row_decode=True, **args)
    assert one_row.engine.runner.token_buckets == [1, 16]
    picked, pick = [], model_runner.pick
    monkeypatch.setattr(model_runner, "pick", lambda sizes, n: picked.append(pick(sizes, n)) or picked[-1])
    before = CompileCounter.count
    assert [one_row.generate([p], params)[0].outputs[0].token_ids for p in prompts] == want
    assert [o.outputs[0].token_ids for o in one_row.generate(prompts, params)] == want_both
    assert CompileCounter.count == before, f"{CompileCounter.count - before} compilations after warm-up"
    assert picked.count(1) >= 2 * 9 and 16 in picked  # each lone stream's decode steps ran as one row

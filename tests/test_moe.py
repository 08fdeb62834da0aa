"""Grouped experts: exact against the dense all-experts path and transformers, expert/tensor parallel on the 8-device
CPU mesh, FLOPs that scale with k / E, the expert load the step reports and the static placement map."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kv import kv_cache
from rtpjax.loading.model_source import load_model
from rtpjax.models import moe
from rtpjax.parallel.sharding import make_mesh
from rtpjax.runner.step_inputs import SeqChunk, build_step
from test_hf_parity import hf_logits, hf_model, ragged_prefill, rel_err

BLOCK = 4


def random_experts(experts=8, hidden=32, inter=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (experts, inter, hidden)) * 0.3, jax.random.normal(ks[1], (experts, inter, hidden)) * 0.3,
            jax.random.normal(ks[2], (experts, hidden, inter)) * 0.3)  # fmt: skip


@pytest.mark.parametrize("tile, skew", [(1, False), (4, True), (16, False)])
def test_grouped_matches_dense_on_any_routing(tile, skew):
    """Uniform routing, and every token on the same two experts (the worst case the tile count is sized for)."""
    w = random_experts()
    rng = np.random.default_rng(tile)
    x = jnp.asarray(rng.standard_normal((13, 32)), jnp.float32)
    ids = np.stack([rng.permutation(8)[:3] for _ in range(13)]) if not skew else np.tile([5, 2, 7], (13, 1))
    weights = jnp.asarray(rng.random((13, 3)), jnp.float32)
    ids = jnp.asarray(ids, jnp.int32)
    want = moe.dense_experts(x, ids, weights, *w)
    got = jax.jit(moe.grouped_experts, static_argnums=(6,))(x, ids, weights, *w, tile)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The same rows from a device holding experts 4..7 only: the others' assignments contribute nothing.
    part = moe.grouped_experts(x, ids, weights, *(a[4:] for a in w), tile, first=4)
    np.testing.assert_allclose(part, moe.dense_experts(x, ids, weights, *(a[4:] for a in w), first=4), rtol=1e-5,
                               atol=1e-5)  # fmt: skip


def with_impl(cfg, impl):
    return dataclasses.replace(cfg, moe_impl=impl)


def test_logits_match_transformers(tiny_checkpoints):
    """Every implementation against one transformers run (loaded and run once for all; pallas interpreted)."""
    path = tiny_checkpoints["qwen3_moe"]
    cfg, family, params = load_model(path)
    model = hf_model(path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 17, 1, 11)]
    want = [hf_logits(model, p) for p in prompts]
    for impl in ("grouped", "dense", "auto", "pallas"):
        ours = ragged_prefill(with_impl(cfg, impl), family, params, prompts, num_tokens=40)
        assert max(rel_err(o, w) for o, w in zip(ours, want)) <= 1e-4, impl


def mesh_logits(path, mesh, impl, hlo=None):
    cfg, family, params = load_model(path, mesh=mesh)
    cfg = with_impl(cfg, impl)
    cache = kv_cache.allocate(cfg, 12, BLOCK, mesh=mesh)
    rng = np.random.default_rng(4)
    chunks = [SeqChunk(rng.integers(3, cfg.vocab_size, n).tolist(), 0, list(range(i * 4, i * 4 + 4))) for i, n in
              enumerate((9, 3, 14))]  # fmt: skip
    inputs = build_step(chunks, BLOCK, num_tokens=32, num_seqs=4)
    fn = jax.jit(family.forward, static_argnames=("cfg", "expert_load"))
    args = (params, cfg, inputs.tokens, inputs.positions, cache, inputs.meta)
    if hlo is not None:
        hlo.append(fn.lower(*args, expert_load=True).compile().as_text())
    logits, _, load = fn(*args, expert_load=True)
    return np.asarray(logits), np.asarray(load)


@pytest.fixture(scope="module")
def single_device_moe(tiny_checkpoints):
    """The reference the mesh layouts are compared with, computed once."""
    return mesh_logits(tiny_checkpoints["qwen3_moe"], make_mesh(devices=jax.devices()[:1]), "dense")


@pytest.mark.parametrize("impl, axes", [("grouped", dict(expert=4, tensor=2)), ("grouped", dict(expert=8)),
                                        ("dense", dict(expert=2, tensor=2, data=2)),
                                        ("pallas", dict(expert=4, tensor=2))])  # fmt: skip
def test_expert_parallel_gives_single_device_logits(impl, axes, tiny_checkpoints, single_device_moe):
    path = tiny_checkpoints["qwen3_moe"]
    single, single_load = single_device_moe
    hlo = []
    sharded, load = mesh_logits(path, make_mesh(**axes), impl, hlo)
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5 * np.abs(single).max())
    np.testing.assert_array_equal(load, single_load)
    assert "all-reduce" in hlo[0]
    assert "all-gather" not in hlo[0]  # no device fetches another's experts: only the partial outputs are summed


def moe_flops(tokens, experts, top_k, impl, hidden=64, inter=32):
    w = random_experts(experts, hidden, inter)
    x = jnp.zeros((tokens, hidden))
    ids, weights = jnp.zeros((tokens, top_k), jnp.int32), jnp.zeros((tokens, top_k))
    fn = jax.jit(lambda *a: moe.run_experts(dict(w_gate=a[3], w_up=a[4], w_down=a[5]), *a[:3], impl))
    return fn.lower(x, ids, weights, *w).compile().cost_analysis()["flops"] / tokens


@pytest.mark.parametrize("tokens", [1, 4])
def test_flops_per_token_scale_with_k_over_e(tokens):
    """XLA's cost analysis of the expert block: the dense path's FLOPs per token stay at E experts' worth whatever k;
    the grouped path's are k experts' worth (decode-sized steps: one row per tile, no padding)."""
    experts, one_expert = 16, 6 * 256 * 128
    dense = moe_flops(tokens, experts, 1, "dense", 256, 128)
    assert dense >= experts * one_expert
    base = moe_flops(tokens, experts, 1, "grouped", 256, 128)
    assert one_expert <= base <= 1.6 * one_expert  # XLA counts ~1.5 experts' worth per routed row
    for k in (2, 4):
        grouped = moe_flops(tokens, experts, k, "grouped", 256, 128)
        assert grouped == pytest.approx(k * base, rel=0.02) and grouped < 1.6 * dense * k / experts
    assert moe_flops(tokens, 2 * experts, 2, "grouped", 256, 128) == pytest.approx(2 * base, rel=0.02)  # not E


def test_prefill_flops_are_a_fraction_of_dense():
    """A prefill-sized step of a Qwen3-30B-A3B-like router (128 experts, top-8, 2048 tokens): tiles of 256 rows, padded
    for the worst case, still compute under a fifth of the dense FLOPs (k / E = 1/16)."""
    grouped, dense = moe_flops(2048, 128, 8, "grouped", 32, 16), moe_flops(2048, 128, 8, "dense", 32, 16)
    assert grouped < dense / 5, grouped / dense


def test_auto_picks_grouped_for_few_tokens_and_dense_when_all_experts_are_busy():
    # Qwen3-30B-A3B: 128 experts, top-8.
    assert moe.plan(8, 128, 1, "auto") == 1  # decode at batch 1: 8 single-row tiles, 8 expert reads
    assert moe.plan(32 * 8, 128, 32, "auto") == 0  # batch 32 touches nearly every expert: read each once
    assert moe.plan(2048 * 8, 128, 2048, "auto") >= 64  # prefill: big tiles, a fraction of the dense FLOPs
    assert moe.plan(32 * 8, 128, 32, "grouped") > 0 and moe.plan(8, 128, 1, "dense") == 0


def test_expert_load_counts_real_tokens_only(tiny_checkpoints):
    cfg, family, params = load_model(tiny_checkpoints["qwen3_moe"])
    prompts = [[5, 9, 33, 41, 7], [100, 3, 17]]
    cache = kv_cache.allocate(cfg, 8, BLOCK)
    inputs = build_step([SeqChunk(p, 0, [2 * i, 2 * i + 1]) for i, p in enumerate(prompts)], BLOCK, num_tokens=16,
                        num_seqs=4)  # fmt: skip
    _, _, load = family.forward(params, cfg, inputs.tokens, inputs.positions, cache, inputs.meta, expert_load=True)
    load = np.asarray(load)
    assert load.shape == (sum(cfg.moe_layers), cfg.num_experts)
    assert (load.sum(axis=1) == 8 * cfg.num_experts_per_tok).all()  # 8 real tokens, 8 padding rows not counted


@pytest.fixture(scope="module")
def placed_engine(tiny_checkpoints, tmp_path_factory):
    """EP=4 on the 8-device mesh (EP x TP is checked at the logits above), grouped experts, both MoE layers' experts
    reordered."""
    from rtpjax import LLM

    placement = tmp_path_factory.mktemp("placement") / "placement.json"
    placement.write_text(json.dumps({"0": list(range(7, -1, -1)), "2": [1, 0, 3, 2, 5, 4, 7, 6]}))
    return LLM(str(tiny_checkpoints["qwen3_moe"]), skip_tokenizer_init=True,
               expert_parallel_size=4, moe_impl="grouped", expert_placement=str(placement), max_num_seqs=2,
               max_num_batched_tokens=8, max_model_len=32, block_size=4, warmup=False)  # fmt: skip


def test_engine_with_expert_parallelism_and_placement(placed_engine, tiny_checkpoints):
    """Greedy tokens as the single-device model function gives them; the load reported per logical expert is the
    routing of the unplaced model (counted by hand from its forward)."""
    from rtpjax import SamplingParams
    from rtpjax.runner.greedy import greedy_tokens

    cfg, family, params = load_model(tiny_checkpoints["qwen3_moe"])
    prompts = [[5, 9, 33, 41, 7, 2, 200], [100, 3, 17]]
    outs = placed_engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == list(greedy_tokens(params, cfg, family, prompt, 6, block_size=BLOCK))
    load = np.asarray(placed_engine.engine.stats().expert_load)
    assert load.shape == (2, 8) and (load.sum(axis=1) == (7 + 3 + 2 * 5) * 2).all()  # prompts + 5 decode inputs each
    # the same tokens through the unplaced model: its per-expert counts are the logical counts
    want = np.zeros((2, 8), np.int64)
    for prompt, out in zip(prompts, outs):
        ids = prompt + out.outputs[0].token_ids[:-1]
        cache = kv_cache.allocate(cfg, 8, BLOCK)
        inputs = build_step([SeqChunk(ids, 0, list(range(8)))], BLOCK)
        want += np.asarray(family.forward(params, cfg, inputs.tokens, inputs.positions, cache, inputs.meta,
                                          expert_load=True)[2])  # fmt: skip
    np.testing.assert_array_equal(load, want)


def test_placement_errors_name_the_problem(tiny_checkpoints, tmp_path):
    from rtpjax.models import load_config

    cfg, _ = load_config(tiny_checkpoints["qwen3_moe"])
    bad = tmp_path / "p.json"
    for content, message in [("{", "cannot read it as JSON"), ('{"1": [0,1,2,3,4,5,6,7]}', "'1' is not a MoE layer"),
                             ('{"0": [0,0,1,2,3,4,5,6]}', "permutation of 0..7")]:  # fmt: skip
        bad.write_text(content)
        with pytest.raises(ValueError, match=message):
            moe.read_placement(str(bad), cfg)


def test_mesh_options_are_checked_against_model_and_devices(tiny_checkpoints, caplog):
    from rtpjax.models import load_config
    from rtpjax.parallel.mesh import engine_mesh

    moe_cfg, _ = load_config(tiny_checkpoints["qwen3_moe"])
    dense_cfg, _ = load_config(tiny_checkpoints["llama3"])
    with pytest.raises(ValueError, match="needs 16 devices; 8 are visible"):
        engine_mesh(moe_cfg, tensor=4, expert=4)
    with pytest.raises(ValueError, match="LlamaForCausalLM has no experts"):
        engine_mesh(dense_cfg, expert=2)
    with pytest.raises(ValueError, match="8 experts do not split evenly over 3"):
        engine_mesh(moe_cfg, expert=3)
    six = dataclasses.replace(dense_cfg, num_heads=12, num_kv_heads=6)
    with caplog.at_level("INFO", logger="rtpjax"):
        mesh = engine_mesh(six, tensor=4)
    assert dict(mesh.shape) == dict(data=1, expert=1, tensor=4)
    assert "6 KV heads on 4 tensor-parallel devices" in caplog.text and "12 heads, 3 per device" in caplog.text

"""On an 8-device CPU mesh the model gives the single-device logits, and each device holds only its weight shards."""

import re

import jax
import numpy as np
import pytest

from rtpjax.kv import kv_cache
from rtpjax.runner.greedy import jit_forward
from rtpjax.loading.model_source import load_model
from rtpjax.models import decoder
from rtpjax.parallel.sharding import make_mesh
from rtpjax.runner.step_inputs import SeqChunk, build_step

BLOCK = 4


def logits_on(mesh, path, impl="reference", hlo=None):
    cfg, family, params = load_model(path, mesh=mesh)
    cache = kv_cache.allocate(cfg, 12, BLOCK, mesh=mesh)
    rng = np.random.default_rng(4)
    chunks = [SeqChunk(rng.integers(3, cfg.vocab_size, n).tolist(), 0, list(range(i * 4, i * 4 + 4))) for i, n in
              enumerate((9, 3, 14))]  # fmt: skip
    inputs = build_step(chunks, BLOCK, num_tokens=32, num_seqs=4, impl=impl, mesh=mesh if impl == "pallas" else None)
    args = (params, cfg, inputs.tokens, inputs.positions, cache, inputs.meta)
    if hlo is not None:
        hlo.append(jit_forward(family).lower(*args).compile().as_text())
    logits, cache = jit_forward(family)(*args)
    return cfg, params, cache, np.asarray(logits)


@pytest.mark.parametrize(
    "name, axes",
    [("llama3", dict(tensor=4, data=2)), ("qwen2", dict(tensor=4, data=2)), ("qwen3_moe", dict(expert=4, tensor=2)),
     ("llama_tied", dict(tensor=4, data=2))],  # 2 KV heads on 4 tensor devices
)
def test_mesh_matches_single_device(name, axes, tiny_checkpoints):
    assert jax.device_count() == 8
    _, _, _, single = logits_on(make_mesh(devices=jax.devices()[:1]), tiny_checkpoints[name])
    mesh = make_mesh(**axes)
    cfg, params, cache, sharded = logits_on(mesh, tiny_checkpoints[name])
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5 * np.abs(single).max())

    tp, ep = mesh.shape["tensor"], mesh.shape["expert"]
    flat = decoder.flatten(params)
    expected = {
        "embed": (cfg.vocab_size // tp, cfg.hidden_size),
        "layers.0.attn.wq": (cfg.num_heads * cfg.head_dim // tp, cfg.hidden_size),
        "layers.0.attn.wo": (cfg.hidden_size, cfg.num_heads * cfg.head_dim // tp),
        "layers.0.input_norm": (cfg.hidden_size,),
    }
    if cfg.is_moe_layer(0):
        expected["layers.0.moe.w_gate"] = (cfg.num_experts // ep, cfg.moe_intermediate_size // tp, cfg.hidden_size)
        expected["layers.0.moe.w_down"] = (cfg.num_experts // ep, cfg.hidden_size, cfg.moe_intermediate_size // tp)
        expected["layers.1.mlp.w_up"] = (cfg.intermediate_size // tp, cfg.hidden_size)  # mlp_only_layers=[1]
    else:
        expected["layers.0.mlp.w_up"] = (cfg.intermediate_size // tp, cfg.hidden_size)
        if not cfg.tie_word_embeddings:
            expected["lm_head"] = (cfg.vocab_size // tp, cfg.hidden_size)
    kv_split = cfg.num_kv_heads % tp == 0  # else k/v projections are whole on every device, KV heads copied
    expected["layers.0.attn.wk"] = (cfg.num_kv_heads * cfg.head_dim // (tp if kv_split else 1), cfg.hidden_size)
    if cfg.attention_bias:
        expected["layers.0.attn.bk"] = (cfg.num_kv_heads * cfg.head_dim // tp,)
    for path, shard_shape in expected.items():
        shards = flat[path].addressable_shards
        assert len(shards) == 8
        assert all(s.data.shape == shard_shape for s in shards), (path, [s.data.shape for s in shards])
    k, _ = cache[0]
    assert {s.data.shape[0] for s in k.addressable_shards} == {cfg.num_kv_heads // tp if kv_split else 1}


@pytest.mark.parametrize("tensor", [2, 4, 8])
def test_kernel_runs_per_tensor_shard(tensor, tiny_checkpoints):
    # XLA cannot split a kernel call: left to it, each layer gathers q and the KV cache onto every device (4
    # all-gathers per layer). The Pallas attention runs under shard_map instead: the tensor-parallel step's only
    # collectives are the row-parallel all-reduces, the cache is split by KV heads, and the logits are the single
    # device's. With 8 devices for 4 KV heads each device holds a copy of the one KV head its query head reads.
    _, _, _, single = logits_on(make_mesh(devices=jax.devices()[:1]), tiny_checkpoints["llama3"])
    hlo = []
    cfg, _, cache, sharded = logits_on(make_mesh(tensor=tensor), tiny_checkpoints["llama3"], "pallas", hlo)
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5 * np.abs(single).max())
    assert not re.search(r"all-gather|all-to-all|collective-permute", hlo[0])
    k = cache[0][0]
    assert k.shape[0] == max(cfg.num_kv_heads, tensor) and {s.data.shape[0] for s in k.addressable_shards} == \
        {max(cfg.num_kv_heads // tensor, 1)}  # fmt: skip


def test_kv_heads_that_do_not_divide_the_devices(tmp_path):
    # 6 KV heads (12 query heads) on 4 devices: the cache holds 12 copies, 3 per device, each the KV head of one of the
    # device's 3 query heads; the kernel runs per device with no gather and gives the single-device logits.
    from conftest import make_tiny_checkpoint

    path = make_tiny_checkpoint("llama3", tmp_path / "m", hidden_size=96, num_attention_heads=12, num_key_value_heads=6)
    _, _, _, single = logits_on(make_mesh(devices=jax.devices()[:1]), path)
    hlo = []
    cfg, _, cache, sharded = logits_on(make_mesh(tensor=4), path, "pallas", hlo)
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5 * np.abs(single).max())
    assert not re.search(r"all-gather|all-to-all|collective-permute", hlo[0])
    assert cache[0][0].shape[0] == 12 and {s.data.shape[0] for s in cache[0][0].addressable_shards} == {3}


def test_mesh_too_large_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 16 devices, have 8"):
        make_mesh(tensor=8, data=2)


def test_kv_cache_budget_counts_what_each_device_holds():
    from rtpjax.models.config import base_config

    hf = dict(architectures=["LlamaForCausalLM"], hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
              num_hidden_layers=3, intermediate_size=128, vocab_size=256)
    cfg = base_config(hf)
    one = kv_cache.bytes_per_block(cfg, 16)
    assert one == 2 * 3 * 16 * 2 * 8 * 2  # k and v, 3 layers, 16 tokens, 2 heads of 8 bfloat16 values
    assert kv_cache.bytes_per_block(cfg, 16, ways=2) == one // 2  # a head per device
    assert kv_cache.bytes_per_block(cfg, 16, ways=4) == one // 2  # a copy of one head per device
    assert kv_cache.cache_heads(cfg, 4) == 4 and kv_cache.cache_heads(cfg, 3) == 2  # 8 query heads do not split in 3
    assert kv_cache.bytes_per_block(cfg, 16, ways=3) == one  # so the cache is whole on each device

"""Per-layer KV-cache precision: the map's spelling, per-layer buffers and their bytes, the calibration against its
budget (stored and read back), and an engine whose layers keep different dtypes matching the plain greedy loop."""

import logging

import jax
import jax.numpy as jnp
import pytest

from rtpjax import LLM, SamplingParams
from rtpjax.kv import kv_cache
from rtpjax.loading.model_source import load_model
from rtpjax.quant import kv_precision
from rtpjax.runner.greedy import greedy_tokens


def test_maps_parse_format_and_reject_what_is_wrong():
    names = kv_precision.parse_map("0-1:bfloat16, 2:fp8,3-4:int8", 5)
    assert names == ("bfloat16", "bfloat16", "fp8", "int8", "int8")
    assert kv_precision.format_map(names) == "0-1:bfloat16,2:fp8,3-4:int8"
    assert kv_precision.parse_map("fp8", 3) == ("fp8",) * 3
    for bad, why in (("0-3:fp8", "layer 3 is out of range"), ("0-1:fp8,1-2:int8", "layer 1 is out of range or named "
                     "twice"), ("0:fp8", r"layers \[1, 2\] have no dtype"), ("0-2:fp4", "'fp4' is not one of"),
                     ("a-b:fp8", "'a-b' is not a layer")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            kv_precision.parse_map(bad, 3)


def test_each_layer_has_its_own_buffer_and_bytes(tiny_checkpoints):
    from rtpjax.models import load_config

    cfg, _ = load_config(tiny_checkpoints["llama3"])  # 3 layers, float32
    cache = kv_cache.allocate(cfg, 4, 16, kv_dtype=("int8", "auto", "fp8"))
    assert [c[0].dtype for c in cache] == [jnp.int8, jnp.float32, jnp.float8_e4m3fn]
    assert [len(c) for c in cache] == [4, 2, 4]  # one-byte layers carry their scales
    per = {d: kv_cache.bytes_per_block(cfg, 16, d) // cfg.num_layers for d in ("int8", "auto")}
    assert kv_cache.bytes_per_block(cfg, 16, ("int8", "auto", "fp8")) == 2 * per["int8"] + per["auto"]
    with pytest.raises(ValueError, match="name 2 layers; the model has 3"):
        kv_cache.allocate(cfg, 4, 16, kv_dtype=("int8", "auto"))


def test_calibration_spends_its_budget_and_is_stored(stories_dir, tmp_path):
    cfg, family, params = load_model(stories_dir)
    tokens = list(range(3, 120))
    assert kv_precision.calibrate(params, cfg, family, tokens, budget=1e-12) == ("auto",) * cfg.num_layers
    generous = kv_precision.calibrate(params, cfg, family, tokens, budget=10.0)
    assert all(d in kv_precision.CANDIDATES for d in generous)
    calls = []

    def tokenize(text):
        calls.append(text)
        return tokens

    kw = dict(budget=0.01, model_id="stories", tokenize=tokenize, cache_dir=str(tmp_path))
    assert kv_precision.resolve("adaptive", "auto", params, cfg, family, kv_bound=False, **kw) == "auto"
    first = kv_precision.resolve("calibrate", "auto", params, cfg, family, kv_bound=False, **kw)
    mixed = kv_precision.log_probs(params, cfg, family, tokens, first)
    ref = kv_precision.log_probs(params, cfg, family, tokens, ("auto",) * cfg.num_layers)
    assert kv_precision.mean_kl(ref, mixed) <= 0.01
    again = kv_precision.resolve("adaptive", "auto", params, cfg, family, kv_bound=True, **kw)
    assert again == first and len(calls) == 1 and len(list(tmp_path.glob("kv-precision-*.json"))) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_calibration_measures_every_layer_with_one_program(stories_dir, caplog, dtype):
    """Each layer alone is measured through one compiled program (float32 caches holding what each layer's dtype
    would give back, the dtype a traced mode), and that stand-in gives exactly the real caches' log-probabilities, in
    a float32 and a bfloat16 model: calibration compiles the forward for that program, the reference and the chosen
    map, not once per layer and dtype."""
    import dataclasses

    cfg, family, params = load_model(stories_dir)
    cfg = dataclasses.replace(cfg, dtype=dtype)
    params = jax.tree.map(lambda x: x.astype(cfg.jnp_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
    tokens = list(range(3, 150))  # a length no other test compiles
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        chosen = kv_precision.calibrate(params, cfg, family, tokens, budget=10.0)
    compiled = [r for r in caplog.records if "Finished XLA compilation of jit(forward)" in r.getMessage()]
    assert 1 <= len(compiled) <= 3 and chosen != ("auto",) * cfg.num_layers
    base = ("auto",) * cfg.num_layers
    ref = kv_precision.log_probs(params, cfg, family, tokens, base)
    assert jnp.array_equal(kv_precision.simulated_log_probs(params, cfg, family, tokens, base), ref)
    for layer_map in (("int8",) + base[1:], base[:-2] + ("fp8", "int8"), chosen):
        simulated = kv_precision.simulated_log_probs(params, cfg, family, tokens, layer_map)
        assert jnp.array_equal(simulated, kv_precision.log_probs(params, cfg, family, tokens, layer_map))
        assert not jnp.array_equal(simulated, ref)
    with pytest.raises(ValueError, match="tries one-byte caches"):
        kv_precision.simulated_log_probs(params, cfg, family, tokens, ("bfloat16",) + base[1:])


def test_engine_with_a_per_layer_map_matches_the_greedy_loop(stories_dir, compile_cache):
    from conftest import ENGINE_ARGS

    layer_map = "0:int8,1-2:auto,3-4:fp8"
    args = ENGINE_ARGS | dict(max_num_seqs=2, max_num_batched_tokens=16, warmup=False)  # a new cache layout compiles
    llm = LLM(str(stories_dir), kv_cache_dtypes=layer_map, compilation_cache_dir=compile_cache, **args)
    engine = llm.engine
    assert [c[0].dtype for c in engine.runner.cache] == [jnp.int8, jnp.float32, jnp.float32, jnp.float8_e4m3fn,
                                                         jnp.float8_e4m3fn]  # fmt: skip
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    got = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    dtypes = kv_precision.parse_map(layer_map, engine.cfg.num_layers)
    for prompt, out in zip(prompts, got):
        want = greedy_tokens(engine.runner.params, engine.cfg, engine.family, prompt, 10, kv_dtype=dtypes)
        assert out.outputs[0].token_ids == list(want)
    with pytest.raises(ValueError, match="'fp4' is not one of"):
        LLM(str(stories_dir), kv_cache_dtypes="fp4", **ENGINE_ARGS)

"""--quantize-lm-head: the output head quantized by --quantization's method at load (a tied model's as a copy of its
embedding), the logits it gives, the memory plan's bytes, the option's checks and the engine's greedy tokens."""

import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax import LLM, SamplingParams
from rtpjax.loading.model_source import load_model
from rtpjax.loading.quantization import QuantizedWeight, dequantize, quantize_head
from rtpjax.memory_plan import weight_bytes
from rtpjax.options import EngineArgs
from rtpjax.runner.greedy import greedy_tokens
from test_hf_parity import ragged_prefill

METHOD = "int8-weight-only"  # (XLA on the CPU runs no fp8 dot; the head's wiring is the same for every method)


@pytest.mark.parametrize("name", ["llama3", "llama_tied"])
def test_head_is_quantized_and_read_through_its_dequantized_values(tiny_checkpoints, name):
    path = tiny_checkpoints[name]
    cfg, family, plain = load_model(path, quantization=METHOD)
    _, _, params = load_model(path, quantization=METHOD, quantize_lm_head=True)
    head = params["lm_head"]
    assert isinstance(head, QuantizedWeight) and head.q.dtype == jnp.int8 and head.shape == (cfg.vocab_size,
                                                                                              cfg.hidden_size)
    assert ("lm_head" in plain) == (not cfg.tie_word_embeddings)  # a tied model has no head of its own without it
    source = plain["embed"] if cfg.tie_word_embeddings else plain["lm_head"]
    np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(plain["embed"]))  # the lookup unchanged
    prompts = [np.random.default_rng(4).integers(3, cfg.vocab_size, n).tolist() for n in (7, 3)]
    got = np.concatenate(ragged_prefill(cfg, family, params, prompts))
    # the same model with the head's dequantized values as a plain array: the quantized head is what logits read
    dequantized = {**params, "lm_head": dequantize(head, source.dtype)}
    want = np.concatenate(ragged_prefill(cfg, family, dequantized, prompts))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    before = np.concatenate(ragged_prefill(cfg, family, plain, prompts))
    err = np.abs(got - before).max() / np.abs(before).max()
    assert 0 < err < 0.05, err  # the head's rounding shows, and stays small (int8 per channel)


def test_head_bytes_in_the_memory_plan(tiny_checkpoints):
    from rtpjax.models import load_config

    for name in ("llama3", "llama_tied"):
        cfg, _ = load_config(tiny_checkpoints[name])
        head, rows, cols = cfg.vocab_size * cfg.hidden_size, cfg.vocab_size, cfg.hidden_size
        group = 128 if cols % 128 == 0 else cols  # (a group that does not divide the inputs becomes the row)
        stored = {METHOD: head + 4 * rows,  # a byte each and a float32 scale per row
                  "int4-asym": head // 2 + (head // group) * 5}  # half a byte each; a scale and a zero per group
        for method, quantized in stored.items():
            bf16 = head * np.dtype(cfg.jnp_dtype).itemsize
            change = quantized if cfg.tie_word_embeddings else quantized - bf16
            assert weight_bytes(cfg, method, True) - weight_bytes(cfg, method) == change, (name, method)
        assert weight_bytes(cfg, None, True) == weight_bytes(cfg, None)  # nothing is quantized without a method


def test_head_needs_a_method(tiny_checkpoints):
    with pytest.raises(ValueError, match="--quantize-lm-head quantizes the head by --quantization's method"):
        EngineArgs(quantize_lm_head=True)
    with pytest.raises(ValueError, match="quantizing the head takes a quantization method"):
        quantize_head({"lm_head": jnp.ones((4, 4))}, False, None)
    assert EngineArgs(quantization="int4", quantize_lm_head=True).quantize_lm_head


def test_engine_with_a_quantized_head_gives_the_greedy_loops_tokens(stories_dir, compile_cache):
    from conftest import ENGINE_ARGS

    llm = LLM(str(stories_dir), quantization="int8", quantize_lm_head=True, compilation_cache_dir=compile_cache,
              warmup=False, **ENGINE_ARGS)  # fmt: skip
    engine = llm.engine
    assert isinstance(engine.runner.params["lm_head"], QuantizedWeight)  # stories260K ties its head: a copy
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    for prompt, tokens in zip(prompts, got):
        assert tokens == list(greedy_tokens(engine.runner.params, engine.cfg, engine.family, prompt, 10, block_size=16))

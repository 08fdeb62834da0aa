"""Pipeline stages on the 8-device CPU mesh: the single-device logits (PP=2, PP=2 x TP=2, PP=2 x EP=2 with an uneven
3-layer split), each stage holding only its layers' KV cache, micro-batched steps, and the engine's greedy tokens."""

import jax
import numpy as np
import pytest

from rtpjax.kv import kv_cache
from rtpjax.loading.model_source import load_model
from rtpjax.parallel import pipeline
from rtpjax.parallel.mesh import engine_mesh
from rtpjax.parallel.stages import split_layers
from rtpjax.runner.model_runner import StepBatch
from rtpjax.runner.step_inputs import SeqChunk, build_step

BLOCK = 4
PROMPTS = ([5, 9, 33, 41, 7, 2, 200], [100, 3, 17], [8, 8, 9, 10, 11], [60, 61])


def step_batch(chunks, num_tokens, num_seqs):
    step = build_step(chunks, BLOCK, num_tokens=num_tokens, num_seqs=num_seqs, max_blocks=2)
    return StepBatch(step.tokens, np.full(num_tokens, -1, np.int32), step.positions, step.meta, step.logits_indices)


def two_steps(run):
    """A prefill of PROMPTS, then one decode token each; `run(chunks_per_micro_batch)` -> last-token logits [seqs]."""
    tables = [[2 * i, 2 * i + 1] for i in range(len(PROMPTS))]
    prefill = [SeqChunk(list(p), 0, t) for p, t in zip(PROMPTS, tables)]
    decode = [SeqChunk([p[-1] + 1], len(p), t) for p, t in zip(PROMPTS, tables)]
    return np.concatenate([run([prefill[:2], prefill[2:]]), run([decode[:3], decode[3:]])])


def single_device(path, **load):
    cfg, family, params = load_model(path, **load)
    cache = kv_cache.allocate(cfg, 8, BLOCK)
    forward = jax.jit(family.forward, static_argnames=("cfg", "expert_load"))

    def run(halves):
        nonlocal cache
        batch = step_batch([c for h in halves for c in h], 32, 4)
        logits, cache, *load = forward(params, cfg, batch.tokens, batch.positions, cache, batch.meta,
                                                  batch.logits_indices, expert_load=bool(cfg.num_experts))  # fmt: skip
        loads.append(load[0] if load else None)
        return np.asarray(logits)

    loads = []
    return two_steps(run), loads


def pipelined(path, load=None, **axes):
    cfg, _, params = load_model(path)
    mesh = engine_mesh(cfg, pipeline=2, **axes)
    cfg, _, params = load_model(path, mesh=mesh, **(load or {}))
    if "lm_head" in params:  # the head's stage holds it (a tied model's quantized copy is made there)
        assert jax.tree.leaves(params["lm_head"])[0].sharding.device_set == set(mesh.stages[-1].devices.flat)
    cache = kv_cache.allocate(cfg, 8, BLOCK, mesh=mesh)
    for i, layer in enumerate(cache):  # each stage holds only its layers' KV
        assert layer[0].sharding.device_set == set(mesh.stages[mesh.stage_of(i)].devices.flat)
    pipe = pipeline.Pipeline(cfg, params, mesh)
    loads = []

    def run(halves):
        nonlocal cache
        micro = pipeline.MicroBatches(tuple(step_batch(h, 16, 4) for h in halves),
                                      pipeline.join_rows(len(halves[0]), len(halves[1]), 4, 4))  # fmt: skip
        logits, cache, load = pipe.run(cache, jax.numpy.zeros(3, np.int32), micro)
        loads.append(load)
        return np.asarray(logits)

    return two_steps(run), loads, pipe


# (a quantized head of a tied model: a copy made on the embedding's stage, moved to the last)
QUANTIZED_HEAD = dict(quantization="int8-weight-only", quantize_lm_head=True)


@pytest.mark.parametrize("name, axes, load", [("llama3", dict(tensor=2), {}), ("llama_tied", {}, {}),
                                              ("llama_tied", dict(tensor=2), QUANTIZED_HEAD),
                                              ("qwen3_moe", dict(expert=2), {})])  # fmt: skip
def test_stages_give_single_device_logits(name, axes, load, tiny_checkpoints):
    """3 layers over 2 stages (2 + 1); two micro-batches per step; the second step reads the first's KV."""
    single, single_loads = single_device(tiny_checkpoints[name], **load)
    ours, loads, pipe = pipelined(tiny_checkpoints[name], load, **axes)
    assert pipe.split_steps == 2
    np.testing.assert_allclose(ours, single, rtol=0, atol=1e-5 * np.abs(single).max())
    if loads[0] is not None:  # MoE: the expert load of both micro-batches, every MoE layer in order
        for got, want in zip(loads, single_loads):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_layer_split_and_errors(tiny_checkpoints):
    from rtpjax.models import load_config

    assert split_layers(7, 3) == (range(0, 3), range(3, 5), range(5, 7))
    assert split_layers(4, 4) == tuple(range(i, i + 1) for i in range(4))
    assert pipeline.split_point([1, 1, 1, 1, 1]) == 2 and pipeline.split_point([9, 1, 1]) == 1
    cfg, _ = load_config(tiny_checkpoints["llama3"])
    with pytest.raises(ValueError, match="--pipeline-parallel-size 4: the model has only 3 layers"):
        engine_mesh(cfg, pipeline=4)
    with pytest.raises(ValueError, match="needs 16 devices; 8 are visible"):
        engine_mesh(cfg, tensor=8, pipeline=2)
    assert kv_cache.bytes_per_block(cfg, 4, stages=2) == kv_cache.bytes_per_block(cfg, 4) * 2 // 3


def test_engine_pp2_tp2_gives_single_device_greedy_tokens(tiny_checkpoints):
    """PP=2 x TP=2 (tied head copied to the last stage): the greedy tokens of the single-device model function, decode
    steps split into two micro-batches, and no compilation after warm-up."""
    from rtpjax import LLM, SamplingParams
    from rtpjax.runner.greedy import greedy_tokens
    from rtpjax.runner.model_runner import CompileCounter

    path = str(tiny_checkpoints["llama_tied"])
    llm = LLM(path, skip_tokenizer_init=True, pipeline_parallel_size=2, tensor_parallel_size=2, max_num_seqs=4,
              max_num_batched_tokens=8, max_model_len=32, block_size=BLOCK)  # fmt: skip
    runner = llm.engine.runner
    with pytest.raises(ValueError, match="--one-row-decode does not work with --pipeline-parallel-size"):
        LLM(path, skip_tokenizer_init=True, pipeline_parallel_size=2, one_row_decode=True, max_model_len=32,
            warmup=False)  # fmt: skip
    compiles = CompileCounter.count
    outs = llm.generate([list(p) for p in PROMPTS], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert CompileCounter.count == compiles
    assert runner.pipeline.split_steps >= 4
    cfg, family, params = load_model(path)
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == list(greedy_tokens(params, cfg, family, list(prompt), 5, block_size=BLOCK))

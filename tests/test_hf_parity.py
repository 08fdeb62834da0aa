"""Every family against Hugging Face transformers (float32, CPU): ragged-batch logits and greedy continuations."""

import numpy as np
import pytest
import torch
import transformers

from conftest import TINY
from rtpjax.kv import kv_cache
from rtpjax.runner.greedy import greedy_tokens, jit_forward
from rtpjax.loading.model_source import load_model
from rtpjax.runner.step_inputs import SeqChunk, build_step

BLOCK = 4


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def ragged_prefill(cfg, family, params, prompts, block=BLOCK, num_tokens=None):
    """All prompts in one ragged step with every token's logits; blocks handed out in a scrambled order."""
    need = [-(-len(p) // block) for p in prompts]
    order = np.random.default_rng(0).permutation(sum(need) + 3).tolist()
    tables, i = [], 0
    for n in need:
        tables.append(order[i : i + n])
        i += n
    cache = kv_cache.allocate(cfg, sum(need) + 3, block)
    chunks = [SeqChunk(p, 0, t) for p, t in zip(prompts, tables)]
    inputs = build_step(chunks, block, num_tokens=num_tokens, num_seqs=len(prompts) + 2)
    logits, _ = jit_forward(family)(params, cfg, inputs.tokens, inputs.positions, cache, inputs.meta)
    logits = np.asarray(logits)
    starts = np.cumsum([0] + [len(p) for p in prompts])
    return [logits[a:b] for a, b in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("name", sorted(TINY))
def test_ragged_logits_match_transformers(name, tiny_checkpoints):
    path = tiny_checkpoints[name]
    cfg, family, params = load_model(path)
    model = hf_model(path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (5, 17, 1, 11, 8)]
    ours = ragged_prefill(cfg, family, params, prompts, num_tokens=48)  # 6 padding tokens
    errors = [rel_err(o, hf_logits(model, p)) for o, p in zip(ours, prompts)]
    print(f"{name}: max relative logits error {max(errors):.2e}")
    assert max(errors) <= 1e-4


@pytest.mark.parametrize("name", sorted(TINY))
def test_greedy_continuation_matches_transformers(name, tiny_checkpoints):
    path = tiny_checkpoints[name]
    cfg, family, params = load_model(path)
    model = hf_model(path)
    model.generation_config.eos_token_id = None  # 32 tokens exactly, as ours (no stop ids)
    prompt = np.random.default_rng(2).integers(3, cfg.vocab_size, 7).tolist()
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)
    ours = list(greedy_tokens(params, cfg, family, prompt, 32, block_size=BLOCK))
    assert ours == ref[0, len(prompt) :].tolist()


def test_stories260k_reproduces_transformers_199_tokens(stories_dir):
    cfg, family, params = load_model(stories_dir)
    model = hf_model(stories_dir)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = model.generate(torch.tensor([[1]]), max_new_tokens=199, do_sample=False, pad_token_id=0)[0, 1:].tolist()
    ours = list(greedy_tokens(params, cfg, family, [1], 199, block_size=16))
    assert ours == ref
    text = transformers.AutoTokenizer.from_pretrained(stories_dir).decode(ours)
    assert text.startswith("Once upon a time, there was a little girl named Lily. She loved to play outside in the park.")

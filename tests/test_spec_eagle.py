"""EAGLE-3 heads on the real stories260K target: random heads in the published layout (no trained head is reachable
here). Whatever the head guesses, every request gets the tokens it gets without speculation; the head's blocks go
back; no compilation after warm-up; the target returns its layers' inputs unchanged otherwise; bad head folders
fail with one line naming what is wrong."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ENGINE_ARGS

from rtpjax import LLM, SamplingParams
from rtpjax.models import load_config
from rtpjax.models.decoder import forward
from rtpjax.runner.model_runner import CompileCounter
from rtpjax.spec.eagle3_head import write_random_head

K = 3
GREEDY = dict(temperature=0, ignore_eos=True)
HEAD = dict(num_heads=4, num_kv_heads=2, intermediate_size=96, draft_vocab_size=256)


@pytest.fixture(scope="module")
def stories_cfg(stories_dir):
    return load_config(str(stories_dir))[0]


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, stories_cfg):
    return write_random_head(tmp_path_factory.mktemp("eagle") / "head", stories_cfg, seed=5, layer_ids=(1, 2, 4),
                             scale=0.3, **HEAD)  # fmt: skip


@pytest.fixture(scope="module")
def eagle_llm(stories_dir, head_dir, compile_cache):
    config = {"method": "eagle3", "model": str(head_dir), "num_speculative_tokens": K}
    return LLM(str(stories_dir), compilation_cache_dir=compile_cache, speculative_config=config, **ENGINE_ARGS)


def batch(n, seed):
    """Prompts of 1-60 tokens (some over the 32-token step budget: chunked, and caught up by the head in two calls)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 512, rng.integers(1, 60)).tolist() for _ in range(n)]
    return prompts, [8 + 5 * i for i in range(n)]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_random_head_greedy_and_seeded_tokens_equal_no_speculation(eagle_llm, stories_llm):
    prompts, lengths = batch(8, seed=21)
    rng = np.random.default_rng(22)
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in lengths[:4]] + [
        SamplingParams(max_tokens=m, temperature=float(rng.choice([0.7, 1.2])), top_k=int(rng.choice([0, 30])),
                       repetition_penalty=1.2, seed=int(rng.integers(1 << 30))) for m in lengths[4:]]  # fmt: skip
    want = tokens(stories_llm.generate(prompts, params))
    counters = eagle_llm.engine.speculator.counters
    drafted = counters.num_draft_tokens
    assert tokens(eagle_llm.generate(prompts, params)) == want
    assert tokens(eagle_llm.generate(prompts[4:], params[4:])) == want[4:]  # seeded: the same again
    assert counters.num_draft_tokens > drafted
    proposer = eagle_llm.engine.speculator.proposer
    assert not proposer.states and proposer.pool.num_free == proposer.pool.num_blocks
    assert eagle_llm.engine.pool.num_free == eagle_llm.engine.pool.num_blocks


def test_no_compilation_after_warmup_with_an_eagle3_head(eagle_llm):
    prompts, lengths = batch(6, seed=23)
    eagle_llm.generate(prompts[:2], SamplingParams(max_tokens=4, **GREEDY))  # one-time host-side setup
    before = CompileCounter.count
    eagle_llm.generate(prompts, [SamplingParams(max_tokens=m, **GREEDY) for m in lengths])
    assert CompileCounter.count == before


def test_aux_hidden_states_are_the_layer_inputs(stories_llm, stories_cfg):
    """The aux output: layer 0's input is the embedding, and asking for aux changes neither logits nor cache."""
    from rtpjax.kv import kv_cache as kv
    from rtpjax.runner.step_inputs import SeqChunk, build_step

    params = stories_llm.engine.runner.params
    ids = [5, 9, 33, 2, 71]
    step = build_step([SeqChunk(ids, 0, [0])], 16)
    cache = kv.allocate(stories_cfg, 2, 16)
    plain = forward(params, stories_cfg, step.tokens, step.positions, cache, step.meta)
    logits, _, aux = forward(params, stories_cfg, step.tokens, step.positions, kv.allocate(stories_cfg, 2, 16),
                             step.meta, aux_layers=(0, 3, 1))  # fmt: skip
    h = stories_cfg.hidden_size
    assert aux.shape == (5, 3 * h)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(plain[0]))
    np.testing.assert_array_equal(np.asarray(aux[:, :h]), np.asarray(params["embed"][jnp.asarray(ids)]))
    assert not np.allclose(np.asarray(aux[:, h : 2 * h]), np.asarray(aux[:, 2 * h :]))


def _broken(tmp_path, head_dir, change):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((head_dir / "config.json").read_text())
    from safetensors.numpy import load_file, save_file

    tensors = load_file(head_dir / "model.safetensors")
    change(config, tensors)
    (bad / "config.json").write_text(json.dumps(config))
    save_file(tensors, bad / "model.safetensors")
    return bad


@pytest.mark.parametrize("change, message", [
    (lambda c, t: c.update(vocab_size=600), "has a vocabulary of 600 tokens, the target 512"),
    (lambda c, t: c.update(target_hidden_size=128), "reads hidden states of size 128, the target's are 64"),
    (lambda c, t: t.pop("midlayer.hidden_norm.weight"), "lacks the tensor midlayer.hidden_norm.weight"),
    (lambda c, t: c.update(intermediate_size=100), r"mlp.gate_proj.weight of shape \[96, 64\], expected \[100, 64\]"),
    (lambda c, t: c["eagle_config"].update(eagle_aux_hidden_state_layer_ids=[1, 2, 5]), "reads target layers"),
])  # fmt: skip
def test_bad_head_folders_fail_with_one_line(stories_dir, head_dir, compile_cache, tmp_path, change, message):
    bad = _broken(tmp_path, head_dir, change)
    with pytest.raises(ValueError, match=message) as e:
        LLM(str(stories_dir), compilation_cache_dir=compile_cache, **ENGINE_ARGS,
            speculative_config={"method": "eagle3", "model": str(bad), "num_speculative_tokens": 2})
    assert "\n" not in str(e.value) and str(bad) in str(e.value)


def _reference_guesses(head, params, target_params, target_cfg, ids, k):
    """The head's K guesses after `ids`, computed densely from scratch: target features over the whole sequence, rows
    p = 0 .. n - 2 (token p + 1, feature p), then chained rows feeding the layer's output back."""
    from rtpjax.kv import kv_cache as kv
    from rtpjax.runner.step_inputs import SeqChunk, build_step
    from rtpjax.spec import eagle3_head as head_lib
    from rtpjax.spec.eagle3_train import dense_attention

    step = build_step([SeqChunk(ids, 0, list(range(-(-len(ids) // 16))))], 16)
    aux = forward(target_params, target_cfg, step.tokens, step.positions, kv.allocate(target_cfg, 8, 16), step.meta,
                  aux_layers=head.aux_layers)[2]  # fmt: skip
    embed = params["embed"]
    tokens, feats = list(ids[1:]), list(head_lib.layers.linear(aux, params["fc"])[: len(ids) - 1])
    guesses = []
    for _ in range(k):
        hidden, _ = head_lib.layer(params, head.cfg, embed[jnp.asarray(tokens)], jnp.stack(feats),
                                   jnp.arange(len(tokens)), None, None, attention=dense_attention)  # fmt: skip
        guess = int(head_lib.draft_tokens(params, head.cfg, hidden[-1:])[0])
        guesses.append(guess)
        tokens.append(guess)
        feats.append(hidden[-1])
    return guesses


def test_proposals_match_a_dense_reference_of_the_head(eagle_llm, stories_cfg):
    """The feature store, the one-row shift, catch-up split over calls and in later rounds, chaining and d2t: the
    engine's proposer guesses what the head computed densely from scratch guesses."""
    from rtpjax.engine.sequence import Sequence, Status
    from rtpjax.kv import kv_cache as kv
    from rtpjax.runner.step_inputs import SeqChunk, build_step

    engine = eagle_llm.engine
    proposer, target = engine.speculator.proposer, engine.runner.params
    table = list(range(4))  # target blocks the idle engine does not use now
    ids = np.random.default_rng(31).integers(3, 512, 70).tolist()
    seq = Sequence("ref", 0, ids[:45], SamplingParams(), 0, 100, status=Status.RUNNING, block_table=table)

    def observe(start, end):  # a target step over ids[start:end], its aux hidden states stored as the engine does
        step = build_step([SeqChunk(ids[start:end], start, table)], 16)
        cache = kv.allocate(stories_cfg, 8, 16)
        prefix = build_step([SeqChunk(ids[:end], 0, table)], 16)  # the whole prefix: this step's rows are its tail
        aux = forward(target, stories_cfg, prefix.tokens, prefix.positions, cache, prefix.meta,
                      aux_layers=proposer.head.aux_layers)[2][start:end]  # fmt: skip
        proposer.observe(step, aux)

    try:
        observe(0, 44)  # the prompt's rows up to the second-to-last token: 44 rows, over the 32-token budget
        got = proposer.propose([seq], [K])[0]
        assert got == _reference_guesses(proposer.head, proposer.params, target, stories_cfg, ids[:45], K)
        seq.token_ids = ids[:49]  # four more tokens: catch up on rows 44 .. 47
        observe(44, 48)
        got = proposer.propose([seq], [K])[0]
        assert got == _reference_guesses(proposer.head, proposer.params, target, stories_cfg, ids[:49], K)
    finally:
        seq.status = Status.FINISHED
        proposer.release_finished()

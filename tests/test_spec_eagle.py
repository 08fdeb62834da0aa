"""EAGLE-3 heads on the real stories260K target: random heads in the published layout (no trained head is reachable
here). Whatever the head guesses, every request gets the tokens it gets without speculation; the head's blocks go
back; no compilation after warm-up; the target returns its layers' inputs unchanged otherwise; bad head folders
fail with one line naming what is wrong."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ENGINE_ARGS

from rtpjax import LLM, SamplingParams
from rtpjax.models import load_config
from rtpjax.models.decoder import forward
from rtpjax.runner.model_runner import CompileCounter
from rtpjax.spec import eagle3_head as head_lib
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


REF_ROWS = 128  # the dense reference pads every sequence to this many rows: one compiled shape (causal: tail inert)


def _reference_guesses(head, params, target_params, target_cfg, ids, k):
    """The head's K guesses after `ids`, computed densely from scratch: target features over the whole sequence, rows
    p = 0 .. n - 2 (token p + 1, feature p), then chained rows feeding the layer's output back."""
    assert len(ids) + k <= REF_ROWS
    tokens = np.zeros(REF_ROWS, np.int32)
    tokens[: len(ids)] = ids
    features = _reference_features(target_params, tokens, cfg=target_cfg, aux_layers=head.aux_layers)
    feats = np.array(head_lib.layers.linear(features, params["fc"]))
    rows, guesses = len(ids) - 1, []
    tokens[:rows] = ids[1:]
    for _ in range(k):
        guess, hidden = _reference_row(params, tokens, feats, rows - 1, cfg=head.cfg)
        guesses.append(int(guess))
        tokens[rows], feats[rows] = guesses[-1], np.asarray(hidden)
        rows += 1
    return guesses


@functools.partial(jax.jit, static_argnames=("cfg", "aux_layers"))
def _reference_features(target_params, tokens, *, cfg, aux_layers):
    from rtpjax.kv import kv_cache as kv
    from rtpjax.runner.step_inputs import SeqChunk, build_step

    step = build_step([SeqChunk([0] * REF_ROWS, 0, list(range(REF_ROWS // 16)))], 16)
    meta = jax.tree.map(jnp.asarray, step.meta)
    return forward(target_params, cfg, tokens, jnp.asarray(step.positions), kv.allocate(cfg, REF_ROWS // 16, 16), meta,
                   aux_layers=aux_layers)[2]  # fmt: skip


@functools.partial(jax.jit, static_argnames=("cfg",))
def _reference_row(params, tokens, feats, row, *, cfg):
    """The layer over the rows (dense causal attention), and row `row`'s guess and output."""
    from rtpjax.spec.eagle3_train import dense_attention

    hidden, _ = head_lib.layer(params, cfg, params["embed"][tokens], feats, jnp.arange(REF_ROWS), None, None,
                               attention=dense_attention)  # fmt: skip
    return head_lib.draft_tokens(params, cfg, hidden[row][None])[0], hidden[row]


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
        proposer.observe(aux, step.meta.slot_mapping)

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


def test_chained_rounds_take_the_heads_guesses_from_the_device(eagle_llm, stories_llm, stories_cfg, monkeypatch):
    """Rounds chain with an EAGLE-3 head: its program, queued after round N and before N is read, catches the head
    up from the sampler state and leaves K guesses there. Each of them is what the head computed densely from scratch
    guesses after the tokens N left; the tokens are those of no speculation (greedy and seeded); the sampler state is
    what the memory plan counts; no compilation; no leaked block."""
    from rtpjax import memory_plan

    engine = eagle_llm.engine
    proposer, speculator = engine.speculator.proposer, engine.speculator
    assert engine.chains()
    monkeypatch.setattr(speculator, "config", dataclasses.replace(speculator.config, min_acceptance_rate=0.0))
    speculator.empty_rounds = speculator.skip = 0
    records, propose, catch_up = [], proposer.propose_on_device, proposer._catch_up
    dropped, caught_up, chaining = {}, [], [False]

    def recording(state, items):  # reads the state (a sync a real round never does) to check it afterwards
        hostage = []
        for item in items:  # once per request: the head loses its rows (its blocks taken), as when its pool runs short
            seq = item.seq
            if seq.request_id not in dropped and len(seq.token_ids) > 40 and seq in proposer.states:
                dropped[seq.request_id] = len(records)
                proposer._drop(seq)
                hostage += proposer.pool.allocate(4)  # the head's next blocks are others
        chaining[0] = True
        state = propose(state, items)
        chaining[0] = False
        proposer.pool.release(hostage)
        lengths, counts, rows = (np.asarray(a) for a in (state.history_len, state.num_proposals, state.proposals))
        for item in items:
            slot = item.seq.slot
            records.append((item.seq.request_id, int(lengths[slot]), int(counts[slot]), rows[slot].tolist()))
        return state

    def counting(queue):  # the host catches up before a chained round only where the head lost rows
        if chaining[0]:
            caught_up.extend((seq.request_id, end - start) for seq, _, start, end in queue)
        return catch_up(queue)

    prompts, _ = batch(4, seed=41)
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in (30, 22, 36, 26)]
    eagle_llm.generate(prompts[:1], SamplingParams(max_tokens=10, **GREEDY))  # one-time host-side setup
    monkeypatch.setattr(proposer, "propose_on_device", recording)
    monkeypatch.setattr(proposer, "_catch_up", counting)
    want = stories_llm.generate(prompts, params)
    engine.take_loop_stats()
    before = CompileCounter.count
    got = eagle_llm.generate(prompts, params)
    assert tokens(got) == tokens(want)
    stats = engine.take_loop_stats()
    assert CompileCounter.count == before
    assert stats.chained > 5 and len(records) >= stats.chained, stats
    full = {o.request_id: o.prompt_token_ids + o.outputs[0].token_ids for o in got}
    target = engine.runner.params
    assert dropped and {r for r, _ in caught_up} == set(dropped) and all(n > 30 for _, n in caught_up), caught_up
    checked = sorted(set(range(0, len(records), max(1, len(records) // 10))) | set(dropped.values()))
    for request_id, length, count, guesses in (records[i] for i in checked):
        ids = full[request_id]
        assert count == K and length <= len(ids)
        assert guesses == _reference_guesses(proposer.head, proposer.params, target, stories_cfg, ids[:length], K)
    seeded = [SamplingParams(temperature=0.8, top_k=40, seed=s, max_tokens=24) for s in (1, 2, 3, 4)]
    assert tokens(eagle_llm.generate(prompts, seeded)) == tokens(stories_llm.generate(prompts, seeded))
    assert engine.take_loop_stats().chained > 3
    allocated = sum(a.nbytes for a in jax.tree.leaves(engine.runner.state))
    planned = memory_plan.sampler_bytes(engine.cfg, engine.args, engine.max_model_len)
    assert abs(allocated - planned) <= 0.01 * allocated, (allocated, planned)
    assert not proposer.states and not proposer.device and proposer.pool.num_free == proposer.pool.num_blocks
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.slow
def test_chained_device_proposals_under_tensor_parallelism(stories_dir, head_dir, stories_llm, compile_cache):
    """Two tensor-parallel devices (the head replicated, the sampler state it writes placed as the engine's programs
    place it): a random EAGLE-3 head's chained rounds give the tokens of no speculation; the target as its own draft
    (its KV sharded), its programs compiled against the state the engine leaves, is accepted every time while its
    rounds chain, with no program compiled for another placement; every block back."""
    from rtpjax.spec.draft_model import DraftModelProposer

    config = {"method": "eagle3", "model": str(head_dir), "num_speculative_tokens": K, "min_acceptance_rate": 0.0}
    llm = LLM(str(stories_dir), tensor_parallel_size=2, compilation_cache_dir=compile_cache, warmup=False,
              speculative_config=config, **ENGINE_ARGS)  # fmt: skip
    engine, speculator = llm.engine, llm.engine.speculator
    prompts, _ = batch(3, seed=43)
    params = SamplingParams(max_tokens=30, **GREEDY)
    want = tokens(stories_llm.generate(prompts, params))
    assert tokens(llm.generate(prompts, params)) == want
    assert engine.take_loop_stats().chained > 5
    head = speculator.proposer
    assert not head.states and head.pool.num_free == head.pool.num_blocks
    draft = speculator.proposer = DraftModelProposer(str(stories_dir), K, engine.draft_context)
    engine.runner.state = speculator.warm(engine.runner.state)
    programs, counters = dict(draft.device.programs), speculator.counters
    drafted, accepted = counters.num_draft_tokens, counters.num_accepted_tokens
    assert tokens(llm.generate(prompts, params)) == want
    assert counters.num_draft_tokens - drafted == counters.num_accepted_tokens - accepted > 20
    assert engine.take_loop_stats().chained > 2 and draft.device.programs == programs  # none for another placement
    assert engine.pool.num_free == engine.pool.num_blocks

"""Draft-model speculation on the real stories260K target: a tiny random draft of its vocabulary, and the target as
its own draft. Whatever the draft guesses, every request gets the tokens it gets without speculation; the target as
its own draft is accepted every time (greedy); the draft's blocks go back when sequences finish; no compilation after
warm-up."""

import dataclasses
import shutil

import numpy as np
import pytest
from conftest import ENGINE_ARGS, make_tiny_checkpoint

from rtpjax import LLM, SamplingParams
from rtpjax.runner.model_runner import CompileCounter
from rtpjax.spec.draft_model import DraftModelProposer

K = 3
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    return make_tiny_checkpoint("llama_tied", tmp_path_factory.mktemp("draft") / "draft", seed=3, vocab_size=512,
                                num_hidden_layers=2)  # fmt: skip


@pytest.fixture(scope="module")
def draft_llm(stories_dir, draft_dir, compile_cache):
    config = {"model": str(draft_dir), "num_speculative_tokens": K}
    return LLM(str(stories_dir), compilation_cache_dir=compile_cache, speculative_config=config, **ENGINE_ARGS)


def batch(n, seed):
    """Prompts of 1-60 tokens (some over the 32-token step budget: chunked, and caught up by the draft in two calls)
    and several output lengths."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 512, rng.integers(1, 60)).tolist() for _ in range(n)]
    return prompts, [8 + 5 * i for i in range(n)]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def assert_draft_blocks_free(llm):
    proposer = llm.engine.speculator.proposer
    assert not proposer.states and proposer.pool.num_free == proposer.pool.num_blocks
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


def test_random_draft_greedy_and_seeded_tokens_equal_no_speculation(draft_llm, stories_llm):
    prompts, lengths = batch(8, seed=11)
    rng = np.random.default_rng(12)
    params = [SamplingParams(max_tokens=m, **GREEDY) for m in lengths[:4]] + [
        SamplingParams(max_tokens=m, temperature=float(rng.choice([0.7, 1.2])), top_k=int(rng.choice([0, 30])),
                       repetition_penalty=1.2, seed=int(rng.integers(1 << 30))) for m in lengths[4:]]  # fmt: skip
    want = tokens(stories_llm.generate(prompts, params))
    counters = draft_llm.engine.speculator.counters
    drafted = counters.num_draft_tokens
    assert tokens(draft_llm.generate(prompts, params)) == want
    assert counters.num_draft_tokens > drafted
    assert_draft_blocks_free(draft_llm)


def test_the_target_as_its_own_draft_is_always_accepted(draft_llm, stories_llm, stories_dir, monkeypatch):
    """Its rounds chained too (the draft's program on the device catches up from the sampler state and guesses
    there), also after the draft lost a sequence's blocks (caught up on the host first, only then)."""
    engine = draft_llm.engine
    speculator = engine.speculator
    original = speculator.proposer
    proposer = speculator.proposer = DraftModelProposer(str(stories_dir), K, engine.draft_context)
    engine.runner.state = proposer.warm(engine.runner.state)
    propose, catch_up = proposer.propose_on_device, proposer._catch_up
    dropped, caught_up, chaining = set(), [], [False]

    def dropping(state, items):  # once per request: the draft loses its blocks, as when its pool runs short
        hostage = []
        for item in items:
            seq = item.seq
            if seq.request_id not in dropped and len(seq.token_ids) > 30 and seq in proposer.states:
                dropped.add(seq.request_id)
                proposer._drop(seq)
                hostage += proposer.pool.allocate(4)  # the draft's next blocks are others
        chaining[0] = True
        state = propose(state, items)
        chaining[0] = False
        proposer.pool.release(hostage)
        return state

    def counting(queue):
        if chaining[0]:
            caught_up.extend((seq.request_id, end - start) for seq, _, start, end in queue)
        return catch_up(queue)

    monkeypatch.setattr(proposer, "propose_on_device", dropping)
    monkeypatch.setattr(proposer, "_catch_up", counting)
    try:
        prompts, lengths = batch(4, seed=13)
        params = [SamplingParams(max_tokens=m + 12, **GREEDY) for m in lengths]
        want = tokens(stories_llm.generate(prompts, params))
        drafted, accepted = speculator.counters.num_draft_tokens, speculator.counters.num_accepted_tokens
        engine.take_loop_stats()
        assert tokens(draft_llm.generate(prompts, params)) == want
        counters = speculator.counters
        drafted, accepted = counters.num_draft_tokens - drafted, counters.num_accepted_tokens - accepted
        assert drafted > 20 and accepted == drafted  # float32 on the CPU: the same argmax at every position
        assert engine.take_loop_stats().chained > 2
        assert dropped and {r for r, _ in caught_up} == dropped and all(n > 20 for _, n in caught_up), caught_up
        assert_draft_blocks_free(draft_llm)
        assert not proposer.device
    finally:
        speculator.proposer = original


@pytest.fixture(scope="module")
def perturbed_dir(stories_dir, tmp_path_factory):
    """stories260K with its last MLP scaled down: a draft the target accepts often, not always."""
    from safetensors.numpy import load_file, save_file

    out = tmp_path_factory.mktemp("perturbed")
    for f in stories_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    tensors = load_file(stories_dir / "model.safetensors")
    tensors["model.layers.4.mlp.down_proj.weight"] *= 0.2
    save_file(tensors, out / "model.safetensors")
    return out


def test_chained_rounds_guess_what_the_draft_guesses_from_scratch(draft_llm, stories_llm, perturbed_dir, monkeypatch):
    """A draft accepted in part (each round's catch-up runs 1 to K+1 tokens, some rows past the count dropped): every
    chained round's guesses, read from the sampler state, are what the same draft proposes on the host from scratch
    after the tokens the round ahead left; the tokens are those of no speculation."""
    from rtpjax.engine.sequence import Sequence, Status

    engine = draft_llm.engine
    speculator = engine.speculator
    original = speculator.proposer
    proposer = speculator.proposer = DraftModelProposer(str(perturbed_dir), K, engine.draft_context)
    engine.runner.state = proposer.warm(engine.runner.state)
    monkeypatch.setattr(speculator, "config", dataclasses.replace(speculator.config, min_acceptance_rate=0.0))
    records, propose = [], proposer.propose_on_device

    def recording(state, items):  # reads the state (a sync a real round never does) to check it afterwards
        state = propose(state, items)
        lengths, counts, rows = (np.asarray(a) for a in (state.history_len, state.num_proposals, state.proposals))
        records.extend((item.seq.request_id, int(lengths[item.seq.slot]), int(counts[item.seq.slot]),
                        rows[item.seq.slot].tolist()) for item in items)  # fmt: skip
        return state

    monkeypatch.setattr(proposer, "propose_on_device", recording)
    try:
        prompts, _ = batch(4, seed=15)
        params = SamplingParams(max_tokens=40, **GREEDY)
        drafted, accepted = speculator.counters.num_draft_tokens, speculator.counters.num_accepted_tokens
        engine.take_loop_stats()
        got = draft_llm.generate(prompts, params)
        assert tokens(got) == tokens(stories_llm.generate(prompts, params))
        counters = speculator.counters
        drafted, accepted = counters.num_draft_tokens - drafted, counters.num_accepted_tokens - accepted
        assert 0.2 * drafted < accepted < 0.9 * drafted, (accepted, drafted)
        assert engine.take_loop_stats().chained > 5
        full = {o.request_id: o.prompt_token_ids + o.outputs[0].token_ids for o in got}
        reference = DraftModelProposer(str(perturbed_dir), K, engine.draft_context)
        for i, (request_id, length, count, guesses) in enumerate(records[:: max(1, len(records) // 12)]):
            seq = Sequence(f"ref-{i}", 0, full[request_id][:length], SamplingParams(), 0, 1000, status=Status.RUNNING)
            assert count == K and guesses == reference.propose([seq], [K])[0], (request_id, length)
            seq.status = Status.FINISHED
        assert_draft_blocks_free(draft_llm)
    finally:
        speculator.proposer = original


def test_no_compilation_after_warmup_with_a_draft_model(draft_llm):
    prompts, lengths = batch(6, seed=14)
    draft_llm.generate(prompts[:2], SamplingParams(max_tokens=4, **GREEDY))  # one-time host-side setup
    before = CompileCounter.count
    draft_llm.generate(prompts, [SamplingParams(max_tokens=m, **GREEDY) for m in lengths])
    assert CompileCounter.count == before


def test_a_draft_of_another_vocabulary_is_refused(stories_dir, tiny_checkpoints, compile_cache):
    with pytest.raises(ValueError, match="vocabulary of 256 tokens, the target 512"):
        LLM(str(stories_dir), compilation_cache_dir=compile_cache, **ENGINE_ARGS,
            speculative_config={"model": str(tiny_checkpoints["llama3"]), "num_speculative_tokens": 2})

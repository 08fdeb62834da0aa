"""The engine on the real stories260K model: batching invariance, prefix caching, preemption, sampling, stopping."""

import jax
import numpy as np
import pytest

from conftest import ENGINE_ARGS, run_out
from rtpjax import LLM, SamplingParams
from rtpjax.runner.greedy import greedy_tokens
from rtpjax.runner.model_runner import CompileCounter

GREEDY = dict(temperature=0, ignore_eos=True)


def random_prompts(n, seed, low=1, high=60):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, rng.integers(low, high)).tolist() for _ in range(n)]


def alone(llm, prompt, max_tokens):
    e = llm.engine
    return list(greedy_tokens(e.runner.params, e.cfg, e.family, prompt, max_tokens, block_size=16, chunk=16))


def assert_all_blocks_free(llm):
    pool = llm.engine.pool
    assert pool.num_free == pool.num_blocks and not any(pool.ref_count)
    assert not llm.engine.requests and not llm.engine.scheduler.running and not llm.engine.scheduler.waiting


def test_batched_greedy_equals_each_alone(stories_llm):
    prompts = random_prompts(16, seed=0)
    lengths = [5 + 3 * i for i in range(16)]
    outs = stories_llm.generate(prompts, [SamplingParams(max_tokens=m, **GREEDY) for m in lengths])
    for prompt, m, out in zip(prompts, lengths, outs):
        assert out.outputs[0].token_ids == alone(stories_llm, prompt, m)
        assert out.outputs[0].finish_reason == "length"
    assert_all_blocks_free(stories_llm)


def test_prefix_cache_off_on_and_hit_give_same_tokens(stories_llm, stories_dir, compile_cache):
    shared = random_prompts(1, seed=1, low=40, high=41)[0]
    prompts = [shared + tail for tail in random_prompts(6, seed=2, low=1, high=20)]
    params = SamplingParams(max_tokens=24, **GREEDY)
    engine = stories_llm.engine
    first = [o.outputs[0].token_ids for o in stories_llm.generate(prompts, params)]
    hits = engine.pool.hits
    second = [o.outputs[0].token_ids for o in stories_llm.generate(prompts, params)]
    assert engine.pool.hits - hits >= 6 * 32  # every request reused at least the two full shared blocks
    off = LLM(str(stories_dir), enable_prefix_caching=False, compilation_cache_dir=compile_cache, **ENGINE_ARGS)
    third = [o.outputs[0].token_ids for o in off.generate(prompts, params)]
    assert off.engine.pool.hits == 0
    assert first == second == third == [alone(stories_llm, p, 24) for p in prompts]


def test_generated_blocks_are_published_under_their_full_chain_hash(stories_llm):
    """Blocks completed during decode are hashed incrementally; the chain must equal one computed from scratch, so a
    later prompt that repeats prompt + output hits every full block."""
    from rtpjax.kv.block_pool import prefix_hashes

    engine = stories_llm.engine
    request = engine.make_request(random_prompts(1, seed=5, low=20, high=21)[0], SamplingParams(max_tokens=60, **GREEDY))
    engine.add(request)
    run_out(engine)
    seq = request.seqs[0]
    full = len(seq.token_ids) // 16  # the last token's K/V is never computed, so its block may stay unpublished
    assert len(seq.block_hashes) >= full - 1 >= 4
    assert seq.block_hashes == prefix_hashes(seq.token_ids, 16)[: len(seq.block_hashes)]
    assert [engine.pool.cached.get(h) is not None for h in seq.block_hashes[: full - 1]] == [True] * (full - 1)
    hits = engine.pool.hits
    stories_llm.generate([seq.token_ids + [5]], SamplingParams(max_tokens=1, **GREEDY))
    assert engine.pool.hits - hits >= (full - 1) * 16


def test_tiny_pool_preempts_and_recomputes_identically(stories_dir, compile_cache):
    import msgspec

    from rtpjax.serve.metrics import Metrics

    llm = LLM(str(stories_dir), num_gpu_blocks=10, compilation_cache_dir=compile_cache,
              **dict(ENGINE_ARGS, max_model_len=160))  # the cache holds one whole sequence
    prompts = random_prompts(6, seed=3, low=20, high=40)
    outs = llm.generate(prompts, SamplingParams(max_tokens=60, **GREEDY))
    preempted = llm.engine.scheduler.num_preemptions
    assert preempted > 0 and llm.engine.stats().num_preemptions == preempted  # also on /metrics, vLLM's name:
    text = Metrics("stories").render(msgspec.structs.asdict(llm.engine.stats())).decode()
    assert f'rtpjax:num_preemptions_total{{model_name="stories"}} {float(preempted)}' in text
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == alone(llm, prompt, 60)
    assert_all_blocks_free(llm)


def test_seeded_sampling_reproduces_across_batch_mixes(stories_llm):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=30, ignore_eos=True)
    prompt = random_prompts(1, seed=4)[0]
    solo = stories_llm.generate(prompt, params)[0].outputs[0].token_ids
    others = random_prompts(7, seed=5)
    mixed = stories_llm.generate(others + [prompt], [SamplingParams(temperature=1.0, max_tokens=20)] * 7 + [params])
    assert mixed[-1].outputs[0].token_ids == solo
    unseeded = stories_llm.generate([prompt] * 2, SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True))
    assert unseeded[0].outputs[0].token_ids != unseeded[1].outputs[0].token_ids  # no seed: independent draws


def test_stop_strings_and_max_tokens_are_exact(stories_llm):
    out = stories_llm.generate([1], SamplingParams(max_tokens=60, **GREEDY))[0].outputs[0]
    full = out.text  # "Once upon a time, there was a little girl named Lily. ..."
    cut = stories_llm.generate([1], SamplingParams(max_tokens=60, stop=["little girl"], **GREEDY))[0].outputs[0]
    assert cut.text == full[: full.index("little girl")]
    assert cut.finish_reason == "stop" and cut.stop_reason == "little girl"
    kept = stories_llm.generate([1], SamplingParams(max_tokens=60, stop="Lily", include_stop_str_in_output=True,
                                                    **GREEDY))[0].outputs[0]  # fmt: skip
    assert kept.text == full[: full.index("Lily") + 4]
    for m in (1, 7, 33):
        o = stories_llm.generate([1], SamplingParams(max_tokens=m, **GREEDY))[0].outputs[0]
        assert len(o.token_ids) == m and o.finish_reason == "length"
        assert o.text == stories_llm.tokenizer.decode(o.token_ids, skip_special_tokens=True)


def test_stop_token_ids_min_tokens_and_logprobs(stories_llm):
    assert stories_llm.engine.eos_ids == (2,)  # EOS takes the same path as stop_token_ids, unless ignore_eos
    free = stories_llm.generate([1], SamplingParams(max_tokens=40, **GREEDY))[0].outputs[0].token_ids
    k = next(i for i in range(8, 40) if free[i] not in free[:i])  # a token that first appears at index k
    stop = free[k]
    out = stories_llm.generate([1], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop]))[0].outputs[0]
    assert out.token_ids == free[: k + 1] and out.finish_reason == "stop" and out.stop_reason == stop
    late = stories_llm.generate([1], SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop],
                                                    min_tokens=k + 6))[0].outputs[0]  # fmt: skip
    assert stop not in late.token_ids[: k + 6] and late.token_ids[:k] == free[:k]
    lp = stories_llm.generate([1], SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0].outputs[0]
    assert len(lp.logprobs) == 5
    for token, entry in zip(lp.token_ids, lp.logprobs):
        assert token in entry and len(entry) == 3  # greedy: the sampled token is the top one
        assert max(entry.values()) == entry[token] <= 0


@pytest.mark.parametrize("length", [20, 100])  # 100: more blocks than the cache has heads (a bug once)
def test_prompt_logprobs_match_a_full_forward(stories_llm, length):
    prompt = random_prompts(1, seed=11, low=length, high=length + 1)[0]
    out = stories_llm.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=2, **GREEDY))[0]
    e = stories_llm.engine
    logits, _ = ragged_logits(e, prompt)
    ref = jax.nn.log_softmax(logits, axis=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for t in range(1, len(prompt)):
        entry = out.prompt_logprobs[t]
        assert abs(entry[prompt[t]] - float(ref[t - 1, prompt[t]])) < 1e-5
        assert set(entry) - {prompt[t]} == set(np.argsort(-np.asarray(ref[t - 1]))[:2].tolist()) - {prompt[t]}


def ragged_logits(engine, prompt):
    from rtpjax.kv import kv_cache
    from rtpjax.runner.greedy import jit_forward
    from rtpjax.runner.step_inputs import SeqChunk, build_step

    assert len(prompt) <= 128
    cache = kv_cache.allocate(engine.cfg, 8, 16)  # padded to 128 tokens: one compiled shape for every length
    step = build_step([SeqChunk(prompt, 0, list(range(8)))], 16, num_tokens=128)
    return jit_forward(engine.family)(engine.runner.params, engine.cfg, step.tokens, step.positions, cache, step.meta)


def test_n_completions_share_the_prompt_blocks(stories_llm):
    prompt = random_prompts(1, seed=6, low=50, high=51)[0]
    out = stories_llm.generate(prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    engine = stories_llm.engine
    rid = engine.add_request(prompt, SamplingParams(n=3, max_tokens=12, **GREEDY))
    seqs = engine.requests[rid].seqs
    for _ in range(100):
        if all(s.block_table for s in seqs):
            break
        engine.step()
    assert all(s.block_table for s in seqs), "not every sample was given blocks in 100 steps"
    assert seqs[1].block_table[:3] == seqs[2].block_table[:3] == seqs[0].block_table[:3]  # 50 tokens: 3 full blocks
    assert engine.pool.ref_count[seqs[0].block_table[0]] == 3 and seqs[1].block_table[3] != seqs[0].block_table[3]
    run_out(engine)
    greedy = stories_llm.generate(prompt, SamplingParams(n=2, max_tokens=12, **GREEDY))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == alone(stories_llm, prompt, 12)
    assert_all_blocks_free(stories_llm)


def test_abort_frees_blocks(stories_llm):
    engine = stories_llm.engine
    rid = engine.add_request(random_prompts(1, seed=8)[0], SamplingParams(max_tokens=100, **GREEDY))
    keep = engine.add_request([1], SamplingParams(max_tokens=10, **GREEDY))
    for _ in range(3):
        engine.step()
    assert engine.pool.num_free < engine.pool.num_blocks
    out = engine.abort(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    done = {o.request_id: o for o in run_out(engine)}
    assert rid not in done and done[keep].outputs[0].finish_reason == "length"
    assert_all_blocks_free(stories_llm)


def test_bad_requests_fail_alone(stories_llm):
    engine = stories_llm.engine
    good = engine.add_request([1], SamplingParams(max_tokens=8, **GREEDY))
    engine.step()
    bad = [
        (lambda: engine.add_request([5] * 300, SamplingParams(max_tokens=1)), "context is 256"),
        (lambda: engine.add_request([5] * 200, SamplingParams(max_tokens=100)), "exceeds the model's context"),
        (lambda: engine.add_request([1], SamplingParams(max_tokens=0)), "max_tokens must be"),
        (lambda: engine.add_request([1], SamplingParams(top_p=0)), "top_p must be in"),
        (lambda: engine.add_request([1], SamplingParams(top_p=1.5)), "top_p must be in"),
        (lambda: engine.add_request([1, 512], SamplingParams()), "outside the vocabulary"),
        (lambda: engine.add_request([-1], SamplingParams()), "outside the vocabulary"),
        (lambda: engine.add_request([], SamplingParams()), "prompt is empty"),
        (lambda: engine.add_request([1], SamplingParams(logprobs=50)), "logprobs must be between"),
    ]
    for call, message in bad:
        with pytest.raises(ValueError, match=message):
            call()
    done = {o.request_id: o for o in run_out(engine)}
    assert len(done[good].outputs[0].token_ids) == 8
    assert_all_blocks_free(stories_llm)


@pytest.mark.slow
def test_no_compilation_after_warmup(stories_llm):
    rng = np.random.default_rng(9)
    before = CompileCounter.count
    prompts = random_prompts(200, seed=10, low=1, high=120)
    params = [
        SamplingParams(
            temperature=float(rng.choice([0, 0.7, 1.2])), top_p=float(rng.choice([1.0, 0.8])),
            top_k=int(rng.choice([0, 20])), min_p=float(rng.choice([0, 0.1])), max_tokens=int(rng.integers(1, 24)),
            repetition_penalty=float(rng.choice([1.0, 1.2])), presence_penalty=float(rng.choice([0, 0.5])),
            logprobs=int(rng.choice([0, 5])), n=int(rng.choice([1, 1, 2])), seed=int(rng.integers(1000)),
            stop=["the"] if rng.random() < 0.2 else None, prompt_logprobs=[None, 0, 3][rng.integers(3)],
        )
        for _ in prompts
    ]  # fmt: skip
    # Prompt logprobs of every length bucket, up to the model's context (256).
    prompts += [random_prompts(1, seed=20 + n, low=n, high=n + 1)[0] for n in (150, 254)]
    params += [SamplingParams(max_tokens=2, prompt_logprobs=2)] * 2
    outs = stories_llm.generate(prompts, params)
    assert len(outs) == 202 and all(o.finished for o in outs)
    scored = [(prompt, out) for prompt, p, out in zip(prompts, params, outs) if p.prompt_logprobs is not None]
    assert len(scored) > 50 and all(len(out.prompt_logprobs) == len(prompt) for prompt, out in scored)
    assert CompileCounter.count == before, f"{CompileCounter.count - before} compilations after warm-up"
    assert_all_blocks_free(stories_llm)


def host_greedy_with_penalties(llm, prompt, n, rep, presence, frequency):
    """Greedy decoding with the penalties applied on the host in numpy, recomputing the full sequence each token."""
    e = llm.engine
    tokens = list(prompt)
    for _ in range(n):
        logits, _ = ragged_logits(e, tokens)
        x = np.asarray(logits[len(tokens) - 1], np.float64)
        out = tokens[len(prompt) :]
        counts = np.bincount(out, minlength=x.size) if out else np.zeros(x.size)
        seen = counts > 0
        seen[prompt] = True
        x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
        x = x - frequency * counts - presence * (counts > 0)
        tokens.append(int(np.argmax(x)))
    return tokens[len(prompt) :]


def test_penalties_match_a_host_reference(stories_llm):
    prompt = [1, 403, 407, 261]
    results = []
    for rep, presence, frequency in [(3.0, 0.0, 0.0), (1.0, 2.0, 0.0), (1.0, 0.0, 2.0), (1.5, 1.0, 1.0)]:
        params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, repetition_penalty=rep,
                                presence_penalty=presence, frequency_penalty=frequency)  # fmt: skip
        got = stories_llm.generate(prompt, params)[0].outputs[0].token_ids
        assert got == host_greedy_with_penalties(stories_llm, prompt, 60, rep, presence, frequency)
        results.append(got)
    plain = stories_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))[0]
    assert all(r != plain.outputs[0].token_ids for r in results)  # the penalties really changed the output


def test_a_penalised_sequence_counts_only_its_own_tokens(stories_llm):
    """Its slot's history is rebuilt at admission from the tokens known then, not from the placeholder of the token
    its first step samples (which counted as the vocabulary's last token)."""
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, frequency_penalty=0.5)
    out = stories_llm.generate([1, 403, 407, 261], params)[0].outputs[0].token_ids
    slot = stories_llm.engine.scheduler.free_slots[-1]  # the slot it ran in (given back last)
    counts = np.asarray(stories_llm.engine.runner.state.output_counts)[slot]
    assert counts.tolist() == np.bincount(out, minlength=counts.size).tolist()


def test_filters_that_leave_one_token_sample_the_argmax(stories_llm):
    prompt = random_prompts(1, seed=13)[0]
    greedy = stories_llm.generate(prompt, SamplingParams(max_tokens=16, **GREEDY))[0].outputs[0].token_ids
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        params = SamplingParams(temperature=1.5, seed=5, max_tokens=16, ignore_eos=True, **kw)
        assert stories_llm.generate(prompt, params)[0].outputs[0].token_ids == greedy, kw

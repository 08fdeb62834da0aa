"""Sampler variants: the host picks the cheapest executable for a step, and it must give exactly what the full one
gives for those requests (tokens, logprobs, state), whatever mix of requests the step holds."""

import dataclasses

import jax
import numpy as np
import pytest

from rtpjax.runner import sampler
from rtpjax.sampling_params import MAX_LOGPROBS, MAX_STOP_TOKEN_IDS

S, V = 6, 300
FULL = sampler.Variant("filtered", True)


def inputs(rng, **rows) -> sampler.SamplingInputs:
    """Neutral (greedy, unpenalised) sequences, with `rows` = {field: {row: value}} overriding."""
    f32, i32 = np.float32, np.int32
    a = dict(
        slot=np.arange(S, dtype=i32), samples=np.ones(S, bool), temperature=np.zeros(S, f32),
        top_k=np.zeros(S, i32), top_p=np.ones(S, f32), min_p=np.zeros(S, f32),
        repetition_penalty=np.ones(S, f32), presence_penalty=np.zeros(S, f32), frequency_penalty=np.zeros(S, f32),
        seed=rng.integers(0, 2**32, S, dtype=np.uint32), index=np.zeros(S, i32), position=rng.integers(0, 9, S, dtype=i32),
        suppress=np.full((S, MAX_STOP_TOKEN_IDS), -1, i32), logprobs=np.zeros(S, bool),
    )  # fmt: skip
    a["suppress"][1, :2] = [7, 11]  # a sequence under min_tokens
    for field, values in rows.items():
        for row, value in values.items():
            a[field][row] = value
    return sampler.SamplingInputs(**a)


def state(rng) -> sampler.SamplerState:
    history = rng.integers(0, V, (S + 1, 40))
    seen = np.zeros((S + 1, V), bool)
    counts = np.zeros((S + 1, V), np.int32)
    for r in range(S):
        seen[r, history[r, :20]] = True
        np.add.at(counts[r], history[r, 20:], 1)
    return sampler.SamplerState(rng.integers(0, V, S + 1).astype(np.int32), seen, counts,
                                np.zeros((S + 1, 0), np.int32), np.zeros(S + 1, np.int32),
                                np.zeros((S + 1, 0), np.int32), np.zeros(S + 1, np.int32))  # fmt: skip


CASES = {
    "all greedy": ({}, sampler.Variant("greedy", False)),
    "temperature only": ({"temperature": {2: 0.8, 4: 1.3}}, sampler.Variant("random", False)),
    "top-p on a greedy row changes nothing": ({"top_p": {0: 0.5}}, sampler.Variant("greedy", False)),
    "top-k": ({"temperature": {2: 0.8}, "top_k": {2: 5}}, sampler.Variant("filtered", False)),
    "min-p": ({"temperature": {3: 1.0}, "min_p": {3: 0.1}}, sampler.Variant("filtered", False)),
    "penalties": ({"repetition_penalty": {5: 1.3}, "frequency_penalty": {0: 0.5}}, sampler.Variant("greedy", False)),
    "logprobs": ({"logprobs": {1: True}, "temperature": {4: 0.7}}, sampler.Variant("random", True)),
    "everything": ({"temperature": {0: 0.9}, "top_p": {0: 0.8}, "presence_penalty": {2: 0.4}, "logprobs": {3: True}},
                   FULL),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_cheapest_variant_equals_the_full_sampler(case):
    rows, expected = CASES[case]
    rng = np.random.default_rng(sorted(CASES).index(case))
    s, st = inputs(rng, **rows), state(rng)
    logits = rng.standard_normal((S, V)).astype(np.float32) * 3
    assert sampler.variant_for(s) == expected
    full_out, full_state = jax.jit(sampler.sample, static_argnums=3)(logits, st, s, FULL)
    # The chosen variant, and every variant that has at least its stages, agree with the full sampler.
    for variant in sampler.VARIANTS:
        order = ("greedy", "random", "filtered")
        if order.index(variant.mode) < order.index(expected.mode) or variant.logprobs < expected.logprobs:
            continue
        out, new_state = jax.jit(sampler.sample, static_argnums=3)(logits, st, s, variant)
        assert np.array_equal(out.tokens, full_out.tokens), variant
        assert np.array_equal(out.logprob, full_out.logprob), variant
        for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(full_state)):
            assert np.array_equal(a, b), variant
        if variant.logprobs:
            assert np.array_equal(out.top_ids, full_out.top_ids) and np.array_equal(out.top_logprobs, full_out.top_logprobs)
        else:
            assert not np.any(out.top_ids) and out.top_ids.shape == (S, MAX_LOGPROBS)
    assert not np.isin(np.asarray(full_out.tokens)[1], [7, 11])  # suppressed ids are never drawn, in every variant


def test_a_variant_that_omits_a_needed_stage_differs():
    """The check above could not fail if the stages did nothing: dropping them does change these sequences."""
    rng = np.random.default_rng(9)
    s = inputs(rng, temperature={0: 1.0, 2: 1.0}, top_k={0: 2}, logprobs={3: True})
    st, logits = state(rng), rng.standard_normal((S, V)).astype(np.float32) * 3
    sample = jax.jit(sampler.sample, static_argnums=3)
    full, _ = sample(logits, st, s, FULL)
    out, _ = sample(logits, st, s, dataclasses.replace(FULL, mode="greedy"))
    assert not np.array_equal(out.tokens, full.tokens)
    out, _ = sample(logits, st, s, dataclasses.replace(FULL, logprobs=False))
    assert np.array_equal(out.tokens, full.tokens) and not np.array_equal(out.top_ids, full.top_ids)


def test_neutral_filters_keep_the_whole_vocabulary():
    """A row with top_p = 1, top_k = 0 and min_p = 0 is not filtered, even over a Llama-3-sized vocabulary where the
    float32 running sum of probabilities reaches 1 before the tail: its draws then do not depend on its neighbours."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((S, 128256)) * 2).astype(np.float32)
    s = inputs(rng, temperature={r: 1.0 for r in range(S)}, top_p={0: 0.9}, top_k={1: 50})
    out = np.asarray(jax.jit(sampler._filter)(logits, s))
    assert np.array_equal(out[2:], logits[2:])  # neutral rows untouched
    assert np.isinf(out[0]).sum() > 0 and np.isinf(out[1]).sum() == 128256 - 50  # the asked-for filters still work

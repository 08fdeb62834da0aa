"""Speculation's parts without an engine: verification against the target distribution (statistically, on a small
vocabulary), the penalties' history inside a verify step, prompt lookup, and speculative_config's errors."""

import jax
import numpy as np
import pytest

from rtpjax.options import EngineArgs
from rtpjax.runner import sampler
from rtpjax.runner.verify import VerifyInputs
from rtpjax.runner.verify import verify as _verify
from rtpjax.sampling_params import MAX_STOP_TOKEN_IDS
from rtpjax.spec.config import SpeculativeConfig
from rtpjax.spec.ngram import NgramProposer, device_lookup, lookup

V = 8
verify = jax.jit(_verify, static_argnums=(3,))
LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.2, 0.0, -1.0, -3.0], np.float32)


def rows(n, **fields) -> sampler.SamplingInputs:
    f32, i32 = np.float32, np.int32
    a = dict(
        slot=np.zeros(n, i32), samples=np.ones(n, bool), temperature=np.zeros(n, f32), top_k=np.zeros(n, i32),
        top_p=np.ones(n, f32), min_p=np.zeros(n, f32), repetition_penalty=np.ones(n, f32),
        presence_penalty=np.zeros(n, f32), frequency_penalty=np.zeros(n, f32), seed=np.arange(n, dtype=np.uint32),
        index=np.zeros(n, i32), position=np.zeros(n, i32), suppress=np.full((n, MAX_STOP_TOKEN_IDS), -1, i32),
        logprobs=np.zeros(n, bool),
    )  # fmt: skip
    for name, value in fields.items():
        a[name][:] = value
    return sampler.SamplingInputs(**a)


def empty_state(slots):
    return sampler.init_state(slots, V)


def target(temperature, top_k):
    """The distribution a plain step draws from: temperature, then the top-k most likely tokens."""
    x = LOGITS.astype(np.float64) / temperature
    x = np.where(x >= np.sort(x)[-top_k], x, -np.inf)
    p = np.exp(x - x.max())
    return p / p.sum()


@pytest.mark.parametrize("draft", [0, 3, 7])  # likely, unlikely, excluded by top-k
def test_verification_preserves_the_target_distribution(draft):
    """N sequences, each one draft: the first output token (the draft if accepted, else the target's correction) is
    distributed as the target, and the draft is accepted with probability p(draft)."""
    n, k, temperature, top_k = 6000, 1, 0.8, 5
    seeds = np.arange(n, dtype=np.uint32) * 7919 + draft
    s = rows(n * (k + 1), temperature=temperature, top_k=top_k, seed=np.repeat(seeds, k + 1),
             slot=np.repeat(np.arange(n), k + 1))  # fmt: skip
    v = VerifyInputs(s, np.full((n, k), draft, np.int32), np.ones(n, np.int32))
    logits = np.tile(LOGITS, (n * (k + 1), 1))
    out, _ = verify(logits, empty_state(n), v, sampler.Variant("filtered", False))
    first = np.asarray(out.tokens).reshape(n, k + 1)[:, 0]
    p = target(temperature, top_k)
    counts = np.bincount(first, minlength=V)
    assert counts[p == 0].sum() == 0
    expected = p[p > 0] * n
    chi2 = ((counts[p > 0] - expected) ** 2 / expected).sum()
    assert chi2 < 18.47, (counts, expected)  # chi-square, 4 degrees of freedom: exceeded with probability 0.001
    rate = np.asarray(out.num_accepted).mean()
    assert abs(rate - p[draft]) < 4 * np.sqrt(max(p[draft] * (1 - p[draft]), 1e-9) / n) + 1e-9


def test_a_verify_row_sees_the_drafts_before_it_in_its_penalties():
    """Row j draws after drafts 0..j-1 were accepted: penalties count them, as a plain step after those tokens would."""
    k = 3
    drafts = np.array([[0, 1, 0]], np.int32)  # token 0 is everyone's argmax; penalised once drafted
    s = rows(k + 1, presence_penalty=2.0, position=np.arange(k + 1))
    logits = np.tile(LOGITS, (k + 1, 1))
    out, state = verify(logits, empty_state(1), VerifyInputs(s, drafts, np.array([k], np.int32)),
                        sampler.Variant("greedy", False))  # fmt: skip
    history = np.zeros(V, np.int32)
    expected = []
    for j in range(k + 1):
        counts = history[None].copy()
        plain = sampler.draw(LOGITS[None], counts, counts > 0, rows(1, presence_penalty=2.0, position=j),
                             sampler.Variant("greedy", False))  # fmt: skip
        expected.append(int(plain.tokens[0]))
        if j < k:
            history[drafts[0, j]] += 1
    assert np.asarray(out.tokens).tolist() == expected == [0, 1, 2, 2]
    assert int(out.num_accepted[0]) == 2  # drafts 0, 1 agree; the third (0) does not: the target says 2
    # The state records the kept tokens only: 0, 1 and the correction 2 (not the rejected draft).
    assert np.asarray(state.output_counts)[0].tolist()[:3] == [1, 1, 1] and int(state.last_token[0]) == 2


def test_no_drafts_is_a_plain_step():
    s = rows(4, temperature=0.9, seed=np.array([5, 5, 9, 9]), slot=np.array([0, 0, 1, 1]))
    out, _ = verify(np.tile(LOGITS, (4, 1)), empty_state(2), VerifyInputs(s, np.zeros((2, 1), np.int32),
                    np.zeros(2, np.int32)), sampler.Variant("random", False))  # fmt: skip
    plain, _ = jax.jit(sampler.sample, static_argnums=(3,))(np.tile(LOGITS, (2, 1)), empty_state(2), rows(2, temperature=0.9, seed=[5, 9],
                              slot=[0, 1]), sampler.Variant("random", False))  # fmt: skip
    assert np.asarray(out.tokens)[::2].tolist() == np.asarray(plain.tokens).tolist()
    assert np.asarray(out.num_accepted).tolist() == [0, 0]


def test_prompt_lookup():
    ids = np.array([5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 5, 6, 7], np.int32)
    assert lookup(ids, 3, 2, 4) == [2, 3, 5]  # the latest earlier occurrence of [5, 6, 7]
    assert lookup(np.array([1, 2, 3, 9, 2, 3, 4, 1, 2, 3], np.int32), 2, 2, 4) == [9, 2]  # longest suffix first
    assert lookup(np.array([1, 2, 3, 4], np.int32), 3, 2, 4) == []
    assert lookup(np.array([4, 1, 4], np.int32), 3, 1, 4) == [1, 4]
    assert lookup(np.array([4], np.int32), 3, 1, 4) == []


def lookup_by_definition(ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup as the docs say it, in plain Python: for n from the longest down, the tokens after the latest
    earlier occurrence of the last n tokens."""
    for n in range(min(n_max, len(ids) - 1), n_min - 1, -1):
        for start in range(len(ids) - n - 1, -1, -1):
            if ids[start : start + n] == ids[len(ids) - n :]:
                return ids[start + n : start + n + k]
    return []


def test_prompt_lookup_matches_its_definition():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        ids = rng.integers(0, int(rng.integers(2, 8)), int(rng.integers(1, 50))).tolist()
        k, n_min = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        n_max = int(rng.integers(n_min, 6))
        assert lookup(np.array(ids, np.int32), k, n_min, n_max) == lookup_by_definition(ids, k, n_min, n_max), ids


def test_the_device_lookup_is_the_host_lookup():
    """Chained rounds take their drafts from the device's lookup: the same drafts as the host's for every row, on
    short and repetitive rows, rows shorter than their buffer (stale tokens past the end) and empty rows."""
    rng = np.random.default_rng(2)
    run = jax.jit(device_lookup, static_argnums=(2, 3, 4))
    for _ in range(12):
        k, n_min = int(rng.integers(1, 6)), int(rng.integers(1, 4))
        n_max = int(rng.integers(n_min, 6))
        history = rng.integers(0, 9, (32, 48)).astype(np.int32)
        length = rng.integers(0, 49, 32).astype(np.int32)
        for r in range(32):
            history[r, : length[r]] = rng.integers(0, int(rng.integers(2, 8)), length[r])
        drafts, count = (np.asarray(a) for a in run(history, length, k, n_min, n_max))
        for r in range(32):
            want = lookup_by_definition(history[r, : length[r]].tolist(), k, n_min, n_max) if length[r] else []
            assert drafts[r, : count[r]].tolist() == want and not drafts[r, count[r] :].any()


class FakeSeq:
    def __init__(self, ids):
        self.token_ids = ids


def test_ngram_history_follows_the_token_list():
    """The proposer's incremental copy of a sequence's tokens equals the list as it grows past its buffer, as its
    tail is cut and regrown (a finished sequence's trim) and when the list is replaced."""
    rng = np.random.default_rng(1)
    proposer, seq = NgramProposer(2, 4), FakeSeq([])
    for _ in range(300):
        if rng.random() < 0.1 and seq.token_ids:
            del seq.token_ids[int(rng.integers(0, len(seq.token_ids))) :]
        elif rng.random() < 0.05:
            seq.token_ids = rng.integers(0, 9, len(seq.token_ids) + int(rng.integers(1, 40))).tolist()
        else:
            seq.token_ids += rng.integers(0, 9, int(rng.integers(1, 30))).tolist()
        assert proposer.history(seq).tolist() == seq.token_ids
        ids = seq.token_ids
        assert proposer.propose([seq], [3]) == [lookup_by_definition(ids, 3, 2, 4)]


@pytest.mark.parametrize("value, message", [
    ('{"method": "ngram"', "not valid JSON"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of"),
    ({"model": "/draft", "num_speculative_tokens": 2}, "is not a folder with a config.json"),
    ({"method": "eagle3", "num_speculative_tokens": 2}, "method eagle3 needs a model"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "method draft_model needs a model"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be an integer >= 1"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_mx": 3}, "did you mean 'prompt_lookup_max'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "prompt_lookup_max must be an integer >= 3"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "ngram takes no model"),
    ([1], "must be a JSON object"),
])  # fmt: skip
def test_speculative_config_errors(value, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(speculative_config=value)


def test_speculative_config_from_the_command_line():
    import argparse

    from rtpjax.options import add_engine_arguments, engine_args_from

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    ns = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    config = engine_args_from(ns).speculative_config
    assert SpeculativeConfig.parse(config) == SpeculativeConfig("ngram", 3)


def test_empty_proposal_rounds_back_off_and_drafts_reset_it():
    """A proposer that finds nothing: speculation (which gives up the loop's overlap) is tried again after 1, 2, 4,
    ... steps up to MAX_SKIP; a round with drafts makes every step speculate again."""
    from types import SimpleNamespace

    from rtpjax.spec.speculator import MAX_SKIP, Speculator

    class Proposer:
        drafts: list = []

        def propose(self, seqs, ks):
            return [list(self.drafts) for _ in seqs]

    class Seq:  # hashable, as the engine's sequences are
        params = SimpleNamespace(speculative=True)
        draft_acceptance = 1.0

    seq = Seq()
    scheduler = SimpleNamespace(running=[seq], waiting=[], max_drafts=lambda s: 4)
    spec = Speculator(SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 4}), Proposer())
    pattern = []
    for _ in range(80):
        on = spec.active(scheduler)
        pattern.append(on)
        if on:
            assert spec.drafts(scheduler) == {}
    rounds = [i for i, on in enumerate(pattern) if on]
    assert [b - a - 1 for a, b in zip(rounds, rounds[1:])][:6] == [1, 2, 4, 8, 16, MAX_SKIP]
    Proposer.drafts = [5, 6]
    assert any(spec.active(scheduler) for _ in range(MAX_SKIP + 1)), "speculation stayed off"
    assert spec.drafts(scheduler) == {seq: [5, 6]}
    assert all(spec.active(scheduler) for _ in range(5))


def test_a_chained_round_starts_at_the_worst_case_and_moves_back_when_the_round_ahead_is_read():
    from rtpjax.engine.scheduler import Scheduler
    from rtpjax.engine.sequence import PENDING, Sequence
    from rtpjax.kv.block_pool import BlockPool
    from rtpjax.sampling_params import SamplingParams

    def decoding(scheduler, max_tokens=30, min_tokens=0):
        seq = Sequence("r", 0, [1, 2, 3, 4, 5], SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens), 0,
                       max_tokens)  # fmt: skip
        scheduler.add(seq)
        scheduler.schedule()  # the prompt
        seq.token_ids[-1] = 6  # read
        return seq

    pool = BlockPool(16)
    scheduler = Scheduler(pool, 4, 4, 64, 64, max_verify_seqs=4)
    seq = decoding(scheduler)
    ahead = scheduler.schedule({seq: [7, 8, 9]})  # verifies 6 7 8 9 at positions 5-8
    chained = scheduler.chain(ahead, {seq: 4})
    [item] = chained.items
    assert (item.start, item.num_tokens, item.chained, seq.num_computed) == (9, 5, True, 14)
    assert len(seq.block_table) == 4  # room for positions up to 13: the worst case
    scheduler.accept(ahead.items[0], [7, 11], then=item)  # one draft accepted, 11 in place of 8
    assert seq.token_ids == [1, 2, 3, 4, 5, 6, 7, 11, PENDING] and item.start == 7 and seq.num_computed == 12
    assert len(seq.block_table) == 3 and pool.num_free == 13  # the worst case's last block back
    scheduler.accept(item, [12, 13, 14])  # the chained round: two of its drafts accepted
    assert seq.token_ids[-4:] == [11, 12, 13, 14] and seq.num_computed == 10

    # A sequence without drafts (opted out, or room for one more token only) goes on as a plain row of the round;
    # with no drafts for anyone it would not be a verify round.
    scheduler = Scheduler(BlockPool(16), 4, 4, 64, 64, max_verify_seqs=4)
    seq, other = decoding(scheduler), decoding(scheduler)  # the second's prompt ran beside the first's decode
    seq.token_ids[-1] = 7  # read
    ahead = scheduler.schedule({seq: [8, 9, 10]})
    assert ahead.verify and scheduler.chain(ahead, {}) is None
    rows = {item.seq: item for item in scheduler.chain(ahead, {seq: 4}).items}
    assert (rows[seq].num_tokens, rows[other].num_tokens, rows[other].drafts, rows[other].chained) == (5, 1, [], True)

    # Refused (the next round then waits for the read): a sequence waiting for admission, a sequence that may still
    # suppress its stop tokens, one that may reach max_tokens in the round ahead, more tokens than the step's budget,
    # no blocks for the worst case.
    for case in ("waiting", "min_tokens", "max_tokens", "budget", "blocks"):
        pool = BlockPool(3 if case == "blocks" else 16)
        scheduler = Scheduler(pool, 4, 4, 6 if case == "budget" else 64, 64, max_verify_seqs=4)
        seq = decoding(scheduler, max_tokens=5 if case == "max_tokens" else 30,
                       min_tokens=9 if case == "min_tokens" else 0)
        ahead = scheduler.schedule({seq: [7, 8, 9]})
        if case == "waiting":
            scheduler.add(Sequence("w", 0, [1, 2], SamplingParams(), 0, 4))
        free = pool.num_free
        assert scheduler.chain(ahead, {seq: 8 if case == "budget" else 4}) is None, case
        assert pool.num_free == free and seq.num_computed == 9


def test_a_catch_up_splits_over_calls_within_the_token_and_sequence_limits():
    import itertools

    from rtpjax.spec.draft_model import calls_within_budget

    queue = [["a", 0, 0, 3], ["b", 1, 2, 12], ["c", 2, 5, 6], ["d", 3, 0, 2]]  # [seq, state, start, end]
    calls = list(itertools.islice(calls_within_budget(queue, limit=8, max_seqs=3), 10))
    assert not queue
    # a whole (3) and b's first 5 (cut short: no owner yet); then b's last 5, c's 1 and d's 2: all finished
    assert calls == [([("a", 0, 0, 3), ("b", 1, 2, 5)], [(0, "a", 0)], 8),
                     ([("b", 1, 7, 5), ("c", 2, 5, 1), ("d", 3, 0, 2)], [(0, "b", 1), (1, "c", 2), (2, "d", 3)], 8)]
    queue = [[s, i, 0, 1] for i, s in enumerate("abcde")]
    calls = itertools.islice(calls_within_budget(queue, limit=8, max_seqs=2), 10)
    assert [len(p) for p, _, _ in calls] == [2, 2, 1]  # by sequences

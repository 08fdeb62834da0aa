"""The router's pieces without processes: the prefix index, the step-cost fit, the policies' choices, and the block
pool's KV events."""

import time

import pytest

from rtpjax.distributed.messages import AllBlocksCleared, BlockRemoved, BlockStored
from rtpjax.kv.block_pool import BlockPool, block_hash, prefix_hashes
from rtpjax.router.cost import PRIOR, CostModel
from rtpjax.router.index import PrefixIndex
from rtpjax.router.policy import Policy, Prompt
from rtpjax.router.workers import Worker

HASHES = prefix_hashes(list(range(64)), 16)  # 4 blocks


def stored(hashes):
    return BlockStored(list(hashes), None, [0] * 16 * len(hashes), 16, None, "GPU", None)


def test_index_matches_leading_blocks_and_follows_removals():
    index = PrefixIndex()
    index.apply("a", [stored(HASHES[:3])])
    index.apply("b", [stored(HASHES[:1]), stored(HASHES[2:])])  # holds block 2 without block 1: no longer run
    assert index.match(HASHES, ["a", "b", "c"]) == {"a": 3, "b": 1, "c": 0}
    index.apply("a", [BlockRemoved([HASHES[1]], "GPU")])
    assert index.match(HASHES, ["a", "b"]) == {"a": 1, "b": 1}
    index.apply("b", [AllBlocksCleared()])
    assert index.match(HASHES, ["a", "b"]) == {"a": 1, "b": 0}
    index.forget("a")
    assert index.match(HASHES, ["a", "b"]) == {"a": 0, "b": 0} and not index.holders


def test_index_credits_routed_prompts_until_they_expire():
    index = PrefixIndex(tentative_s=0.05)
    index.note_routed("a", HASHES[:2])
    index.apply("a", [AllBlocksCleared()])  # an engine's first batch does not wipe what was just routed to it
    assert index.match(HASHES, ["a", "b"]) == {"a": 2, "b": 0}
    time.sleep(0.06)
    assert index.match(HASHES, ["a", "b"]) == {"a": 0, "b": 0}
    index.expire()
    assert index.routed == {"a": {}}


def test_cost_model_recovers_step_time_from_cumulative_counters():
    a, b = 0.004, 2e-4
    model = CostModel()
    assert (model.a, model.b) == PRIOR and not model.calibrated
    steps = tokens = 0
    busy = 0.0
    model.observe(steps, tokens, busy)
    for per_step in (10, 200, 50, 120, 30, 250):
        steps, tokens, busy = steps + 5, tokens + 5 * per_step, busy + 5 * (a + b * per_step)
        model.observe(steps, tokens, busy)
    assert model.calibrated
    assert model.a == pytest.approx(a) and model.b == pytest.approx(b)
    model.observe(1, 0, 0.0)  # a restarted replica: its counters start again, no bogus point
    assert model.b == pytest.approx(b)
    # 300 tokens ahead + 100 new at 64 tokens a step with 4 decoding: ceil(400 / 60) = 7 steps of 64 tokens
    assert model.ttft(300, 100, 4, 64) == pytest.approx(7 * (a + b * 64))


def worker(url, unfinished=0, waiting_tokens=0, running=0):
    w = Worker(url)
    w.reported({"num_unfinished": unfinished, "waiting_prompt_tokens": waiting_tokens, "num_running": running,
                "max_num_batched_tokens": 64, "block_size": 16})  # fmt: skip
    return w


def test_cache_aware_prefers_the_cached_prefix_unless_the_queue_costs_more():
    index = PrefixIndex()
    index.apply("http://a", [stored(HASHES)])
    policy = Policy("cache_aware", index)
    prompt = Prompt(70, HASHES)
    a, b = worker("http://a", unfinished=2, waiting_tokens=10), worker("http://b")
    d = policy.choose(prompt, [a, b])
    assert (d.worker, d.reason, d.cached_tokens) == (a, "prefix", 64)
    a_busy = worker("http://a", unfinished=4, waiting_tokens=1200)  # 19 steps to its turn against 2 to prefill
    d = policy.choose(prompt, [a_busy, b])
    assert (d.worker, d.reason, d.cached_tokens) == (b, "moved", 0)
    cold = Prompt(70, prefix_hashes(list(range(500, 570)), 16))  # cached nowhere
    assert policy.choose(cold, [a, b]).reason == "ttft"
    hot = worker("http://a", unfinished=40)  # the balance guard (40 > 0 * 1.5 + 8), past even a sticky prefix's (4 * 8)
    d = policy.choose(prompt, [hot, b])
    assert (d.worker, d.reason) == (b, "balance")


def test_cache_aware_under_load_keeps_a_long_prefix_where_it_is_cached():
    """A slightly longer queue on the replica holding 1024 of the prompt's 1040 tokens beats prefilling them again
    on one with requests of its own (each would wait for that prefill). Against an idle replica it keeps the prefix
    while its TTFT is within `sticky_rel` of the idle one's; without stickiness TTFT alone decides."""
    long = prefix_hashes(list(range(1024)), 16)
    index = PrefixIndex()
    index.apply("http://a", [stored(long)])
    policy = Policy("cache_aware", index)
    prompt = Prompt(1040, long)
    holder = worker("http://a", unfinished=8, waiting_tokens=1100)  # 18 steps of the prior's 64 tokens to its turn
    busy = worker("http://b", unfinished=6)  # 17 steps to prefill the whole prompt, 6 requests held up meanwhile
    d = policy.choose(prompt, [holder, busy])
    assert (d.worker, d.reason, d.cached_tokens) == (holder, "prefix", 1024)
    idle = worker("http://b")
    assert policy.choose(prompt, [holder, idle]).worker is holder  # 18 steps to its turn against 17 to prefill
    assert Policy("cache_aware", index, sticky_fraction=2.0).choose(prompt, [holder, idle]).worker is idle
    deep = worker("http://a", unfinished=8, waiting_tokens=9000)  # 141 steps to its turn: more than 8 times 17
    assert policy.choose(prompt, [deep, idle]).worker is idle


def test_round_robin_and_least_load():
    a, b = worker("http://a", unfinished=3), worker("http://b", unfinished=1)
    rr = Policy("round_robin")
    assert [rr.choose(Prompt(), [a, b]).worker for _ in range(4)] == [a, b, a, b]
    least = Policy("least_load")
    assert least.choose(Prompt(), [a, b]).worker is b
    done = [b.begin(10) for _ in range(3)]  # sent since its last report: counted until the next
    assert least.choose(Prompt(), [a, b]).worker is a
    for end in done:
        end()
    assert least.choose(Prompt(), [a, b]).worker is b
    with pytest.raises(ValueError, match="--policy must be one of"):
        Policy("random")


def test_block_pool_events_chain_blocks_and_report_evictions():
    pool = BlockPool(2, kv_events=True)
    assert pool.drain_events() == [AllBlocksCleared()]
    blocks = pool.allocate(2)
    tokens = list(range(32))
    pool.register(blocks[0], HASHES[0], None, tokens[:16])
    pool.register(blocks[1], HASHES[1], HASHES[0], tokens[16:])
    assert pool.drain_events() == [BlockStored(HASHES[:2], None, tokens, 16, None, "GPU", None)]
    pool.release(blocks)
    pool.allocate(1)  # evicts the tail block first
    assert pool.drain_events() == [BlockRemoved([HASHES[1]], "GPU")]
    assert BlockPool(2).drain_events() == [] and BlockPool(2).events is None


def test_prefix_hashes_are_the_block_hash_chain_over_full_blocks():
    tokens = [7, -3, 2**31 - 1, -(2**31)] * 9  # 36 tokens: two full blocks of 16, four left over
    for extra in (b"", b"adapter"):
        first = block_hash(None, tokens[:16], extra)
        assert prefix_hashes(tokens, 16, extra) == [first, block_hash(first, tokens[16:32], extra)]
    assert prefix_hashes(tokens[:15], 16) == [] and len(prefix_hashes(tokens, 1)) == 36


def test_fast_encoder_gives_the_tokenizers_own_ids(stories_dir):
    """The router's prompt tokenizing (the Rust tokenizer called directly) against tokenizer.encode, as the engine
    tokenizes: the same ids with and without special tokens, special tokens in the text included."""
    from rtpjax.loading.tokenizer import fast_encoder, load_tokenizer

    tok = load_tokenizer(stories_dir)
    encode = fast_encoder(tok)
    assert getattr(encode, "__self__", None) is not tok  # the fast path, not tok.encode
    texts = ["", "Once upon a time", " two  spaces\n\ttab", "<s>a</s> <unk> b", "héllo 日本 🙂" * 40]
    for text in texts:
        assert encode(text) == tok.encode(text), text
        assert encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False), text

    class Plain:
        def encode(self, text):
            return [len(text)]

    plain = Plain()
    assert fast_encoder(plain) == plain.encode  # a tokenizer that is no stock fast one keeps its own encode


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_router_overhead_benchmark_runs(stories_dir, tmp_path, stream):
    """benchmarks/router_bench.py overhead on CPU, tiny: stub replicas, a few requests direct and through the
    router (streamed: each must end with [DONE])."""
    import json

    from rtpjax.benchmarks import router_bench

    out = tmp_path / "overhead.json"
    row = router_bench.main(["overhead", "--tokenizer", str(stories_dir), "--rate", "20", "--seconds", "1",
                             "--out", str(out), *(["--stream"] if stream else [])])  # fmt: skip
    assert row["requests"] == 20 and row["routed_p50_ms"] > 0 and row["router_cpu_ms_per_request"] > 0
    assert json.loads(out.read_text())["stream"] == stream


def test_data_parallel_replicas_get_the_same_flags_and_their_share_of_devices(monkeypatch):
    import argparse

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    from rtpjax.router.launch import replica_envs
    from rtpjax.serve.launch import add_arguments, replica_argv

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["m", "--port", "9000", "--data-parallel-size", "2", "--max-num-seqs", "4",
                              "--no-enable-prefix-caching", "--api-key", "k"])  # fmt: skip
    argv = replica_argv(args)
    again = parser.parse_args(argv)
    assert again.max_num_seqs == 4 and again.enable_prefix_caching is False and again.api_key == "k"
    assert again.model == "m" and again.data_parallel_size == 1 and "--port" not in argv
    assert replica_envs(2, 2, gpus=4) == [{"CUDA_VISIBLE_DEVICES": "0,1"}, {"CUDA_VISIBLE_DEVICES": "2,3"}]
    assert replica_envs(2, 1, gpus=1) == [{"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.450"}] * 2


def test_an_unmeasured_replica_is_costed_as_its_measured_peer():
    """A busy, measured replica holding the prefix must not lose to an idle one whose prior looks faster."""
    index = PrefixIndex()
    index.apply("http://a", [stored(HASHES[:3])])
    a, b = worker("http://a"), worker("http://b")
    a.cost.a, a.cost.b, a.cost.calibrated = 0.05, 1e-3, True  # slow steps, measured
    assert Policy("cache_aware", index).choose(Prompt(56, HASHES[:3]), [a, b]).worker is a


def test_a_conversations_next_turn_stays_on_its_replica_before_any_kv_event():
    """The next turn resends the history: it goes where the last turn went (credited at routing, no event yet) although
    a less loaded replica predicts a slightly lower TTFT, and moves only when that replica is clearly overloaded."""
    index = PrefixIndex()
    policy = Policy("cache_aware", index)
    turn1 = list(range(160))
    a, b = worker("http://a"), worker("http://b", unfinished=1)
    first = policy.choose(Prompt(len(turn1), prefix_hashes(turn1, 16)), [a, b])
    assert first.worker is a
    index.note_routed(a.url, prefix_hashes(turn1, 16))  # as the router does when it sends the request
    turn2 = turn1 + list(range(1000, 1176))  # the answer and the next question
    prompt = Prompt(len(turn2), prefix_hashes(turn2, 16))
    a, b = worker("http://a", unfinished=4, waiting_tokens=300), worker("http://b", unfinished=2)
    d = policy.choose(prompt, [a, b])
    assert (d.worker, d.reason, d.cached_tokens) == (a, "prefix", 160)
    overloaded = worker("http://a", unfinished=4, waiting_tokens=3000)  # 50 steps to its first token against 6
    assert policy.choose(prompt, [overloaded, b]).worker is b
    busier = worker("http://a", unfinished=14)  # set aside by the balance guard (14 > 2 * 1.5 + 8), not by stickiness
    assert policy.choose(prompt, [busier, b]).worker is busier
    assert policy.choose(prompt, [worker("http://a", unfinished=36), b]).worker is b  # 36 > 2 * 1.5 + 4 * 8


def test_cold_prompts_go_round_replicas_whose_fits_differ_by_noise():
    """New prompts (cached nowhere) arriving together go round the replicas although their fitted step costs differ
    a little and the replicas' reports do not show them yet (each report resets what the router counted as sent); a
    replica busier by more than a few such prefills is passed over."""
    index = PrefixIndex()
    policy = Policy("cache_aware", index)
    workers = [worker(f"http://{name}") for name in "abcd"]
    for i, w in enumerate(workers):
        w.cost.a, w.cost.b, w.cost.calibrated = 5e-3 * (1 - 0.03 * i), 5e-5, True  # d looks 9% faster than a
    placed = []
    for n in range(8):
        prompt = Prompt(256, prefix_hashes(list(range(1000 * n, 1000 * n + 256)), 16))
        d = policy.choose(prompt, workers)
        assert d.reason == "ttft"
        d.worker.begin(prompt.num_tokens)
        index.note_routed(d.worker.url, prompt.hashes)
        placed.append(d.worker.url[-1])
        d.worker.reported(dict(d.worker.load))  # sent before the replica queued it: its report does not count it
    assert sorted(placed) == sorted("abcd" * 2) and len(set(placed[:4])) == 4, placed
    busy = [worker("http://a", waiting_tokens=2000)] + [worker(f"http://{name}") for name in "bcd"]
    index = PrefixIndex()
    for w in busy[1:]:  # sent to lately; the busy one not
        index.note_routed(w.url, prefix_hashes(list(range(256)), 16))
    cold = Prompt(256, prefix_hashes(list(range(9000, 9256)), 16))
    assert Policy("cache_aware", index).choose(cold, busy).worker is not busy[0]
    for queued in (100, 300):  # busier by less than the prompt's prefill, and by more than one
        near = worker("http://a", waiting_tokens=queued)
        assert Policy("cache_aware", index).choose(cold, [near, *busy[1:]]).worker is near  # sent nothing lately


def test_blocks_sent_lately_outlive_the_tentative_credit():
    """What a replica was sent counts for spreading new prompts for `sent_s`, long after its tentative credit for
    matching (`tentative_s`) has gone; both go at their own time."""
    index = PrefixIndex(tentative_s=0.01, sent_s=60.0)
    index.note_routed("http://a", HASHES)
    time.sleep(0.05)
    index.expire()
    assert index.match(HASHES, ["http://a"]) == {"http://a": 0}
    assert index.recent("http://a") == len(HASHES) and index.recent("http://b") == 0
    index.note_routed("http://a", HASHES[:2])  # sent again: still the same distinct blocks
    assert index.recent("http://a") == len(HASHES)
    short = PrefixIndex(tentative_s=0.01, sent_s=0.02)
    short.note_routed("http://a", HASHES)
    time.sleep(0.05)
    short.expire()
    assert short.recent("http://a") == 0


def test_blocks_sent_lately_expire_oldest_first(monkeypatch):
    """A block sent again moves to the back: it outlives blocks sent once before it, and expire() drops the rest."""
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    index = PrefixIndex(tentative_s=1.0, sent_s=10.0)
    a, b = HASHES[:1], HASHES[1:2]
    index.note_routed("http://a", a + b)
    clock[0] = 105.0
    index.note_routed("http://a", a)  # refreshed: until 115, b until 110
    clock[0] = 111.0
    index.expire()
    assert list(index.sent["http://a"]) == a and index.recent("http://a") == 1
    clock[0] = 116.0
    assert index.recent("http://a") == 0 and index.recent("http://never") == 0

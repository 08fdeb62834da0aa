"""Admission when the KV pool is the bottleneck: room for a whole prompt beside running sequences, longest cached
prefix first (lpm) without starving anyone, decode headroom (room kept for what running sequences are expected to
generate, so that a pool admitted to the brim does not preempt its own sequences), and the simulator that compares
scheduling choices on a modelled GPU."""

import itertools

import pytest

from rtpjax.benchmarks import sched_sim
from rtpjax.engine import scheduler as scheduler_module
from rtpjax.engine.scheduler import Scheduler
from rtpjax.engine.sequence import Sequence
from rtpjax.kv.block_pool import BlockPool
from rtpjax.options import EngineArgs
from rtpjax.sampling_params import SamplingParams


def sequence(order: int, prompt_len: int, max_tokens: int) -> Sequence:
    prompt = [order * 1000 + i for i in range(prompt_len)]  # no two share a prefix
    return Sequence(str(order), 0, prompt, SamplingParams(max_tokens=max_tokens), 0, max_tokens, arrival_order=order)


@pytest.mark.parametrize("share, admitted, kept", [(0.0, True, 0), (0.5, True, 3), (1.0, False, 7)])
def test_admission_leaves_room_for_the_running_sequences_growth(share, admitted, kept):
    """20 blocks of 4 tokens. The running sequence holds 9 (33 tokens computed, its 34th pending) and may generate 30
    more, whose `share` is `kept` blocks more (the last token's K/V is never computed). The waiting one has a 16-token
    prompt and 32 tokens to generate: 4 blocks, and 4 more for half of its output or 8 for all of it; 11 are free."""
    scheduler = Scheduler(BlockPool(20), 4, 4, 64, 256, decode_headroom=share)
    first, second = sequence(0, 32, 32), sequence(1, 16, 32)
    scheduler.add(first)
    scheduler.schedule()
    assert scheduler.running == [first] and len(first.block_table) == 8
    scheduler.add(second)
    first.token_ids[-1] = 7  # its first token read
    schedule = scheduler.schedule()
    assert (second in schedule.admitted) == admitted and len(first.block_table) == 9
    assert scheduler._expected_blocks(first, first.num_computed) == kept


def test_beside_others_a_prompt_needs_room_for_all_of_it_not_its_first_chunk():
    """12 blocks of 4 tokens, 8-token steps; a running sequence holds 3. A 40-token prompt's first chunk (2 blocks)
    fits in the 9 free blocks, all of it (10) does not: it waits, rather than take the blocks and preempt someone as
    its later chunks come. Alone, it is admitted on its first chunk and goes on chunk by chunk."""
    scheduler = Scheduler(BlockPool(12), 4, 4, 8, 256)
    running, waiting = sequence(0, 8, 8), sequence(1, 40, 4)
    scheduler.add(running)
    scheduler.schedule()
    running.token_ids[-1] = 7
    scheduler.add(waiting)
    assert scheduler.schedule().admitted == [] and scheduler.pool.num_free == 12 - 3
    scheduler.finish(running, "abort")
    assert scheduler.schedule().admitted == [waiting] and len(waiting.block_table) == 2


def test_a_sequence_alone_is_admitted_whatever_it_may_grow_into():
    scheduler = Scheduler(BlockPool(8), 4, 4, 64, 256, decode_headroom=1.0)
    seq = sequence(0, 16, 200)  # 54 blocks at full length: more than the pool
    scheduler.add(seq)
    assert scheduler.schedule().admitted == [seq]


def run_to_the_end(scheduler: Scheduler, seqs: list[Sequence]) -> dict[str, list[int]]:
    for seq in seqs:
        scheduler.add(seq)
    for step in range(2000):
        if not scheduler.has_work():
            break
        for item in scheduler.schedule().items:
            seq = item.seq
            if item.samples:
                seq.token_ids[-1] = len(seq.token_ids)  # its "token": its position
            scheduler.register_full_blocks(seq)
            if seq.num_generated >= seq.max_tokens:
                scheduler.finish(seq, "length")
    assert not scheduler.has_work() and scheduler.pool.num_free == scheduler.pool.num_blocks
    return {seq.request_id: seq.output_ids for seq in seqs}


def test_headroom_ends_the_preemptions_of_a_pool_admitted_to_the_brim():
    """Six sequences whose prompts fit together but whose outputs do not: without headroom they preempt each other,
    with all of max_tokens kept none is preempted; both finish every sequence with the same tokens."""
    outputs = {}
    for share in (0.0, 1.0):
        scheduler = Scheduler(BlockPool(24), 4, 8, 32, 256, decode_headroom=share)
        outputs[share] = run_to_the_end(scheduler, [sequence(i, 12, 24) for i in range(6)])
        assert (scheduler.num_preemptions > 0) == (share == 0)
    assert outputs[0.0] == outputs[1.0]


@pytest.mark.parametrize("num_blocks, drafted", [(9, False), (11, True)])
def test_drafts_do_not_take_the_blocks_kept_for_a_running_prompts_later_chunks(num_blocks, drafted):
    """Blocks of 4 tokens, 8-token steps. A decoding sequence (4-token prompt) and a 24-token prompt admitted beside
    it with room for all of it (6 blocks), computed 7 tokens a step. In 9 blocks, seven drafts would take 2 blocks
    that the prompt's last chunk needs, and the prompt would be preempted for a guess: the decoding one verifies no
    drafts instead. In 11 there is room for both (the drafts then take the step's budget)."""
    scheduler = Scheduler(BlockPool(num_blocks), 4, 4, 8, 256, max_verify_seqs=4)
    decoding, prompt = sequence(0, 4, 20), sequence(1, 24, 1)
    scheduler.add(decoding)
    scheduler.schedule()
    decoding.token_ids[-1] = 7
    scheduler.add(prompt)
    assert scheduler.schedule().admitted == [prompt] and scheduler._kept_for_running() == 4
    decoding.token_ids[-1] = 8
    schedule = scheduler.schedule({decoding: [5] * 7})
    assert schedule.preempted == [] and any(item.drafts for item in schedule.items) == drafted
    assert len(decoding.block_table) == (4 if drafted else 2) and len(prompt.block_table) == (2 if drafted else 4)


CASES = [("lpm", 0, False, "2"), ("fcfs", 0, False, "1"), ("lpm", 1, False, "1"), ("lpm", 0, True, "1")]


@pytest.mark.parametrize("policy, young_priority, passed_over, admitted", CASES)
def test_lpm_admits_the_sequence_whose_prefix_the_cache_holds_first(policy, young_priority, passed_over, admitted):
    """10 blocks of 4 tokens, 4 of them holding a finished prompt's prefix. An older sequence brings its own prompt (6
    blocks); a younger one shares those 4 blocks and needs 1 more. Room for one of them: lpm takes the younger, fcfs
    the older; a lower priority (a larger number) still goes after, and so does a younger one once the older has been
    passed over LPM_MAX_PASSES times."""
    scheduler = Scheduler(BlockPool(10), 4, 4, 64, 256, policy=policy)
    done = sequence(0, 17, 1)
    run_to_the_end(scheduler, [done])
    old = sequence(1, 23, 8)
    old.passed_over = scheduler_module.LPM_MAX_PASSES if passed_over else 0
    young = Sequence("2", 0, done.prompt_ids[:16] + [5, 6, 7], SamplingParams(max_tokens=8), 0, 8,
                     priority=young_priority, arrival_order=2)  # fmt: skip
    scheduler.add(old)
    scheduler.add(young)
    assert [seq.request_id for seq in scheduler.schedule().admitted] == [admitted]
    if admitted == "2":
        assert len(young.block_table) == 5 and young.num_computed == 19  # (16 of them from the cache)
        assert old.passed_over == 1  # counted towards its bound


def test_a_long_queue_is_admitted_in_arrival_order(monkeypatch):
    """Past LPM_MAX_WAITING waiting sequences, lpm orders by arrival (no lookup per sequence)."""
    monkeypatch.setattr(scheduler_module, "LPM_MAX_WAITING", 1)
    test_lpm_admits_the_sequence_whose_prefix_the_cache_holds_first("lpm", 0, False, "1")


def test_the_simulator_runs_the_real_scheduler_and_the_host_tier_takes_prefixes_off_the_device():
    traffic = sched_sim.Traffic(num_prompts=48, num_prefixes=8, prefix_len=256, suffix_len=32, output_len=16,
                                max_concurrency=8)  # fmt: skip
    config = dict(num_blocks=160, max_num_batched_tokens=256, max_num_seqs=16, max_model_len=1024, policy="fcfs")
    device = sched_sim.run(sched_sim.SimConfig(**config), traffic)
    tiered = sched_sim.run(sched_sim.SimConfig(**config, host_tier=True), traffic)
    total = traffic.num_prompts * (traffic.prefix_len + traffic.suffix_len)
    for run in (device, tiered):
        assert run["steps"] > 0 and run["p95_ttft_ms"] >= run["p50_ttft_ms"] > 0
    assert device["blocks_loaded"] == 0 and tiered["blocks_loaded"] > 0
    # every prefix is computed once with the tier; the suffixes (and recomputed preempted sequences) always
    assert tiered["prompt_tokens_computed"] < device["prompt_tokens_computed"] <= total * 2
    assert tiered["prompt_tokens_computed"] >= traffic.num_prefixes * traffic.prefix_len


def test_the_simulator_at_a_request_rate_counts_ttft_from_arrival_or_from_a_free_client():
    """--request-rate: Poisson arrivals (serve_bench's open loop). Far below capacity each request runs alone, its
    TTFT one prefill step; all at once (closed loop) they queue for the step's token budget; under a cap of one
    client, TTFT counts from when the client was free (as serve_bench's), not from the request's arrival."""
    import dataclasses

    traffic = sched_sim.Traffic(num_prompts=16, num_prefixes=16, prefix_len=128, suffix_len=16, output_len=4,
                                max_concurrency=16)  # fmt: skip
    config = sched_sim.SimConfig(num_blocks=400, max_num_batched_tokens=256, max_num_seqs=16, max_model_len=512,
                                 step_ms=5.0, token_ms=0.01)  # fmt: skip
    one_step = config.step_ms + config.token_ms * (traffic.prefix_len + traffic.suffix_len)
    slow = sched_sim.run(config, dataclasses.replace(traffic, request_rate=0.1))
    assert slow["max_ttft_ms"] == pytest.approx(one_step)
    assert slow["duration_s"] >= dataclasses.replace(traffic, request_rate=0.1).arrivals(16)[-1] > 10
    closed = sched_sim.run(config, traffic)
    assert closed["max_ttft_ms"] > 8 * one_step and closed["duration_s"] < 1
    capped = sched_sim.run(config, dataclasses.replace(traffic, request_rate=1000.0, max_concurrency=1))
    assert capped["max_ttft_ms"] < 3 * one_step < capped["duration_s"] * 1e3 / 8


def test_the_simulator_sends_each_turn_of_a_conversation_on_its_history_after_its_pause():
    """multi_turn: each turn is the conversation so far (its prompts and answers) and new input, so later turns find
    the earlier ones cached; with --think-time a conversation also waits its seeded pauses between turns."""
    import dataclasses

    from rtpjax.benchmarks.serve_bench import think_times

    traffic = sched_sim.Traffic(dataset_name="multi_turn", num_prompts=6, num_turns=3, input_len=32, output_len=4,
                                max_concurrency=2)  # fmt: skip
    config = sched_sim.SimConfig(num_blocks=200, max_num_batched_tokens=256, max_num_seqs=4, max_model_len=512,
                                 step_ms=5.0, token_ms=0.01)  # fmt: skip
    at_once = sched_sim.run(config, traffic)
    sent = 2 * (32 + (32 + 4 + 32) + (32 + 4 + 32 + 4 + 32))  # two conversations' three turns
    cached = 2 * (32 + 64)  # whole blocks of 16 of each earlier turn (its last answer token's K/V is never computed)
    assert at_once["prompt_tokens_computed"] == sent - cached and at_once["prefix_hit_rate"] > 0.4
    paused = sched_sim.run(config, dataclasses.replace(traffic, think_time=2.0))
    pauses = [sum(think_times(2.0, traffic.seed, conversation, 3)) for conversation in (0, 1)]
    assert paused["duration_s"] >= max(pauses) > 0.1 > at_once["duration_s"]
    assert paused["prompt_tokens_computed"] == at_once["prompt_tokens_computed"]
    # one client: a pause holds none (the other conversation's turns run meanwhile), nor does it count in TTFT
    one = sched_sim.run(config, dataclasses.replace(traffic, think_time=2.0, max_concurrency=1))
    assert one["duration_s"] < sum(pauses) and one["max_ttft_ms"] < 3 * (config.step_ms + config.token_ms * 104)
    with pytest.raises(ValueError, match="past --max-model-len 100"):
        sched_sim.run(dataclasses.replace(config, max_model_len=100), traffic)


@pytest.mark.parametrize("option, message", [
    (dict(scheduling_policy="sjf"), "--scheduling-policy must be lpm or fcfs"),
    (dict(decode_headroom=1.5), r"--decode-headroom must be a number in \[0, 1\]"),
])
def test_bad_admission_options_fail_by_their_flags(option, message):
    with pytest.raises(ValueError, match=message):
        EngineArgs(**option)


def test_the_simulator_runs_another_versions_scheduler_beside_this_one(tmp_path):
    """--scheduler-module: a copy of this scheduler gives this one's results; options it lacks are not passed."""
    import inspect

    source = inspect.getsource(scheduler_module).replace("policy: str = \"lpm\", ", "")
    source = source.replace("        if policy not in", "        policy = \"lpm\"\n        if policy not in")
    (tmp_path / "older.py").write_text(source)
    assert "policy" not in inspect.signature(sched_sim.scheduler_class(str(tmp_path / "older.py"))).parameters
    traffic = sched_sim.Traffic(num_prompts=24, num_prefixes=4, prefix_len=128, suffix_len=16, output_len=8,
                                max_concurrency=6)  # fmt: skip
    config = dict(num_blocks=96, max_num_batched_tokens=128, max_num_seqs=8, max_model_len=512)
    this = sched_sim.run(sched_sim.SimConfig(**config), traffic)
    older = sched_sim.run(sched_sim.SimConfig(**config, scheduler_module=str(tmp_path / "older.py")), traffic)
    assert older == this


def test_under_lpm_a_sequence_with_nothing_cached_is_not_starved_by_a_stream_of_cached_prefixes():
    """A sequence with no cached prefix waits behind a steady stream of later arrivals that share a resident one, each
    of which lpm prefers: once passed over LPM_MAX_PASSES times it goes first and is admitted."""
    scheduler = Scheduler(BlockPool(30), 4, 8, 64, 512)
    shared = list(range(500, 532))  # 8 blocks every stream sequence shares, and 4 of its own (40 + 5 tokens)
    run_to_the_end(scheduler, [Sequence("s", 0, shared + [1], SamplingParams(max_tokens=1), 0, 1)])
    lonely = sequence(1, 60, 4)  # 16 blocks of its own: room for it only while fewer than 2 stream sequences run
    order, admitted_at = itertools.count(2), None
    for step in range(2000):
        if step == 1:
            scheduler.add(lonely)  # once the stream runs: it is never alone
        while len(scheduler.waiting) < 3:
            i = next(order)
            scheduler.add(Sequence(str(i), 0, shared + [i] * 8, SamplingParams(max_tokens=6), 0, 6, arrival_order=i))
        schedule = scheduler.schedule()
        if lonely in schedule.admitted:
            admitted_at = step
            break
        for item in schedule.items:
            if item.samples:
                item.seq.token_ids[-1] = 7
            scheduler.register_full_blocks(item.seq)
            if item.seq.num_generated >= item.seq.max_tokens:
                scheduler.finish(item.seq, "length")
    assert admitted_at is not None, "starved"
    assert lonely.passed_over == 0 and admitted_at >= scheduler_module.LPM_MAX_PASSES  # (it was passed until then)


def test_the_simulator_charges_a_prompt_step_its_padding_by_the_token_buckets_asked_for():
    def cost(buckets, prompt, rows):
        return sched_sim.SimConfig(max_num_batched_tokens=2048, token_buckets=buckets).prompt_cost_tokens(prompt, rows)

    assert cost("exact", 1024, 1025) == 1024  # a 1,024-token chunk beside one decode row
    assert cost("powers", 1024, 1025) == 2047 and cost("quarters", 1024, 1025) == 1279  # padded; the decode row not
    assert cost("quarters", 0, 200) == 0 and cost("quarters", 100, 100) == 128  # decode alone: step_ms only
    with pytest.raises(ValueError, match="--token-buckets must be"):
        sched_sim.SimConfig(token_buckets="octaves")

"""Multi-step decode (--num-scheduler-steps): several decode iterations per launch give the tokens of plain steps
(greedy, seeded sampling with penalties, stops inside an iteration run, max_tokens that is no multiple of K), fall
back to plain steps where they cannot be exact (requests waiting, logprobs, min_tokens), leak no block, never compile
after warm-up, and hold under tensor parallelism and MoE."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ENGINE_ARGS, run_out
from rtpjax import LLM, SamplingParams
from rtpjax.engine.scheduler import Scheduler
from rtpjax.engine.sequence import PENDING, Sequence
from rtpjax.kernels.metadata import AttentionMetadata
from rtpjax.kv.block_pool import BlockPool
from rtpjax.options import EngineArgs
from rtpjax.runner.model_runner import CompileCounter, StepBatch
from rtpjax.runner import multi_step
from rtpjax.runner.multi_step import iteration

K = 4


def prompts(n, seed, low=1, high=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 512, rng.integers(low, high)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def multi_llm(stories_dir, compile_cache):
    return LLM(str(stories_dir), compilation_cache_dir=compile_cache, num_scheduler_steps=K, **ENGINE_ARGS)


@pytest.fixture
def launches(multi_llm, monkeypatch):
    """The multi-step launches of `multi_llm`, each as its sequences' iterations (a test that cannot fail by never
    taking that path)."""
    runner, counted = multi_llm.engine.runner, []
    dispatch = runner._dispatch_multi

    def counting(inputs, sampling, variant):
        counted.append([int(n) for n in np.asarray(inputs.steps) if n])
        return dispatch(inputs, sampling, variant)

    monkeypatch.setattr(runner, "_dispatch_multi", counting)
    return counted


def all_blocks_free(llm):
    pool = llm.engine.pool
    return pool.num_free == pool.num_blocks and not any(pool.ref_count) and not llm.engine.requests


def tokens(llm, batch, params):
    return [o.outputs[0].token_ids for o in llm.generate(batch, params)]


def test_the_tokens_of_plain_steps(stories_llm, multi_llm, launches):
    """Greedy, seeded sampling with penalties and filters, stop strings and EOS (stops inside a launch's
    iterations), and max_tokens that are no multiple of K, in one batch."""
    batch = prompts(8, seed=1)
    params = [SamplingParams(temperature=0, max_tokens=37, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=5, max_tokens=30, repetition_penalty=1.3, presence_penalty=0.4),
              SamplingParams(temperature=1.1, seed=6, top_k=20, top_p=0.9, max_tokens=23, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=1),
              SamplingParams(temperature=0.7, seed=8, min_p=0.1, max_tokens=41, stop=["the", "."]),
              SamplingParams(temperature=0, max_tokens=2),
              SamplingParams(temperature=1.0, seed=9, max_tokens=50, frequency_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=13, stop_token_ids=[13, 24, 50])]  # fmt: skip
    assert tokens(multi_llm, batch, params) == tokens(stories_llm, batch, params)
    assert launches and max(map(max, launches)) == K
    assert all_blocks_free(multi_llm)


def test_seeded_sampling_alone_equals_in_a_batch(multi_llm, launches):
    """A seeded request gives the same tokens alone (all its launches multi-step) and beside others that end at other
    times (its iterations run beside sequences that stopped, and then alone)."""
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=29)
    prompt = prompts(1, seed=2)[0]
    alone = tokens(multi_llm, [prompt], params)[0]
    others = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 17)]
    batched = tokens(multi_llm, [prompt] + prompts(3, seed=3), [params] + others)[0]
    assert batched == alone and len(launches) > 10


def test_logprobs_and_min_tokens_decode_plainly(stories_llm, multi_llm, launches):
    """A request asking for logprobs keeps the whole batch on plain steps; one under min_tokens only until it passes
    them (its stop ids suppressed exactly as in plain steps)."""
    batch = prompts(3, seed=4)
    lp = [SamplingParams(temperature=0, max_tokens=12, logprobs=2, ignore_eos=True)] * 3
    plain = stories_llm.generate(batch, lp)
    multi = multi_llm.generate(batch, lp)
    assert [o.outputs[0].token_ids for o in multi] == [o.outputs[0].token_ids for o in plain]
    for m, p in zip(multi, plain):  # (the same ids; values to float rounding: a prefix hit runs other shapes)
        for got, want in zip(m.outputs[0].logprobs, p.outputs[0].logprobs):
            assert got.keys() == want.keys() and np.allclose(list(got.values()), list(want.values()), atol=1e-4)
    assert launches == []
    first = tokens(stories_llm, batch[:1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    # stop at the 3rd token; min_tokens 5 suppresses it as a stop there, so the sequence runs on to max_tokens
    params = SamplingParams(temperature=0, max_tokens=20, min_tokens=5, stop_token_ids=[first[2]])
    assert tokens(multi_llm, batch[:1], params) == tokens(stories_llm, batch[:1], params)
    assert launches


def test_blocks_it_publishes_hold_the_right_kv(stories_llm, multi_llm, launches):
    """A sequence with fewer iterations left than K (max_tokens 7: 1 + 4 + 2) repeats its last position past them
    without writing it: that position closes a block the prefix cache publishes (26 + 7 - 1 = 32 tokens), and a
    follow-up prompt that hits the block continues as it does on a cache that never held it."""
    first = [p + [9] * (26 - len(p)) for p in prompts(4, seed=7, high=20)]
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    sampled = int(multi_llm.engine.runner.state.output_counts.sum())
    follow = [p + out + [5, 6, 7] for p, out in zip(first, tokens(multi_llm, first, params))]
    # iterations past a sequence's steps sample nothing: the state counts 7 tokens each, as plain steps leave it
    assert int(multi_llm.engine.runner.state.output_counts.sum()) - sampled == 4 * 7
    hits = multi_llm.engine.pool.hits
    again = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert tokens(multi_llm, follow, again) == tokens(stories_llm, follow, again)
    assert multi_llm.engine.pool.hits - hits >= 4 * 32 and min(map(min, launches)) < K


def test_tokens_past_a_stop_never_reach_the_prefix_cache(stories_llm, multi_llm, launches):
    """A 13-token prompt stopped at its 2nd generated token: plain steps publish no block; a multi-step computed its
    16th token's K/V past the stop, and does not publish that block either."""
    prompt = prompts(1, seed=12, low=13, high=14)[0]
    second = tokens(stories_llm, [prompt], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0][1]
    params = SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[second])
    published = []
    for llm in (stories_llm, multi_llm):
        before = set(llm.engine.pool.cached)
        assert len(tokens(llm, [prompt], params)[0]) == 2
        published.append(len(set(llm.engine.pool.cached) - before))
    assert published == [0, 0] and launches[0] == [K]


def test_abort_in_flight_frees_every_block(multi_llm, launches):
    engine = multi_llm.engine
    rid = engine.add_request(prompts(1, seed=5)[0], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    keep = engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert launches and engine.inflight is not None and engine.inflight[0].steps == K
    engine.abort(rid)
    done = {o.request_id: o for o in run_out(engine)}
    assert rid not in done and len(done[keep].outputs[0].token_ids) == 10
    assert all_blocks_free(multi_llm)


@pytest.mark.slow
def test_no_compilation_after_warmup(multi_llm, launches):
    rng = np.random.default_rng(3)
    batch = prompts(40, seed=6)
    params = [SamplingParams(temperature=float(rng.choice([0, 0.8])), top_p=float(rng.choice([1.0, 0.9])),
                             max_tokens=int(rng.integers(1, 30)), seed=int(rng.integers(100)))
              for _ in batch]  # fmt: skip
    before = CompileCounter.count
    multi_llm.generate(batch, params)
    for n in range(1, 9):  # every multi-step bucket (1, 2, 4, 8 sequences)
        multi_llm.generate(batch[:n], SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    assert CompileCounter.count == before, f"{CompileCounter.count - before} compilations after warm-up"
    assert len(launches) >= 16  # (two per small batch: 8 tokens after the first)


# -- the scheduler ------------------------------------------------------------------------------------------------


def started(scheduler: Scheduler, specs: list[tuple[int, int, dict]]) -> list[Sequence]:
    """Sequences (prompt length, max_tokens, sampling options) admitted together and their first step read: those
    whose prompts ran whole decode now."""
    seqs = [Sequence(str(i), 0, list(range(1, n + 1)), SamplingParams(max_tokens=m, **o), 0, m, arrival_order=i)
            for i, (n, m, o) in enumerate(specs)]  # fmt: skip
    for seq in seqs:
        scheduler.add(seq)
    assert len(scheduler.schedule().admitted) == len(seqs)
    for seq in seqs:
        seq.token_ids = [7 if t == PENDING else t for t in seq.token_ids]
    return seqs


@pytest.mark.slow
def test_one_launch_holds_every_running_sequence(stories_llm, stories_dir, compile_cache, monkeypatch):
    """A batch wider than small ones (34 sequences, up to max_num_seqs) decodes in multi-step launches that hold all
    of it, with the tokens of plain steps."""
    wide = LLM(str(stories_dir), compilation_cache_dir=compile_cache, num_scheduler_steps=K,
               warmup=False, **{**ENGINE_ARGS, "max_num_seqs": 34, "max_num_batched_tokens": 64})  # fmt: skip
    runner, widths = wide.engine.runner, []
    dispatch = runner._dispatch_multi
    monkeypatch.setattr(runner, "_dispatch_multi",
                        lambda inputs, *rest: widths.append(int(np.count_nonzero(np.asarray(inputs.steps))))
                        or dispatch(inputs, *rest))  # fmt: skip
    batch = prompts(34, seed=21, high=8)
    params = [SamplingParams(temperature=0, max_tokens=6 + i % 5, ignore_eos=True) for i in range(34)]
    assert tokens(wide, batch, params) == tokens(stories_llm, batch, params)
    assert runner.multi_step_seqs == 34 and max(widths) == 34
    assert all_blocks_free(wide)


def test_a_multi_step_covers_every_running_sequence_within_its_limits():
    """Blocks of 4 tokens, K = 4, a context of 32: one sequence with 2 tokens left to generate, one 3 tokens short of
    the context, one free to take all 4; each is grown for exactly its iterations."""
    scheduler = Scheduler(BlockPool(40), 4, 8, 64, 32, num_scheduler_steps=K)
    short, edge, free = started(scheduler, [(6, 3, {}), (28, 10, {}), (5, 20, {})])
    schedule = scheduler.schedule()
    assert schedule.steps == K and [i.steps for i in schedule.items] == [2, 3, 4]
    assert [i.num_tokens for i in schedule.items] == [1, 1, 1] and schedule.computed == 9
    for item in schedule.items:
        seq = item.seq
        assert seq.token_ids[-item.steps :] == [PENDING] * item.steps and seq.num_computed == item.start + item.steps
        assert len(seq.block_table) == -(-seq.num_computed // 4)
    assert len(edge.token_ids) == 32 and short.num_generated == 3 and free.num_generated == 5


def test_sequences_whose_last_tokens_are_on_their_way_sit_out_and_full_slots_do_not_hold_it_back():
    """Of two running sequences one has a single token left (max_tokens 2): it takes one iteration beside the other's K,
    and with that token in flight sits out the next launch.
    A request waiting while every slot is taken could not be admitted: it does not hold the multi-step back. Where
    every sequence has one token left, the step is plain."""
    scheduler = Scheduler(BlockPool(40), 4, 2, 64, 64, num_scheduler_steps=K)
    done, going = started(scheduler, [(6, 2, {}), (5, 20, {})])
    scheduler.add(Sequence("w", 0, [1, 2, 3], SamplingParams(max_tokens=5), 0, 5, arrival_order=9))
    schedule = scheduler.schedule()
    assert schedule.steps == K and [(i.seq, i.steps) for i in schedule.items] == [(done, 1), (going, K)]
    schedule = scheduler.schedule()  # both in flight: `done` has nothing left; `going` another K
    assert [(i.seq, i.steps) for i in schedule.items] == [(going, K)]
    scheduler = Scheduler(BlockPool(40), 4, 2, 64, 64, num_scheduler_steps=K)
    started(scheduler, [(6, 2, {}), (5, 2, {})])
    schedule = scheduler.schedule()
    assert schedule.steps == 1 and [i.steps for i in schedule.items] == [1, 1]


@pytest.mark.parametrize("case", ["waiting", "min_tokens", "logprobs", "over_budget", "no_blocks", "prefilling"])
def test_plain_steps_where_a_multi_step_cannot_be_exact(case):
    scheduler = Scheduler(BlockPool(8 if case == "no_blocks" else 40), 4, 8, 17 if case == "prefilling" else 64, 64,
                          num_scheduler_steps=K)  # fmt: skip
    options = {"min_tokens": 3} if case == "min_tokens" else {"logprobs": 1} if case == "logprobs" else {}
    specs = [(31 if case == "no_blocks" else 6, 20, options)]
    if case in ("over_budget", "prefilling"):  # prefilling: its 39-token prompt runs over several steps
        specs.append((9 if case == "over_budget" else 39, 20, {}))
    started(scheduler, specs)
    if case == "over_budget":  # more running sequences than a step's tokens (a budget below max_num_seqs)
        scheduler.max_num_batched_tokens = 1
    if case == "waiting":
        scheduler.add(Sequence("w", 0, [1, 2, 3], SamplingParams(max_tokens=5), 0, 5, arrival_order=9))
    if case == "no_blocks":  # its 31 computed tokens fill the pool's 8 blocks; K more need a 9th
        assert scheduler.pool.num_free == 0
    schedule = scheduler.schedule()
    assert schedule.steps == 1 and all(item.steps == 1 for item in schedule.items) and schedule.items


# -- the device program -----------------------------------------------------------------------------------------


def test_each_iteration_moves_every_sequence_one_position_within_its_steps():
    """Two sequences (contexts 5 and 10, blocks of 4) and a padding row: iteration j reads position + j while the
    sequence has iterations left, then stays at its last one and writes nothing."""
    tables = np.array([[3, 7, 0], [1, 2, 5], [0, 0, 0]], np.int32)
    meta = AttentionMetadata(jnp.array([0, 1, 2, 2]), jnp.array([5, 10, 0]), jnp.asarray(tables),
                             jnp.array([7 * 4 + 0, 5 * 4 + 1, -1, -1]))  # fmt: skip
    batch = StepBatch(jnp.zeros(4, jnp.int32), jnp.full(4, -1), jnp.array([4, 9, 0, 0]), meta, jnp.array([0, 1, 0]))
    steps = jnp.array([3, 1, 0])
    for j, (positions, slots, lens) in enumerate([([4, 9, 0, 0], [28, 21, -1, -1], [5, 10, 0]),
                                                  ([5, 9, 0, 0], [29, -1, -1, -1], [6, 10, 0]),
                                                  ([6, 9, 0, 0], [30, -1, -1, -1], [7, 10, 0]),
                                                  ([6, 9, 0, 0], [-1, -1, -1, -1], [7, 10, 0])]):  # fmt: skip
        step, real, _ = iteration(batch, steps, j, 4)
        assert step.positions.tolist() == positions and step.meta.slot_mapping.tolist() == slots
        assert step.meta.seq_lens.tolist() == lens and real.tolist() == [True, True, False, False]


# -- options, tensor parallelism, MoE ---------------------------------------------------------------------------


@pytest.mark.parametrize("options", [dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2}),
                                     dict(pipeline_parallel_size=2)])  # fmt: skip
def test_other_multi_token_steps_are_refused_at_once(options):
    with pytest.raises(ValueError, match="--num-scheduler-steps > 1 does not work with"):
        EngineArgs(num_scheduler_steps=2, **options)
    with pytest.raises(ValueError, match="--num-scheduler-steps must be"):
        EngineArgs(num_scheduler_steps=0)


@pytest.mark.slow
@pytest.mark.parametrize("family, options", [("llama3", dict(tensor_parallel_size=2)), ("qwen3_moe", {})])
def test_tensor_parallel_and_moe_give_the_tokens_of_plain_steps(tiny_checkpoints, compile_cache, family, options):
    args = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, block_size=16, skip_tokenizer_init=True,
                compilation_cache_dir=compile_cache, **options)  # fmt: skip
    batch = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (17, 6, 11)]
    plain = tokens(LLM(str(tiny_checkpoints[family]), **args), batch, params)
    multi = LLM(str(tiny_checkpoints[family]), num_scheduler_steps=3, **args)
    runner, launched = multi.engine.runner, []
    dispatch = runner._dispatch_multi
    runner._dispatch_multi = lambda *a: launched.append(1) or dispatch(*a)
    assert tokens(multi, batch, params) == plain
    assert len(launched) >= 4
    if family == "qwen3_moe":  # every iteration's routed tokens reach the expert counts
        assert multi.engine.runner.read_expert_load().sum() > 0
    jax.clear_caches()


def test_no_program_copies_a_layer_cache(multi_llm):
    """Each iteration writes every layer's cache in place: a one-row write (XLA's dynamic-update-slice) once made
    the compiled program copy whole layer caches around each write."""
    runner = multi_llm.engine.runner
    layer = int(np.prod(runner.cache[0][0].shape))
    for (t, variant), program in runner._multis.items():
        copies = [int(np.prod([int(d) for d in dims.split(",")]))
                  for dims in re.findall(r"= \w+\[([\d,]+)\]\S* copy\(", program.as_text())]  # fmt: skip
        assert max(copies, default=0) < layer, f"bucket {t} {variant.mode}: a copy of {max(copies)} elements"


def test_the_unrolled_form_gives_the_tokens_of_the_loop(stories_dir, compile_cache, multi_llm, monkeypatch):
    """RTPJAX_MULTI_STEP_UNROLL (benchmarks: the K iterations unrolled into one program) is the same computation:
    the same tokens as the loop, greedy and seeded, from programs that really are unrolled."""
    monkeypatch.setattr(multi_step, "UNROLL", True)
    unrolled = LLM(str(stories_dir), compilation_cache_dir=compile_cache, num_scheduler_steps=K, **ENGINE_ARGS)
    batch = prompts(3, seed=11)
    params = [SamplingParams(temperature=0, max_tokens=17, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, top_p=0.9, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)]  # fmt: skip
    assert tokens(unrolled, batch, params) == tokens(multi_llm, batch, params)
    loops = {key: program.as_text().count(" while(") for key, program in multi_llm.engine.runner._multis.items()}
    for key, program in unrolled.engine.runner._multis.items():  # the loop's one while became K iterations' own
        assert program.as_text().count(" while(") != loops[key], key

"""AsyncLLM streaming and abort, the incremental detokenizer, the block pool, priorities and the compilation cache."""

import asyncio
import subprocess
import sys

import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import ENGINE_ARGS, run_out
from rtpjax import AsyncLLM, SamplingParams
from rtpjax.engine import detokenizer
from rtpjax.kv.block_pool import BlockPool, prefix_hashes
from rtpjax.runner.model_runner import QUARTER_STEPS_FROM, buckets, pick, step_buckets

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def async_llm(stories_dir, compile_cache):
    llm = AsyncLLM(str(stories_dir), compilation_cache_dir=compile_cache, **ENGINE_ARGS)
    yield llm
    llm.shutdown()


def test_async_streams_match_offline_and_abort_frees(async_llm, stories_llm):
    expected = stories_llm.generate([[1], [1, 450]], SamplingParams(max_tokens=30, **GREEDY))

    async def stream(prompt):
        deltas, ids, last = [], [], None
        async for out in async_llm.generate(prompt, SamplingParams(max_tokens=30, **GREEDY)):
            deltas.append(out.outputs[0].delta_text)
            ids += out.outputs[0].delta_token_ids
            last = out
        return "".join(deltas), ids, last

    async def leave_early():
        async for out in async_llm.generate([1], SamplingParams(max_tokens=200, **GREEDY)):
            if len(out.outputs[0].token_ids) >= 3:
                break  # the client goes away: its request must be aborted and its blocks freed

    async def main():
        results = await asyncio.gather(stream([1]), stream([1, 450]), leave_early())
        for _ in range(100):
            if async_llm.stats()["num_running"] == 0 and async_llm.stats()["num_waiting"] == 0:
                break
            await asyncio.sleep(0.05)
        return results

    (t1, ids1, last1), (t2, ids2, _), _ = asyncio.run(main())
    assert ids1 == expected[0].outputs[0].token_ids and t1 == expected[0].outputs[0].text
    assert ids2 == expected[1].outputs[0].token_ids and t2 == expected[1].outputs[0].text
    assert last1.finished and last1.metrics.first_token is not None
    assert len(last1.metrics.inter_token_latencies) == 29
    stats = async_llm.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_async_bad_request_raises_for_that_request(async_llm):
    async def main():
        with pytest.raises(ValueError, match="top_p"):
            async for _ in async_llm.generate([1], SamplingParams(top_p=2.0)):
                pass
        outs = [o async for o in async_llm.generate([1], SamplingParams(max_tokens=4, **GREEDY))]
        return outs[-1]

    assert len(asyncio.run(main()).outputs[0].token_ids) == 4


def test_slow_reader_gets_merged_outputs_with_every_token(async_llm, stories_llm):
    """A reader that falls behind the engine process gets one output for the steps it missed: nothing lost."""
    params = SamplingParams(max_tokens=40, logprobs=2, **GREEDY)
    expected = stories_llm.generate([1, 450], params)[0].outputs[0]

    async def slow():
        outs = []
        async for out in async_llm.generate([1, 450], params):
            outs.append(out)
            await asyncio.sleep(0.05)  # several engine steps pile up meanwhile
        return outs

    outs = asyncio.run(slow())
    assert len(outs) < 40  # merged, not one per token
    assert [t for o in outs for t in o.outputs[0].delta_token_ids] == expected.token_ids
    assert "".join(o.outputs[0].delta_text for o in outs) == expected.text == outs[-1].outputs[0].text
    assert [lp for o in outs for lp in o.outputs[0].delta_logprobs] == expected.logprobs == outs[-1].outputs[0].logprobs
    assert outs[-1].outputs[0].token_ids == expected.token_ids and outs[-1].finished


def test_request_id_is_reusable_once_the_engine_let_go(async_llm, stories_llm):
    params = SamplingParams(max_tokens=12, **GREEDY)
    expected = stories_llm.generate([1, 450], params)[0].outputs[0].token_ids

    async def main():
        async for out in async_llm.generate([1], SamplingParams(max_tokens=200, **GREEDY), request_id="x"):
            if len(out.outputs[0].token_ids) >= 2:
                break  # left early: "x" stays taken until the engine confirms the abort
        for _ in range(200):
            if async_llm.num_unfinished == 0:
                break
            await asyncio.sleep(0.02)
        assert async_llm.num_unfinished == 0
        return [t async for out in async_llm.generate([1, 450], params, request_id="x") for t in out.outputs[0].delta_token_ids]

    assert asyncio.run(main()) == expected  # nothing of the first "x" leaked into the second


def test_a_request_the_engine_cannot_read_fails_alone(async_llm, monkeypatch):
    """Requests travel as typed fields, not pickled classes: a SamplingParams subclass only the front end knows runs
    as its fields say. A message of the wrong types fails its request alone, naming the field; the engine serves on."""
    import types

    import msgspec

    module = types.ModuleType("rtpjax_parent_only")  # importable here, not in the engine process
    exec("from rtpjax import SamplingParams\nclass Params(SamplingParams): pass", module.__dict__)
    module.Params.__module__ = module.__name__
    maker = async_llm._make_request
    message = maker.message

    async def main():
        parent_only = [o async for o in async_llm.generate([1], module.Params(max_tokens=3, **GREEDY))][-1]
        monkeypatch.setattr(maker, "message", lambda *a: msgspec.structs.replace(message(*a), seed="1"))
        with pytest.raises(RuntimeError, match=r"engine error: malformed 'add' message: .* at `\$.seed`"):
            async for _ in async_llm.generate([1], SamplingParams(max_tokens=3, **GREEDY)):
                pass
        monkeypatch.setattr(maker, "message", message)
        plain = [o async for o in async_llm.generate([1], SamplingParams(max_tokens=3, **GREEDY))][-1]
        return parent_only, plain

    parent_only, plain = asyncio.run(main())
    assert parent_only.outputs[0].token_ids == plain.outputs[0].token_ids and len(plain.outputs[0].token_ids) == 3
    assert async_llm.num_unfinished == 0


@pytest.mark.parametrize("end, message", [("kill", "engine process exited"), ("shutdown", "shut down")])
def test_an_ended_engine_fails_streams_new_requests_and_the_server(stories_dir, compile_cache, end, message):
    """The engine process dying (killed) or shut down mid-stream: the stream raises instead of hanging, new requests
    are refused, nothing stays counted, and the server answers 503."""
    import httpx

    from rtpjax.serve.app import build_app

    llm = AsyncLLM(str(stories_dir), compilation_cache_dir=compile_cache, **ENGINE_ARGS)

    async def consume(stream):
        async for out in stream:
            if len(out.outputs[0].token_ids) >= 2:
                if end == "kill":
                    llm._engine.proc.kill()
                else:
                    await asyncio.to_thread(llm.shutdown)

    async def main():
        stream = await llm.submit([1], SamplingParams(max_tokens=200, **GREEDY))
        with pytest.raises(RuntimeError, match=message):
            await asyncio.wait_for(consume(stream), timeout=60)  # a regression fails here rather than hanging
        for _ in range(100):  # the reader thread notices the socket closing
            if not llm.is_alive:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(RuntimeError, match="shut down"):
            await llm.submit([1], SamplingParams(max_tokens=2))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(build_app(llm, "m")), base_url="http://t") as c:
            assert (await c.get("/health")).status_code == 503
            r = await c.post("/v1/completions", json={"prompt": [1], "max_tokens": 2})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"

    try:
        asyncio.run(main())
        assert llm.num_unfinished == 0 and not llm.is_alive
    finally:
        llm.shutdown()
    assert llm._engine.proc.poll() is not None


def test_stream_never_leaks_a_partial_stop_string(stories_llm):
    engine = stories_llm.engine
    full = stories_llm.generate([1], SamplingParams(max_tokens=40, **GREEDY))[0].outputs[0].text
    stop = "girl named Lily"
    rid = engine.add_request([1], SamplingParams(max_tokens=40, stop=stop, **GREEDY))
    expected = full[: full.index(stop)]
    streamed, deltas = "", 0
    for out in run_out(engine):
        if out.request_id == rid:
            streamed += out.outputs[0].delta_text
            deltas += bool(out.outputs[0].delta_text)
            assert out.outputs[0].text == streamed  # the whole text is always what the deltas spelled
            assert expected.startswith(streamed), streamed  # never a piece of "girl named Lily" on the way
    assert streamed == expected and deltas > 3


def test_loop_stats_account_for_each_step(stories_llm):
    from rtpjax.engine.core import LoopStats

    engine = stories_llm.engine
    engine.loop_stats = LoopStats()
    stories_llm.generate([[1], [1, 450]], SamplingParams(max_tokens=10, **GREEDY))
    s = engine.loop_stats
    assert s.steps >= 10 and 2 * 9 <= s.rows <= 2 * s.steps
    assert s.computed == 1 + 2 + 2 * 9 and s.sampled == 2 * 10  # prompts once, then each sampled token fed back
    assert 0 < s.prepare_s and 0 < s.launch_s and s.prepare_s + s.launch_s + s.device_wait_s <= s.busy_s
    assert f"{s.steps / 2.0:.1f} steps/s" in s.report(2.0)
    worst = s.slowest  # the longest step, its parts summing to it
    assert 0 < worst.busy <= s.busy_s and worst.reading <= s.device_wait_s and worst.tiers == s.tiers_s == 0
    assert min(getattr(worst, part) for part in worst.PARTS) >= 0 and worst.scheduling + worst.inputs > 0
    assert f"the slowest step {1e3 * worst.busy:.1f} ms (reading" in s.report(2.0)
    import jax
    import jax.numpy as jnp

    engine.take_loop_stats()  # (other tests may have compiled since this engine's warm-up)
    stories_llm.generate([[1], [1, 450]], SamplingParams(max_tokens=10, **GREEDY))
    assert engine.take_loop_stats().compiles[0] == 0  # a warmed engine's steps compile nothing
    jax.jit(lambda x: x * 3 + 1)(jnp.arange(7))  # anything compiled in the process meanwhile is named
    stories_llm.generate([[1]], SamplingParams(max_tokens=2, **GREEDY))
    count, recent = engine.take_loop_stats().compiles
    assert count >= 1 and any("<lambda>" in name for name, _ in recent)
    stories_llm.generate([[1]], SamplingParams(max_tokens=2, **GREEDY))
    s = engine.take_loop_stats()
    assert s.compiles[0] == 0 and "while serving" not in s.report(1.0)  # taken once
    s.compiles = (3, [("jit(f)", 1.25)])
    assert "; 3 executables compiled or fetched while serving (the latest: jit(f) 1.25 s)" in s.report(1.0)


def test_stall_meter_sees_the_interpreter_held():
    """A long C call holds the interpreter lock: the meter's thread wakes that much late, and says so once; so is a
    full collection, named with its time."""
    import gc
    import time

    from rtpjax.engine.stall_meter import StallMeter

    meter = StallMeter(period=0.005)
    try:
        time.sleep(0.05)
        meter.take()
        began = time.perf_counter()
        sum(range(30_000_000))  # one bytecode: no thread switch until it returns
        held = time.perf_counter() - began
        time.sleep(0.05)
        assert held * 0.5 < meter.take() < held + 0.5
        time.sleep(0.05)
        assert meter.take() < held * 0.75  # (a loaded machine may wake it a little late)
        assert "gc passes" not in meter.report()
        gc.collect()  # a full pass: named once in the report, with its time
        line = meter.report()
        assert "; full gc passes: 1, the longest " in line and line.startswith("threads woke up to ")
        assert "gc passes" not in meter.report()
    finally:
        meter.close()
    assert not meter._thread.is_alive() and meter.collections not in gc.callbacks


@pytest.mark.parametrize("rust_stream", [True, False])
def test_detokenizer_holds_split_multibyte_characters(stories_dir, rust_stream):
    tok = AutoTokenizer.from_pretrained(stories_dir)
    prompt = [1]
    ids = tok.encode("Lily saw é中 and 中中.", add_special_tokens=False)
    assert any(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids)  # byte-fallback pieces
    state, pieces = detokenizer.start(len(prompt)), []
    if not rust_stream:
        state.stream = False  # the path of tokenizers without a Rust backend
    for n in range(1, len(ids) + 1):
        piece = detokenizer.append_tokens(tok, state, prompt + ids[:n], True)
        assert "\ufffd" not in piece
        pieces.append(piece)
    assert bool(state.stream) == rust_stream
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == state.text


@pytest.mark.parametrize("rust_stream", [True, False])
def test_detokenizer_prompt_ending_mid_character(stories_dir, rust_stream, monkeypatch):
    # A prompt of token ids may end inside a multi-byte character (a continuation of an output cut by max_tokens):
    # the completed character is the first new text, and nothing of the prompt is repeated.
    if not rust_stream:
        monkeypatch.setattr(detokenizer, "DecodeStream", None)
    tok = AutoTokenizer.from_pretrained(stories_dir)
    ids = tok.encode("Lily saw 中 and", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    state = detokenizer.start(cut)
    text = "".join(detokenizer.append_tokens(tok, state, ids, True, end) for end in range(cut + 1, len(ids) + 1))
    assert text == tok.decode(ids)[len(tok.decode(ids[:cut]).rstrip("\ufffd")) :] and text.startswith("中")
    assert bool(state.stream) == rust_stream


@pytest.mark.parametrize("skip_special", [True, False])
def test_detokenizer_paths_spell_the_same_text(stories_dir, skip_special):
    # Random ids (byte pieces, special tokens, words) after a prompt: the Rust stream and the window path agree
    # token by token; a stream that refuses a token midway (tokenizers does, on some byte-piece sequences) hands over
    # to the window path without a character lost or repeated.
    class Refuses:
        def step(self, tokenizer, ids):
            raise Exception("Invalid prefix encountered while decoding stream")

    tok = AutoTokenizer.from_pretrained(stories_dir)
    rng = np.random.default_rng(3)
    prompt = tok.encode("Once upon a time", add_special_tokens=True)
    ids = prompt + rng.integers(0, tok.vocab_size, 300).tolist()
    states = [detokenizer.start(len(prompt)) for _ in range(3)]
    states[1].stream = False
    for end in range(len(prompt) + 1, len(ids) + 1):
        if end == len(prompt) + 40:
            states[2].stream = Refuses()
        a, b, c = (detokenizer.append_tokens(tok, st, ids, skip_special, end) for st in states)
        assert a == b == c, end
    assert states[0].text == states[1].text == states[2].text and states[2].stream is False


def test_block_pool_lru_eviction_and_refcounts():
    pool = BlockPool(4)
    tokens = list(range(32))
    hashes = prefix_hashes(tokens, 8)
    a = pool.allocate(4)
    for b, h in zip(a, hashes):
        pool.register(b, h)
    pool.release(a)  # freed tail first: block a[3] is the first to be evicted
    assert pool.lookup(hashes) == a
    fresh = pool.allocate(1)
    assert fresh == [a[3]] and pool.lookup(hashes) == a[:3]
    pool.share(a[:2])
    assert pool.allocate(3) is None and pool.num_free == 1
    pool.release(a[:2])
    pool.release(fresh)
    assert pool.num_free == 4 and not any(pool.ref_count)
    assert prefix_hashes(tokens, 8, b"adapter")[0] != hashes[0]  # the extra key separates equal tokens


def test_priority_runs_urgent_requests_first(stories_llm):
    engine = stories_llm.engine
    order = []
    low = [engine.add_request([1, 5 + i], SamplingParams(max_tokens=2, **GREEDY), priority=5) for i in range(10)]
    high = engine.add_request([1, 99], SamplingParams(max_tokens=2, **GREEDY), priority=-1)
    order += [o.request_id for o in run_out(engine) if o.finished]
    assert order.index(high) < order.index(low[-1])
    assert order.index(high) <= 8  # admitted in the first step despite arriving last


START = """
import sys
from rtpjax import LLM, SamplingParams
from rtpjax.runner.model_runner import CompileCounter
llm = LLM(sys.argv[1], max_num_seqs=8, max_num_batched_tokens=16, max_model_len=256, compilation_cache_dir=sys.argv[2])
assert llm.generate([1], SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids
print("compilations", CompileCounter.count)
"""


@pytest.mark.slow
def test_second_start_compiles_nothing_with_the_cache(stories_dir, tmp_path):
    def start():
        out = subprocess.run([sys.executable, "-c", START, str(stories_dir), str(tmp_path)], capture_output=True,
                             text=True, check=True)  # fmt: skip
        return int(out.stdout.split("compilations")[-1])

    assert start() > 0
    assert start() == 0


@pytest.mark.parametrize("limit, smallest", [(2048, 16), (8192, 16), (1000, 16), (600, 1), (256, 1)])
def test_step_buckets_pad_large_steps_by_at_most_a_quarter(limit, smallest):
    sizes = step_buckets(limit, smallest)
    assert sizes == sorted(set(sizes)) and sizes[0] == smallest and sizes[-1] == limit
    assert [s for s in sizes if s <= QUARTER_STEPS_FROM] == buckets(min(limit, QUARTER_STEPS_FROM), smallest)
    for n in range(QUARTER_STEPS_FROM + 1, limit + 1):  # every large step pads by at most a quarter of a power of two
        assert pick(sizes, n) - n < (1 << (n - 1).bit_length()) // 4 or pick(sizes, n) == limit
    if smallest == 16:  # the Pallas kernels' tiles want multiples of 16
        assert all(s % 16 == 0 for s in sizes if s != limit)
    if limit >= 2048:  # a 1,024-token chunk beside a decode row
        assert pick(sizes, 1025) == 1280

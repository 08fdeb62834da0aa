"""The engine's wire protocol (rtpjax.distributed.messages): every message round-trips, wrong ones are rejected with
an error naming what was wrong, and an engine process that receives one keeps serving."""

import asyncio
import json
import logging

import msgspec
import pytest

from conftest import ENGINE_ARGS
from rtpjax import AsyncLLM, SamplingParams
from rtpjax.distributed import messages as m
from rtpjax.distributed.engine_process import Accumulator, _command
from rtpjax.engine.sequence import RequestMetrics

GREEDY = dict(temperature=0, ignore_eos=True)
STATS = m.EngineStats(num_running=3, num_waiting=1, kv_cache_usage=0.25, prefix_cache_queries=100,
                      prefix_cache_hits=40, num_free_blocks=12, num_blocks=16)  # fmt: skip
ADD = m.AddRequest("req-1", [1, 450, 7], SamplingParams(n=2, temperature=0.7, stop="The", logprobs=3, seed=None),
                   seed=1234, arrival_time=1.7e9, prompt="Once upon", priority=-2)  # fmt: skip
DELTA = m.RequestDelta(
    "req-1", True,
    [m.CompletionDelta(0, " girl", [31, 32], [{31: -0.5, 4: -1.0}, {32: -0.25}], "stop", "The"),
     m.CompletionDelta(1, "", [], [], "length", None),
     m.CompletionDelta(2, "x", [2], None, "stop", 2)],
    prompt_logprobs=[None, {450: -3.5, 9: -1.0}],
    timings=m.RequestTimings(0.001, 0.05, 0.4, 0.41, [0.1, 0.25]),
)  # fmt: skip

EVERY_MESSAGE = [
    m.Startup("/models/x", {"max_num_seqs": 8, "dtype": None, "gpu_memory_utilization": 0.9, "progress": True}, 20),
    m.Ready(m.ModelInfo(32000, 2048, (2, 32001), 256), STATS),
    m.Failed("ValueError: no model", "Traceback (most recent call last):\n  ..."),
    ADD,
    m.AddRequest("r", [5], SamplingParams(), seed=0, arrival_time=0.0),  # the defaults
    m.Abort("req-1"),
    m.Stop(),
    m.StepOutputs([DELTA, m.RequestDelta("r", False, [m.CompletionDelta(0, "a", [9])])],
                  [m.RequestError("bad", "invalid", "top_p must be in (0, 1], got 2.0"),
                   m.RequestError("worse", "engine", "engine error: OOM")], STATS),
]  # fmt: skip


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda x: type(x).__name__)
def test_every_message_round_trips(message):
    data = m.encode(message)
    assert isinstance(data, bytes)
    back = m.decode(data)
    assert type(back) is type(message) and back == message
    assert m.decode(data, type(message)) == message


def test_sampling_params_arrive_normalized_and_validated():
    back = m.decode(m.encode(ADD))
    assert back.params.stop == ["The"] and back.params == ADD.params  # a dataclass again, __post_init__ ran
    raw = msgspec.msgpack.decode(m.encode(ADD))
    raw["params"]["top_k"] = -1
    assert m.decode(msgspec.msgpack.encode(raw)).params.top_k == 0
    raw["params"]["top_p"] = 2.0  # well-typed, but SamplingParams.validate refuses it
    with pytest.raises(m.ProtocolError, match=r"malformed 'add' message: top_p must be in \(0, 1\]") as e:
        m.decode(msgspec.msgpack.encode(raw))
    assert e.value.request_id == "req-1"


def _tampered(message, **changes) -> bytes:
    raw = msgspec.msgpack.decode(m.encode(message))
    for key, value in changes.items():
        if value is KeyError:
            del raw[key]
        else:
            raw[key] = value
    return msgspec.msgpack.encode(raw)


@pytest.mark.parametrize("data, error, kind, request_id", [
    (_tampered(ADD, prompt_ids=["1", "450"]), r"^malformed 'add' message: Expected `int`, got `str` - at "
     r"`\$.prompt_ids\[0\]`$", "add", "req-1"),
    (_tampered(ADD, seed=KeyError), r"^malformed 'add' message: Object missing required field `seed`$", "add", "req-1"),
    (_tampered(ADD, params={"n": "2"}), r"Expected `int`, got `str` - at `\$.params.n`$", "add", "req-1"),
    (_tampered(m.Abort("a"), request_id=7), r"'abort' message: Expected `str`, got `int` - at `\$.request_id`$",
     "abort", None),
    (_tampered(m.Abort("a"), type="launch"), r"^malformed 'launch' message: Invalid value 'launch' - at `\$.type`$",
     "launch", "a"),
    (msgspec.msgpack.encode({"request_id": "a"}), r"^malformed message: Object missing required field `type`$", None,
     "a"),
    (b"\xc1 not msgpack", r"^malformed message: ", None, None),
    (m.encode(ADD)[:-3], r"^malformed message: ", None, None),  # cut short: not even its kind is readable
])  # fmt: skip
def test_wrong_messages_are_rejected_naming_what_was_wrong(data, error, kind, request_id):
    with pytest.raises(m.ProtocolError, match=error) as e:
        m.decode(data)
    assert (e.value.kind, e.value.request_id) == (kind, request_id)


def test_a_message_of_the_wrong_kind_is_rejected():
    with pytest.raises(m.ProtocolError, match=r"unexpected 'step' message \(expected 'add', 'abort', 'stop'\)"):
        m.decode(m.encode(EVERY_MESSAGE[-1]), (m.AddRequest, m.Abort, m.Stop))
    with pytest.raises(m.ProtocolError, match="unexpected 'abort' message") as e:
        m.decode(m.encode(m.Abort("x")), m.StepOutputs)
    assert e.value.request_id == "x"


def test_a_message_that_cannot_be_encoded_says_which():
    huge = m.AddRequest("big", [1], SamplingParams(seed=2**70), seed=0, arrival_time=0.0)
    with pytest.raises(m.ProtocolError, match="cannot encode AddRequest") as e:
        m.encode(huge)
    assert (e.value.kind, e.value.request_id) == ("add", "big")
    with pytest.raises(m.ProtocolError, match="cannot encode AddRequest: .* surrogates not allowed"):
        m.encode(m.AddRequest("text", [1], SamplingParams(), seed=0, arrival_time=0.0, prompt="a\ud800"))


def test_the_engine_side_logs_a_bad_message_and_answers_the_request_it_names(caplog):
    with caplog.at_level(logging.ERROR, logger="rtpjax"):
        error = _command(_tampered(ADD, prompt_ids=["x"]))
        assert _command(b"\xc1") is None  # nothing to answer: logged only
        assert _command(m.encode(m.Ready(m.ModelInfo(1, 2, (), 3), STATS))) is None
        # Not an add: the id may be a request the engine runs on, whose stream must not end here.
        assert _command(_tampered(m.Abort("req-2"), type="pause")) is None
    assert error == m.RequestError("req-1", "protocol", error.message) and "`$.prompt_ids[0]`" in error.message
    assert isinstance(error.exception(), RuntimeError)
    assert [r.getMessage().split(":")[1] for r in caplog.records] == [
        " malformed 'add' message", " malformed message", " unexpected 'ready' message (expected 'add', 'abort', 'stop')",
        " malformed 'pause' message"]  # fmt: skip
    assert all(r.getMessage().startswith("rejected a message from the front end: ") for r in caplog.records)
    assert _command(m.encode(ADD)) == ADD


def test_the_engines_command_reader_stops_the_engine_when_it_fails(caplog):
    """A reader that died quietly left the engine idle for good with the server's requests unheard; now the engine
    stops (and the server fails what it sent, as for any engine exit)."""
    import queue

    from rtpjax.distributed.engine_process import _receive

    class Broken:
        def __init__(self):
            self.frames = [m.encode(ADD)]

        def recv_bytes(self):
            if not self.frames:
                raise RuntimeError("a bug in the reader")
            return self.frames.pop()

    commands: queue.Queue = queue.Queue()
    with caplog.at_level(logging.ERROR, logger="rtpjax"):
        _receive(Broken(), commands)
    assert [commands.get_nowait(), commands.get_nowait()] == [ADD, m.Stop()] and commands.empty()
    assert "command reader failed" in caplog.text and "a bug in the reader" in caplog.text


def test_request_errors_raise_value_error_for_bad_input_and_runtime_error_otherwise():
    assert type(m.RequestError("r", "invalid", "bad").exception()) is ValueError
    assert type(m.RequestError("r", "protocol", "unreadable").exception()) is RuntimeError
    assert type(m.RequestError("r", "engine", "failed").exception()) is RuntimeError


def test_timings_travel_as_offsets_and_land_on_the_receivers_clock():
    sent = RequestMetrics(100.0, 100.5, 101.0, 103.0, 103.5, [1.0, 1.0])
    timings = sent.timings()
    assert timings == m.RequestTimings(0.5, 1.0, 3.0, 3.5, [1.0, 1.0])
    got = RequestMetrics.from_timings(7.0, m.decode(m.encode(m.StepOutputs(
        [m.RequestDelta("r", True, [], timings=timings)], [], STATS))).outputs[0].timings)  # fmt: skip
    assert got == RequestMetrics(7.0, 7.5, 8.0, 10.0, 10.5, [1.0, 1.0])
    assert RequestMetrics(5.0).timings() == m.RequestTimings(None, None, None, None, [])


def test_the_accumulator_adds_deltas_up():
    acc = Accumulator.of(ADD)
    first = acc.output(m.RequestDelta("req-1", False, [m.CompletionDelta(0, "Once", [10], [{10: -1.0}]),
                                                       m.CompletionDelta(1, "A", [11], [{11: -2.0}])],
                                      prompt_logprobs=[None, {450: -3.0}]))  # fmt: skip
    assert first.metrics is None and first.prompt == "Once upon" and first.prompt_token_ids == [1, 450, 7]
    last = acc.output(m.RequestDelta("req-1", True, [m.CompletionDelta(0, " there", [12], [{12: -0.5}], "length")],
                                     timings=m.RequestTimings(first_token=0.5)))  # fmt: skip
    o = last.outputs[0]
    assert (o.text, o.token_ids, o.finish_reason) == ("Once there", [10, 12], "length")
    assert o.logprobs == [{10: -1.0}, {12: -0.5}]
    assert (o.delta_text, o.delta_token_ids, o.delta_logprobs) == (" there", [12], [{12: -0.5}])
    assert last.finished and last.prompt_logprobs == [None, {450: -3.0}]
    assert last.metrics.first_token - last.metrics.arrival == 0.5


# -- through a real engine process -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def async_llm(stories_dir, compile_cache):
    llm = AsyncLLM(str(stories_dir), compilation_cache_dir=compile_cache, **ENGINE_ARGS)
    yield llm
    llm.shutdown()


def test_an_engine_sent_malformed_messages_keeps_serving(async_llm, stories_llm, monkeypatch):
    params = SamplingParams(max_tokens=6, logprobs=2, **GREEDY)
    expected = stories_llm.generate([1, 450], params)[0]
    maker = async_llm._make_request
    real = maker.message

    def strings_for_ids(*args):  # a sender that gets the types wrong
        return msgspec.structs.replace(real(*args), prompt_ids=["1", "450"])

    async def main():
        async_llm._engine.send_frame(b"\xc1 garbage")  # no request named: logged, skipped
        async_llm._engine.send_frame(m.encode(m.Stop())[:-1])  # cut short
        async_llm._engine.send(m.Ready(async_llm.info, STATS))  # the wrong direction
        monkeypatch.setattr(maker, "message", strings_for_ids)
        with pytest.raises(RuntimeError, match=r"Expected `int`, got `str` - at `\$.prompt_ids\[0\]`"):
            async for _ in async_llm.generate([1, 450], params, request_id="typed-wrong"):
                pass
        monkeypatch.setattr(maker, "message", real)
        with pytest.raises(ValueError, match="cannot be sent to the engine process: cannot encode AddRequest"):
            await async_llm.submit([1, 450], SamplingParams(seed=2**70))  # fails alone, before anything is sent
        return [o async for o in async_llm.generate([1, 450], params)][-1]

    out = asyncio.run(asyncio.wait_for(main(), timeout=120))
    assert out.outputs[0].token_ids == expected.outputs[0].token_ids and out.outputs[0].text == expected.outputs[0].text
    assert out.outputs[0].logprobs == expected.outputs[0].logprobs
    assert async_llm.num_unfinished == 0 and async_llm.is_alive


def test_async_outputs_and_stats_through_the_protocol_equal_offline(async_llm, stories_llm):
    params = SamplingParams(n=2, max_tokens=8, temperature=0.8, seed=7, logprobs=1, prompt_logprobs=2,
                            stop=["Lily"], ignore_eos=True)  # fmt: skip
    expected = stories_llm.generate([1, 450, 260], params)[0]

    async def main():
        return [o async for o in async_llm.generate([1, 450, 260], params)][-1]

    got = asyncio.run(main())
    assert got.prompt_logprobs == expected.prompt_logprobs and got.prompt_logprobs[0] is None
    for g, e in zip(got.outputs, expected.outputs, strict=True):
        assert (g.text, g.token_ids, g.logprobs, g.finish_reason, g.stop_reason) == (
            e.text, e.token_ids, e.logprobs, e.finish_reason, e.stop_reason)  # fmt: skip
    assert got.metrics.arrival <= got.metrics.first_scheduled <= got.metrics.first_token <= got.metrics.finished
    stats = async_llm.stats()
    assert set(stats) == set(m.EngineStats.__struct_fields__) and stats["num_blocks"] > 0


def test_an_engine_waiting_only_for_kv_tier_loads_neither_spins_nor_floods_the_server():
    """An engine whose only work is a KV tier load still on its way runs nothing a round: its loop waits a little
    for commands and reports at most every STALLED_REPORT_S, instead of a message per spin of the loop."""
    import multiprocessing
    import queue
    import threading
    import time
    from types import SimpleNamespace

    from rtpjax.distributed import engine_process as ep

    stats = m.EngineStats(0, 1, 0.0, 0, 0, 16, 16, num_loading=1)
    engine = SimpleNamespace(loop_stats=SimpleNamespace(steps=0), tiers=None, inflight=None, rounds=0,
                             pool=SimpleNamespace(drain_events=list), has_work=lambda: True, stats=lambda: stats)  # fmt: skip

    def step(as_deltas=False):
        engine.rounds += 1
        return []

    engine.step = step
    handoff = SimpleNamespace(poll=lambda: ([], []), after_step=list, stats=lambda s: s, idle_wait=lambda: None)
    server, conn = multiprocessing.Pipe()
    inbox = queue.Queue()
    loop = threading.Thread(target=ep._loop, args=(engine, conn, inbox, handoff), daemon=True)
    loop.start()
    time.sleep(0.5)
    inbox.put(m.Stop())
    loop.join(10)
    assert not loop.is_alive()
    reports = 0
    while server.poll(0):
        server.recv_bytes()
        reports += 1
    assert 1 <= reports <= 0.5 / ep.STALLED_REPORT_S + 2, f"{reports} reports in 0.5 s"
    assert engine.rounds <= 0.5 / ep.STALLED_WAIT_S + 10, f"{engine.rounds} rounds in 0.5 s: the loop spins"
    server.close()
    conn.close()


def test_the_engine_loops_profile_is_written_as_pstats_and_text(tmp_path):
    import cProfile
    import pstats

    from rtpjax.distributed.engine_process import _write_profile

    def busy_loop():
        return sum(i * i for i in range(10000))

    profiler = cProfile.Profile()
    profiler.enable()
    busy_loop()
    path = str(tmp_path / "engine.prof")
    _write_profile(profiler, path)  # disables it first
    assert any(name == "busy_loop" for (_, _, name) in pstats.Stats(path).stats)
    text = (tmp_path / "engine.prof.txt").read_text()
    assert "(busy_loop)" in text and "Ordered by: internal time" in text and "Ordered by: cumulative time" in text


def test_the_engine_switch_interval_defaults_short_and_refuses_bad_values(monkeypatch):
    from rtpjax.distributed.engine_process import SWITCH_INTERVAL_S, switch_interval

    monkeypatch.delenv("RTPJAX_ENGINE_SWITCH_INTERVAL", raising=False)
    assert switch_interval() == SWITCH_INTERVAL_S < 0.005  # Python's default let the tiers' threads hold the loop
    monkeypatch.setenv("RTPJAX_ENGINE_SWITCH_INTERVAL", "0.002")
    assert switch_interval() == 0.002
    for bad in ("fast", "0", "-1"):
        monkeypatch.setenv("RTPJAX_ENGINE_SWITCH_INTERVAL", bad)
        with pytest.raises(ValueError, match="RTPJAX_ENGINE_SWITCH_INTERVAL must be a positive number"):
            switch_interval()


def test_the_engine_process_leaves_what_loading_made_out_of_the_collectors_passes():
    """Run where the engine's process would: a fresh interpreter (a test process must not freeze its own heap)."""
    import subprocess
    import sys

    code = ("import gc, json; from rtpjax.distributed.engine_process import freeze_heap; "
            "n = freeze_heap(); print(json.dumps([n, gc.get_freeze_count()]))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    frozen, count = json.loads(out.stdout.strip().splitlines()[-1])
    assert frozen == count > 10_000  # the engine's modules' objects at least

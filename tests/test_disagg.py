"""Prefill/decode disaggregation on loopback: a prefill server and a decode server (engine processes of their own),
the two-phase flow of vLLM's protocol (rtpjax.disagg.pd_proxy, and vllm-router's binary), and the faults."""

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from starlette.responses import StreamingResponse

from conftest import ENGINE_ARGS, run_out, wait_healthy
from rtpjax import AsyncLLM, SamplingParams
from rtpjax.disagg.pd_proxy import PDPool, continues, disaggregated, run_prefill
from rtpjax.kv.block_copy import rows_to_host
from rtpjax.router.proxy import new_session
from rtpjax.serve.app import build_app
from test_server import Server, chat_model, free_port  # noqa: F401 - chat_model: a fixture

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to"
TIMEOUT = 3.0  # kv_transfer_timeout of both sides here


@pytest.fixture(scope="module")
def pd(chat_model, compile_cache):
    """A prefill server (blocks of 16) and a decode server (blocks of 8, no prefix cache: its colocated answers are
    computed, never read from adopted blocks); stories260K with a chat template."""
    common = dict(ENGINE_ARGS, compilation_cache_dir=compile_cache, kv_transfer_timeout=TIMEOUT)
    engines, servers = [], []
    try:
        for role, extra in (("prefill", {}), ("decode", dict(block_size=8, enable_prefix_caching=False))):
            engines.append(AsyncLLM(str(chat_model), role=role, **{**common, **extra}))
            servers.append(Server(build_app(engines[-1], "stories")))
        yield engines, servers
    finally:
        for server in servers:
            server.stop()
        for engine in engines:
            engine.shutdown()


def status(url: str) -> dict:
    return httpx.get(url + "/pd/status", timeout=5).json()


def wait_for(url: str, check, what: str, seconds: float = 15.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        s = status(url)
        if check(s):
            return s
        assert time.monotonic() < deadline, f"{what}: {s}"
        time.sleep(0.2)


def via_pd(prefill_urls, decode_url, body, path="/v1/completions", continuation=False):
    async def go():
        async with new_session(5.0) as session:
            response = await disaggregated(session, prefill_urls, decode_url, path, body, continuation=continuation)
            if isinstance(response, StreamingResponse):
                chunks = [c async for c in response.body_iterator]
                return response.status_code, b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks)
            return response.status_code, response.body

    return asyncio.run(go())


def texts(status_code: int, content: bytes) -> list:
    assert status_code == 200, content
    if content.startswith(b"data:"):
        events = [json.loads(line[6:]) for line in content.decode().splitlines() if line.startswith("data: {")]
        assert not any("error" in e for e in events), events
        out: dict = {}
        for e in events:
            for c in e["choices"]:
                out[c["index"]] = out.get(c["index"], "") + c["text"]
        return [out[i] for i in sorted(out)]
    return [c["text"] for c in sorted(json.loads(content)["choices"], key=lambda c: c["index"])]


BODIES = [
    dict(prompt=PROMPT, max_tokens=24, temperature=0),
    dict(prompt=PROMPT, max_tokens=24, temperature=0.9, seed=7),
    dict(prompt=PROMPT, max_tokens=16, temperature=0.9, seed=3, n=2),
    dict(prompt=PROMPT, max_tokens=40, temperature=0, stop=[" the"]),
    dict(prompt=PROMPT, max_tokens=24, temperature=0.9, seed=11, stream=True),
]


def test_disaggregated_tokens_equal_colocated(pd):
    """Greedy, seeded, n > 1, stop strings and streaming: the decode server's answer after the hand-off (K/V of 16-
    token blocks re-laid into 8-token ones, through shared memory) is exactly its colocated answer."""
    _, (prefill, decode) = pd
    before = status(decode.url)["kv_transfers_pulled"]
    for body in BODIES:
        colocated = texts(*via_plain(decode.url, body))
        assert texts(*via_pd([prefill.url], decode.url, body)) == colocated, body
    assert status(decode.url)["kv_transfers_pulled"] == before + len(BODIES)
    wait_for(prefill.url, lambda s: s["kv_transfers_held"] == 0 and s["num_free_blocks"] == s["num_blocks"],
             "the prefill side still holds K/V")  # fmt: skip


def via_plain(url: str, body: dict, path: str = "/v1/completions"):
    r = httpx.post(url + path, json=body, timeout=60)
    return r.status_code, r.content


def events(status_code: int, content: bytes) -> list[dict]:
    assert status_code == 200, content
    assert content.endswith(b"data: [DONE]\n\n"), content[-200:]
    return [json.loads(line[6:]) for line in content.decode().splitlines() if line.startswith("data: {")]


def streamed(evs: list[dict]) -> tuple[str, list, dict | None]:
    """A stream's text, finish reasons and usage."""
    text = "".join(c.get("text", c.get("delta", {}).get("content", "")) for e in evs for c in e["choices"])
    return text, [c["finish_reason"] for e in evs for c in e["choices"] if c["finish_reason"]], \
        next((e["usage"] for e in evs if e.get("usage")), None)  # fmt: skip


def shapes(evs: list[dict]) -> set:
    """Each event's fields and its choices' fields (what a client's parser meets)."""
    return {(tuple(sorted(e)), tuple(sorted(k for c in e["choices"] for k in c))) for e in evs}


STREAMS = [
    ("/v1/completions", dict(prompt=PROMPT, max_tokens=24, temperature=0.9, seed=11, stream=True)),
    ("/v1/completions", dict(prompt=PROMPT, max_tokens=40, temperature=0, stop=[" the"], stream=True,
                             stream_options={"include_usage": True})),
    ("/v1/completions", dict(prompt=PROMPT, max_tokens=1, temperature=0, stream=True)),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": PROMPT}], max_tokens=24, temperature=0,
                                  stream=True, stream_options={"include_usage": True})),
]


def test_stream_starts_with_the_prefill_token(pd):
    """A continued stream (the prefill's token sent at once, then the decode worker's stream from the second token):
    the colocated text, finish reason and usage, one id and created across its chunks, a colocated stream's fields;
    every request handed over."""
    _, (prefill, decode) = pd
    before = status(decode.url)["kv_transfers_pulled"]
    for path, body in STREAMS:
        colocated = events(*via_plain(decode.url, body, path))
        got = events(*via_pd([prefill.url], decode.url, body, path, continuation=True))
        assert streamed(got) == streamed(colocated), (path, body)
        assert len({(e["id"], e["created"]) for e in got}) == 1, got
        assert shapes(got) == shapes(colocated), (got, colocated)
        if path.endswith("chat/completions"):
            assert [c["delta"].get("role") for e in got for c in e["choices"]].count("assistant") == 1, got
    assert status(decode.url)["kv_transfers_pulled"] == before + len(STREAMS)


def test_continuation_is_checked(pd):
    """rtpjax_continuation: only for a stream of one completion without echo or logprobs, with its fields."""
    _, (_, decode) = pd
    cont = {"id": "cmpl-x", "created": 1, "text": "", "tokens": 1}
    for body in (dict(BODIES[2], stream=True), dict(BODIES[4], logprobs=2), dict(BODIES[0]),
                 dict(BODIES[4], rtpjax_continuation={"id": "cmpl-x"})):  # fmt: skip
        r = httpx.post(decode.url + "/v1/completions", json={"rtpjax_continuation": cont, **body}, timeout=30)
        assert r.status_code == 400 and "rtpjax_continuation" in r.json()["error"]["message"], (body, r.text)
    # an eligible stream whose hand-off does not carry the prefill's token (no K/V, an older prefill): the decode side
    # would sample its own first token, which may not be the one the client was shown
    for extra in ({}, {"kv_transfer_params": {"do_remote_prefill": True}}):
        r = httpx.post(decode.url + "/v1/completions", json={"rtpjax_continuation": cont, **BODIES[4], **extra},
                       timeout=30)  # fmt: skip
        assert r.status_code == 400 and "first_token_ids" in r.json()["error"]["message"], (extra, r.text)


def test_router_continues_only_a_stream_whose_hand_off_carries_the_first_token():
    """The router streams the prefill's token and has the decode worker go on from it only when the decode side will
    (first_token_ids handed over): else the client could be shown one first token and the rest follow another."""
    body = dict(BODIES[4])
    answer = {"choices": [{"text": " a", "finish_reason": "length"}],
              "kv_transfer_params": {"do_remote_decode": True, "first_token_ids": [5]}}  # fmt: skip
    assert continues(body, answer)
    for params in ({"do_remote_decode": True}, {"do_remote_decode": True, "first_token_ids": [5, 6]}):
        assert not continues(body, dict(answer, kv_transfer_params=params)), params
    assert not continues(body, dict(answer, choices=[{"text": " a", "finish_reason": "stop"}]))  # finished there
    for other in (dict(body, stream=False), dict(body, n=2), dict(body, echo=True), dict(body, logprobs=1)):
        assert not continues(other, answer), other


def prefill_params(url: str, body: dict) -> dict:
    async def go():
        async with new_session(5.0) as session:
            return await run_prefill(session, [url], "/v1/completions", body)

    return asyncio.run(go())


def test_tcp_path_and_corrupted_transfer(pd):
    """Over TCP (another host id) the hand-off is adopted; a byte flipped on the way fails its checksum: the decode
    side computes the prompt itself and still answers exactly."""
    _, (prefill, decode) = pd
    body = BODIES[1]
    colocated = texts(*via_plain(decode.url, body))
    s0 = status(decode.url)
    params = dict(prefill_params(prefill.url, body), remote_host_id="another-host")
    assert texts(*via_plain(decode.url, dict(body, kv_transfer_params=params))) == colocated
    s1 = status(decode.url)
    assert (s1["kv_transfers_pulled"], s1["kv_transfers_failed"]) == (s0["kv_transfers_pulled"] + 1,
                                                                      s0["kv_transfers_failed"])  # fmt: skip
    params = prefill_params(prefill.url, body)
    relay = FlippingRelay(params["remote_host"], params["remote_port"])
    params.update(remote_port=relay.port, remote_host_id="another-host")
    assert texts(*via_plain(decode.url, dict(body, kv_transfer_params=params))) == colocated
    assert relay.flipped
    s2 = status(decode.url)
    assert (s2["kv_transfers_pulled"], s2["kv_transfers_failed"]) == (s1["kv_transfers_pulled"],
                                                                      s1["kv_transfers_failed"] + 1)  # fmt: skip


class FlippingRelay:
    """Relays one connection, flipping one byte of what the upstream sends past its first 4 KiB."""

    def __init__(self, host: str, port: int):
        self.upstream, self.flipped = (host, port), False
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        self.sock.settimeout(30)
        with self.sock, self.sock.accept()[0] as down, socket.create_connection(self.upstream, timeout=30) as up:
            threading.Thread(target=self._pipe, args=(down, up, False), daemon=True).start()
            self._pipe(up, down, True)

    def _pipe(self, src, dst, flip):
        seen = 0
        try:
            while data := src.recv(1 << 16):
                if flip and not self.flipped and seen + len(data) > 4096:
                    data = bytearray(data)
                    data[max(0, 4096 - seen)] ^= 0xFF
                    self.flipped = True
                seen += len(data)
                dst.sendall(data)
        except OSError:
            pass


def test_stale_transfer_expires_and_is_never_adopted(pd):
    """K/V nobody pulls is dropped after kv_transfer_timeout (its blocks went back at once); a decode request that
    comes later with those params computes the prompt itself."""
    _, (prefill, decode) = pd
    body = BODIES[0]
    params = prefill_params(prefill.url, body)
    wait_for(prefill.url, lambda s: s["kv_transfers_held"] == 0, "held K/V did not expire", TIMEOUT + 10)
    assert status(prefill.url)["num_free_blocks"] == status(prefill.url)["num_blocks"]
    failed = status(decode.url)["kv_transfers_failed"]
    colocated = texts(*via_plain(decode.url, body))
    assert texts(*via_plain(decode.url, dict(body, kv_transfer_params=params))) == colocated
    assert status(decode.url)["kv_transfers_failed"] == failed + 1


def test_abort_during_handoff_frees_the_reservation(pd):
    """A decode request whose K/V never comes (a prefill side that accepts and says nothing) holds reserved blocks;
    the client leaving returns them at once."""
    _, (_, decode) = pd
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        params = {"do_remote_prefill": True, "remote_host": "127.0.0.1", "remote_port": silent.getsockname()[1],
                  "remote_request_id": "nothing", "remote_host_id": "another-host"}  # fmt: skip
        body = dict(BODIES[0], stream=True, kv_transfer_params=params)
        with httpx.stream("POST", decode.url + "/v1/completions", json=body, timeout=30):
            wait_for(decode.url, lambda s: s["num_free_blocks"] < s["num_blocks"], "no blocks were reserved", 5)
        s = wait_for(decode.url, lambda s: s["num_free_blocks"] == s["num_blocks"], "the reservation leaked", 5)
        assert s["num_running"] == s["num_waiting"] == 0
    finally:
        silent.close()


def test_prefill_worker_down_routes_to_another_or_fails_clearly(pd):
    _, (prefill, decode) = pd
    dead = f"http://127.0.0.1:{free_port()}"
    body = BODIES[0]
    assert texts(*via_pd([dead, prefill.url], decode.url, body)) == texts(*via_plain(decode.url, body))
    code, content = via_pd([dead], decode.url, body)
    assert code == 502 and "unreachable" in json.loads(content)["error"]["message"]

    async def ranked():
        async with new_session(5.0) as session:
            return await PDPool(session, [dead, prefill.url], [decode.url]).ranked()

    assert asyncio.run(ranked())[0] == [prefill.url, dead]


def test_role_refuses_the_other_side(pd):
    _, (prefill, decode) = pd
    r = httpx.post(decode.url + "/v1/completions", timeout=30,
                   json=dict(BODIES[0], kv_transfer_params={"do_remote_decode": True}))  # fmt: skip
    assert r.status_code == 400 and "role is decode" in r.json()["error"]["message"]


def test_vllm_router_pd_mode(pd):
    """vllm-router --vllm-pd-disaggregation in front of rtpjax workers."""
    _, (prefill, decode) = pd
    binary = shutil.which("vllm-router") or shutil.which("vllm-router", path=str(__import__("sys").prefix) + "/bin")
    if binary is None:
        pytest.skip("vllm-router is not installed (pip install vllm-router)")
    port = free_port()
    proc = subprocess.Popen([binary, "--vllm-pd-disaggregation", "--prefill", prefill.url, "--decode", decode.url,
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                             "--prometheus-port", str(free_port())],  # its default, 29000, may be taken
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, "vllm-router", 30)
        pulled = status(decode.url)["kv_transfers_pulled"]
        body = dict(BODIES[1], model="stories")
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert texts(r.status_code, r.content) == texts(*via_plain(decode.url, body))
        assert status(decode.url)["kv_transfers_pulled"] == pulled + 1
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_rtpjax_router_pd_mode(pd):
    """`rtpjax router --pd-disaggregation` (a real process) in front of the workers: every request goes through the
    hand-off (the decode side's pulled counter) and gives the decode server's colocated tokens, streamed or not."""
    _, (prefill, decode) = pd
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "rtpjax.cli", "router", "--pd-disaggregation", "--prefill",
                             prefill.url, "--decode", decode.url, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, "rtpjax router", 60)
        pulled = status(decode.url)["kv_transfers_pulled"]
        for body in (BODIES[0], BODIES[4]):
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert texts(r.status_code, r.content) == texts(*via_plain(decode.url, body)), body
        assert len({e["id"] for e in events(r.status_code, r.content)}) == 1  # streamed: continued from the prefill
        assert status(decode.url)["kv_transfers_pulled"] == pulled + 2
        assert httpx.post(url + "/v1/completions", content=b"{not json", timeout=10).status_code == 400
        assert httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"] == "stories"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_router_pd_flags_are_checked():
    """Bad flag combinations fail in one line before anything starts."""
    for argv, says in ((["--pd-disaggregation", "--prefill", "http://a:1"], "at least one --prefill and one --decode"),
                       (["--prefill", "http://a:1", "--decode", "http://b:1"], "need --pd-disaggregation"),
                       (["--pd-disaggregation", "--prefill", "a:1", "--decode", "http://b:1"], "not an http"),
                       ([], "--worker-urls")):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "rtpjax.cli", "router", *argv], capture_output=True, text=True,
                           timeout=60)  # fmt: skip
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_decode_engine_killed_mid_stream_fails_fast(pd):
    """Last in the module: it kills the decode server's engine. The client's stream ends with an error event within
    seconds, and the prefill side holds nothing."""
    engines, (prefill, decode) = pd
    body = dict(prompt=PROMPT, max_tokens=200, temperature=0, ignore_eos=True, stream=True)

    async def go():
        async with new_session(5.0) as session:
            response = await disaggregated(session, [prefill.url], decode.url, "/v1/completions", body)
            began, seen = time.monotonic(), b""
            async for chunk in response.body_iterator:
                seen += chunk if isinstance(chunk, bytes) else chunk.encode()
                if b'"text"' in seen and engines[1]._engine.proc.poll() is None:
                    engines[1]._engine.proc.kill()
                    began = time.monotonic()
            return seen, time.monotonic() - began

    seen, after_kill = asyncio.run(go())
    assert after_kill < 10
    assert b"[DONE]" not in seen[-20:]
    wait_for(prefill.url, lambda s: s["kv_transfers_held"] == 0, "the prefill side still holds K/V")


def test_tp2_prefill_to_tp1_decode_qwen3(tiny_checkpoints, compile_cache):
    """Engines of different tensor-parallel sizes and block sizes: a tiny Qwen3, prefill over 2 devices (blocks of
    16), decode on 1 (blocks of 8), greedy and seeded, token ids in and out."""
    common = dict(ENGINE_ARGS, compilation_cache_dir=compile_cache, skip_tokenizer_init=True, max_num_seqs=4,
                  warmup=False)  # fmt: skip
    path = str(tiny_checkpoints["qwen3"])
    pre = AsyncLLM(path, **dict(common, role="prefill", tensor_parallel_size=2))
    dec = None
    try:
        dec = AsyncLLM(path, **dict(common, role="decode", block_size=8, enable_prefix_caching=False))
        prompt = [5, 17, 99, 3, 42, 8, 200, 31, 77, 12, 150, 6, 64, 9, 18, 111, 23, 7, 250, 4, 33]

        async def run(llm, params, rid, transfer=None):
            out = None
            async for out in llm.generate(prompt, params, request_id=rid, kv_transfer_params=transfer):
                pass
            return out

        async def go():
            for i, params in enumerate([SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                                        SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)]):
                one = SamplingParams(max_tokens=1, temperature=params.temperature, seed=params.seed, ignore_eos=True)
                first = await run(pre, one, f"p{i}", {"do_remote_decode": True})
                assert first.kv_transfer_params and first.kv_transfer_params["tp_size"] == 2
                got = await run(dec, params, f"d{i}", first.kv_transfer_params)
                want = await run(dec, params, f"c{i}")
                assert got.outputs[0].token_ids == want.outputs[0].token_ids

        asyncio.run(go())
        assert dec.stats()["kv_transfers_pulled"] == 2
    finally:
        pre.shutdown()
        if dec is not None:
            dec.shutdown()


def test_pd_bench_transfer_runs(tmp_path):
    """The GPU stage's channel measurement, tiny, on CPU: every path moves the bytes and reports a bandwidth."""
    from rtpjax.benchmarks import pd_bench

    out = tmp_path / "t.json"
    pd_bench.main(["transfer", "--tokens", "32", "--layers", "2", "--repeats", "1", "--out", str(out)])
    row = json.loads(out.read_text())["rows"][0]
    assert all(row[f"{p}_GBps"] > 0 for p in ("shm", "tcp", "staged", "pinned_staged", "shm_stage"))
    assert row["shm_of_pinned_staged"] > 0  # the goal's ratio: against the best host-staged path


def test_pd_bench_ttft_and_serve_record_every_phase(stories_dir, compile_cache, tmp_path):
    """gpu_run.sh pd's TTFT runs, tiny, on CPU: in process, each disaggregated request's timeline in the order its
    phases happen and the second token; over HTTP through the P/D router, TTFT and second token."""
    from rtpjax.benchmarks import pd_bench

    engine = ["--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "128",
              "--compilation-cache-dir", compile_cache, "--no-warmup"]  # fmt: skip
    pd_bench.main(["ttft", str(stories_dir), "--prompt-len", "100", "--repeats", "1", "--out", str(tmp_path / "t.json"),
                   *engine])  # fmt: skip
    result = json.loads((tmp_path / "t.json").read_text())
    (timeline,) = result["timelines_ms"]
    # The decode side reports the prefill's first token as it adopts the K/V, before any step of its own.
    decode = ("added", "reserved", "pulled", "adopted", "first_token", "output")
    assert list(timeline) == [f"prefill.{k}" for k in pd_bench.PREFILL_PHASES] + ["client.prefill_answered"] + \
        [f"decode.{k}" for k in decode] + ["client.first_token"]  # fmt: skip
    assert list(timeline.values()) == sorted(timeline.values()), timeline
    assert 0 < result["disaggregated_ttft_ms"] <= result["disaggregated_second_token_ms"]
    pd_bench.main(["serve", str(stories_dir), "--prompt-len", "100", "--repeats", "1", "--out", str(tmp_path / "s.json"),
                   "--logs", str(tmp_path / "logs"), "--", *engine])  # fmt: skip
    result = json.loads((tmp_path / "s.json").read_text())
    assert 0 < result["router_ttft_ms"] and 0 < result["colocated_ttft_ms"]
    assert result["handoff_phases_ms"].keys() >= {"prefill_d2h", "decode_channel"}


def test_channel_stages_once_checks_and_removes(monkeypatch):
    """The channel, no engines: gathered pieces (padded, arriving one by one) are staged into one reused shared-memory
    file in chunks that straddle them; both paths deliver the rows equal; a byte changed in the file after staging
    fails the checksum; closing removes the files."""
    import glob
    import os

    from rtpjax.disagg import channel, staging
    from rtpjax.kv.host_blocks import KVLayout

    layout = KVLayout("bfloat16", 4, 2, 2, 8)
    monkeypatch.setattr(staging, "CHUNK", 2 * layout.block_bytes)  # chunks of 2 rows over pieces of 3 and 2
    rows = np.random.default_rng(0).integers(0, 255, (5, layout.block_bytes), dtype=np.uint8)
    padded = np.concatenate([rows[:3], np.full((1, layout.block_bytes), 7, np.uint8)])  # a bucket of 4, 3 real
    pieces = [(3, padded), (2, rows[3:])]
    store = staging.HeldStore()
    others = set(threading.enumerate())
    server = channel.TransferServer(store, "127.0.0.1", 0)
    mine = os.path.join(staging.SHM_DIR, f"{staging.PREFIX}{os.getpid()}-*")

    def held():
        return staging.Held(layout, 5, 18, [1, 2], time.monotonic() + 30, store.stage(pieces, layout))

    try:
        for path in ("shm", "tcp", "shm"):
            store.put("t", held())
            got = channel.pull("127.0.0.1", server.port, "t", path, time.monotonic() + 30)
            assert np.array_equal(np.stack(got.rows), rows) and (got.layout, got.num_tokens) == (layout, 18)
            for _ in range(50):  # the serving thread gives the file back just after the pull returns
                if store.arena._idle:
                    break
                time.sleep(0.05)
        assert len(glob.glob(mine)) == 1  # one staging file, reused
        h = held()
        h.staged.done.result(timeout=10)
        path, payload = h.staged.leased.result()
        assert len(h.staged.sums) == 3 and path is not None
        payload[7] ^= 0xFF  # the mapping of the file the decode side maps
        store.put("t", h)
        with pytest.raises(channel.TransferError, match="checksum"):
            channel.pull("127.0.0.1", server.port, "t", "shm", time.monotonic() + 30)
        with pytest.raises(channel.TransferError, match="no hand-off"):
            channel.pull("127.0.0.1", server.port, "t", "shm", time.monotonic() + 30)  # served once
    finally:
        accepting = [t for t in threading.enumerate() if t.name == "rtpjax-kv-server" and t not in others]
        server.close()
        store.close()
    for thread in accepting:  # closing wakes the accept loop: no thread left behind per hand-off server
        thread.join(timeout=5)
        assert not thread.is_alive()
    for _ in range(50):  # the last serving thread hands its file back (removed now) just after the pull returns
        if not glob.glob(mine):
            break
        time.sleep(0.1)
    assert glob.glob(mine) == []


def test_prefill_gather_never_blocks_the_engine_loop(stories_llm, monkeypatch):
    """The prefill side in process, its hand-off thread held back: the prompt's gather is queued behind its last
    chunk, its host copy starts only once the first token is read, and the loop goes on (the request detaches,
    another keeps decoding) while the copy is not yet staged; the pull then gets it. A request aborted before its
    copy is staged, and one whose hand-off expires, leave no file leased; the pool and the store end empty."""
    from rtpjax.disagg import channel, staging
    from rtpjax.disagg.handoff import Handoff
    from rtpjax.distributed.messages import KVTransferParams

    engine = stories_llm.engine
    handoff = Handoff(engine, wake=lambda: None)
    gate, started, stage = threading.Event(), [], staging.stage

    def held_back(*args):
        started.append(1)
        assert gate.wait(30)
        return stage(*args)

    monkeypatch.setattr(staging, "stage", held_back)
    downloads, download = [], engine.runner.copier.download
    monkeypatch.setattr(engine.runner.copier, "download", lambda rows: downloads.append(1) or download(rows))
    leased, lease = set(), handoff.store.arena.lease
    monkeypatch.setattr(handoff.store.arena, "lease", lambda size: (got := lease(size), leased.add(got[0]))[0])

    def add(rid, prompt):
        msg = engine.maker.message(prompt, SamplingParams(max_tokens=8, temperature=0), rid)
        msg.kv_transfer_params = KVTransferParams(do_remote_decode=True)
        assert handoff.add(msg) is None

    def step():
        engine.step(as_deltas=True)
        return handoff.after_step()

    try:
        add("p", PROMPT)
        engine.add_request("Once upon a time", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), "other")
        for _ in range(20):
            if "p" in handoff.gathering:
                break
            assert not step()
        assert not downloads  # gathered on the device; its host copy waits for the first token
        detached = []
        for _ in range(20):
            if detached := step():
                break
        params = detached[0].kv_transfer_params
        assert params is not None and len(started) == 1 and not handoff.store._held["p"].staged.done.done()
        other = engine.requests["other"].seqs[0]
        before = other.num_generated
        for _ in range(4):
            step()
        assert other.num_generated > before and "p" not in engine.requests  # the loop went on meanwhile
        add("a", PROMPT + " play")
        for _ in range(20):
            if "a" in handoff.gathering:
                break
            step()
        assert "a" in handoff.gathering
        handoff.abort("a")  # while its copy is held back
        engine.abort("a")
        gate.set()
        handoff.store._held["p"].staged.done.result(timeout=30)
        _, payload = handoff.store._held["p"].staged.leased.result()
        sent = payload.copy()
        got = channel.pull(params.remote_host, params.remote_port, "p", "shm", time.monotonic() + 30, handoff._load)
        payload[:] = 0  # the file is reused once the pull answers: the device rows are copies
        assert np.array_equal(rows_to_host(got.rows).reshape(-1), sent)
        prompt_len = len(engine.maker.message(PROMPT).prompt_ids)
        assert got.num_tokens == prompt_len and len(got.rows) == len(params.remote_block_ids)
        add("e", PROMPT + " run")
        assert any(step() for _ in range(20)), "the request was not handed off in 20 steps"
        handoff.store._held["e"].expires = 0.0
        handoff.poll()
        run_out(engine, step)
        for _ in range(50):  # the expired hand-off's file comes back once staged (the aborted one never leased one)
            if {path for path, _ in handoff.store.arena._idle} == leased:
                break
            time.sleep(0.1)
        assert {path for path, _ in handoff.store.arena._idle} == leased and len(handoff.store) == 0
        assert not handoff.gathering and downloads
        assert engine.pool.num_free == engine.pool.num_blocks
        assert handoff.stats(engine.stats()).kv_transfer_ms.keys() == {"prefill_d2h", "prefill_stage"}
    finally:
        gate.set()
        for rid in list(engine.requests):
            engine.abort(rid)
        run_out(engine)
        handoff.close()


def test_prefill_runs_no_step_past_the_first_token(stories_llm):
    """A prefill hand-off leaves with its first token: the engine computes its prompt and nothing more (no decode
    row sampling a token nobody reads), and its answer carries the hand-off's phases in order."""
    from rtpjax.disagg.handoff import Handoff
    from rtpjax.distributed.messages import KVTransferParams

    engine = stories_llm.engine
    handoff = Handoff(engine, wake=lambda: None)
    try:
        prompt = "Tom and his big dog ran to the park. They played ball under a tall green tree all day"  # not cached
        msg = engine.maker.message(prompt, SamplingParams(max_tokens=8, temperature=0), "first")
        msg.kv_transfer_params = KVTransferParams(do_remote_decode=True)
        computed = engine.lifetime.computed + engine.loop_stats.computed
        assert handoff.add(msg) is None
        detached = []
        for _ in range(50):  # bounded: the prompt's chunks and its first token
            engine.step(as_deltas=True)
            if detached := handoff.after_step():
                break
        assert detached, "the hand-off never left the engine"
        for _ in range(50):
            if not engine.has_work():
                break
            engine.step()
        assert not engine.has_work()
        assert engine.lifetime.computed + engine.loop_stats.computed - computed == len(msg.prompt_ids)
        trace = detached[0].trace
        order = ["added", "scheduled", "gather_began", "gather_queued", "read_began", "first_token", "output"]
        assert [trace[k] for k in order] == sorted(trace[k] for k in order), trace
        assert detached[0].kv_transfer_params is not None
    finally:
        handoff.close()

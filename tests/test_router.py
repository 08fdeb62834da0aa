"""`rtpjax router` in front of two real `rtpjax serve` replicas of stories260K on loopback, started once for the
module: where requests land (checked through the engines' own prefix-cache counters), that answers are the replicas'
own, byte for byte, and what happens when a replica hangs or dies mid-stream. Also the replicas behind sglang-router
and vllm-router, and the KV events as vLLM's ZMQ stream."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import msgspec
import pytest

from rtpjax.distributed.messages import BlockStored, KVEventBatch, KVEventsPage
from rtpjax.kv.block_pool import prefix_hashes
from test_server import free_port

pytestmark = pytest.mark.slow

# 64 tokens a step: router_bench's flush between runs (prompts of 248 tokens) takes half the steps of 32. test_pd_mixed
# serves with these flags too, so the two files' engines share their compilations.
REPLICA_FLAGS = ["--max-model-len", "256", "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--block-size",
                 "16", "--num-gpu-blocks", "160"]  # fmt: skip
POLICIES = ("cache_aware", "round_robin", "least_load")
STORY = ("Once upon a time there was a little girl named Lily. She loved to play outside in the park with her "
         "friends. One day she saw a big red ball under a tree and")  # fmt: skip


def _wait(check, what: str, timeout: float, procs=(), log=None) -> None:
    """Until check() holds; fails at once when one of procs exits, with the end of its log file if one is named."""
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            if p.poll() is not None:
                tail = open(log, errors="replace").read()[-2000:] if log else ""
                pytest.fail(f"{what}: a process exited with {p.returncode}\n{tail}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


class Cluster:
    def __init__(self, stories_dir, compile_cache):
        import zmq

        self.model = str(stories_dir)
        self.ports = [free_port(), free_port()]
        self.replicas = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.procs: list[subprocess.Popen] = []
        # Replica 0 also streams its KV events over ZMQ (vLLM's convention: the subscriber binds, the engine's PUB
        # connects to a named address) and replays them on a ROUTER socket.
        self.zmq = zmq.Context()
        self.sub = self.zmq.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        zport, self.replay_port = free_port(), free_port()
        self.sub.bind(f"tcp://127.0.0.1:{zport}")
        common = [sys.executable, "-m", "rtpjax.cli", "serve", self.model, *REPLICA_FLAGS, "--compilation-cache-dir",
                  compile_cache]  # fmt: skip
        events = ["--kv-events-endpoint", f"tcp://127.0.0.1:{zport}",
                  "--kv-events-replay-endpoint", f"tcp://127.0.0.1:{self.replay_port}"]  # fmt: skip
        for i, port in enumerate(self.ports):
            self.procs.append(self._start([*common, "--port", str(port), *(events if i == 0 else [])]))
        self.routers = {}
        for policy in POLICIES:
            port = free_port()
            self.procs.append(self._start([sys.executable, "-m", "rtpjax.cli", "router", "--worker-urls",
                                           *self.replicas, "--policy", policy, "--model", self.model, "--port",
                                           str(port)]))  # fmt: skip
            self.routers[policy] = f"http://127.0.0.1:{port}"

    @staticmethod
    def _start(argv) -> subprocess.Popen:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip

    def wait_ready(self) -> None:
        for url in self.replicas:
            _wait(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, url, 600, self.procs)
        for _ in range(10):  # a SUB socket sends its subscription only once its owner touches it
            self.sub.poll(50)
        for url in self.routers.values():
            _wait(lambda: all(w["healthy"] for w in httpx.get(url + "/workers", timeout=2).json()), url, 60)

    def load(self, i: int) -> dict:
        return httpx.get(self.replicas[i] + "/load", timeout=5).json()

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait(timeout=30)
        self.sub.close(linger=0)
        self.zmq.term()


@pytest.fixture(scope="module")
def cluster(stories_dir, compile_cache):
    c = Cluster(stories_dir, compile_cache)
    try:
        c.wait_ready()
        yield c
    finally:
        c.stop()


def complete(url: str, prompt: str, max_tokens: int = 8, **extra) -> httpx.Response:
    body = {"model": "stories260K", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def worker_of(response: httpx.Response) -> int:
    return int(response.headers["x-rtpjax-worker"].rsplit(":", 1)[1])


def test_kv_events_over_http_and_zmq_match_the_prompt_hashes(cluster):
    """A completion's prompt blocks come back as BlockStored events, under the hashes a router computes from the
    prompt's token ids: from GET /kv_events, the ZMQ PUB stream, and its replay socket."""
    import zmq

    prompt = STORY + " a dog barked"
    ids = httpx.post(cluster.replicas[0] + "/tokenize", json={"prompt": prompt}).json()["tokens"]
    want = prefix_hashes(ids, 16)
    assert len(want) >= 2
    assert complete(cluster.replicas[0], prompt).status_code == 200

    def stored(batches) -> set:
        return {h for b in batches for e in b.events if isinstance(e, BlockStored) for h in e.block_hashes}

    page = None

    def arrived():
        nonlocal page
        page = msgspec.json.decode(httpx.get(cluster.replicas[0] + "/kv_events?since=0").content, type=KVEventsPage)
        return set(want) <= stored(b for _, b in page.batches)

    _wait(arrived, "events over HTTP", 10)
    assert page.oldest == 0 and page.next == page.batches[-1][0] + 1
    assert httpx.get(cluster.replicas[0] + f"/kv_events?since={page.next}").json()["batches"] == []
    assert httpx.get(cluster.replicas[0] + "/kv_events?since=-1").status_code == 400

    frames = []
    while cluster.sub.poll(5000) and not set(want) <= stored(msgspec.msgpack.decode(f[2], type=KVEventBatch)
                                                            for f in frames):  # fmt: skip
        frames.append(cluster.sub.recv_multipart())
    assert set(want) <= stored(msgspec.msgpack.decode(f[2], type=KVEventBatch) for f in frames)
    seqs = [int.from_bytes(f[1], "big") for f in frames]
    assert seqs == sorted(seqs)

    dealer = cluster.zmq.socket(zmq.DEALER)
    dealer.connect(f"tcp://127.0.0.1:{cluster.replay_port}")
    try:
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replayed = []
        while dealer.poll(5000):
            _, seq, payload = dealer.recv_multipart()
            if int.from_bytes(seq, "big", signed=True) == -1:
                break
            replayed.append(msgspec.msgpack.decode(payload, type=KVEventBatch))
        assert set(want) <= stored(replayed)
    finally:
        dealer.close(linger=0)


def test_shared_prefix_lands_on_the_replica_holding_it(cluster):
    """cache_aware: requests sharing a prefix follow the first one, and that replica's own counters show the hits."""
    url = cluster.routers["cache_aware"]
    prefix = STORY.replace("Lily", "Mia") + " she ran to it and"
    first = complete(url, prefix + " one")
    assert first.status_code == 200
    home = cluster.ports.index(worker_of(first))
    time.sleep(0.5)  # its KV events reach the router (the routing would follow it anyway, tentatively)
    before = [cluster.load(i)["prefix_cache_hits"] for i in range(2)]
    rest = [complete(url, prefix + f" {word}") for word in ("two", "three", "four", "five")]
    assert [cluster.ports.index(worker_of(r)) for r in rest] == [home] * 4
    after = [cluster.load(i)["prefix_cache_hits"] for i in range(2)]
    assert after[home] - before[home] >= 4 * 32  # each found at least its first two blocks cached
    assert after[1 - home] == before[1 - home]
    metrics = httpx.get(url + "/metrics").text
    assert 'rtpjax_router:decisions_total{policy="cache_aware",reason="prefix"}' in metrics


def test_round_robin_alternates_and_answers_match_a_replica(cluster):
    """The router's answers are the replica's own, non-streamed and streamed (SSE chunks passed through)."""
    url = cluster.routers["round_robin"]
    prompt = "The little dog wanted to"
    direct = complete(cluster.replicas[0], prompt, 16).json()
    served = [complete(url, prompt, 16) for _ in range(4)]
    assert sorted(worker_of(r) for r in served) == sorted(cluster.ports * 2)
    assert all(r.json()["choices"] == direct["choices"] for r in served)

    body = {"model": "stories260K", "prompt": prompt, "max_tokens": 16, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == direct["choices"][0]["text"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", json.dumps({"prompt": ""}).encode(),
                                  json.dumps({"prompt": "hi", "model": "nope"}).encode(),
                                  json.dumps({"prompt": "hi", "temperature": -1}).encode(),
                                  json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()])  # fmt: skip
def test_malformed_requests_get_the_replicas_own_4xx(cluster, body):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    direct = httpx.post(cluster.replicas[0] + path, content=body, headers={"content-type": "application/json"})
    routed = httpx.post(cluster.routers["cache_aware"] + path, content=body,
                        headers={"content-type": "application/json"})  # fmt: skip
    assert 400 <= direct.status_code < 500
    assert (routed.status_code, routed.json()) == (direct.status_code, direct.json())


def _flood(url: str, n: int, stop: threading.Event) -> list[threading.Thread]:
    """n long streams straight to one replica, until `stop`."""

    def run():
        body = {"prompt": "Once", "max_tokens": 240, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return  # closing the stream aborts the request

    threads = [threading.Thread(target=run, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def test_least_load_avoids_a_busy_replica(cluster):
    """Replica 0 has a queue of long requests sent to it directly (not through the router): least_load sees it in
    the replica's load reports and sends new requests to replica 1."""
    stop = threading.Event()
    threads = _flood(cluster.replicas[0], 160, stop)  # more than it can finish meanwhile: aborted at the end
    try:
        _wait(lambda: cluster.load(0)["num_unfinished"] >= 8, "replica 0 busy", 30)
        time.sleep(0.7)  # the router's next load poll sees it
        served = [complete(cluster.routers["least_load"], f"The cat sat on the {w}") for w in ("mat", "hat", "bed")]
        assert cluster.load(0)["num_unfinished"] > 0, "the flood ended too soon to tell"
        assert [worker_of(r) for r in served] == [cluster.ports[1]] * 3
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    _wait(lambda: cluster.load(0)["num_unfinished"] == 0, "flood aborted", 30)


def _streams(url: str, n: int, on_start=lambda port: None) -> tuple[dict, list[threading.Thread]]:
    """n long streams through the router, each in a thread; returns once every one has its response headers (the
    replica sends them before the first token). `on_start(port)` runs in a stream's thread as its headers arrive, so a
    test can stop that replica before a fast model finishes the stream. results[i]: (the replica's port, the SSE data
    lines)."""
    results: dict = {}
    started = [threading.Event() for _ in range(n)]

    def run(i):
        body = {"model": "stories260K", "prompt": "Once upon a time", "max_tokens": 240, "ignore_eos": True,
                "stream": True, "temperature": 0}  # fmt: skip
        events: list = []
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                results[i] = (worker_of(r), events)
                on_start(results[i][0])
                started[i].set()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        finally:
            started[i].set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(30), "a stream did not start"
    return results, threads


def _ended_with_error(events: list) -> bool:
    return len(events) >= 2 and events[-1] == "[DONE]" and "error" in json.loads(events[-2])


def _finished(events: list) -> bool:
    """The replica sent its whole stream (finish_reason "length") before the test could stop it."""
    return any(e != "[DONE]" and json.loads(e).get("choices") and json.loads(e)["choices"][0].get("finish_reason")
               == "length" for e in events)  # fmt: skip


def test_a_hung_replica_is_out_within_seconds_its_streams_end_with_an_error_and_it_rejoins(cluster):
    url = cluster.routers["round_robin"]
    hung = cluster.procs[1]
    for attempt in range(3):  # the tiny model may send all 240 tokens before SIGSTOP lands: then stop it again
        at: list = []

        def stop(port):  # at once: waiting for the other stream's headers gave this one time to finish
            if port == cluster.ports[1]:
                os.kill(hung.pid, signal.SIGSTOP)
                at.append(time.monotonic())

        results, threads = _streams(url, 2, stop)
        assert at, "no stream went to the replica to stop"
        stopped = at[0]
        try:
            _wait(lambda: not httpx.get(url + "/workers").json()[1]["healthy"], "marked out", 6)
            assert time.monotonic() - stopped < 4.5  # two polls in a row unanswered: 2 x (0.5 s interval + 1 s timeout)
            for t in threads:
                t.join(timeout=60)
            assert time.monotonic() - stopped < 30
            hung_events = next(events for port, events in results.values() if port == cluster.ports[1])
            raced = _finished(hung_events)
            if not raced:
                ends = {port: _ended_with_error(events) for port, events in results.values()}
                assert ends == {cluster.ports[1]: True, cluster.ports[0]: False}
                assert {worker_of(complete(url, "A bird")) for _ in range(3)} == {cluster.ports[0]}
        finally:
            os.kill(hung.pid, signal.SIGCONT)
        _wait(lambda: httpx.get(url + "/workers").json()[1]["healthy"], "rejoined", 5)
        if not raced:
            break
    else:
        pytest.fail("in 3 tries the replica sent its whole stream before it could be stopped")
    assert {worker_of(complete(url, "A fish")) for _ in range(2)} == set(cluster.ports)


@pytest.mark.parametrize("router", ["sglang", "vllm"])
def test_replicas_serve_behind_sglang_and_vllm_routers(cluster, router, tmp_path):
    """Unchanged rtpjax servers behind the routers users already run: round_robin and their cache_aware serve every
    request (each replica's own counters show its share under round robin)."""
    if router == "sglang":
        pytest.importorskip("sglang_router", reason="sglang-router is not installed (pip install sglang-router)")
        base = [sys.executable, "-m", "sglang_router.launch_router"]
    else:
        exe = os.path.join(os.path.dirname(sys.executable), "vllm-router")
        if not os.path.exists(exe):
            pytest.skip("vllm-router is not installed (pip install vllm-router)")
        base = [exe]
    for policy in ("round_robin", "cache_aware"):
        port, log = free_port(), tmp_path / f"{router}-{policy}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([*base, "--worker-urls", *cluster.replicas, "--policy", policy, "--host",
                                     "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port())],
                                    stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            _wait(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, f"{router} router", 60, [proc], log)
            before = [cluster.load(i)["prefix_cache_queries"] for i in range(2)]
            for i in range(4):
                r = complete(url, f"{STORY} {router} {policy} {i}")
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["finish_reason"] == "length"
            after = [cluster.load(i)["prefix_cache_queries"] for i in range(2)]
            if policy == "round_robin":
                assert all(a > b for a, b in zip(after, before))
            assert sum(after) > sum(before)
        finally:
            proc.kill()
            proc.wait(timeout=30)


def _sse_text(url: str, body: dict) -> tuple[str, dict]:
    """A streamed completion's text, joined from its SSE events, and its usage event (include_usage)."""
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True,
                      "stream_options": {"include_usage": True}}, timeout=60) as r:  # fmt: skip
        assert r.status_code == 200, r.read()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks if c["choices"]), chunks[-1]["usage"]


def test_sglang_info_endpoints_report_the_replicas_own_settings(cluster):
    """/server_info and /model_info (and their /get_ aliases) say what this replica serves and schedules by."""
    url = cluster.replicas[1]
    server = httpx.get(url + "/server_info", timeout=5).json()
    assert httpx.get(url + "/get_server_info", timeout=5).json() == server
    assert (server["served_model_name"], server["model_path"]) == ("stories260K", cluster.model)
    assert (server["context_length"], server["max_running_requests"], server["max_prefill_tokens"],
            server["page_size"]) == (256, 8, 64, 16)  # REPLICA_FLAGS  # fmt: skip
    load = cluster.load(1)
    assert server["max_total_num_tokens"] == load["num_blocks"] * load["block_size"]
    model = httpx.get(url + "/model_info", timeout=5).json()
    assert httpx.get(url + "/get_model_info", timeout=5).json() == model
    config = json.loads(open(os.path.join(cluster.model, "config.json")).read())
    assert (model["model_path"], model["tokenizer_path"], model["is_generation"]) == (cluster.model, cluster.model, True)
    assert (model["model_type"], model["architectures"]) == (config["model_type"], config["architectures"])
    assert (model["vocab_size"], model["max_context_length"]) == (config["vocab_size"], 256)


@pytest.mark.parametrize("policy", ["cache_aware", "round_robin"])
def test_sglang_router_names_the_model_and_serves_completions_token_for_token(cluster, policy):
    """sglang-router registers each worker under the served name it reads from SGLang's /server_info; without it
    every worker was model "unknown", the router's /v1/models said so, and a client that took the name from there
    (as the serving benchmark does) was refused by every replica. Through it, completions streamed and not are the
    replicas' own, token for token, and /health_generate reaches a replica that computes a token."""
    pytest.importorskip("sglang_router", reason="sglang-router is not installed (pip install sglang-router)")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *cluster.replicas,
                             "--policy", policy, "--host", "127.0.0.1", "--port", str(port), "--prometheus-port",
                             str(free_port())], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        def registered():
            workers = httpx.get(url + "/workers", timeout=2).json()["workers"]
            return len(workers) == 2 and all(w["is_healthy"] and w["model_id"] != "unknown" for w in workers)

        _wait(registered, "sglang-router's workers", 60, [proc])
        assert [w["model_id"] for w in httpx.get(url + "/workers").json()["workers"]] == ["stories260K"] * 2
        model = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
        assert model == "stories260K"
        before = [cluster.load(i)["prefix_cache_queries"] for i in range(2)]
        for i in range(3):
            body = {"model": model, "prompt": f"{STORY} sglang {policy} {i}", "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True}  # fmt: skip
            direct = httpx.post(cluster.replicas[0] + "/v1/completions", json=body, timeout=60).json()
            via = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert via.status_code == 200, via.text
            assert via.json()["choices"] == direct["choices"] and via.json()["usage"] == direct["usage"]
            text, usage = _sse_text(url, body)
            assert text == direct["choices"][0]["text"] and usage == direct["usage"]
        after = [cluster.load(i)["prefix_cache_queries"] for i in range(2)]
        if policy == "round_robin":
            assert all(a > b for a, b in zip(after, before))
        assert httpx.get(url + "/health_generate", timeout=30).status_code == 200
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_router_bench_compare_drives_the_replicas_open_and_closed_loop(cluster):
    """benchmarks/router_bench.py compare, tiny: each router, workload and load gets a row whose hit rate comes from
    the engines' counters (the tokens they were asked for add up to what the runs sent) and whose requests all
    succeeded."""
    from rtpjax.benchmarks import router_bench

    def hits() -> int:
        return cluster.load(0)["prefix_cache_hits"]

    for _ in range(2):  # the flush between runs evicts what a replica held: a prompt cached before misses after
        before = hits()
        assert complete(cluster.replicas[0], STORY + " flushed", max_tokens=1).status_code == 200
    assert hits() > before
    router_bench.flush(cluster.replicas)
    before = hits()
    assert complete(cluster.replicas[0], STORY + " flushed", max_tokens=1).status_code == 200
    assert hits() == before

    routers = ["round_robin", "cache_aware"] + (["sglang_cache_aware"] if _importable("sglang_router") else [])
    # 6 requests a run (multi_turn: 2 conversations of 3 turns), open loop at 24/s: each run's arrivals take ~0.25 s.
    n = 6
    rows = router_bench.main(["compare", "--replicas", *cluster.replicas, "--tokenizer", cluster.model, "--routers",
                              *routers, "--request-rates", "24", "--concurrencies", "4", "--num-prompts", str(n),
                              "--prefix-len", "48", "--suffix-len", "8", "--num-prefixes", "3", "--turns", "3",
                              "--turn-input-len", "16", "--output-len", "4", "--repeats", "2"])  # fmt: skip
    assert sorted(rows) == sorted(f"{r}/{w}/{load}/r{rep}" for r in routers for w in router_bench.WORKLOADS
                                  for load in ("24/s", "c4") for rep in (0, 1))  # fmt: skip
    for row in rows.values():
        assert (row["completed"], row["failed"]) == (n, 0) and len(row["ttfts_ms"]) == n
        assert row["workload"] != "multi_turn" or len(row["p95_ttft_ms_by_turn"]) == 3
        assert 0.0 <= row["hit_rate"] <= 1.0 and sum(row["replica_queried_tokens"]) > n * 8
    assert rows["round_robin/prefix_repetition/c4/r0"]["max_concurrency"] == 4
    for key in ("prefix_repetition/24/s/r0", "multi_turn/c4/r1"):  # rtpjax's router: each decision counted, with why
        made = rows[f"cache_aware/{key}"]["decisions"]
        assert sum(v for k, v in made.items() if k != "predicted_hit_tokens") == n, made
        assert rows[f"round_robin/{key}"]["decisions"] == {"round_robin": float(n), "predicted_hit_tokens": 0.0}
    assert all(q > 0 for q in rows["round_robin/prefix_repetition/24/s/r0"]["replica_queried_tokens"])


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_a_killed_replica_ends_its_streams_with_an_error_and_the_rest_go_on(cluster):
    """Last: it leaves replica 1 dead."""
    at = []

    def kill(port):
        if port == cluster.ports[1]:
            cluster.procs[1].kill()
            at.append(time.monotonic())

    results, threads = _streams(cluster.routers["round_robin"], 2, kill)
    assert at, "no stream went to the replica to kill"
    killed = at[0]
    for t in threads:
        t.join(timeout=60)
    ends = {port: _ended_with_error(events) for port, events in results.values()}
    assert ends == {cluster.ports[1]: True, cluster.ports[0]: False}
    assert time.monotonic() - killed < 30  # the healthy stream's end; the dead one's error came at once
    url = cluster.routers["cache_aware"]
    assert [worker_of(complete(url, f"{STORY} after {i}")) for i in range(3)] == [cluster.ports[0]] * 3
    assert httpx.get(url + "/health").status_code == 200

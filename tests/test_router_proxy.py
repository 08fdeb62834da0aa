"""The router's relay against a scripted fake replica on loopback, in this process: how a stream ends when the
replica dies, hangs or the client leaves, and that answers pass through byte for byte. Each fault runs several times:
its outcome must not depend on which of the router's tasks notices first."""

import asyncio
import gzip
import json
import threading
import time

import httpx
import pytest
import uvicorn
from test_server import free_port

from rtpjax.router.app import build_router

SSE = b"text/event-stream; charset=utf-8"
EVENT = b'data: {"choices": [{"index": 0, "text": "x"}]}\n\n'
GZIPPED = gzip.compress(b'{"choices": []}', mtime=0)
LOAD = json.dumps({"num_unfinished": 0, "num_running": 0, "waiting_prompt_tokens": 0, "block_size": 16}).encode()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LATE_S = 0.45  # past the routed fixture's poll timeout (0.3 s)


class FakeReplica:
    """Answers GET /load (until it hangs) and plays the script named by a completion's prompt."""

    def __init__(self):
        self.hung = False  # /load and every script stop answering
        self.late_loads = 0  # how many of the next GET /load answers come late (past the router's poll timeout)
        self.closed = threading.Event()  # the router closed a "slow" stream's connection
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        server = asyncio.run_coroutine_threadsafe(asyncio.start_server(self.handle, "127.0.0.1", 0), self.loop)
        self.server = server.result(10)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def stop(self) -> None:
        async def shutdown():
            self.server.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: one request after another
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                path = head[0].split()[1]
                length = next((int(h.split(":")[1]) for h in head if h.lower().startswith("content-length:")), 0)
                body = await reader.readexactly(length)
                while self.hung:
                    await asyncio.sleep(0.05)
                if path == "/load":
                    if self.late_loads:
                        self.late_loads -= 1
                        await asyncio.sleep(LATE_S)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                                 % (len(LOAD), LOAD))  # fmt: skip
                elif path == "/v1/completions":
                    if not await self.complete(json.loads(body)["prompt"], reader, writer):
                        return
                else:
                    writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def complete(self, script: str, reader, writer) -> bool:
        """Plays `script`; False when the connection is done with."""
        if script == "json":  # gzipped: the router must pass the bytes on, not decoded
            body = GZIPPED
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
                         b"x-extra: 1\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            return True
        if script == "hang before headers":
            self.hung = True
            await asyncio.sleep(3600)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: " + SSE + b"\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(_chunk(EVENT))
        await writer.drain()
        if script == "stream":
            writer.write(_chunk(EVENT) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            return True
        if script == "reset":  # a killed process's socket, torn down
            writer.transport.abort()
            return False
        if script == "close":  # the stream cut short with a clean TCP close
            writer.close()
            return False
        if script == "hang":
            self.hung = True
            await asyncio.sleep(3600)
        if script == "slow":
            eof = asyncio.ensure_future(reader.read(1))
            while not eof.done():
                writer.write(_chunk(EVENT))
                await asyncio.sleep(0.02)
            self.closed.set()
            return False
        raise AssertionError(f"unknown script {script!r}")


@pytest.fixture
def routed():
    """A fake replica and a round_robin router in front of it; yields (router URL, replica)."""
    replica = FakeReplica()
    app = build_router([replica.url], policy="round_robin", health_interval_s=0.1, health_timeout_s=0.3)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the router did not take the fake replica in"
            time.sleep(0.05)
        yield url, replica
    finally:
        server.should_exit = True
        thread.join(10)
        replica.stop()


def stream(url: str, script: str) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": script, "stream": True}, timeout=10) as r:
        return r, r.read()


def test_answers_pass_through_byte_for_byte(routed):
    url, _ = routed
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "json"}, timeout=10) as r:
        assert (r.status_code, r.headers["content-encoding"], r.headers["x-extra"]) == (200, "gzip", "1")
        assert r.headers["x-rtpjax-worker"].startswith("http://127.0.0.1:")
        assert b"".join(r.iter_raw()) == GZIPPED
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 404  # the replica's own answer, passed on
    for _ in range(3):
        r, body = stream(url, "stream")
        assert r.headers["content-type"] == SSE.decode()
        assert body == EVENT * 2 + b"data: [DONE]\n\n"


def _ends_with_error(body: bytes) -> bool:
    events = [e for e in body.decode().split("\n\n") if e]
    return events[0] + "\n\n" == EVENT.decode() and events[-1] == "data: [DONE]" and "error" in json.loads(
        events[-2].removeprefix("data: "))  # fmt: skip


@pytest.mark.parametrize("script", ["reset", "close"])
def test_a_replica_dying_mid_stream_always_ends_it_with_an_error_event(routed, script):
    url, _ = routed
    for _ in range(10):
        r, body = stream(url, script)
        assert r.status_code == 200 and _ends_with_error(body), body
        deadline = time.monotonic() + 5
        while httpx.get(url + "/health").status_code != 200:  # a reset may have marked it out: wait until it is in
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_hung_replica_ends_its_stream_with_an_error_event_and_a_waiting_request_with_502(routed):
    url, replica = routed
    began = time.monotonic()
    r, body = stream(url, "hang")
    assert _ends_with_error(body) and b"it stopped answering" in body, body
    assert time.monotonic() - began < 2
    replica.hung = False
    deadline = time.monotonic() + 5
    while httpx.get(url + "/health").status_code != 200:
        assert time.monotonic() < deadline, "the replica did not rejoin"
        time.sleep(0.05)
    r = httpx.post(url + "/v1/completions", json={"prompt": "hang before headers"}, timeout=10)
    assert r.status_code == 502 and r.json()["error"]["code"] == "replica_failed"


def test_a_busy_replica_late_to_answer_one_poll_stays_in_and_keeps_its_stream(routed):
    url, replica = routed
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "slow", "stream": True}, timeout=10) as r:
        chunks = r.iter_bytes()
        assert next(chunks).startswith(b"data: ")
        replica.late_loads = 1
        deadline = time.monotonic() + 3 * LATE_S
        while time.monotonic() < deadline:  # one poll times out meanwhile; the stream goes on
            assert b"error" not in next(chunks)
            assert httpx.get(url + "/health", timeout=2).status_code == 200
        assert replica.late_loads == 0, "no poll came while the stream ran"


def test_a_client_leaving_mid_stream_closes_the_replicas_connection(routed):
    url, replica = routed
    for _ in range(3):
        replica.closed.clear()
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": "slow", "stream": True}, timeout=10) as r:
            assert next(r.iter_bytes()).startswith(b"data: ")
        assert replica.closed.wait(5), "the router kept reading a stream nobody wanted"
    r, body = stream(url, "stream")  # and the router still serves
    assert body.endswith(b"data: [DONE]\n\n")


def test_free_ports_lie_below_the_ephemeral_range_and_never_repeat():
    """The ports tests and benchmarks start servers on: an outgoing connection's source port (taken from the ephemeral
    range) can never be one of them, and no two callers in a process get the same one."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_low = int(f.read().split()[0])
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports) and all(1024 < p < ephemeral_low for p in ports)

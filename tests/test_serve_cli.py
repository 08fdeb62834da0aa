"""`rtpjax serve` as a user runs it: a subprocess that answers, then shuts down gracefully on SIGTERM."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import wait_healthy
from test_server import free_port


@pytest.mark.slow
def test_serve_answers_and_drains_on_sigterm(stories_dir, compile_cache):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtpjax.cli", "serve", str(stories_dir), "--port", str(port), "--max-model-len", "256",
         "--max-num-seqs", "8", "--max-num-batched-tokens", "32", "--compilation-cache-dir", compile_cache],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, "rtpjax serve")
        out = httpx.post(url + "/v1/completions", json={"model": "stories260K", "prompt": "Once upon a time",
                                                        "max_tokens": 12, "temperature": 0}).json()  # fmt: skip
        assert out["choices"][0]["text"].startswith(", there was a little girl named Lily")
        _stacks(proc, stop=False)  # kill -USR1 prints each process's stacks (checked below, in its output)

        # SIGTERM once the stream has begun and before it ends. A reader slower than the engine gets what piled up
        # as one event, so on a busy machine the whole answer can come at once: then there was nothing in flight
        # to drain, and the stream is asked for again (an unbounded wait for a third event hung CI once that way).
        for _ in range(3):
            events, reader = _stream_in_background(url)
            deadline = time.monotonic() + 120  # bounded: a stream that stalls fails here, never hangs the suite
            while not events and reader.is_alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            if not events:
                pytest.fail(f"the stream stalled; the processes' stacks and output:\n{_stacks(proc)}")
            if reader.is_alive():
                break
        else:
            pytest.fail("in 3 tries the whole stream came before it could be interrupted")
        proc.send_signal(signal.SIGTERM)  # in the middle of the stream
        reader.join(timeout=120)
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert events[-1] == "[DONE]"  # the in-flight request was allowed to finish
        tokens = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert len(tokens) > 100
        output = proc.stdout.read()
        assert " in run_then" in output and " in _rounds" in output, output[-5000:]  # the server's, the engine's
    finally:
        if proc.poll() is None:
            proc.kill()


def _stream_in_background(url: str) -> tuple[list[str], threading.Thread]:
    """A long streamed completion read on a thread: its SSE data lines as they come, and the thread."""
    events: list[str] = []

    def read():
        body = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])

    reader = threading.Thread(target=read)
    reader.start()
    return events, reader


def _stacks(proc: subprocess.Popen, stop: bool = True) -> str:
    """What a stuck server and its engine were doing: every thread's Python stack (SIGUSR1, rtpjax's faulthandler),
    then, when it stops the server, the end of their shared output."""
    pids = [proc.pid, *_children(proc.pid)]
    for pid in pids:  # one at a time: their stacks share the pipe
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
        time.sleep(1)
    if not stop:
        return ""
    for pid in pids:  # the engine too, by its id: it holds the pipe open
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return proc.communicate(timeout=30)[0][-20000:]


def _children(pid: int) -> list[int]:
    """The live processes whose parent is `pid` (from /proc: no psutil needed)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.slow
def test_data_parallel_launch_stops_its_replicas_on_sigterm(stories_dir, compile_cache):
    """SIGTERM to `rtpjax serve --data-parallel-size 2` stops its replicas (and their engines) before it exits:
    uvicorn raises the signal again as it returns, which once ended the launcher before its cleanup and orphaned
    both replicas."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtpjax.cli", "serve", str(stories_dir), "--port", str(port), "--data-parallel-size",
         "2", "--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--no-warmup",
         "--compilation-cache-dir", compile_cache],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    replicas = []
    try:
        for i in (1, 2):
            wait_healthy(proc, f"http://127.0.0.1:{port + i}", f"replica {i}")
        wait_healthy(proc, f"http://127.0.0.1:{port}", "the router")  # it has seen a replica answer
        replicas = _children(proc.pid)
        assert len(replicas) == 2
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                         json={"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}).json()  # fmt: skip
        assert out.get("choices"), out
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        left = [pid for pid in replicas if Path(f"/proc/{pid}").exists()]  # reaped by the launcher, or orphaned
        assert not left, f"replicas left running after the launcher exited: {left}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its replicas, wherever the test stopped
        for pid in replicas:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # orphans
        proc.wait()

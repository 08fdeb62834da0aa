"""`rtpjax serve` as a user runs it: a subprocess that answers, then shuts down gracefully on SIGTERM."""

import json
import signal
import subprocess
import sys
import threading
import time

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

        events = []

        def stream():
            body = {"prompt": "Once upon a time", "max_tokens": 120, "stream": True, "ignore_eos": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])

        reader = threading.Thread(target=stream)
        reader.start()
        while len(events) < 3:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)  # in the middle of the stream
        reader.join(timeout=120)
        assert proc.wait(timeout=120) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert events[-1] == "[DONE]"  # the in-flight request was allowed to finish
        tokens = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
        assert len(tokens) > 100
    finally:
        if proc.poll() is None:
            proc.kill()

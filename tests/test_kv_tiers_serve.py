"""`rtpjax serve` with a disk KV tier, restarted: the prefix cache written down as the server stops on SIGTERM is hit
by the next server with the same model and block size (same tokens), never by one with another block size."""

import contextlib
import re
import signal
import subprocess
import sys

import httpx
import pytest
from conftest import wait_healthy
from test_server import free_port

PROMPT = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. "
          "One day, she saw a big red ball under a tree. She ran to get it, but a dog came and took it away. Lily was "
          "sad, so her mom gave her a hug and they went home to eat cookies.")  # fmt: skip


@contextlib.contextmanager
def serve(stories_dir, compile_cache, disk, *extra):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtpjax.cli", "serve", str(stories_dir), "--port", str(port), "--max-model-len", "256",
         "--max-num-seqs", "8", "--max-num-batched-tokens", "32", "--compilation-cache-dir", compile_cache,
         "--kv-offloading-size", "0.01", "--kv-disk-path", str(disk), "--kv-disk-size", "0.05", "--no-warmup", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, "rtpjax serve")
        yield url
        proc.send_signal(signal.SIGTERM)  # graceful: the engine writes its prefix cache down as it stops
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def complete(url: str) -> tuple[str, float]:
    """The greedy completion of PROMPT, and the disk tier's hits (tokens) on /metrics after it."""
    body = {"model": "stories260K", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    text = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    metrics = httpx.get(url + "/metrics", timeout=10).text
    hits = re.search(r'^rtpjax:kv_tier_hits_total\{[^}]*tier="disk"\} (\S+)$', metrics, re.MULTILINE)
    assert hits, "no disk tier metrics on /metrics"
    return text, float(hits.group(1))


@pytest.mark.slow
def test_serve_restart_hits_the_disk_tier(stories_dir, compile_cache, tmp_path):
    with serve(stories_dir, compile_cache, tmp_path) as url:
        first, hits = complete(url)
    assert hits == 0 and list(tmp_path.glob("*/*/*.kv")), "the stopping server wrote nothing to disk"
    with serve(stories_dir, compile_cache, tmp_path) as url:
        again, hits = complete(url)
    assert again == first
    assert hits >= 3 * 16, "the restarted server did not hit the disk tier"
    with serve(stories_dir, compile_cache, tmp_path, "--block-size", "32") as url:
        other, hits = complete(url)
    assert other == first and hits == 0, "a server with another block size read the disk tier"

"""One engine over two processes (4 CPU devices each, tensor parallel over all 8) launched as a user would, with
jax.distributed on loopback: the leader serves HTTP with the tokens of one process; a killed follower fails the
leader's request within seconds and the leader exits."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from test_server import free_port

PROMPT = "Once upon a time"
# Few step shapes: both processes compile every one of them at start.
SHAPES = ["--max-model-len", "64", "--max-num-seqs", "2", "--max-num-batched-tokens", "8", "--block-size", "16"]


def _wait_health(url: str, procs, logs, seconds: float) -> None:
    deadline = time.time() + seconds
    while True:
        for proc, log in zip(procs, logs):
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "the multi-host server did not come up:\n" + logs[0].read_text()[-3000:]
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(stories_dir, compile_cache, tmp_path_factory):
    """(url, leader, follower, log paths): `rtpjax serve` twice, process 0 and process 1 of one engine."""
    logs_dir = tmp_path_factory.mktemp("multihost")
    port, coordinator = free_port(), free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs, logs = [], []
    try:
        for rank in (0, 1):
            log = logs_dir / f"process{rank}.log"
            cmd = [sys.executable, "-m", "rtpjax.cli", "serve", str(stories_dir), "--port", str(port), *SHAPES,
                   "--tensor-parallel-size", "8", "--num-processes", "2", "--process-id", str(rank),
                   "--coordinator-address", f"127.0.0.1:{coordinator}", "--compilation-cache-dir", compile_cache,
                   "--num-scheduler-steps", "3"]  # multi-step decodes; a request with logprobs steps plainly
            with open(log, "w") as out:
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))  # fmt: skip
            logs.append(log)
        url = f"http://127.0.0.1:{port}"
        _wait_health(url, procs, logs, 420)
        yield url, procs[0], procs[1], logs
    finally:
        for proc in procs:  # each by its own pid (and its engine process: the leader's session)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_two_processes_serve_the_tokens_of_one(cluster, stories_llm):
    from rtpjax import SamplingParams

    url = cluster[0]
    one = stories_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    for extra in ({}, {"logprobs": 1}):  # the leader's multi-step decodes, then plain steps (logprobs)
        body = {"model": "stories260K", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, **extra}
        assert httpx.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"] == one


@pytest.mark.slow
def test_a_killed_follower_fails_the_request_and_the_leader_exits(cluster):
    url, leader, follower, logs = cluster
    events, ended = [], []

    def stream():
        body = {"prompt": PROMPT, "max_tokens": 40, "stream": True, "ignore_eos": True, "temperature": 0}
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
        except httpx.HTTPError as e:
            events.append(f"transport: {e}")
        ended.append(time.time())

    reader = threading.Thread(target=stream)
    reader.start()
    deadline = time.time() + 60
    while not events and time.time() < deadline:
        time.sleep(0.005)
    assert events, "no first token"
    os.kill(follower.pid, signal.SIGKILL)
    killed = time.time()
    reader.join(timeout=30)
    log = logs[0].read_text()[-3000:]
    assert ended and ended[0] - killed < 15, "the stream did not end within seconds of the follower's death\n" + log
    # It ends with an error (a stream in flight is cut, as when the engine process dies), not finished as if whole.
    assert events[-1].startswith("transport:") or "error" in events[-1], events[-3:]
    assert leader.wait(timeout=30) is not None, log  # the leader exits too
    assert time.time() - killed < 30
    assert "follower process 1 is gone" in logs[0].read_text(), log


@pytest.mark.parametrize("options, error", [
    (dict(num_processes=2, process_id=2, coordinator_address="h:1"), "--process-id must be below --num-processes (2)"),
    (dict(num_processes=2), "--coordinator-address must be HOST:PORT"),
    (dict(num_processes=2, coordinator_address="h"), "--coordinator-address must be HOST:PORT"),
    (dict(num_processes=2, coordinator_address="h:1", kv_offloading_size=1.0), "work in one process only"),
])  # fmt: skip
def test_bad_launch_options_fail_with_one_line(options, error):
    from rtpjax import EngineArgs

    with pytest.raises(ValueError, match=re.escape(error)):
        EngineArgs(**options)


def test_step_messages_round_trip():
    from rtpjax.distributed import messages
    from rtpjax.distributed.messages import FollowAdmit, FollowScore, FollowStep

    flat = np.arange(7, dtype=np.int32)
    for message in (FollowStep(16, 8, flat.tobytes(), flat[:3].tobytes(), "greedy", False),
                    FollowStep(16, 16, flat.tobytes(), b"", "filtered", False, steps=4),
                    FollowAdmit([0, 8], [5, 6], [0, 0], [False, True]), FollowScore([1, 2, 3], 2)):  # fmt: skip
        assert messages.decode(messages.encode(message)) == message
    step = messages.decode(messages.encode(FollowStep(16, 8, flat.tobytes(), b"", "random", True)))
    assert np.array_equal(np.frombuffer(step.inputs, np.int32), flat)

"""README.md's examples run as shown, so the README cannot drift: every ```python block (in one process, in order)
and every ```bash block (a block that is `rtpjax serve ...` is started as the server the others talk to), with the
default model on CPU. A block right after `<!-- not tested: reason -->` is skipped.

The server is the README's first command with no flags, in a process limited to 8 GB of address space (RLIMIT_AS,
inherited by its engine process): the default start must fit, and the engine's peak resident memory must stay within
what its memory plan said.
"""

import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from test_server import free_port

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(<!-- not tested: [^>]*-->\s*)?```(python|bash|sh)\n(.*?)```", re.S)
LIMIT = 8 << 30


def blocks(language: str) -> list[str]:
    kinds = ("bash", "sh") if language == "bash" else (language,)
    return [code for skip, kind, code in BLOCK.findall(README.read_text()) if kind in kinds and not skip]


def test_readme_marks_only_what_it_must_skip():
    skipped = re.findall(r"<!-- not tested: ([^>]*)-->", README.read_text())
    assert len(skipped) == 2 and all(reason.strip() for reason in skipped)  # installing, and the suite itself
    assert blocks("python") and blocks("bash")


def _env(home: Path, compile_cache: str) -> dict:
    venv_bin = str(Path(sys.executable).parent)
    return {**os.environ, "HOME": str(home), "PATH": venv_bin + os.pathsep + os.environ["PATH"],
            "JAX_COMPILATION_CACHE_DIR": compile_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}  # fmt: skip


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


@pytest.mark.slow
def test_readme_python_examples_run(tmp_path, compile_cache):
    script = "\n\n".join(blocks("python"))
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=_env(tmp_path, compile_cache),
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()


@pytest.mark.slow
def test_readme_first_command_serves_under_8gb_and_answers_the_examples(tmp_path, compile_cache):
    servers = [code for code in blocks("bash") if code.strip().startswith("rtpjax serve")]
    clients = [code for code in blocks("bash") if code not in servers]
    assert servers == ["rtpjax serve\n"], "the README's first command is a plain `rtpjax serve`"
    port = free_port()  # the README's 8000 may be taken on a shared machine
    clients = [code.replace("localhost:8000", f"localhost:{port}") for code in clients]
    log = tmp_path / "serve.log"
    env = _env(tmp_path, compile_cache)
    with open(log, "w") as sink:
        proc = subprocess.Popen(["bash", "-c", f"exec {servers[0].strip()} --port {port}"], cwd=tmp_path, env=env,
                                stdout=sink,
                                stderr=subprocess.STDOUT, preexec_fn=_limit_memory)  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "rtpjax serve did not come up:\n" + log.read_text()[-3000:]
            time.sleep(1)
        for code in clients:
            out = subprocess.run(["bash", "-e", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                                 timeout=300)  # fmt: skip
            assert out.returncode == 0, out.stderr[-3000:]
            assert "Paris" in out.stdout, out.stdout  # the answer the README shows
        text = log.read_text()
        planned = re.search(r"memory plan: .*; ([\d.]+) GB \(.*\) planned of ([\d.]+) GB available \(RLIMIT_AS\)", text)
        assert planned, text[-3000:]
        (engine,) = _children(proc.pid)
        assert _peak_rss(engine) <= float(planned.group(1)) * 1e9
        assert "Traceback" not in text and "tpu" not in text.lower()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

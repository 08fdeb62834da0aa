"""`rtpjax generate` streams a real model's completion; bad input is one line on stderr and exit code 2."""

import subprocess
import sys


def rtpjax(*args, cache):
    return subprocess.run([sys.executable, "-m", "rtpjax.cli", *args, "--compilation-cache-dir", cache],
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_generate_streams_the_story(stories_dir, compile_cache):
    out = rtpjax("generate", "Once upon a time", "--model", str(stories_dir), "--max-tokens", "20", cache=compile_cache)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Once upon a time, there was a little girl named Lily.")


def test_generate_bad_input_is_a_clear_error(stories_dir, tmp_path, compile_cache):
    out = rtpjax("generate", "hi", "--model", str(tmp_path), cache=compile_cache)
    assert out.returncode == 2 and "no config.json" in out.stderr and "Traceback" not in out.stderr
    out = rtpjax("generate", "hi", "--model", str(stories_dir), "--top-p", "3", cache=compile_cache)
    assert out.returncode == 2 and "top_p must be in (0, 1]" in out.stderr

"""A user's mistake is one line on stderr and exit code 2 for every command, found before minutes of loading: bad
paths, model hub ids (no hub access, no network tried), unsupported architectures, bad values, sizes that cannot fit
(also when the engine process finds them); --debug shows the traceback."""

import json
import subprocess
import sys
import time

import pytest

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def rtpjax(*args, timeout=120):
    began = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "rtpjax.cli", *args], capture_output=True, text=True, timeout=timeout)
    return out, time.monotonic() - began


def one_line_error(out) -> str:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtpjax: error: "), out.stderr
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (("serve", HUB_ID), "looks like a model hub id, and rtpjax has no model hub access"),
    (("convert", HUB_ID, "out"), "looks like a model hub id"),
    (("generate", "hi", "--model", "/no/such/model"), "/no/such/model: no such file or folder"),
    (("generate", "hi", "--max-tokens", "-1"), "max_tokens"),  # checked before the default model loads
])  # fmt: skip
def test_mistakes_are_one_line_before_anything_loads(args, expected):
    out, seconds = rtpjax(*args)
    assert expected in one_line_error(out)
    assert seconds < 60  # no hub retries, no loading


def test_unsupported_architecture_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    (tmp_path / "tokenizer.json").write_text("{}")
    out, _ = rtpjax("generate", "hi", "--model", str(tmp_path))
    assert "unsupported architecture 'FooForCausalLM'" in one_line_error(out)
    out, _ = rtpjax("generate", "hi", "--model", str(tmp_path), "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr and "FooForCausalLM" in out.stderr


def test_sizes_that_cannot_fit_are_one_line_from_the_engine_process_too(stories_dir):
    """serve's engine runs in a process of its own: its refusal still reaches the user as one line."""
    out, _ = rtpjax("serve", str(stories_dir), "--max-model-len", "256", "--num-gpu-blocks", "2", timeout=300)
    assert "holds 32 tokens, less than one sequence of --max-model-len 256" in one_line_error(out)

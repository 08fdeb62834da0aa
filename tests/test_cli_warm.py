"""A warm `rtpjax generate` loads only the executables its one prompt runs, not a warm-up's worth of step shapes."""

import re
import subprocess
import sys

COUNTS = re.compile(r"executables of this run: (\d+) compiled, (\d+) from the compilation cache")


def generate(model, cache, *flags) -> tuple[str, int, int]:
    """(answer, executables compiled, executables fetched from the compilation cache) of one CLI run."""
    out = subprocess.run([sys.executable, "-m", "rtpjax.cli", "generate", "Once upon a time", "--model", str(model),
                          "--max-tokens", "12", "--compilation-cache-dir", str(cache), *flags],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    counts = COUNTS.search(out.stderr)
    assert counts, out.stderr
    return out.stdout, int(counts.group(1)), int(counts.group(2))


def test_a_warm_generate_loads_only_what_its_prompt_runs(stories_dir, tmp_path):
    # A fresh cache filled by a run with the serving engine's warm-up (every step shape, sampler variant, prompt
    # scorer, block copy), then the plain command: its one prompt needs a prompt step, a decode step and their samplers.
    warmed, compiled, fetched = generate(stories_dir, tmp_path, "--warmup")
    assert fetched == 0 and compiled >= 20
    answer, recompiled, loaded = generate(stories_dir, tmp_path)
    assert answer == warmed and answer.startswith("Once upon a time, there was a little girl")
    assert recompiled == 0, "the warm run compiled something the warm-up had compiled"
    assert 2 <= loaded <= compiled // 4


def test_generate_sizes_the_engine_to_its_prompt_unless_told():
    from rtpjax.cli import generate_sizes
    from rtpjax.options import EngineArgs

    assert generate_sizes(EngineArgs(), 40, 24) == {"max_model_len": 1024, "max_num_batched_tokens": 64}
    assert generate_sizes(EngineArgs(), 1500, 1000) == {"max_model_len": 4096, "max_num_batched_tokens": 512}
    given = EngineArgs(max_model_len=300, max_num_batched_tokens=32)
    assert generate_sizes(given, 40, 24) == {}

"""`pip install .` ships exactly one top-level package, rtpjax, with models and serve inside it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_install_puts_only_rtpjax_at_the_top(tmp_path):
    src = tmp_path / "src"
    for name in ("rtpjax", "models", "serve", "benchmarks"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, src],
        check=True,
    )
    top = sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin")
    assert top == ["rtpjax"]
    assert (site / "bin" / "rtpjax").is_file()
    probe = (
        "import rtpjax.models.llama, rtpjax.serve, rtpjax.benchmarks.serve_bench, importlib.util as u; "
        "print(u.find_spec('models'), u.find_spec('serve'), u.find_spec('benchmarks'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None", "None"]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Install and run the tests")[1].split("```bash\n")[1].split("\n```")[0].strip()
    assert block.endswith("&& pytest")
    assert block in (ROOT / ".ci" / "run").read_text()

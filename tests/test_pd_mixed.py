"""The multi-GPU P/D benchmark (benchmarks/pd_mixed.py) run end to end on the CPU: real engines, routers and clients on
loopback, one engine pair of role `both` reused by every configuration. Every request sent completes, the
disaggregated configurations hand every request's K/V over and the colocated one none."""

import json
import shutil
import sys

import pytest
from rtpjax.benchmarks import pd_mixed
from test_router import REPLICA_FLAGS  # the router tests' replicas: the same step shapes, compiled once for both


def test_pd_mixed_runs_every_configuration(stories_dir, compile_cache, tmp_path):
    configs = ["colocated", "disagg"] + (["vllm_router"] if shutil.which("vllm-router") or
                                         shutil.which("vllm-router", path=str(__import__("pathlib").Path(sys.executable).parent)) else [])  # fmt: skip
    out = tmp_path / "pd_mixed.json"
    rows = pd_mixed.main([str(stories_dir), "--name", "stories", "--gpus", "cpu", "cpu", "--all-both", "--configs",
                          *configs, "--rates", "1", "--seconds", "1", "--long-len", "96", "--long-out", "8",
                          "--long-rate", "1", "--short-len", "16", "--short-out", "12", "--short-rate", "3",
                          "--request-timeout", "60", "--start-timeout", "300", "--logs", str(tmp_path / "logs"),
                          "--out", str(out), "--", *REPLICA_FLAGS, "--compilation-cache-dir", compile_cache,
                          "--no-warmup"])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    for config in configs:
        r = rows[config]["1"]
        assert r["sent"] == r["completed"] == 1 + 3, (config, r["classes"])  # --seconds 1: one long, three short
        assert r["output_tok_s"] > 0 and r["short_itl_p99_ms"] > 0
        assert r["kv_handoffs"] == (0 if config == "colocated" else r["sent"]), config
        assert r["kv_handoffs_failed"] == 0


def test_pd_mixed_refuses_an_engine_that_cannot_start(tmp_path):
    with pytest.raises(RuntimeError, match="exited with"):
        pd_mixed.main([str(tmp_path / "missing"), "--gpus", "cpu", "cpu", "--configs", "disagg", "--rates", "1",
                       "--start-timeout", "60", "--logs", str(tmp_path / "logs")])  # fmt: skip

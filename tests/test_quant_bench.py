"""benchmarks/kernels/quant_bench.py end to end on the CPU at a tiny shape (the kernel interpreted): every format's
row, the tile sweep's pick, and the JSON the GPU stage writes."""

import json

from rtpjax.benchmarks.kernels import quant_bench


def test_quant_bench_quick_writes_every_format_and_the_best_tiles(tmp_path):
    out = tmp_path / "quant_bench.json"
    quant_bench.main(["--quick", "--tokens", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["tokens"] for r in rows] == [1]
    for row in rows:
        assert row["bf16_us"] > 0 and row["bf16_gbps"] > 0
        for fmt in ("fp8", "int8", "int4"):
            assert row[f"{fmt}_us"] > 0 and row[f"{fmt}_xla_us"] > 0 and row[f"{fmt}_kernel_us"] > 0
    best = result["best_tiles"]["tiny"]
    assert set(best) == {"fp8", "int8", "int4"}
    assert all(len(b["sweep_us"]) == 2 and b["us"] == min(b["sweep_us"].values()) for b in best.values())

"""benchmarks/kernels/quant_bench.py end to end on the CPU at a tiny shape (the kernel interpreted): every format's
row, the tile sweep's pick, and the JSON the GPU stage writes."""

import dataclasses
import json

import pytest

from rtpjax.benchmarks.kernels import quant_bench


@pytest.mark.parametrize("sweep_rows", ["16", "1"])  # the tensor-core tiles' sweep; the one-row tiles'
def test_quant_bench_quick_writes_every_format_and_the_best_tiles(tmp_path, sweep_rows):
    out = tmp_path / "quant_bench.json"
    quant_bench.main(["--quick", "--tokens", "1", "--sweep-rows", sweep_rows, "--out", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["tokens"] for r in rows] == [1]
    for row in rows:
        assert row["bf16_us"] > 0 and row["bf16_gbps"] > 0
        for fmt in ("fp8", "int8", "int4"):
            assert row[f"{fmt}_us"] > 0 and row[f"{fmt}_xla_us"] > 0 and row[f"{fmt}_kernel_us"] > 0
        assert row["int4_u4_us"] > 0 and row["int4_u4_error"] < 0.02
        assert all(row[f"{fmt}_reduce_us"] > 0 and row[f"{fmt}_reduce_error"] < 0.02 for fmt in ("fp8", "int8", "int4"))
    best = result["best_tiles"]["tiny"]
    assert set(best) == {"fp8", "int8", "int4"}
    assert all(len(b["sweep_us"]) == 2 and b["us"] == min(b["sweep_us"].values()) for b in best.values())
    assert all(b["tiles"]["one_row"] == (sweep_rows == "1") for b in best.values())  # the sweep the rows ask for
    assert all(b["wrong"] == {} for b in best.values())


def test_quant_bench_past_decode_rows_sweeps_row_tiles_and_the_dequant_kernel(tmp_path):
    """--sweep-rows over 64: the kernel's row-tiled tiles at that many rows, and int4_dequant's programs alone, each
    checked element for element before it is timed; --mosaic: int4_mosaic's kernel too (interpreted)."""
    out = tmp_path / "quant_bench.json"
    quant_bench.main(["--quick", "--formats", "int4", "--tokens", "80", "--sweep-rows", "80", "--mosaic", "--out",
                      str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["tokens"] == 80 and row["int4_us"] > 0 and row["int4_error"] < 0.02 and row["int4_kernel_us"] > 0
    assert row["int4_mosaic_us"] > 0 and row["int4_mosaic_failed"] == {}  # the Mosaic GPU kernel, interpreted
    assert row["int4_mosaic_stages"] in quant_bench.MOSAIC_STAGES
    best = result["best_tiles"]["tiny"]["int4"]
    assert best["tiles"]["row_tile"] == 64 and not best["wrong"] and len(best["sweep_us"]) == 2
    dequant = result["int4_dequant"]["tiny"]
    assert dequant["wrong"] == [] and len(dequant["sweep_us"]) == len(quant_bench.DEQUANT_SWEEP)
    assert dequant["us"] == min(dequant["sweep_us"].values()) and dequant["gbps"] > 0


def test_dequant_sweep_reports_wrong_tiles_instead_of_timing_them(monkeypatch):
    import jax
    import jax.numpy as jnp

    from rtpjax.loading.quantization import METHODS, quantize

    real, bad = quant_bench.dequantize_int4, quant_bench.DEQUANT_SWEEP[1]
    monkeypatch.setattr(quant_bench, "DEQUANT_SWEEP", quant_bench.DEQUANT_SWEEP[:2])
    monkeypatch.setattr(quant_bench, "dequantize_int4", lambda w, dtype, interpret, tiles: (
        real(w, dtype, interpret=interpret, tiles=tiles).at[-1, -1].add(1) if tiles == bad else
        real(w, dtype, interpret=interpret, tiles=tiles)))  # fmt: skip
    w = quantize(jax.random.normal(jax.random.key(0), (64, 256), jnp.float32),
                 dataclasses.replace(METHODS["int4"], whole=True))  # fmt: skip
    got = quant_bench.dequant_sweep([w], calls=2, repeats=1, interpret=True)
    assert got["wrong"] == [str(dataclasses.astuple(bad))] and len(got["sweep_us"]) == 1
    assert got["tiles"] == dataclasses.asdict(quant_bench.DEQUANT_SWEEP[0])


def test_mosaic_depths_that_fail_or_are_wrong_are_reported_not_timed(monkeypatch, capsys):
    """The Mosaic GPU kernel's first GPU runs: a depth that raises (a lowering error) or answers wrongly is recorded
    in the row and printed; the others are timed."""
    import jax
    import jax.numpy as jnp

    from rtpjax.loading.quantization import METHODS, quantize

    real = quant_bench._mosaic

    def flaky(x, w, stages, interpret):
        if stages == 2:
            raise RuntimeError("Mosaic GPU lowering failed")
        out = real(x, w, stages=stages, interpret=interpret)
        return out.at[0, 0].add(1e3) if stages == 4 else out

    monkeypatch.setattr(quant_bench, "_mosaic", flaky)
    w = quantize(jax.random.normal(jax.random.key(0), (128, 256), jnp.float32),
                 dataclasses.replace(METHODS["int4"], whole=True))  # fmt: skip
    row = {"tokens": 80}
    xs = jax.random.normal(jax.random.key(1), (2, 80, 256), jnp.bfloat16)
    quant_bench.mosaic_row(row, xs, [w], repeats=1, interpret=True, depths=(2, 3, 4))
    assert row["int4_mosaic_stages"] == 3 and row["int4_mosaic_us"] > 0
    assert row["int4_mosaic_failed"][2] == "RuntimeError: Mosaic GPU lowering failed"
    assert row["int4_mosaic_failed"][4].startswith("relative error")
    assert "int4_mosaic, 2 stages, 80 tokens: RuntimeError" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["int4", "int4-asym"])
def test_uint4_form_reads_the_stored_nibbles_in_input_order(method):
    """The bitcast form dequantizes exactly the weight `linear` multiplies (bf16 rounding of scale x nibble aside)."""
    import jax
    import jax.numpy as jnp

    from rtpjax.loading.quantization import dequantize, quantize

    w = quantize(jax.random.normal(jax.random.key(0), (48, 256), jnp.float32), method)
    x = jax.random.normal(jax.random.key(1), (5, 256), jnp.float32).astype(jnp.bfloat16)
    want = x.astype(jnp.float32) @ dequantize(w, jnp.float32).T
    got = quant_bench._u4_dot(x, w).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 0.02


@pytest.mark.parametrize("method", ["int4", "int4-asym", "int8-weight-only", "fp8-weight-only"])
def test_row_reduce_is_the_dequantized_product(method):
    """The one-row reduction form reads each stored value against its own input (int4: nibble j and j + g/2)."""
    import jax
    import jax.numpy as jnp

    from rtpjax.loading.quantization import dequantize, quantize

    w = quantize(jax.random.normal(jax.random.key(0), (48, 512), jnp.float32), method)
    x = jax.random.normal(jax.random.key(1), (1, 512), jnp.float32)
    want = x @ dequantize(w, jnp.float32).T
    got = quant_bench._row_reduce(x, w)
    assert float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))) < 1e-5


def test_quant_bench_reports_a_wrong_kernel_and_does_not_time_it(tmp_path, monkeypatch):
    """Tiles whose output is off are listed under "wrong" and kept out of the pick (the GPU's PTX paths are checked
    this way, where the CPU only interprets their jnp twins)."""
    from rtpjax.quant import small_matmul

    real = small_matmul.quantized_matmul
    off = lambda x, w, tiles=None, interpret=False: real(x, w, tiles, interpret=interpret) * (
        1.5 if tiles is not None and tiles.block_n == 32 else 1.0)  # noqa: E731
    monkeypatch.setattr(small_matmul, "quantized_matmul", off)
    monkeypatch.setattr(quant_bench, "SWEEP", (small_matmul.Tiles(), small_matmul.Tiles(block_n=32)))
    out = tmp_path / "quant_bench.json"
    quant_bench.main(["--quick", "--tokens", "1", "--formats", "int8", "--out", str(out)])
    best = json.loads(out.read_text())["best_tiles"]["tiny"]["int8"]
    assert list(best["wrong"]) == [str(dataclasses.astuple(small_matmul.Tiles(block_n=32)))]
    assert len(best["sweep_us"]) == 1 and best["tiles"]["block_n"] == 64
    for bad in (["--formats", "int9"], ["--unpack", "lut"]):  # refused before anything runs
        with pytest.raises(SystemExit):
            quant_bench.main(["--quick", *bad, "--out", str(out)])


def test_quant_table_compares_each_format_with_bf16(tmp_path):
    def run(quantization, b1, b32, tput, ttft, decode="auto", head=False, kv="auto"):
        path = tmp_path / f"quant_{quantization}_{decode}_{head}_{kv}.json"
        path.write_text(json.dumps({"quantization": quantization, "quantized_decode": decode, "quantize_lm_head": head,
                                    "kv_cache_dtype": kv,
                                    "throughput": {"output_tokens_per_s": tput},
                                    "decode": {"1": {"decode_tokens_per_s": b1}, "32": {"decode_tokens_per_s": b32}},
                                    "ttft": {"seconds": ttft}}))  # fmt: skip
        return str(path)

    (tmp_path / "a=b").mkdir()  # a folder whose name holds an "=": still a path
    tmp_path = tmp_path / "a=b"
    paths = [run(None, 200.0, 5000.0, 6000.0, 0.4), run("fp8", 300.0, 7500.0, 7800.0, 0.26)]
    out = tmp_path / "summary.json"
    quant_bench.main(["--table", *paths, "--out", str(out)])
    fp8 = json.loads(out.read_text())["fp8"]["vs_bf16"]
    assert fp8 == pytest.approx({"b1_tok_s": 1.5, "b32_tok_s": 1.5, "throughput_tok_s": 1.3, "ttft_ms": 0.65})
    # the same format with its decode path named (not the default): a row of its own
    quant_bench.main(["--table", *paths, run("fp8", 240.0, 5000.0, 7800.0, 0.26, "pallas"), "--out", str(out)])
    assert set(json.loads(out.read_text())) >= {"bf16", "fp8", "fp8/pallas"}
    quant_bench.main(["--table", *paths, run("fp8", 250.0, 7600.0, 7800.0, 0.26, head=True), "--out", str(out)])
    assert set(json.loads(out.read_text())) >= {"bf16", "fp8", "fp8-head"}  # the head quantized too
    quant_bench.main(["--table", *paths, run("fp8", 250.0, 7600.0, 7800.0, 0.26, head=True, kv="fp8"),
                      "--out", str(out)])  # fmt: skip
    assert set(json.loads(out.read_text())) >= {"bf16", "fp8", "fp8-head-kvfp8"}  # and the KV cache in fp8
    with pytest.raises(ValueError, match="no bf16 run"):
        quant_bench.main(["--table", paths[1], "--out", str(out)])


def test_quant_table_compares_serving_runs_named_by_format(tmp_path):
    def run(name, tok_s, ttft, itl):
        path = tmp_path / f"quant_serve_{name}.json"
        path.write_text(json.dumps({"output_throughput": tok_s, "p95_ttft_ms": ttft, "p95_itl_ms": itl,
                                    "completed": 4 if tok_s else 0, "errors": ["HTTP 400: too long"] * 4}))
        return f"{name}={path}"

    out = tmp_path / "summary.json"
    quant_bench.main(["--table", run("none", 14000.0, 800.0, 20.0), run("fp8", 18200.0, 600.0, 15.0),
                      "--out", str(out)])  # fmt: skip
    table = json.loads(out.read_text())
    assert table["fp8"]["vs_bf16"] == pytest.approx({"serve_tok_s": 1.3, "p95_ttft_ms": 0.75, "p95_itl_ms": 0.75})
    assert table["bf16"]["serve_tok_s"] == 14000.0
    quant_bench.main(["--table", run("none", 14000.0, 800.0, 20.0), run("none-kvfp8", 15400.0, 700.0, 18.0),
                      "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["bf16-kvfp8"]["vs_bf16"]["serve_tok_s"] == pytest.approx(1.1)  # as offline
    offline = tmp_path / "offline.json"  # an offline run beside serving ones: refused, not a table of mixed columns
    offline.write_text(json.dumps({"quantization": "int8", "decode": {"1": {"decode_tokens_per_s": 1.0},
                                                                      "32": {"decode_tokens_per_s": 1.0}}}))
    with pytest.raises(ValueError, match="not the same kind"):
        quant_bench.main(["--table", run("none", 1.0, 1.0, 1.0), str(offline), "--out", str(out)])
    with pytest.raises(ValueError, match="no completed request .HTTP 400: too long"):  # all failed: said, not divided
        quant_bench.main(["--table", run("none", 0.0, 0.0, 0.0), run("fp8", 1.0, 1.0, 1.0), "--out", str(out)])
    with pytest.raises(ValueError, match="name the format of serving run"):  # not taken for bf16 unnamed
        quant_bench.main(["--table", run("none", 1.0, 1.0, 1.0), run("fp8", 1.0, 1.0, 1.0).split("=", 1)[1],
                          "--out", str(out)])  # fmt: skip
    with pytest.raises(ValueError, match="two runs of fp8"):
        quant_bench.main(["--table", run("none", 1.0, 1.0, 1.0), run("fp8", 1.0, 1.0, 1.0), run("fp8", 2.0, 1.0, 1.0),
                          "--out", str(out)])  # fmt: skip


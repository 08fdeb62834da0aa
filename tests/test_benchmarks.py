"""The serving benchmark against a real server (uvicorn on loopback), its datasets, arrivals and metrics; the random
checkpoint writer the GPU benchmarks use; the attention kernel's tile sweep; the probes behind RESULTS.md."""

import asyncio
import json
import random
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ENGINE_ARGS
from rtpjax.benchmarks import serve_bench
from rtpjax.benchmarks.random_checkpoint import write_random_checkpoint
from rtpjax.serve.app import build_app
from test_server import Server

from rtpjax import AsyncLLM
from rtpjax.cli import main as cli


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", "tiny", shards=2, dtype="float32")


@pytest.fixture(scope="module")
def llm(model, compile_cache):
    """No warm-up: the tests compile the few step shapes they run, not every bucket (scoring, KV copies) ahead."""
    llm = AsyncLLM(str(model), compilation_cache_dir=compile_cache, warmup=False, **ENGINE_ARGS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def url(llm):
    s = Server(build_app(llm, "tiny-random"))
    yield s.url
    s.stop()


def test_random_checkpoint_loads_in_transformers_and_rtpjax(model, llm):
    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    ids = tok("w5 w6 w300")["input_ids"]
    assert ids == [5, 6, 300] and tok.decode(ids) == "w5 w6 w300"
    out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, 3:].tolist()
    got = asyncio.run(_generate(llm, ids))
    assert got == out


async def _generate(llm, ids):
    from rtpjax import SamplingParams

    final = None
    async for o in llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)):
        final = o
    return final.outputs[0].token_ids


def test_random_dataset_metrics_json_and_plot(url, model, tmp_path):
    argv = ["--base-url", url, "--tokenizer", str(model), "--dataset-name", "random", "--random-input-len", "24",
            "--random-output-len", "6", "--num-prompts", "12", "--max-concurrency", "4", "--ignore-eos",
            "--save-result", "--result-dir", str(tmp_path), "--result-filename", "r.json", "--plot",
            "--disable-tqdm", "--goodput", "ttft:100000", "--metric-percentiles", "50,95"]  # fmt: skip
    m = serve_bench.main(argv)
    assert m["model_id"] == "tiny-random"  # discovered from /v1/models
    assert m["completed"] == 12 and m["failed"] == 0
    assert m["input_lens"] == [24] * 12 and m["total_output_tokens"] == 72
    assert m["request_goodput"] == pytest.approx(m["request_throughput"])
    assert m["output_throughput"] == pytest.approx(72 / m["duration"])
    for ttft, e2el, itl in zip(m["ttfts"], m["e2els"], m["itls"]):
        # One ITL per later chunk: a server that falls behind merges steps into one chunk (so maybe none at all).
        assert 0 < ttft <= e2el and len(itl) <= 5 and ttft + sum(itl) <= e2el + 1e-6
    tpot = np.mean([(e - t) / 5 for t, e in zip(m["ttfts"], m["e2els"])]) * 1e3
    assert m["mean_tpot_ms"] == pytest.approx(tpot)
    assert m["p95_ttft_ms"] >= m["median_ttft_ms"] == m["p50_ttft_ms"]
    saved = json.loads((tmp_path / "r.json").read_text())
    for field in ("request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
                  "median_tpot_ms", "p95_itl_ms", "mean_e2el_ms", "completed", "total_input_tokens"):  # fmt: skip
        assert field in saved
    assert (tmp_path / "r.png").stat().st_size > 1000
    strict = serve_bench.main(argv[:-5] + ["--goodput", "ttft:0.0001", "--num-prompts", "4"])
    assert strict["request_goodput"] == 0


def test_shared_prefixes_hit_the_prefix_cache(url, model, llm):
    before = llm.stats()["prefix_cache_hits"]
    m = serve_bench.main(["--base-url", url, "--tokenizer", str(model), "--dataset-name", "prefix_repetition",
                          "--prefix-repetition-prefix-len", "64", "--prefix-repetition-suffix-len", "8",
                          "--prefix-repetition-num-prefixes", "2", "--prefix-repetition-output-len", "4",
                          "--num-prompts", "8", "--max-concurrency", "2", "--ignore-eos", "--disable-tqdm"])  # fmt: skip
    assert m["completed"] == 8 and m["input_lens"] == [72] * 8
    assert llm.stats()["prefix_cache_hits"] - before >= 6 * 64  # all but the first of each group hit


def test_multi_turn_chat_resends_history(url, model):
    m = serve_bench.main(["--base-url", url, "--tokenizer", str(model), "--backend", "openai-chat",
                          "--dataset-name", "multi_turn", "--multi-turn-num-turns", "3", "--multi-turn-input-len",
                          "10", "--multi-turn-output-len", "5", "--num-prompts", "6", "--max-concurrency", "2",
                          "--ignore-eos", "--disable-tqdm"])  # fmt: skip
    assert m["completed"] == 6 and m["total_output_tokens"] == 30
    lens = m["input_lens"]
    for conv in (lens[0:3], lens[3:6]):  # each turn carries the earlier turns and answers
        assert conv[0] > 10 and conv[1] > conv[0] + 10 + 5 - 1 and conv[2] > conv[1] + 10 + 5 - 1


def test_multi_turn_users_pause_between_turns(url, model):
    """--multi-turn-think-time: each later turn waits its seeded pause outside the concurrency gate: with one client,
    a conversation lasts at least its turns and pauses, and the other's turns run during its pauses, so the run is
    shorter than everything one after another; a negative mean is refused."""
    argv = ["--base-url", url, "--tokenizer", str(model), "--dataset-name", "multi_turn", "--multi-turn-num-turns",
            "3", "--multi-turn-input-len", "10", "--multi-turn-output-len", "2", "--num-prompts", "6", "--ignore-eos",
            "--disable-tqdm", "--seed", "3", "--max-concurrency", "1"]  # fmt: skip
    pauses = [serve_bench.think_times(0.4, 3, conversation, 3) for conversation in (0, 1)]
    assert all(p[0] == 0 and min(p[1:]) > 0 for p in pauses) and pauses[0] == serve_bench.think_times(0.4, 3, 0, 3)
    m = serve_bench.main(argv + ["--multi-turn-think-time", "0.4"])
    assert m["completed"] == 6 and m["multi_turn_think_time"] == 0.4
    e2els = [m["e2els"][0:3], m["e2els"][3:6]]  # requests in conversation order
    assert m["duration"] >= max(sum(p) + sum(e) for p, e in zip(pauses, e2els))
    assert m["duration"] < sum(map(sum, pauses)) + sum(m["e2els"])
    with pytest.raises(SystemExit, match="--multi-turn-think-time must be >= 0"):
        serve_bench.main(argv + ["--multi-turn-think-time", "-1"])


def test_sharegpt_mix_has_the_published_means(model):
    from transformers import AutoTokenizer

    args = serve_bench.parser().parse_args(["--dataset-name", "sharegpt", "--num-prompts", "3000", "--seed", "1"])
    requests = serve_bench.sample_requests(args, AutoTokenizer.from_pretrained(model))
    ins = np.array([r.prompt_len for r in requests])
    outs = np.array([r.output_len for r in requests])
    assert len(requests) == 3000 and ins.min() >= 4 and outs.min() >= 4 and (ins + outs).max() <= 2048
    assert 0.8 < ins.mean() / serve_bench.SHAREGPT_MEAN_INPUT < 1.1
    assert 0.75 < outs.mean() / serve_bench.SHAREGPT_MEAN_OUTPUT < 1.1  # the 2048 cut trims the long tail


def test_poisson_and_gamma_arrivals():
    gaps = []

    async def fake_sleep(s):  # records the gaps instead of waiting (asyncio.sleep itself stays untouched: other
        gaps.append(s)  # threads of this test session, such as the server's, use it)

    async def drain(rate, burstiness):
        gaps.clear()
        return [i async for i in serve_bench.arrivals(4001, rate, burstiness, random.Random(0), fake_sleep)]

    assert asyncio.run(drain(50.0, 1.0)) == list(range(4001))
    g = np.array(gaps)
    assert abs(g.mean() - 1 / 50) < 0.002 and abs(g.std() / g.mean() - 1) < 0.08  # exponential: cv 1
    asyncio.run(drain(50.0, 4.0))
    g = np.array(gaps)
    assert abs(g.mean() - 1 / 50) < 0.002 and abs(g.std() / g.mean() - 0.5) < 0.05  # gamma k=4: cv 1/2
    asyncio.run(drain(float("inf"), 1.0))
    assert gaps == []


def test_cli_bench_serve_and_sweep_plot(url, model, tmp_path):
    for c in (1, 4):
        assert cli(["bench", "serve", "--base-url", url, "--tokenizer", str(model), "--random-input-len", "8",
                    "--random-output-len", "3", "--num-prompts", "4", "--max-concurrency", str(c), "--ignore-eos",
                    "--save-result", "--result-dir", str(tmp_path), "--result-filename", f"c{c}.json",
                    "--disable-tqdm"]) == 0  # fmt: skip
    assert cli(["bench", "serve", "--plot-sweep", str(tmp_path / "c1.json"), str(tmp_path / "c4.json"),
                "--result-dir", str(tmp_path)]) == 0  # fmt: skip
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_profile_step_sums_kernels_and_counts_overlapping_gpu_time_once(tmp_path):
    import gzip

    from rtpjax.benchmarks.profile_step import kernel_times

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "name": "gemm", "ts": 0, "dur": 10, "args": {"hlo_op": "dot.1"}},
        {"ph": "X", "pid": 1, "name": "gemm", "ts": 5, "dur": 10, "args": {"hlo_op": "dot.1"}},  # overlaps the first
        {"ph": "X", "pid": 1, "name": "attn", "ts": 30, "dur": 4},  # after a 15 us gap
        {"ph": "X", "pid": 2, "name": "Execute", "ts": 0, "dur": 40},
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "perfetto_trace.json.gz").write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    totals, launches, busy, host = kernel_times(tmp_path)
    assert totals == {"dot.1 [gemm]": 20.0, "attn [attn]": 4.0}
    assert launches == 3 and busy == 19.0
    assert host == {"/host:CPU: Execute": 40.0}


def test_real_decode_inputs_hold_the_context_and_leave_the_engine_clean(model, compile_cache):
    from rtpjax.benchmarks.offline import RtpjaxRunner

    runner = RtpjaxRunner(str(model), max_num_seqs=8, max_model_len=256, max_num_batched_tokens=32,
                          compilation_cache_dir=compile_cache, warmup=False)  # fmt: skip
    engine = runner.llm.engine
    inputs, ids = runner.decode_inputs(4, 40, prompt_len=24)
    batch, _ = inputs
    lens = batch.meta.seq_lens[:4]
    assert len(ids) == 4 and (lens >= 40).all() and (lens < 40 + 4).all()  # real rows at (about) the context
    assert runner.device_step_ms(4, steps=2, inputs=inputs) > 0
    runner.release(ids)
    assert not engine.requests and engine.pool.num_free == engine.pool.num_blocks
    (batch, _), ids = runner.prefill_inputs(32, 64)  # the third chunk of 32 of one 96-token prompt
    assert int(batch.meta.query_start_loc[1]) == 32 and int(batch.meta.seq_lens[0]) == 96
    assert runner.device_step_ms(32, steps=2, inputs=(batch, _)) > 0
    runner.release(ids)
    assert not engine.requests and engine.pool.num_free == engine.pool.num_blocks
    split = RtpjaxRunner(str(model), max_num_seqs=8, max_model_len=256, max_num_batched_tokens=32,
                         compilation_cache_dir=compile_cache, tensor_parallel_size=2, warmup=False)  # fmt: skip
    assert split.llm.engine.runner.mesh.shape["tensor"] == 2 and split.generate([[1, 5, 9]], 4) == 4
    loop = split.loop_ms()  # the loop's host time per step since the last call: here the 4-token run's steps
    assert loop["steps"] >= 3 and loop["launching"] > 0 and min(loop.values()) >= 0 and split.loop_ms()["steps"] == 0


def _expert_counts(runner, batch, every_row: bool = False) -> np.ndarray:
    """Assignments per expert per MoE layer ([MoE layers, experts]) of a step's real rows (every_row: padding rows
    too), by the model function on the ModelRunner's cache and sampler state as they are now."""
    from rtpjax.models import moe
    from rtpjax.runner.model_runner import model_step
    from rtpjax.runner.step_inputs import pack

    count = moe.expert_load
    with pytest.MonkeyPatch.context() as patch, jax.disable_jit():
        if every_row:
            patch.setattr(moe, "expert_load", lambda ids, valid, n: count(ids, valid | True, n))
        _, _, load = model_step(runner.params, runner.cache, runner.state, *pack(batch), cfg=runner.cfg,
                                forward=runner._forward, block_size=runner.block_size)  # fmt: skip
    return np.asarray(load)


def test_device_step_alone_routes_a_moe_batch_as_decode_does(tmp_path, compile_cache, monkeypatch):
    """offline.py times the device step alone on real decode rows. Padding rows are all alike, so in a MoE model every
    one routes to the same top-k experts and a routed step reads k experts' weights per layer: on an H200 that made
    the Qwen3-30B-A3B step at batch 32 look 11 ms shorter than the loop's steps, read as a host gap."""
    from rtpjax.benchmarks.offline import RtpjaxRunner
    from rtpjax.benchmarks.random_checkpoint import write_config_only

    runner = RtpjaxRunner(str(write_config_only(tmp_path / "moe", "tiny-moe")), load_format="dummy",
                          moe_impl="grouped", max_num_seqs=8, max_model_len=256, max_num_batched_tokens=32,
                          compilation_cache_dir=compile_cache, warmup=False)  # fmt: skip
    engine = runner.llm.engine
    k, rows = engine.cfg.num_experts_per_tok, 8
    loads = []

    def timed_step(batch, steps=50, inputs=None):  # what the step it times would route
        assert inputs is not None, "the device step alone must run real rows, not padding rows"
        loads.append(_expert_counts(engine.runner, inputs[0]))
        return 1.0

    monkeypatch.setattr(runner, "device_step_ms", timed_step)
    assert runner.decode_step_ms(rows, 40, prompt_len=24) == 1.0
    assert not engine.requests and engine.pool.num_free == engine.pool.num_blocks  # released after
    (load,) = loads
    assert (load.sum(axis=1) == rows * k).all()  # one real decode token per row
    assert ((load > 0).sum(axis=1) > 2 * k).all()  # 8 rows spread over many more than one row's k experts
    padding, _ = engine.runner._batch([], rows, engine.runner._seqs_for(rows))
    assert ((_expert_counts(engine.runner, padding, every_row=True) > 0).sum(axis=1) == k).all()


def test_host_step_splits_the_loop_and_drains_the_device():
    """Warm-up off: measure's own loop before the timed steps compiles the shapes they run (not all 12 buckets of its
    2048-token budget ahead)."""
    from rtpjax import EngineArgs
    from rtpjax.benchmarks.host_step import measure

    r = measure(rows=8, steps=4, idle_launch=True, engine_args=EngineArgs(warmup=False))
    for run in (r, r["idle_launch"]):
        assert run["rows_per_step"] == 8
        parts = sum(run[k] for k in ("scheduling_ms", "launching_ms", "reading_ms", "outputs_ms"))
        assert 0 < parts <= run["step_ms"] and run["encoding_ms"] > 0
    # With the device drained before each launch, reading the previous step's tokens waits for nothing.
    assert r["idle_launch"]["reading_ms"] < 1.0
    from rtpjax.benchmarks.host_step import describe
    from rtpjax.engine.stall_meter import GcTimes

    times = GcTimes()  # the collections during the measured steps, as the gc module reports them
    times("start", {"generation": 2})
    times("stop", {"generation": 2})
    assert times.count == [0, 0, 1] and times.summary()["gen2"]["count"] == 1
    assert set(r["gc"]) == {"gen0", "gen1", "gen2"} and "Python's collections: gen0 " in describe(r)


def test_step_launch_probe_counts_graph_updates_in_each_timed_loop():
    from rtpjax.benchmarks.probes.step_launch import updates_per_mark

    line = "I1130 command_buffer_thunk.cc:336] [0] Create/Update command buffer by recoding command buffer cmd sequence"
    log = "\n".join([
        f"{line} after 1 executions; num_commands=13; updated_allocs=2",  # warm-up, before any mark: not counted
        "PROBE-MARK as_runner",
        f"{line} after 1 executions; num_commands=491; updated_allocs=1",
        f"{line} after 1 executions; num_commands=13; updated_allocs=5",  # a smaller graph (another executable)
        f"{line} after 1 executions; num_commands=491; updated_allocs=2",
        "PROBE-MARK end",
        f"{line} after 1 executions; num_commands=491; updated_allocs=3",  # the next loop's warm-up: not counted
        "PROBE-MARK logits_into_buffer",
        f"{line} after 1 executions; num_commands=491; updated_allocs=3",
        "PROBE-MARK end",
        "PROBE-MARK fresh_inputs",  # another executable: its own largest graph counts
        f"{line} after 1 executions; num_commands=40; updated_allocs=3",
        f"{line} after 1 executions; num_commands=40; updated_allocs=3",
        "PROBE-MARK end",
        "PROBE-MARK fresh_inputs_copied",  # no re-recording: counted as none
        "PROBE-MARK end",
    ])  # fmt: skip
    assert updates_per_mark(log) == {"as_runner": 2, "logits_into_buffer": 1, "fresh_inputs": 2,
                                     "fresh_inputs_copied": 0}  # fmt: skip


def test_step_launch_probe_runs_each_setting_in_its_own_process(tmp_path):
    out = tmp_path / "step_launch.json"
    cmd = [sys.executable, "-m", "rtpjax.benchmarks.probes.step_launch", "--shape", "tiny", "--setting=",
           "--setting=--xla_gpu_command_buffer_update_mode=NO_SUCH_MODE",
           "--setting=XLA_PYTHON_CLIENT_ALLOCATOR=platform --xla_cpu_use_thunk_runtime=true", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=900)
    plain, rejected, other = json.loads(out.read_text())["rows"]
    cases = ("as_runner", "logits_into_buffer", "fresh_inputs", "fresh_inputs_copied")
    for name in cases:
        assert 0 < plain[name]["host_ms"] <= plain[name]["step_ms"]
        assert len(plain[name]["greedy_tokens"]) == 1  # the smallest bucket's rows (one token off the GPU)
        assert plain[name]["greedy_tokens"] == plain["as_runner"]["greedy_tokens"]  # (copied inputs: the same step)
    assert "error" not in plain and "Flag parsing failed" in rejected["error"]
    assert other["same_tokens_as_first_setting"] is True  # settings (a variable and a flag) that leave the math alone
    bad = subprocess.run(cmd[:5] + ["--setting=not-a-flag"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "each word is an XLA flag (--...) or NAME=VALUE" in bad.stderr


def test_allreduce_chain_probe_sums_over_every_device():
    import jax

    from rtpjax.benchmarks.probes.allreduce_chain import measure

    r = measure(hidden=256, batches=(1,))
    assert r["devices"] == len(jax.devices()) == 8
    assert r["sums_only_max_error"] == 0.0 and r["sums_only_batch1_ms"] > 0 and r["matmul_then_sum_batch1_ms"] > 0


def test_onload_overlap_probe_times_every_way_and_each_gives_the_serial_output(tmp_path):
    """probes/onload_overlap.py, tiny: copy, layers, both serial, in one program and in layer groups, all timed; the
    overlapped ways compute what the serial one does (each layer read its own KV slice)."""
    import json

    from rtpjax.benchmarks.probes import onload_overlap

    out = tmp_path / "overlap.json"
    onload_overlap.main(["--tokens", "16", "--hidden", "128", "--ffn", "256", "--layers", "4", "--kv-mib-per-layer",
                         "0.25", "--groups", "2", "--repeats", "1", "--out", str(out)])  # fmt: skip
    r = json.loads(out.read_text())
    assert all(r[f"{k}_ms"] > 0 for k in ("compute", "copy", "serial", "in_jit", "groups"))
    assert r["kv_bytes"] == 4 * 1024 * 128 * 2 and r["max_abs_diff_vs_serial"] == {"in_jit": 0.0, "groups": 0.0}


def test_read_bw_probe_times_every_program(tmp_path):
    from rtpjax.benchmarks.probes import read_bw

    out = tmp_path / "read_bw.json"
    r = read_bw.main(["--mib", "2", "--repeats", "2", "--out", str(out)])
    assert r["bytes"] == 2 << 20 and set(r["TBps"]) == set(read_bw.PROGRAMS)
    assert all(rate > 0 for rate in r["TBps"].values()) and json.loads(out.read_text()) == r


def test_protocol_bench_times_both_formats_and_the_typed_message_is_the_smaller(tmp_path):
    from rtpjax.benchmarks.protocol_bench import measure

    rows = measure(streams=16, iters=3, repeats=1)  # each format's round trip is checked inside
    assert [(r["format"], r["logprobs"]) for r in rows] == [
        (f, lp) for lp in (0, 5) for f in ("msgspec", "pickle, tuples", "pickle, typed")]  # fmt: skip
    assert all(r["encode_us"] > 0 and r["decode_us"] > 0 and r["bytes"] > 0 for r in rows)
    size = {(r["format"], r["logprobs"]): r["bytes"] for r in rows}
    # The per-request parts travel as arrays: as maps (their field names in every one) they would outweigh pickle.
    assert size["msgspec", 0] < size["pickle, tuples", 0] and size["msgspec", 5] < size["pickle, tuples", 5]
    out = tmp_path / "protocol.json"
    subprocess.run([sys.executable, "-m", "rtpjax.benchmarks.protocol_bench", "--streams", "4", "--iters", "2",
                    "--repeats", "1", "--out", str(out)], check=True, capture_output=True, timeout=300)  # fmt: skip
    assert len(json.loads(out.read_text())["rows"]) == 6


def test_cpu_peer_runs_both_engines_on_the_same_prompt(stories_dir, compile_cache, tmp_path):
    from rtpjax.benchmarks import cpu_peer

    out = tmp_path / "peer.json"
    result = cpu_peer.main(["--model", str(stories_dir), "--batch-sizes", "1,2", "--max-tokens", "4", "--repeats", "1",
                            "--compilation-cache-dir", compile_cache, "--out", str(out)])  # fmt: skip
    for engine in ("rtpjax", "transformers"):
        assert set(result[engine]["tok_s"]) == {1, 2} and min(result[engine]["tok_s"].values()) > 0
    assert json.loads(out.read_text())["max_tokens"] == 4


def test_kernel_sass_probe_finds_the_main_loop_and_lowers_on_the_cpu():
    """probes/kernel_sass.py without the triton wheel: the longest loop of a SASS listing (a backward branch's
    span), the weights a thread handles per iteration, and the Triton IR Pallas builds for CUDA on this host."""
    from rtpjax.benchmarks.probes import kernel_sass
    from rtpjax.quant.small_matmul import Tiles

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/                   PRMT R3, R2, 0x3120, RZ ;
        /*0030*/                   FFMA R5, R3, R6, R5 ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   IADD3 R7, R7, 0x1, RZ ;
        /*0060*/               @P1 BRA 0x50 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
    """
    assert kernel_sass.main_loop(sass) == ["PRMT", "FFMA", "BRA"]
    assert kernel_sass.main_loop("        /*0000*/                   EXIT ;") == []
    one_row = Tiles(block_n=32, block_k=512, num_warps=8, unpack="magic", one_row=True)
    ttir, per_thread = kernel_sass.matmul_job("int4", 1, True, one_row)
    assert "tt.func public @small_matmul_int4" in ttir and "scf.for" in ttir and per_thread == 32 * 512 // 256
    ttir, per_thread, warps, stages = kernel_sass.attention_job("int8", dict(kv_unpack="asm"))
    assert "@ragged_paged_attention" in ttir and "prmt.b32" in ttir and (per_thread, warps, stages) == (256, 4, 3)


def test_attention_sweep_times_each_tiling_per_kv_dtype_against_bf16s_default(monkeypatch, capsys):
    """benchmarks/kernels/sweep.py's decode sweep (interpreted, a tiny shape): a row per tiling and dtype, a tiling
    the kernel refuses recorded as an error, and the best of each dtype printed as a ratio to bf16's default."""
    import functools

    from rtpjax.benchmarks.kernels import sweep
    from rtpjax.kernels.ragged_paged_attention import ragged_paged_attention

    monkeypatch.setattr(sweep, "ragged_paged_attention", functools.partial(ragged_paged_attention, interpret=True))
    monkeypatch.setattr(sweep, "DECODE_GRID", dict(pages_per_tile=(1, 2), num_splits=(1,), num_stages=(2,),
                                                    num_warps=(4,), kv_unpack=("convert", "nonsense")))  # fmt: skip
    results = []
    sweep.decode_sweep([(2, 64)], ["int8"], results)
    timed = [r for r in results if "us" in r]
    assert [r["dtype"] for r in timed] == ["bf16_default", "int8", "int8"]
    assert all(r["us"] > 0 and r["batch"] == 2 and r["ctx"] == 64 for r in timed)
    refused = [r for r in results if "error" in r]
    assert len(refused) == 2 and all(r["kv_unpack"] == "nonsense" and "kv_unpack" in r["error"] for r in refused)
    assert "decode b=2 ctx=64 int8:" in capsys.readouterr().out


def test_warm_ups_fill_the_prefix_cache_and_stay_out_of_the_metrics(url, model, llm):
    before = llm.stats()["prefix_cache_hits"]
    m = serve_bench.main(["--base-url", url, "--tokenizer", str(model), "--dataset-name", "prefix_repetition",
                          "--prefix-repetition-prefix-len", "64", "--prefix-repetition-suffix-len", "8",
                          "--prefix-repetition-num-prefixes", "3", "--prefix-repetition-output-len", "4",
                          "--num-prompts", "6", "--num-warmups", "3", "--max-concurrency", "3", "--seed", "7",
                          "--ignore-eos", "--disable-tqdm"])  # fmt: skip
    assert m["completed"] == 6 and len(m["ttfts"]) == 6
    assert llm.stats()["prefix_cache_hits"] - before >= 6 * 64  # one warm-up per prefix: every measured one hits
    args = serve_bench.parser().parse_args(["--dataset-name", "multi_turn", "--num-warmups", "1"])
    with pytest.raises(SystemExit, match="not for multi_turn"):
        serve_bench.sample_requests(args, None)

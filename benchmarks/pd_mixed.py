"""Colocated against disaggregated serving under mixed traffic (the multi-GPU run of the P/D issue): long prompts
arriving at a steady rate while many short-prompt streams decode, swept over request rates, one run per configuration:

    colocated    two role-`both` replicas behind `rtpjax router --policy cache_aware`
    disagg       a prefill and a decode engine behind `rtpjax router --pd-disaggregation`
    vllm_router  the same two engines behind `vllm-router --vllm-pd-disaggregation` (where installed)

    # 2 GPUs (an engine each):
    python -m rtpjax.benchmarks.pd_mixed CFG --gpus 0 1 --rates 0.5 1 2 4 --out pd_mixed.json -- --load-format dummy
    # one GPU, both engines on it (a dry run of the same script):
    python -m rtpjax.benchmarks.pd_mixed CFG --gpus 0 0 --mem-fraction 0.45 ... -- --load-format dummy

Arguments after `--` go to every `rtpjax serve`. Each rate runs two `serve_bench` clients at once (long: --long-len
tokens +-33%, --long-rate x rate requests/s; short: --short-len tokens, --short-rate x rate requests/s), each for about
--seconds. Per configuration and rate: output tok/s, TTFT and ITL P50/P95/P99 per class, goodput under the SLOs
(TTFT <= --slo-ttft-ms, time per output token <= --slo-itl-ms), the K/V hand-offs (count, mean ms per phase, from the
decode engine's /pd/status), and requests sent against completed (a request may never be lost or hang: each has a
timeout and the sums are checked)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rtpjax.benchmarks.router_bench import free_port

CONFIGS = {
    "colocated": ("both", "both"),
    "disagg": ("prefill", "decode"),
    "vllm_router": ("prefill", "decode"),
}
STAT_KEYS = ("kv_transfers_pulled", "kv_transfers_failed")


@dataclass
class Proc:
    """A process this run started: stopped by its pid whatever happens."""

    name: str
    popen: subprocess.Popen
    url: str
    log: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


@dataclass
class Engines:
    roles: tuple[str, str]
    procs: list[Proc] = field(default_factory=list)

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


def wait_healthy(proc: Proc, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            tail = proc.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode}:\n{tail}"
            )
        try:
            if httpx.get(proc.url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"{proc.name} did not answer /health within {seconds:.0f} s (log: {proc.log})"
    )


def start(name: str, argv: list[str], env: dict, logs: Path, port: int) -> Proc:
    log = logs / f"{name}.log"
    popen = subprocess.Popen(
        argv, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    return Proc(name, popen, f"http://127.0.0.1:{port}", log)


def start_engines(args, roles: tuple[str, str], logs: Path) -> Engines:
    engines = Engines(roles)
    try:
        for i, (role, gpu) in enumerate(zip(roles, args.gpus)):
            env = dict(os.environ)
            if gpu != "cpu":
                env["CUDA_VISIBLE_DEVICES"] = gpu
            if args.mem_fraction:
                env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.mem_fraction)
            port = free_port()
            argv = [sys.executable, "-m", "rtpjax.cli", "serve", args.model, "--port", str(port), "--role", role,
                    "--served-model-name", args.name, *args.serve_args]  # fmt: skip
            engines.procs.append(start(f"{role}{i}", argv, env, logs, port))
        for p in engines.procs:
            wait_healthy(p, args.start_timeout)
    except BaseException:
        engines.stop()
        raise
    return engines


def start_router(args, config: str, engines: Engines, logs: Path) -> Proc:
    port = free_port()
    a, b = (p.url for p in engines.procs)
    if config == "colocated":
        argv = [sys.executable, "-m", "rtpjax.cli", "router", "--policy", "cache_aware", "--worker-urls", a, b,
                "--model", args.tokenizer]  # fmt: skip
    elif config == "disagg":
        argv = [
            sys.executable,
            "-m",
            "rtpjax.cli",
            "router",
            "--pd-disaggregation",
            "--prefill",
            a,
            "--decode",
            b,
        ]
    else:
        binary = shutil.which("vllm-router") or shutil.which(
            "vllm-router", path=str(Path(sys.executable).parent)
        )
        if binary is None:
            raise RuntimeError("vllm-router is not installed (pip install vllm-router)")
        argv = [
            binary,
            "--vllm-pd-disaggregation",
            "--prefill",
            a,
            "--decode",
            b,
            "--log-level",
            "warning",
            "--prometheus-port",  # its default, 29000, may be taken
            str(free_port()),
        ]
    proc = start(
        f"router_{config}",
        [*argv, "--host", "127.0.0.1", "--port", str(port)],
        dict(os.environ),
        logs,
        port,
    )
    try:
        wait_healthy(proc, 60)
    except BaseException:
        proc.stop()
        raise
    return proc


def pd_status(engines: Engines) -> dict:
    """Summed hand-off counters of the engines (zeros where a field is absent)."""
    total: dict = dict.fromkeys(STAT_KEYS, 0.0) | {"kv_transfer_ms": {}}
    for p in engines.procs:
        s = httpx.get(p.url + "/pd/status", timeout=10).json()
        for k in STAT_KEYS:
            total[k] += float(s.get(k, 0) or 0)
        total["kv_transfer_ms"] |= s.get("kv_transfer_ms") or {}  # mean ms per hand-off by phase, since start
    return total


def clients(args, url: str, rate: float, results: Path, tag: str) -> dict:
    """Both request classes at once against `url`; their serve_bench results."""
    classes = {"long": (args.long_len, args.long_out, 0.33, args.long_rate * rate),
               "short": (args.short_len, args.short_out, 0.0, args.short_rate * rate)}  # fmt: skip
    procs = {}
    for name, (inp, out, spread, r) in classes.items():
        n = max(1, round(r * args.seconds))
        argv = [sys.executable, "-m", "rtpjax.benchmarks.serve_bench", "--base-url", url, "--model", args.name,
                "--tokenizer", args.tokenizer, "--dataset-name", "random", "--random-input-len", str(inp),
                "--random-output-len", str(out), "--random-range-ratio", str(spread), "--num-prompts", str(n),
                "--request-rate", str(r), "--ignore-eos", "--disable-tqdm", "--seed", str(zlib.crc32(f"{tag}/{name}".encode()) % 10_000),
                "--goodput", f"ttft:{args.slo_ttft_ms}", f"tpot:{args.slo_itl_ms}", "--metric-percentiles",
                "50,95,99", "--request-timeout", str(args.request_timeout), "--save-result", "--result-dir",
                str(results), "--result-filename", f"{tag}_{name}.json"]  # fmt: skip
        procs[name] = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
    out = {}
    for name, proc in procs.items():
        try:
            _, err = proc.communicate(
                timeout=args.seconds * 3 + args.request_timeout + 60
            )
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise RuntimeError(
                f"the {name} client of {tag} did not finish in time"
            ) from None
        if proc.returncode != 0:
            raise RuntimeError(f"the {name} client of {tag} failed:\n{err[-2000:]}")
        m = json.loads((results / f"{tag}_{name}.json").read_text())
        errors = [e for e in m.get("errors", []) if e]
        out[name] = {k: v for k, v in m.items() if not isinstance(v, list)} | {
            "first_error": errors[0] if errors else ""
        }
    return out


def summarize(classes: dict, before: dict, after: dict) -> dict:
    long, short = classes["long"], classes["short"]
    moved = {k: after[k] - before[k] for k in STAT_KEYS}
    pulled = moved["kv_transfers_pulled"]
    return {
        "output_tok_s": long["output_throughput"] + short["output_throughput"],
        "goodput_req_s": (long["request_goodput"] or 0) + (short["request_goodput"] or 0),
        "sent": long["num_prompts"] + short["num_prompts"], "completed": long["completed"] + short["completed"],
        **{f"{c}_{m}_p{p}_ms": classes[c][f"p{p}_{m}_ms"] for c in ("long", "short") for m in ("ttft", "itl")
           for p in (50, 95, 99)},
        "kv_handoffs": pulled, "kv_handoffs_failed": moved["kv_transfers_failed"],
        "kv_phase_ms": after["kv_transfer_ms"],  # per phase (prefill_d2h, prefill_stage, decode_channel, decode_h2d)
        "classes": classes,
    }  # fmt: skip


def run(args) -> dict:
    rows: dict = {}
    logs = Path(args.logs or tempfile.mkdtemp(prefix="pd_mixed_"))
    logs.mkdir(parents=True, exist_ok=True)
    engines = None
    try:
        for config in args.configs:
            roles = ("both", "both") if args.all_both else CONFIGS[config]
            if engines is None or engines.roles != roles:
                if engines is not None:
                    engines.stop()
                engines = start_engines(args, roles, logs)
            try:
                router = start_router(args, config, engines, logs)
            except RuntimeError as e:
                print(f"skipped {config}: {e}")
                rows[config] = {"skipped": str(e)}
                continue
            try:
                for rate in args.rates:
                    before = pd_status(engines)
                    classes = clients(
                        args, router.url, rate, logs, f"{config}_r{rate:g}"
                    )
                    rows.setdefault(config, {})[f"{rate:g}"] = summarize(
                        classes, before, pd_status(engines)
                    )
                    print_row(config, rate, rows[config][f"{rate:g}"])
            finally:
                router.stop()
    finally:
        if engines is not None:
            engines.stop()
    return rows


def print_row(config: str, rate: float, r: dict) -> None:
    phases = " ".join(f"{k} {v:.1f}" for k, v in r["kv_phase_ms"].items())
    kv = f"  K/V {r['kv_handoffs']:.0f}: {phases} ms" if r["kv_handoffs"] else ""
    print(
        f"{config:12s} x{rate:<5g} out {r['output_tok_s']:8.0f} tok/s  goodput {r['goodput_req_s']:6.2f} req/s  "
        f"long TTFT p50/p99 {r['long_ttft_p50_ms']:6.0f}/{r['long_ttft_p99_ms']:6.0f}  short ITL p50/p99 "
        f"{r['short_itl_p50_ms']:5.1f}/{r['short_itl_p99_ms']:6.1f} ms  {r['completed']}/{r['sent']} done{kv}"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="what every engine serves (a folder or .gguf)")
    p.add_argument("--tokenizer", default=None, help="default: the model folder")
    p.add_argument("--name", default="model", help="served model name")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument(
        "--gpus",
        nargs=2,
        default=["0", "1"],
        help="CUDA device of engine 1 and 2 ('cpu': none)",
    )
    p.add_argument(
        "--mem-fraction",
        type=float,
        default=None,
        help="XLA_PYTHON_CLIENT_MEM_FRACTION of each engine",
    )
    p.add_argument(
        "--all-both",
        action="store_true",
        help="every engine role `both` (a smoke test on one pair)",
    )
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        default=[0.5, 1.0, 2.0, 4.0],
        help="multipliers of both rates",
    )
    p.add_argument("--long-len", type=int, default=6144)
    p.add_argument("--long-out", type=int, default=128)
    p.add_argument(
        "--long-rate",
        type=float,
        default=0.5,
        help="long prompts per second at multiplier 1",
    )
    p.add_argument("--short-len", type=int, default=128)
    p.add_argument("--short-out", type=int, default=512)
    p.add_argument(
        "--short-rate",
        type=float,
        default=8.0,
        help="short prompts per second at multiplier 1",
    )
    p.add_argument(
        "--seconds", type=float, default=40.0, help="arrival window of each rate"
    )
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-itl-ms", type=float, default=50.0)
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument(
        "--logs", default=None, help="folder for the processes' logs and raw results"
    )
    p.add_argument("--out", default=None, help="JSON file for the table")
    return p


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser().parse_args(argv[:cut])
    args.serve_args = argv[cut + 1 :]  # flags for every `rtpjax serve`
    args.tokenizer = args.tokenizer or args.model
    rows = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

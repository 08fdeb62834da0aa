"""Time to first token of `rtpjax serve` from process start (loading + compilation + one request), with an empty
compilation cache and then with the cache the first start filled. Prints a line per start, writes JSON.

    python -m rtpjax.benchmarks.startup_bench /data/llama3-8b --out startup.json -- --max-num-seqs 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timeline(log: Path, launched: float) -> list[str]:
    """The engine's log lines, each stamped with seconds since launch (from its asctime): where startup goes."""
    marks = []
    for line in log.read_text().splitlines():
        try:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:  # lines of uvicorn, tqdm and XLA, which have their own formats
            continue
        if " rtpjax: " in line:
            marks.append(f"{stamp - launched:6.1f} s  {line[24:]}")
    return marks


def first_token_seconds(model: str, cache_dir: str, port: int, serve_args: list[str], log: Path) -> float:
    import httpx

    cmd = [sys.executable, "-m", "rtpjax.cli", "serve", model, "--port", str(port),
           "--compilation-cache-dir", cache_dir, "--served-model-name", "bench", *serve_args]  # fmt: skip
    began = time.perf_counter()
    first_token_seconds.launched = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        body = {"model": "bench", "prompt": "w5 w6 w7", "max_tokens": 1, "stream": True}
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}; see {log}")
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:200]}")
                    for line in r.iter_lines():
                        if line.startswith("data:") and '"text"' in line:
                            return time.perf_counter() - began
            except httpx.TransportError:
                time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--drop-page-cache", action="store_true", help="evict the checkpoint before the cold start")
    parser.add_argument("--out", default=None)
    parser.add_argument("--compilation-cache-dir", default=None, help="start empty here (default: a new temp dir)")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.serve_args = argv[split + 1 :]  # flags for `rtpjax serve`
    cache = args.compilation_cache_dir or tempfile.mkdtemp(prefix="rtpjax-xla-")
    logs = Path(tempfile.mkdtemp(prefix="rtpjax-startup-"))
    if args.drop_page_cache:
        from rtpjax.benchmarks.load_bench import drop_page_cache

        drop_page_cache(Path(args.model))
    result = {"model": args.model, "serve_args": args.serve_args}
    for name in ("cold_compile_cache", "warm_compile_cache"):
        result[name] = first_token_seconds(args.model, cache, args.port, args.serve_args, logs / f"{name}.log")
        result[f"{name}_breakdown"] = timeline(logs / f"{name}.log", first_token_seconds.launched)
        print(f"{name}: first token {result[name]:.1f} s after launch", *result[f"{name}_breakdown"], sep="\n  ",
              flush=True)  # fmt: skip
    if not args.compilation_cache_dir:
        shutil.rmtree(cache, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Time until a checkpoint's weights are resident on the accelerator: rtpjax (safetensors and converted orbax) beside
transformers `from_pretrained(device_map=...)`, safetensors + `jax.device_put`, and `cat` of the files, with the page
cache cold (the files' pages dropped) and warm. Each measurement runs in a fresh process with the device already
initialised, so only loading is timed. Prints a table, writes JSON.

    python -m rtpjax.benchmarks.load_bench /data/llama3-8b --out load.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("cat", "rtpjax", "rtpjax_staged", "rtpjax_direct_io", "rtpjax_int8", "rtpjax_orbax", "safetensors_device_put",
           "transformers")  # fmt: skip


def drop_page_cache(folder: Path) -> None:
    """Evict the folder's files from the page cache (fadvise works unprivileged; drop_caches needs root)."""
    os.sync()
    for f in folder.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        pass


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def measure(method: str, folder: Path, torch_device: str, options: dict) -> dict:
    """Runs inside the child process: initialise the device, then time one load."""
    if method == "cat":
        began = time.perf_counter()
        subprocess.run(["cat", *map(str, _files(folder))], stdout=subprocess.DEVNULL, check=True)
        return {"seconds": time.perf_counter() - began}
    if method == "transformers":
        import torch
        from transformers import AutoModelForCausalLM

        if torch_device == "cuda":
            torch.zeros(1, device="cuda")
        began = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=torch_device)
        if torch_device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        return {"seconds": seconds, "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    import logging

    import jax
    import numpy as np
    from rtpjax.models import load_config

    from rtpjax.loading.loader import LoadOptions, load_params
    from rtpjax.loading.model_source import load_model
    from rtpjax.parallel.sharding import make_mesh

    notes: list[str] = []  # the loader's debug line: how long it waited on reads and on transfers
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: notes.append(record.getMessage())
    logging.getLogger("rtpjax").addHandler(handler)
    logging.getLogger("rtpjax").setLevel(logging.DEBUG)
    jax.block_until_ready(jax.device_put(np.zeros(1)))
    began = time.perf_counter()  # libraries are imported and the device is up, as for transformers above
    if method == "safetensors_device_put":
        from safetensors import safe_open

        arrays = []
        for f in _files(folder):
            with safe_open(f, framework="numpy") as st:
                arrays += [jax.device_put(st.get_tensor(name)) for name in st.keys()]
        jax.block_until_ready(arrays)
    elif method == "rtpjax_orbax":
        arrays = jax.tree.leaves(load_model(folder)[2])
    else:
        cfg, family = load_config(folder)
        opts = LoadOptions(**{"direct_io": method == "rtpjax_direct_io", "pinned": method != "rtpjax_staged"} | options)
        mesh = make_mesh(tensor=1)  # as the engine loads
        quantization = "int8" if method == "rtpjax_int8" else None  # quantized on the device as weights arrive
        arrays = jax.tree.leaves(load_params(folder, cfg, family, mesh, options=opts, quantization=quantization))
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "bytes": sum(a.nbytes for a in arrays), "notes": [n for n in notes if "waited" in n]}


def run_child(method: str, folder: Path, torch_device: str, options: str) -> dict:
    cmd = [sys.executable, "-m", "rtpjax.benchmarks.load_bench", str(folder), "--child", method,
           "--torch-device", torch_device, "--options", options]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a safetensors checkpoint folder")
    parser.add_argument("--converted", type=Path, default=None,
                        help="the `rtpjax convert` copy, written if absent (default: MODEL-orbax)")  # fmt: skip
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=1, help="warm measurements per method (best is reported)")
    parser.add_argument("--skip-cold", action="store_true", help="warm runs only (the page cache is filled first)")
    parser.add_argument("--torch-device", default="cuda")
    parser.add_argument("--options", default="{}", help='LoadOptions fields for rtpjax, as JSON: \'{"buffers": 4}\'')
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.torch_device, json.loads(args.options))))
        return
    converted = args.converted or args.model.with_name(args.model.name + "-orbax")
    results = {"model": str(args.model), "options": json.loads(args.options),
               "bytes": sum(f.stat().st_size for f in _files(args.model)), "runs": {}}  # fmt: skip
    methods = args.methods.split(",")
    if "rtpjax_orbax" in methods and not converted.exists():
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rtpjax.cli", "convert", str(args.model), str(converted)], check=True)
        results["convert_seconds"] = time.perf_counter() - began
    for method in methods:
        folder = converted if method == "rtpjax_orbax" else args.model
        if args.skip_cold:
            cold = {"skipped": True}
            run_child(method, folder, args.torch_device, args.options)  # fills the page cache
        else:
            drop_page_cache(folder)
            cold = run_child(method, folder, args.torch_device, args.options)
        warm = [run_child(method, folder, args.torch_device, args.options) for _ in range(args.repeats)]
        best = min(warm, key=lambda r: r.get("seconds", float("inf")))
        results["runs"][method] = {"cold": cold, "warm": best}
        print(f"{method:24s} cold {_fmt(cold, results['bytes'])}   warm {_fmt(best, results['bytes'])}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


def _fmt(run: dict, nbytes: int) -> str:
    if run.get("skipped"):
        return "skipped"
    if "error" in run:
        return f"error: {run['error'][:60]}"
    return f"{run['seconds']:7.2f} s {nbytes / 1e9 / run['seconds']:6.2f} GB/s"


if __name__ == "__main__":
    main()

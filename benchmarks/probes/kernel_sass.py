"""What does a quantized-weight kernel compile to on Hopper, without a GPU? Pallas lowers the kernel to Triton IR for
CUDA on any host; the `triton` wheel (in a Python that has it: --triton-python) compiles that for sm_90 and its
cuobjdump reads the SASS back: registers, spills, and the instructions of the main loop per weight a thread handles.
It answers whether a change to a kernel cuts the work per weight before a GPU times it. Triton's version is not the
one inside jaxlib's XLA, so the counts show how a change moves the code, not the GPU's exact instructions.

    python -m venv /tmp/tv && /tmp/tv/bin/pip install triton
    python -m rtpjax.benchmarks.probes.kernel_sass --triton-python /tmp/tv/bin/python --out kernel_sass.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# name: (format, rows, zero points, Tiles keyword arguments); 8B up projection, groups of 128
VARIANTS = {
    "int4_1row_asm": ("int4", 1, False, dict(block_n=32, block_k=512, num_warps=8, unpack="asm", one_row=True)),
    "int4_1row_magic": ("int4", 1, False, dict(block_n=32, block_k=512, num_warps=8, unpack="magic", one_row=True)),
    "int4_1row_magic_zero": ("int4", 1, True, dict(block_n=32, block_k=512, num_warps=8, unpack="magic",
                                                   one_row=True)),  # fmt: skip
    "int4_16_asm": ("int4", 16, False, dict(unpack="asm")),
    "int4_16_magic": ("int4", 16, False, dict(unpack="magic")),
    "fp8_1row": ("fp8", 1, False, dict(block_n=16, block_k=512, one_row=True)),
    "fp8_16": ("fp8", 16, False, {}),
}
N, K, GROUP = 14336, 4096, 128

COMPILE = r"""
import json, subprocess, sys, os, re
import triton
from triton.backends.compiler import GPUTarget
jobs, out = json.load(open(sys.argv[1])), {}
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
for name, job in jobs.items():
    try:
        k = triton.compile(job["ttir"], target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"]))
    except Exception as e:
        out[name] = dict(error=str(e)[:1000]); continue
    cubin = job["ttir"][:-5] + ".cubin"
    open(cubin, "wb").write(k.asm["cubin"])
    run = lambda *a: subprocess.run([os.path.join(tools, "cuobjdump"), *a, cubin], capture_output=True, text=True).stdout
    out[name] = dict(sass=run("-sass"), resources=run("-res-usage"), ptx=k.asm["ptx"], triton=triton.__version__)
json.dump(out, open(sys.argv[2], "w"))
"""


def capture(fmt: str, rows: int, zero_point: bool, tiles) -> str:
    """The Triton IR (text) Pallas builds for small_matmul at this shape, lowered for CUDA on this host."""
    import jax
    import jax.numpy as jnp
    from jax._src.pallas.triton import lowering

    from rtpjax.quant.small_matmul import small_matmul

    built, build = [], lowering.lower_jaxpr_to_triton_module

    def keep(*args, **kwargs):
        result = build(*args, **kwargs)
        built.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    x = jax.ShapeDtypeStruct((rows, K), jnp.bfloat16)
    if fmt == "int4":
        q, s = jax.ShapeDtypeStruct((N, K // 2), jnp.uint8), jax.ShapeDtypeStruct((N, K // GROUP), jnp.float32)
    else:
        q, s = jax.ShapeDtypeStruct((N, K), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((N, 1), jnp.float32)
    z = jax.ShapeDtypeStruct((N, K // GROUP), jnp.uint8) if zero_point else None
    lowering.lower_jaxpr_to_triton_module = keep
    try:
        jax.jit(lambda x, q, s, z: small_matmul(x, q, s, z, fmt=fmt, group=GROUP if fmt == "int4" else 0,
                                                tiles=tiles)).trace(x, q, s, z).lower(lowering_platforms=("cuda",))  # fmt: skip
    finally:
        lowering.lower_jaxpr_to_triton_module = build
    return built[-1]


def main_loop(sass: str) -> list[str]:
    """The opcodes (with modifiers) of the longest loop in a kernel's SASS: the span a backward branch closes."""
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][A-Z0-9_.]*)([^;]*);", sass)
    spans = [(int(target, 16), int(at, 16)) for at, op, rest in lines if op.endswith("BRA")
             for target in re.findall(r"0x([0-9a-f]+)", rest) if int(target, 16) < int(at, 16)]  # fmt: skip
    if not spans:
        return []
    start, end = max(spans, key=lambda span: span[1] - span[0])
    return [op.split()[-1] for at, op, _ in lines if start <= int(at, 16) <= end]


def weights_per_thread(fmt: str, rows: int, tiles) -> int:
    """Weights one thread handles in one iteration of the kernel's loop."""
    from rtpjax.quant.small_matmul import plan

    p = plan(rows, N, K, fmt, GROUP if fmt == "int4" else 0, tiles)
    return p.block_n * p.step // (32 * tiles.num_warps)


def analyse(name: str, fmt: str, rows: int, tiles, compiled: dict) -> dict:
    if "error" in compiled:
        return dict(error=compiled["error"])
    loop = main_loop(compiled["sass"])
    per = weights_per_thread(fmt, rows, tiles)
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", compiled["resources"]))
    top = collections.Counter(op.split(".")[0] for op in loop).most_common(12)
    return dict(loop_instructions=len(loop), weights_per_thread=per, per_weight=round(len(loop) / per, 2),
                registers=int(usage.get("REG", 0)), spilled=int(usage.get("LOCAL", 0)), loop_opcodes=dict(top),
                triton=compiled["triton"])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-python", default=sys.executable, help="a Python with the triton wheel")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--keep", default=None, help="a folder for each kernel's Triton IR, PTX and SASS")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from rtpjax.benchmarks.probes import report
    from rtpjax.quant.small_matmul import Tiles

    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        jobs, tiles = {}, {}
        for name in names:
            fmt, rows, zero_point, kw = VARIANTS[name]
            tiles[name] = Tiles(**kw)
            path = folder / f"{name}.ttir"
            path.write_text(capture(fmt, rows, zero_point, tiles[name]))
            jobs[name] = dict(ttir=str(path), num_warps=tiles[name].num_warps, num_stages=tiles[name].num_stages)
        (folder / "jobs.json").write_text(json.dumps(jobs))
        done = subprocess.run([args.triton_python, "-c", COMPILE, str(folder / "jobs.json"), str(folder / "out.json")],
                              capture_output=True, text=True, env={**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"})  # fmt: skip
        if done.returncode:
            sys.exit(f"compiling with {args.triton_python} failed (does it have the triton wheel?):\n{done.stderr[-2000:]}")
        compiled = json.loads((folder / "out.json").read_text())
        result = {}
        for name in names:
            result[name] = analyse(name, VARIANTS[name][0], VARIANTS[name][1], tiles[name], compiled[name])
            if args.keep and "sass" in compiled[name]:
                (folder / f"{name}.sass").write_text(compiled[name]["sass"])
                (folder / f"{name}.ptx").write_text(compiled[name]["ptx"])
            r = result[name]
            print(f"{name:22s} " + (f"loop {r['loop_instructions']:4d} instructions / {r['weights_per_thread']} "
                  f"weights = {r['per_weight']:5.2f} per weight, {r['registers']} registers, {r['spilled']} B spilled"
                  f"  {r['loop_opcodes']}" if "error" not in r else r["error"][:300]), flush=True)  # fmt: skip
    report({"shape": [N, K], "group": GROUP, "kernels": result}, args.out)


if __name__ == "__main__":
    main()

"""What does a quantized kernel compile to on Hopper, without a GPU? Pallas lowers the kernel to Triton IR for CUDA on
any host; the `triton` wheel (in a Python that has it: --triton-python) compiles that for sm_90 and its cuobjdump
reads the SASS back: registers, spills, and the instructions of the main loop per element a thread handles (a weight
of the small-M matmul; a K or V element of the decode attention's cache). It answers whether a change to a kernel
cuts the work per element before a GPU times it. Triton's version is not the
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

# matmul variants: (format, rows, zero points, Tiles keyword arguments); the 8B up projection, int4 groups of 128
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
# decode attention variants (Llama-3-8B heads, 32 sequences of 2048 tokens): (KV dtype, ragged_paged_attention kwargs)
ATTENTION = {
    "attention_bf16": ("bfloat16", {}),
    "attention_int8": ("int8", dict(kv_unpack="convert")),
    "attention_int8_asm": ("int8", dict(kv_unpack="asm")),
    "attention_fp8": ("float8_e4m3fn", {}),
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
    run = lambda *a: subprocess.run([os.path.join(tools, "cuobjdump"), *a, cubin], capture_output=True,
                                    text=True).stdout
    out[name] = dict(sass=run("-sass"), resources=run("-res-usage"), ptx=k.asm["ptx"], triton=triton.__version__)
json.dump(out, open(sys.argv[2], "w"))
"""


def capture(fn, *args) -> str:
    """The Triton IR (text) of the last Pallas kernel in `fn(*args)`, lowered for CUDA on this host."""
    import jax
    from jax._src.pallas.triton import lowering

    built, build = [], lowering.lower_jaxpr_to_triton_module

    def keep(*a, **kw):
        result = build(*a, **kw)
        built.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = keep
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = build
    return built[-1]


def matmul_job(fmt: str, rows: int, zero_point: bool, tiles) -> tuple[str, int]:
    """small_matmul's Triton IR at this shape, and the weights a thread handles per loop step."""
    import jax
    import jax.numpy as jnp

    from rtpjax.quant.small_matmul import plan, small_matmul

    x = jax.ShapeDtypeStruct((rows, K), jnp.bfloat16)
    if fmt == "int4":
        q, s = jax.ShapeDtypeStruct((N, K // 2), jnp.uint8), jax.ShapeDtypeStruct((N, K // GROUP), jnp.float32)
    else:
        q, s = jax.ShapeDtypeStruct((N, K), jnp.float8_e4m3fn), jax.ShapeDtypeStruct((N, 1), jnp.float32)
    z = jax.ShapeDtypeStruct((N, K // GROUP), jnp.uint8) if zero_point else None
    group = GROUP if fmt == "int4" else 0
    ttir = capture(lambda x, q, s, z: small_matmul(x, q, s, z, fmt=fmt, group=group, tiles=tiles), x, q, s, z)
    p = plan(rows, N, K, fmt, group, tiles)
    return ttir, p.block_n * p.step // (32 * tiles.num_warps)


def attention_job(kv_dtype: str, kwargs: dict) -> tuple[str, int, int, int]:
    """ragged_paged_attention's decode Triton IR (32 sequences of 2048 tokens), the K and V elements a thread handles
    per loop step, and the kernel's warps and stages (its defaults for the shape)."""
    import jax
    import jax.numpy as jnp

    from rtpjax.kernels.metadata import AttentionMetadata
    from rtpjax.kernels.ragged_paged_attention import ragged_paged_attention

    seqs, ctx, heads, kv_heads, head_dim, page = 32, 2048, 32, 8, 128, 16
    blocks, dtype = seqs * ctx // page, jnp.dtype(kv_dtype)
    meta = AttentionMetadata(jnp.arange(seqs + 1, dtype=jnp.int32), jnp.full(seqs, ctx, jnp.int32),
                             jnp.zeros((seqs, ctx // page), jnp.int32), jnp.zeros(seqs, jnp.int32))  # fmt: skip
    q = jax.ShapeDtypeStruct((seqs, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((kv_heads, blocks, page, head_dim), dtype)
    scales = (jax.ShapeDtypeStruct((kv_heads, blocks, page), jnp.float32),) * 2 if dtype != jnp.bfloat16 else ()
    quantized = bool(scales)  # the tiles the wrapper picks for such a step, named so the counts know them
    tiles = dict(pages_per_tile=8 if quantized else 4, num_warps=4, num_stages=3 if quantized else 2) | kwargs
    ttir = capture(lambda q, cache: ragged_paged_attention(q, cache, meta, scale=head_dim**-0.5, **tiles),
                   q, (kv, kv, *scales))  # fmt: skip
    per_thread = 2 * tiles["pages_per_tile"] * page * head_dim // (32 * tiles["num_warps"])
    return ttir, per_thread, tiles["num_warps"], tiles["num_stages"]


def main_loop(sass: str) -> list[str]:
    """The opcodes (with modifiers) of the longest loop in a kernel's SASS: the span a backward branch closes."""
    lines = re.findall(r"/\*([0-9a-f]{4,})\*/\s+((?:@!?U?P\w+\s+)?[A-Z][A-Z0-9_.]*)([^;]*);", sass)
    spans = [(int(target, 16), int(at, 16)) for at, op, rest in lines if op.endswith("BRA")
             for target in re.findall(r"0x([0-9a-f]+)", rest) if int(target, 16) < int(at, 16)]  # fmt: skip
    if not spans:
        return []
    start, end = max(spans, key=lambda span: span[1] - span[0])
    return [op.split()[-1] for at, op, _ in lines if start <= int(at, 16) <= end]


def analyse(compiled: dict, per_thread: int) -> dict:
    """A compiled kernel's main loop: instructions, per element a thread handles, top opcodes; registers, spills."""
    if "error" in compiled:
        return dict(error=compiled["error"])
    loop = main_loop(compiled["sass"])
    usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", compiled["resources"]))
    top = collections.Counter(op.split(".")[0] for op in loop).most_common(12)
    return dict(loop_instructions=len(loop), per_thread=per_thread, per_element=round(len(loop) / per_thread, 2),
                registers=int(usage.get("REG", 0)), spilled=int(usage.get("LOCAL", 0)), loop_opcodes=dict(top),
                wgmma_waits=sum(op.startswith("WARPGROUP.DEPBAR") for op in loop),  # each waits for the dots issued
                triton=compiled["triton"])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-python", default=sys.executable, help="a Python with the triton wheel")
    parser.add_argument("--variants", default=",".join([*VARIANTS, *ATTENTION]))
    parser.add_argument("--keep", default=None, help="a folder for each kernel's Triton IR, PTX and SASS")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from rtpjax.benchmarks.probes import report
    from rtpjax.quant.small_matmul import Tiles

    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS) - set(ATTENTION))
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join([*VARIANTS, *ATTENTION])}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        jobs, per_thread = {}, {}
        for name in names:
            if name in VARIANTS:
                fmt, rows, zero_point, kw = VARIANTS[name]
                tiles = Tiles(**kw)
                ttir, per_thread[name] = matmul_job(fmt, rows, zero_point, tiles)
                warps, stages = tiles.num_warps, tiles.num_stages
            else:
                ttir, per_thread[name], warps, stages = attention_job(*ATTENTION[name])
            path = folder / f"{name}.ttir"
            path.write_text(ttir)
            jobs[name] = dict(ttir=str(path), num_warps=warps, num_stages=stages)
        (folder / "jobs.json").write_text(json.dumps(jobs))
        env = {**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"}
        done = subprocess.run([args.triton_python, "-c", COMPILE, str(folder / "jobs.json"), str(folder / "out.json")],
                              capture_output=True, text=True, env=env)  # fmt: skip
        if done.returncode:
            sys.exit(f"compiling with {args.triton_python} failed (does it have the triton wheel?):\n"
                     f"{done.stderr[-2000:]}")
        compiled = json.loads((folder / "out.json").read_text())
        result = {}
        for name in names:
            result[name] = r = analyse(compiled[name], per_thread[name])
            if args.keep and "sass" in compiled[name]:
                (folder / f"{name}.sass").write_text(compiled[name]["sass"])
                (folder / f"{name}.ptx").write_text(compiled[name]["ptx"])
            print(f"{name:22s} " + (f"loop {r['loop_instructions']:4d} instructions / {r['per_thread']} elements = "
                  f"{r['per_element']:5.2f} each, {r['registers']} registers, {r['spilled']} B spilled"
                  f"  {r['loop_opcodes']}" if "error" not in r else r["error"][:300]), flush=True)  # fmt: skip
    report({"matmul_shape": [N, K], "group": GROUP, "kernels": result}, args.out)


if __name__ == "__main__":
    main()

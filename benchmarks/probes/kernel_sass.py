"""What does a quantized-weight kernel compile to? Each variant (the int4 kernel by PTX, by the magic float, by
conversion; fp8 beside it; one row and 16 rows) is compiled for one 8B up projection and its executable serialized;
the kernel's PTX and cubin are taken from it and counted by opcode (SASS through cuobjdump or nvdisasm, which the
Triton wheel brings; ptxas -v for registers and spills). It answers why a kernel reads its bytes at a third of the
copy bandwidth: too many instructions per weight, spills, or neither (then memory parallelism).

    python -m rtpjax.benchmarks.probes.kernel_sass --out kernel_sass.json --keep DIR
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {  # name: (format, rows, Tiles keyword arguments)
    "int4_asm_1row": ("int4", 1, dict(block_n=32, block_k=512, num_warps=8, unpack="asm", one_row=True)),
    "int4_magic_1row": ("int4", 1, dict(block_n=32, block_k=512, num_warps=8, unpack="magic", one_row=True)),
    "int4_asm_16": ("int4", 16, dict(unpack="asm")),
    "int4_convert_16": ("int4", 16, dict(unpack="convert")),
    "fp8_1row": ("fp8", 1, dict(block_n=16, block_k=512, one_row=True)),
    "fp8_16": ("fp8", 16, {}),
}
N, K, GROUP = 14336, 4096, 128


def cuda_tool(name: str) -> str | None:
    """`name` on PATH or inside an installed wheel (Triton's bin, the nvidia packages), else None."""
    found = shutil.which(name)
    if found:
        return found
    for root in sys.path:
        for pattern in ("triton/backends/nvidia/bin", "nvidia/*/bin", "nvidia/cu*/bin"):
            hits = glob.glob(os.path.join(root, pattern, name))
            if hits:
                return hits[0]
    return None


def opcodes(text: str, sass: bool = False) -> dict[str, int]:
    """Instruction counts by opcode (PTX `add.f32` -> `add`; SASS `HFMA2.MMA` -> `HFMA2`)."""
    counts = collections.Counter()
    for line in text.splitlines():
        line = line.strip()
        if sass:
            m = re.match(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        else:
            m = re.match(r"(?:@!?%p\d+\s+)?([a-z][a-z0-9_]*)[.\s]", line)
        if m:
            counts[m.group(1)] += 1
    return dict(counts.most_common())


def ptx_entries(blob: bytes, needle: str) -> dict[str, str]:
    """PTX kernels named with `needle` in a serialized executable (PTX is kept there as text)."""
    out = {}
    for m in re.finditer(rb"\.visible \.entry (\w*" + needle.encode() + rb"\w*)\(", blob):
        end = blob.find(b"\n}\n", m.start())
        header_at = blob.rfind(b".version", 0, m.start())
        out[m.group(1).decode()] = blob[header_at if header_at >= 0 else m.start() : end + 3].decode(errors="replace")
    return out


def cubins(blob: bytes) -> list[bytes]:
    """ELF images (64-bit) in a serialized executable, each cut at its section headers' end."""
    out, at = [], blob.find(b"\x7fELF\x02")
    while at >= 0:
        shoff, = struct.unpack_from("<Q", blob, at + 0x28)
        shentsize, shnum = struct.unpack_from("<HH", blob, at + 0x3A)
        size = shoff + shentsize * shnum
        if 0 < size < len(blob) - at + 1:
            out.append(blob[at : at + size])
        at = blob.find(b"\x7fELF\x02", at + 4)
    return out


def compile_variants() -> dict[str, dict]:
    import jax
    import jax.numpy as jnp

    from rtpjax.quant.small_matmul import Tiles, small_matmul

    key = jax.random.key(0)
    packed = jax.random.randint(key, (N, K // 2), 0, 256, jnp.int32).astype(jnp.uint8)
    gscale = jax.random.uniform(key, (N, K // GROUP), jnp.float32)
    q8 = jax.random.normal(key, (N, K), jnp.float32).astype(jnp.float8_e4m3fn)
    cscale = jax.random.uniform(key, (N, 1), jnp.float32)
    client = jax.devices()[0].client
    found = {}
    for name, (fmt, rows, kw) in VARIANTS.items():
        x = jax.random.normal(key, (rows, K), jnp.bfloat16)
        args = (x, packed, gscale) if fmt == "int4" else (x, q8, cscale)
        fn = jax.jit(lambda x, q, s, fmt=fmt, tiles=Tiles(**kw): small_matmul(
            x, q, s, fmt=fmt, group=GROUP if fmt == "int4" else 0, tiles=tiles))
        compiled = fn.lower(*args).compile()
        blob = client.serialize_executable(compiled.runtime_executable())
        fn(*args).block_until_ready()
        t = time.perf_counter()
        for _ in range(50):
            y = fn(*args)
        y.block_until_ready()
        found[name] = dict(us=(time.perf_counter() - t) / 50 * 1e6, blob=blob)
        print(f"{name:16s} {found[name]['us']:7.1f} us (dispatched one by one), executable {len(blob)} bytes",
              flush=True)
    return found


def analyse(found: dict[str, dict], keep: Path | None) -> dict:
    tools = {t: cuda_tool(t) for t in ("ptxas", "cuobjdump", "nvdisasm")}
    result = {"tools": tools, "kernels": {}}
    for name, got in found.items():
        blob = got["blob"]
        ptx = ptx_entries(blob, "small_matmul")
        elves = cubins(blob)
        info = {"us": round(got["us"], 1), "ptx_entries": list(ptx), "cubins": [len(e) for e in elves]}
        for entry, text in ptx.items():
            info[f"ptx_opcodes:{entry}"] = opcodes(text)
            if keep:
                (keep / f"{name}.{entry}.ptx").write_text(text)
            if tools["ptxas"]:
                with tempfile.TemporaryDirectory() as tmp:
                    src = Path(tmp, "k.ptx")
                    src.write_text(text)
                    arch = re.search(r"\.target (sm_\w+)", text)
                    p = subprocess.run([tools["ptxas"], "-v", f"-arch={arch.group(1) if arch else 'sm_90a'}",
                                        "-o", str(Path(tmp, "k.cubin")), str(src)], capture_output=True, text=True)  # fmt: skip
                    info[f"ptxas:{entry}"] = (p.stdout + p.stderr).strip()[-600:]
        for i, elf in enumerate(elves):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp, "k.cubin")
                path.write_bytes(elf)
                sass = ""
                if tools["cuobjdump"]:
                    sass = subprocess.run([tools["cuobjdump"], "-sass", str(path)], capture_output=True, text=True).stdout
                if not sass.strip() and tools["nvdisasm"]:
                    sass = subprocess.run([tools["nvdisasm"], "-c", str(path)], capture_output=True, text=True).stdout
            for fn_name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S) or [("", sass)]:
                if "small_matmul" not in fn_name and fn_name:
                    continue
                counts = opcodes(body, sass=True)
                info[f"sass_opcodes:{fn_name or i}"] = counts
                info[f"sass_count:{fn_name or i}"] = sum(counts.values())
                if keep:
                    (keep / f"{name}.{fn_name or i}.sass").write_text(body)
        result["kernels"][name] = info
        sass_keys = [k for k in info if k.startswith("sass_opcodes")]
        top = list(info[sass_keys[0]].items())[:14] if sass_keys else []
        regs = [v[-200:] for k, v in info.items() if k.startswith("ptxas")]
        print(f"{name:16s} {info['us']:7.1f} us ptx {list(ptx)} cubins {info['cubins']}\n    {regs}\n    {top}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    parser.add_argument("--keep", default=None, help="a folder for each kernel's PTX and SASS")
    args = parser.parse_args()
    from rtpjax.benchmarks.probes import report

    keep = Path(args.keep) if args.keep else None
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
    report(analyse(compile_variants(), keep), args.out)


if __name__ == "__main__":
    main()

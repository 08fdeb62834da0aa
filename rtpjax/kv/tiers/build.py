"""KV tiers from the engine's options: checked at start (a bad path or size fails there, in one line), bound to the
model's identity (the disk tier's folder), and their costs measured once the steps are compiled."""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

import jax
import numpy as np

from rtpjax.kv.host_blocks import KVLayout, PackedBlocks
from rtpjax.kv.tiers.disk import DiskTier
from rtpjax.kv.tiers.host import HostTier
from rtpjax.kv.tiers.manager import Costs, KVTiers

log = logging.getLogger("rtpjax")

GIB = 1 << 30
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "special_tokens_map.json")  # fmt: skip


def _file_digest(h, path: Path, edge: int = 1 << 20) -> None:
    """Name, size and the first and last MiB: tells checkpoints apart without reading gigabytes at start."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(edge))
        if size > edge:
            f.seek(max(edge, size - edge))
            h.update(f.read(edge))


def fingerprint(path: str | None, files=None) -> str:
    """A digest of a model (or tokenizer) folder's config and weight files, or of one file."""
    h = hashlib.sha256()
    if path is None:
        return "none"
    p = Path(path)
    if p.is_file():
        _file_digest(h, p)
        return h.hexdigest()[:32]
    for f in sorted(p.iterdir()):
        if f.is_file() and (f.name in files if files else (f.suffix in _WEIGHT_SUFFIXES or f.name == "config.json")):
            _file_digest(h, f)
    return h.hexdigest()[:32]


def identity(model: str, tokenizer: str | None, layout: KVLayout, args) -> dict:
    """What KV blocks depend on: a disk tier made under another identity is never read."""
    return dict(model=fingerprint(model), tokenizer=fingerprint(tokenizer, _TOKENIZER_FILES),
                load_format=args.load_format, dtype=args.dtype, quantization=args.quantization,
                layout=dict(dtype=layout.dtype, block_size=layout.block_size, num_layers=layout.num_layers,
                            num_kv_heads=layout.num_kv_heads, head_dim=layout.head_dim,
                            **({"layer_dtypes": list(layout.layer_dtypes)} if layout.layer_dtypes else {})),
                format=1)  # fmt: skip


def _available_host_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def make_tiers(args, layout: KVLayout, ident: dict) -> KVTiers | None:
    """The tiers the options ask for, or None (no --kv-offloading-size)."""
    if not args.kv_offloading_size:
        if args.kv_disk_path:
            raise ValueError("--kv-disk-path needs --kv-offloading-size (the host tier stages every disk read)")
        if args.preemption_mode == "swap":
            raise ValueError("--preemption-mode swap needs a host KV tier (--kv-offloading-size)")
        return None
    host_bytes = int(args.kv_offloading_size * GIB)
    available = _available_host_bytes()
    if available is not None and host_bytes > available:
        raise ValueError(f"--kv-offloading-size {args.kv_offloading_size:g} GiB is more than the host memory "
                         f"available ({available / GIB:.1f} GiB)")  # fmt: skip
    from rtpjax.loading.loader import dma_mapper

    host = HostTier(host_bytes, layout.block_bytes, pin=dma_mapper(jax.devices()))
    disk = None
    if args.kv_disk_path:
        disk = DiskTier(args.kv_disk_path, int(args.kv_disk_size * GIB), layout.block_bytes, ident)
    log.info("KV tiers: host %.2f GiB (%d blocks%s)%s", host.capacity_bytes / GIB, host.num_slots,
             ", page-locked" if host.unpin else "",
             f", disk {disk.capacity_bytes / GIB:.2f} GiB ({disk.num_slots} blocks) in {disk.dir}" if disk else "")
    return KVTiers(layout, host, disk, args.preemption_mode)


def measure_costs(runner, tiers: KVTiers, repeats: int = 5) -> Costs:
    """Onload bandwidth (host rows -> cache) and the step's tokens per second, timed on the compiled executables
    (the writes go to an index past the cache and are dropped, so the cache keeps its contents). Each is the best of
    `repeats`: noise (another process freeing its memory, a first touch) only slows a run, and one slow measurement
    would otherwise turn every load into a recompute for the engine's life."""
    n = min(runner.copier.sizes[-1], tiers.host.num_slots)
    tiers.host.buf[:n] = 0
    packed = PackedBlocks(tiers.layout, [tiers.host.buf[i] for i in range(n)], page_locked=tiers.host.unpin is not None)
    past = [runner.copier.num_blocks] * n
    onload = []
    for _ in range(repeats):
        began = time.perf_counter()
        runner.cache = runner.copier.write_packed(runner.cache, past, packed)
        jax.block_until_ready(runner.cache)
        onload.append(time.perf_counter() - began)
    tokens = runner.token_buckets[-1]
    step = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(runner.run_step(*runner._batch([], tokens, runner._seqs_for(tokens))))
        step.append(time.perf_counter() - began)
    disk = measure_disk(tiers.disk, tiers.block_bytes) if tiers.disk is not None else None
    costs = Costs(n * tiers.block_bytes / min(onload), tokens / min(step), disk)
    log.info("KV tiers: onload %.2f GB/s, recompute %.0f tokens/s%s: loading a block pays when it takes less than "
             "recomputing its %d tokens", costs.onload_bytes_per_s / 1e9, costs.prefill_tokens_per_s,
             f", disk reads {disk / 1e9:.2f} GB/s" if disk else "", tiers.block_size)  # fmt: skip
    return costs


def measure_disk(disk: DiskTier, block_bytes: int, blocks: int = 16) -> float | None:
    """The disk tier's read rate (checksum included) over the newest blocks earlier runs left, so that the first loads
    after a restart already know whether reading beats recomputing (they otherwise go to the disk until reads have
    measured it); None on an empty disk tier (its reads measure it as they happen)."""
    row = np.empty(block_bytes, np.uint8)
    with disk.lock:
        newest = list(disk.index)[-blocks:]
    began = time.perf_counter()
    read = sum(disk.read_into(h, row) for h in reversed(newest))
    seconds = time.perf_counter() - began
    return read * block_bytes / max(seconds, 1e-9) if read else None

"""KV tiers below the device (rtpjax/kv/tiers): blocks evicted from a tiny device cache come back from host memory or
disk with exactly the tokens of a fresh prefill; the disk tier outlives a restart and is bound to the model; bad,
missing or corrupt blocks are recomputed, never loaded; bad configuration fails at start."""

import errno
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ENGINE_ARGS
from rtpjax import LLM, EngineArgs, SamplingParams
from rtpjax.kv import kv_cache
from rtpjax.disagg import relayout
from rtpjax.kv.block_copy import BlockCopier, gather, pack, unpack
from rtpjax.kv.host_blocks import KVLayout, PackedBlocks
from rtpjax.kv.tiers import build
from rtpjax.kv.tiers.disk import DiskTier
from rtpjax.kv.tiers.host import HostTier
from rtpjax.models.config import ModelConfig
from rtpjax.runner.model_runner import CompileCounter

LAYOUT = KVLayout("float32", 4, 2, 2, 8)


def _row(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, LAYOUT.block_bytes, dtype=np.uint8)


# -- pieces ------------------------------------------------------------------------------------------------------------


def test_host_tier_lru_and_leases():
    host = HostTier(3 * LAYOUT.block_bytes, LAYOUT.block_bytes)
    for i in range(3):
        assert host.put(bytes([i]) * 16, _row(i))
    slot = host.lease(b"\0" * 16)  # block 0 is now the most recently used, and leased
    assert host.put(b"\3" * 16, _row(3))  # evicts block 1, the least recently used
    assert b"\1" * 16 not in host and b"\0" * 16 in host
    assert host.put(b"\4" * 16, _row(4)) and b"\2" * 16 not in host
    assert host.put(b"\5" * 16, _row(5)) and b"\0" * 16 in host, "a leased row was reused"
    np.testing.assert_array_equal(host.buf[slot], _row(0))
    host.release(slot)
    assert host.put(b"\6" * 16, _row(6)) and b"\0" * 16 not in host


@pytest.mark.parametrize("dtype", ["float32", "int8", ("int8", "fp8", "fp8", "auto")])
def test_pack_round_trip(dtype):
    """Blocks leave as packed rows and come back bit for bit, host KVBlocks too; layers may differ in dtype (runs of
    layers of one dtype are packed one after another)."""
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=32, intermediate_size=64,
                      num_layers=2 if isinstance(dtype, str) else len(dtype), num_heads=4, num_kv_heads=2, head_dim=8,
                      rms_norm_eps=1e-5, rope_theta=1e4, dtype="float32")  # fmt: skip
    cache = kv_cache.allocate(cfg, 6, 4, kv_dtype=dtype)
    rng = np.random.default_rng(0)
    cache = [tuple(jnp.asarray(rng.normal(size=a.shape) * 50).astype(a.dtype) for a in layer) for layer in cache]
    layout = KVLayout.of([layer[0].dtype for layer in cache], 4, 2, 8)
    assert (layout.dtype == "mixed") == (not isinstance(dtype, str))
    want = gather(cache, np.array([4, 1]), copies=1)
    assert len(want) == len(layout.block_parts()) == (2 if dtype == "float32" else 4 if dtype == "int8" else 10)
    rows = pack(want)
    assert rows.shape == (2, layout.block_bytes) and rows.dtype == jnp.uint8
    for a, b in zip(unpack(rows, layout), want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    copier = BlockCopier(cache, layout, [1, 2])
    (real, packed), = copier.gather_packed(cache, [4, 1])  # fmt: skip
    host = np.asarray(packed)[:real]
    for a, b in zip(relayout.unpack(layout, host).arrays(), want, strict=True):  # the host's order is the device's
        np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_array_equal(relayout.pack(relayout.unpack(layout, host)), host)
    cache = copier.write_packed(cache, [0, 5], PackedBlocks(layout, list(host)))
    for a, b in zip(gather(cache, np.array([0, 5]), copies=1), want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kv = copier.gather(cache, [5, 0])  # host KVBlocks (request migration): in and out again, by another path
    cache = copier.write(cache, [2, 3], kv, [1, 0])
    for a, b in zip(gather(cache, np.array([2, 3]), copies=1), want, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="cannot enter a cache with"):  # a copier for another layout
        BlockCopier(cache, KVLayout("float16", 4, cfg.num_layers, 2, 8), [1])


def test_mixed_blocks_relayout_to_another_block_size():
    """A prefill engine's mixed-dtype blocks enter a decode engine of another block size position for position."""
    layout = KVLayout.of(["int8", "bfloat16", "bfloat16"], 4, 2, 8)
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, (3, layout.block_bytes), dtype=np.uint8)
    kv = relayout.unpack(layout, rows)
    target = KVLayout.of(["int8", "bfloat16", "bfloat16"], 8, 2, 8)
    out = relayout.relayout(kv, 10, target)
    assert out.layout == target and out.num_blocks == 2
    for a, b in zip(kv.arrays(), out.arrays(), strict=True):  # [layers, heads, blocks, size, ...] per part
        flat = lambda x: x.reshape(*x.shape[:2], -1, *x.shape[4:])  # noqa: E731
        np.testing.assert_array_equal(flat(a)[:, :, :10], flat(b)[:, :, :10])
        assert not flat(b)[:, :, 10:].view(np.uint8).any()
    with pytest.raises(ValueError, match="layer_dtypes"):
        relayout.relayout(kv, 10, KVLayout.of(["int8", "int8", "bfloat16"], 8, 2, 8))
    with pytest.raises(ValueError, match="bytes where 3 blocks"):
        type(kv)(kv.layout, 3, kv.keys[:-1], kv.values, kv.key_scales, kv.value_scales).arrays()


def test_disk_tier_checks_every_block(tmp_path, caplog):
    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})
    hashes = [bytes([i]) * 16 for i in range(4)]
    for i, h in enumerate(hashes):
        assert disk.write(h, _row(i))
    out = np.empty(LAYOUT.block_bytes, np.uint8)
    assert disk.read_into(hashes[0], out)
    np.testing.assert_array_equal(out, _row(0))
    data = bytearray(disk.path(hashes[1]).read_bytes())
    data[-7] ^= 1
    disk.path(hashes[1]).write_bytes(bytes(data))  # one bit flipped
    disk.path(hashes[2]).write_bytes(disk.path(hashes[2]).read_bytes()[:-5])  # truncated
    disk.path(hashes[3]).unlink()  # missing
    for h in hashes[1:]:
        assert not disk.read_into(h, out) and h not in disk and not disk.path(h).exists()
    assert disk.errors == 3 and "recomputed" in caplog.text
    again = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})  # a restart sees the good block
    assert list(again.index) == [hashes[0]]
    other = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "b"})  # another model sees nothing
    assert not other.index and other.dir != again.dir


@pytest.mark.parametrize("failing", ["replace", "writev"])
def test_disk_full_drops_the_block(tmp_path, monkeypatch, caplog, failing):
    """A write that fails (an error, or a short write: the disk filled up mid-file) drops the block, leaves no
    file, and the next write goes on."""
    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real = os.writev
    monkeypatch.setattr(os, failing, full if failing == "replace" else lambda fd, parts: real(fd, parts[:1]))
    assert not disk.write(b"\1" * 16, _row(1))
    assert disk.errors == 1 and b"\1" * 16 not in disk
    assert ("No space left" if failing == "replace" else "short write") in caplog.text
    assert not list(tmp_path.rglob("*.tmp*")), "a failed write left a partial file"
    monkeypatch.undo()
    assert disk.write(b"\2" * 16, _row(2)) and b"\2" * 16 in disk


def test_disk_writes_go_on_after_the_folders_are_emptied(tmp_path):
    """A cleaner that removes the tier's subfolders between writes costs nothing: the next write makes them again."""
    import shutil

    disk = DiskTier(str(tmp_path), 1 << 20, LAYOUT.block_bytes, {"model": "a"})
    first, h = b"\4" * 16, b"\4" + b"\5" * 15  # one subfolder
    assert disk.write(first, _row(4)) and disk.path(h).parent == disk.path(first).parent
    shutil.rmtree(disk.path(first).parent)
    assert disk.write(h, _row(3)) and disk.errors == 0
    out = np.empty(LAYOUT.block_bytes, np.uint8)
    assert disk.read_into(h, out) and np.array_equal(out, _row(3))


def test_disk_tier_capacity_evicts_oldest(tmp_path):
    disk = DiskTier(str(tmp_path), 2 * (LAYOUT.block_bytes + 36), LAYOUT.block_bytes, {"model": "a"})
    for i in range(3):
        disk.write(bytes([i]) * 16, _row(i))
    assert list(disk.index) == [b"\1" * 16, b"\2" * 16] and not disk.path(b"\0" * 16).exists()


def test_bad_configuration_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="--kv-disk-path .* is not writable"):
        DiskTier(str(blocker / "sub"), 1 << 20, LAYOUT.block_bytes, {})
    with pytest.raises(ValueError, match="--kv-disk-size 1048576.00 GiB is larger than the free space"):
        DiskTier(str(tmp_path), 1 << 50, LAYOUT.block_bytes, {})
    with pytest.raises(ValueError, match="--kv-offloading-size 1e\\+06 GiB is more than the host memory"):
        build.make_tiers(EngineArgs(kv_offloading_size=1e6), LAYOUT, {})
    with pytest.raises(ValueError, match="--kv-disk-path needs --kv-offloading-size"):
        build.make_tiers(EngineArgs(kv_disk_path=str(tmp_path), kv_disk_size=1), LAYOUT, {})
    with pytest.raises(ValueError, match="--kv-disk-path and --kv-disk-size go together"):
        EngineArgs(kv_disk_path=str(tmp_path))
    with pytest.raises(ValueError, match="--kv-offloading-size must be a number > 0 or None"):
        EngineArgs(kv_offloading_size=0)


def test_identity_tells_models_and_block_sizes_apart(stories_dir, tiny_checkpoints):
    args = EngineArgs()
    base = build.identity(str(stories_dir), str(stories_dir), LAYOUT, args)
    assert base == build.identity(str(stories_dir), str(stories_dir), LAYOUT, args)
    other_model = build.identity(str(tiny_checkpoints["llama3"]), str(stories_dir), LAYOUT, args)
    other_blocks = build.identity(str(stories_dir), str(stories_dir), KVLayout("float32", 8, 2, 2, 8), args)
    other_dtype = build.identity(str(stories_dir), str(stories_dir), LAYOUT, EngineArgs(dtype="bfloat16"))
    layer_map = build.identity(str(stories_dir), str(stories_dir), KVLayout.of(["int8", "float32"], 4, 2, 8), args)
    other_map = build.identity(str(stories_dir), str(stories_dir), KVLayout.of(["float32", "int8"], 4, 2, 8), args)
    assert len({str(i) for i in (base, other_model, other_blocks, other_dtype, layer_map, other_map)}) == 6


# -- the engine --------------------------------------------------------------------------------------------------------

# 12 device blocks; 10 prompts of 5 blocks (4 shareable each) are a working set 4x the device cache.
TIER_ARGS = dict(ENGINE_ARGS, max_model_len=192, num_gpu_blocks=12, kv_offloading_size=0.01, kv_disk_size=0.05, preemption_mode="swap")
PROMPTS = [[int(t) for t in np.random.default_rng(100 + i).integers(3, 512, 70)] for i in range(10)]
SHAREABLE = 4 * 16 * len(PROMPTS)  # prompt tokens in full blocks that are not the last token's
GREEDY = SamplingParams(max_tokens=6, temperature=0)
SEEDED = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.9, seed=7)


def tokens(llm, params):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def reference(stories_llm):
    """Fresh prefills: an engine that has never seen these prompts, with nothing below its device cache."""
    return {p.seed: tokens(stories_llm, p) for p in (GREEDY, SEEDED)}


@pytest.fixture(scope="module")
def disk_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kv_disk"))


def tier_llm(stories_dir, compile_cache, disk_path):
    return LLM(str(stories_dir), compilation_cache_dir=compile_cache, kv_disk_path=disk_path, **TIER_ARGS)


def tier_stats(llm):
    return {t.tier: t for t in llm.engine.stats().kv_tiers}


@pytest.fixture(scope="module")
def first_run(stories_dir, compile_cache, disk_path, reference):
    """An engine whose device cache holds a quarter of the working set, run over it twice."""
    llm = tier_llm(stories_dir, compile_cache, disk_path)
    compiles = CompileCounter.count
    runs = [tokens(llm, GREEDY)]
    before, computed = tier_stats(llm)["host"], llm.engine.stats().total_tokens
    runs += [tokens(llm, GREEDY), tokens(llm, SEEDED)]
    yield llm, runs, before, CompileCounter.count - compiles, llm.engine.stats().total_tokens - computed
    llm.engine.close()  # the device's blocks go down to disk too


def test_host_tier_serves_a_working_set_4x_the_device(first_run, reference):
    llm, runs, before, compiles, computed = first_run
    assert runs == [reference[None], reference[None], reference[7]]
    host = tier_stats(llm)["host"]
    # Every shareable token came from a cache: the model ran only each prompt's last partial block and its decode
    # inputs. Most came from the host tier; a prompt whose blocks were still on the device is admitted while the
    # others' blocks move up, so it takes them from there.
    tails = sum(len(p) % 16 + len(t) - 1 for run in runs[1:] for p, t in zip(PROMPTS, run))
    assert computed == tails, f"{computed - tails} shareable tokens were recomputed"
    assert host.hits - before.hits >= SHAREABLE and host.queries - before.queries == host.hits - before.hits, \
        "a repeated prefix missed the host tier"  # fmt: skip
    assert host.bytes_written > 0 and host.errors == 0
    assert compiles == 0, "KV tiers compiled something after warm-up"
    e = llm.engine
    assert e.tiers.flush()  # blocks queued for the disk hold their host rows until written
    assert e.pool.num_free == e.pool.num_blocks and not any(e.tiers.host.leases), "a block or host row leaked"


def test_restart_hits_the_disk_tier_and_recomputes_bad_files(first_run, stories_dir, compile_cache, disk_path,
                                                           reference, caplog):  # fmt: skip
    llm, *_ = first_run
    llm.engine.close()
    assert not llm.engine.tiers._writer.is_alive(), "close left the tiers' writer thread running"
    files = sorted(llm.engine.tiers.disk.dir.glob("*/*.kv"))
    assert len(files) >= 4 * len(PROMPTS)
    again = tier_llm(stories_dir, compile_cache, disk_path)
    assert tokens(again, GREEDY) == reference[None]
    # a block read from disk for a try that did not admit is loaded from host memory on the next: a host hit
    below = lambda llm: sum(t.hits for t in tier_stats(llm).values())  # noqa: E731
    disk = tier_stats(again)["disk"]
    assert disk.hits > 0 and below(again) == SHAREABLE and disk.errors == 0, "a restart did not find its blocks on disk"
    again.engine.close()
    del again

    def block_file(prompt: int, block: int):
        from rtpjax.kv.block_pool import prefix_hashes

        h = prefix_hashes(PROMPTS[prompt], 16)[block]
        return llm.engine.tiers.disk.path(h)

    bad = [block_file(0, 1), block_file(1, 0), block_file(2, 2)]
    data = bytearray(bad[0].read_bytes())
    data[100] ^= 0x40
    bad[0].write_bytes(bytes(data))
    bad[1].write_bytes(bad[1].read_bytes()[:50])
    bad[2].unlink()
    third = tier_llm(stories_dir, compile_cache, disk_path)
    assert tokens(third, GREEDY) == reference[None]
    disk = tier_stats(third)["disk"]
    assert disk.errors == 2 and "recomputed" in caplog.text  # the deleted file is simply absent
    # prompt 0 loads block 0 only, prompt 1 nothing, prompt 2 blocks 0-1: every other prefix whole
    assert below(third) == SHAREABLE - (3 + 4 + 2) * 16
    third.engine.close()


def test_tier_metrics_on_prometheus(first_run):
    import msgspec

    from rtpjax.serve.metrics import Metrics

    llm, *_ = first_run
    m = Metrics("stories")
    text = m.render(msgspec.structs.asdict(llm.engine.stats())).decode()
    host = tier_stats(llm)["host"]
    assert f'rtpjax:kv_tier_hits_total{{model_name="stories",tier="host"}} {float(host.hits)}' in text
    assert 'rtpjax:kv_tier_capacity_bytes{model_name="stories",tier="disk"}' in text
    report = llm.engine.tiers.report()
    assert "KV tiers: host" in report and " downloads (mean/max ms) waiting " in report
    loop = llm.engine.loop_stats  # (an LLM's engine never hands its loop stats to a report)
    assert 0 < loop.tiers_s < loop.prepare_s and "on KV tiers' copies down" in loop.report(1.0)


def test_tensor_parallel_offloads_and_loads(stories_dir, compile_cache, reference):
    """KV heads sharded over 2 devices: blocks go down whole and come back into each device's heads."""
    args = {k: v for k, v in TIER_ARGS.items() if k != "kv_disk_size"}
    llm = LLM(str(stories_dir), compilation_cache_dir=compile_cache, tensor_parallel_size=2, warmup=False, **args)
    assert len(llm.engine.runner.cache[0][0].sharding.device_set) == 2
    first = tokens(llm, GREEDY)
    before, computed = tier_stats(llm)["host"], llm.engine.stats().total_tokens
    assert [first, tokens(llm, GREEDY)] == [reference[None]] * 2
    host = tier_stats(llm)["host"]
    tails = sum(len(p) % 16 + len(t) - 1 for p, t in zip(PROMPTS, first))
    assert llm.engine.stats().total_tokens - computed == tails, "shareable tokens were recomputed"
    assert host.hits - before.hits >= SHAREABLE // 2, "a repeated prefix missed the host tier"
    e = llm.engine
    assert e.tiers.flush()  # blocks queued for the disk hold their host rows until written
    assert e.pool.num_free == e.pool.num_blocks and not any(e.tiers.host.leases)


def test_per_layer_kv_dtypes_go_down_and_come_back(stories_dir, compile_cache):
    """Layers of int8, the model's dtype and fp8 (--kv-cache-dtypes): their blocks go down and come back with the
    tokens of the fresh prefills (the first pass: distinct prompts, nothing below yet)."""
    args = {k: v for k, v in TIER_ARGS.items() if k != "kv_disk_size"}
    llm = LLM(str(stories_dir), compilation_cache_dir=compile_cache, kv_cache_dtypes="0:int8,1-2:auto,3-4:fp8",
              warmup=False, **args)  # fmt: skip
    e = llm.engine
    assert e.runner.kv_layout.layer_dtypes == ("int8", "float32", "float32", "float8_e4m3fn", "float8_e4m3fn")
    first = tokens(llm, GREEDY)
    assert tier_stats(llm)["host"].hits == 0
    computed = e.stats().total_tokens
    assert tokens(llm, GREEDY) == first
    tails = sum(len(p) % 16 + len(t) - 1 for p, t in zip(PROMPTS, first))
    assert e.stats().total_tokens - computed == tails, "shareable tokens were recomputed"
    assert tier_stats(llm)["host"].hits >= SHAREABLE // 2, "a repeated prefix missed the host tier"
    assert e.tiers.flush() and e.pool.num_free == e.pool.num_blocks and not any(e.tiers.host.leases)


# -- the benchmark -----------------------------------------------------------------------------------------------------


def test_tiers_bench_runs_tiny(tmp_path):
    import json

    from rtpjax.benchmarks import tiers_bench

    out = tmp_path / "tiers_bw.json"
    result = tiers_bench.main(["--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--dtype", "float32", "--blocks",
                               "8", "--dir", str(tmp_path), "--out", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == result
    assert result["block_bytes"] == KVLayout("float32", 16, 2, 2, 8).block_bytes and result["layout"] in ("packed", "strided")
    for key in ("h2d_pinned_GBps", "onload_packed_GBps", "onload_rows_GBps", "offload_tier_GBps", "offload_pinned_GBps",
                "offload_pageable_GBps", "onload_strided_GBps", "disk_dd_GBps", "disk_tier_GBps"):  # fmt: skip
        assert result[key] > 0, key
    assert result["onload_staged_rows_exact"] is True
    assert result["onload_staged_64_during_steps_GBps"] > 0 and result["steps_during_onload"] > 0  # the device was busy

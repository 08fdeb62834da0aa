"""The file-order loader against a plain safetensors read: bit-identical, sharded per device, and clear when corrupt."""

import dataclasses
import json
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rtpjax.loading import loader
from rtpjax.cli import main as cli
from rtpjax.loading.orbax_checkpoint import is_converted
from rtpjax.loading.loader import CheckpointError, FileOrderReader, LoadOptions, plan_reads
from rtpjax.loading.model_source import load_model
from rtpjax.models import decoder, load_config
from rtpjax.parallel.sharding import make_mesh

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Small batches, odd chunks and two buffers: many batches, each read in several pieces, buffers reused many times.
TIGHT = LoadOptions(threads=3, batch_bytes=20_000, read_chunk=4096 * 3, buffers=2)


def resave(src, dst, dtype: str, shards: int):
    """`src`'s tensors cast to `dtype`, dealt round-robin over `shards` files (so one file's tensors are not neighbours)."""
    tensors = load_file(src / "model.safetensors")
    tensors = {k: v.astype(NP_DTYPES[dtype]) for k, v in tensors.items()}
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    hf = json.loads((dst / "config.json").read_text())
    hf["torch_dtype"] = hf["dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(hf))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, dst / "model.safetensors")
        return dst
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in names[i::shards]}, dst / fname)
        weight_map |= {n: fname for n in names[i::shards]}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def plain_read(folder, dtype: str) -> dict[str, np.ndarray]:
    """What the parameters must be: safetensors' own reader, experts stacked, cast on the host."""
    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors |= load_file(f)
    cfg, family = load_config(folder)
    out = {}
    for path, source in family.weight_names(cfg).items():
        parts = [tensors[n] for n in source.names]
        array = np.stack(parts) if len(parts) > 1 else parts[0]
        out[path] = array.astype(NP_DTYPES[dtype])
    return out


def assert_bit_identical(params, expected):
    flat = decoder.flatten(params)
    assert set(flat) == set(expected)
    for path, want in expected.items():
        got = np.asarray(flat[path])
        assert got.dtype == want.dtype and got.shape == want.shape, path
        assert got.tobytes() == want.tobytes(), path


@pytest.mark.parametrize(
    "name,stored,shards,target",
    [
        ("llama3", "float32", 1, "float32"),
        ("qwen2", "bfloat16", 3, "bfloat16"),  # biases, sharded index
        ("qwen3_moe", "float16", 2, "float16"),  # stacked experts
        ("llama_tied", "float32", 2, "bfloat16"),  # cast on the device
    ],
)
def test_bit_identical_to_plain_read(tmp_path, tiny_checkpoints, name, stored, shards, target):
    folder = resave(tiny_checkpoints[name], tmp_path / name, stored, shards)
    cfg, family = load_config(folder)
    cfg = cfg.with_dtype(target)
    expected = plain_read(folder, target)
    assert_bit_identical(loader.load_params(folder, cfg, family, options=TIGHT), expected)
    assert_bit_identical(loader.load_params(folder, cfg, family, options=LoadOptions(direct_io=True)), expected)
    assert_bit_identical(loader.load_params(folder, cfg, family), expected)


def test_finishing_executables_are_compiled_ahead(tmp_path, tiny_checkpoints, caplog):
    """Joins of row pieces, casts and quantizers are compiled while the reads run, under the keys finishing uses."""
    import logging

    folder = resave(tiny_checkpoints["llama3"], tmp_path / "l", "float32", 2)
    cfg, family = load_config(folder)
    cfg = cfg.with_dtype("bfloat16")
    with caplog.at_level(logging.DEBUG, logger="rtpjax"):
        params = loader.load_params(folder, cfg, family, make_mesh(tensor=4, data=2), options=TIGHT,
                                    quantization="int8")  # fmt: skip
    line = next(r.getMessage() for r in caplog.records if "compiled ahead" in r.getMessage())
    ahead, runs = map(int, re.search(r"(\d+) of (\d+) executables compiled ahead", line).groups())
    assert runs > 8 and ahead == runs, line
    assert decoder.flatten(params)["layers.0.attn.wq.q"].dtype == np.int8


def test_parameters_wait_for_a_slow_join_compile(tmp_path, tiny_checkpoints, caplog, monkeypatch):
    """A large tensor whose join is still compiling when its last piece lands is finished after the reads, intact."""
    import logging
    import time
    from concurrent.futures import ThreadPoolExecutor

    folder = resave(tiny_checkpoints["qwen2"], tmp_path / "q", "bfloat16", 1)
    cfg, family = load_config(folder)
    slow = ThreadPoolExecutor(1)
    monkeypatch.setattr(loader, "_ahead", {})
    monkeypatch.setattr(loader, "_ahead_pool", type("Slow", (), {"submit": lambda self, fn: slow.submit(
        lambda: (time.sleep(0.3), fn())[1])})())  # fmt: skip
    with caplog.at_level(logging.DEBUG, logger="rtpjax"):
        params = loader.load_params(folder, cfg, family, options=TIGHT)
    line = next(r.getMessage() for r in caplog.records if "compiled ahead" in r.getMessage())
    assert int(re.search(r"(\d+) parameters finished later", line).group(1)) >= 1, line
    assert_bit_identical(params, plain_read(folder, "bfloat16"))


def test_buffers_are_page_locked_once_and_released(tmp_path, tiny_checkpoints, monkeypatch):
    """On GPUs each reusable buffer is DMA-mapped once, before its data is sent, and unmapped at the end (CPU: a fake)."""
    assert loader.dma_mapper(jax.devices()) is None  # the CPU backend has no DMA mapping: the plain path
    folder = resave(tiny_checkpoints["qwen2"], tmp_path / "q", "bfloat16", 3)
    pinned, unpinned = [], []

    def fake_mapper(devices):
        def pin(buf):
            assert buf.ctypes.data % 4096 == 0 and buf.nbytes % 4096 == 0
            assert buf[:64].any()  # after its first fill (its pages are faulted in by the reading threads)
            pinned.append(buf.ctypes.data)
            return lambda: unpinned.append(buf.ctypes.data)

        return pin

    monkeypatch.setattr(loader, "dma_mapper", fake_mapper)
    cfg, family = load_config(folder)
    opts = LoadOptions(batch_bytes=20_000, read_chunk=12 << 10, buffers=3)
    params = loader.load_params(folder, cfg, family, options=opts)
    assert_bit_identical(params, plain_read(folder, "bfloat16"))
    assert len(pinned) == len(set(pinned)) == 3 and sorted(unpinned) == sorted(pinned)
    pinned.clear(), unpinned.clear()
    loader.load_params(folder, cfg, family, options=dataclasses.replace(opts, pinned=False))
    assert pinned == unpinned == []

    def failing_mapper(devices):
        def pin(buf):
            if pinned:
                raise OSError("cannot lock memory")
            pinned.append(buf.ctypes.data)
            return lambda: unpinned.append(buf.ctypes.data)

        return pin

    monkeypatch.setattr(loader, "dma_mapper", failing_mapper)  # fails on the second buffer: raised, not hung
    with pytest.raises(OSError, match="cannot lock memory"):
        loader.load_params(folder, cfg, family, options=opts)
    assert unpinned == pinned and len(pinned) == 1


def test_plan_follows_file_order(tmp_path, tiny_checkpoints):
    folder = resave(tiny_checkpoints["qwen3"], tmp_path / "q", "bfloat16", 3)
    ckpt = loader.Checkpoint(folder)
    batches = plan_reads(ckpt, ckpt.names(), batch_bytes=30_000)
    keys = [(str(t.path), t.start) for b in batches for t in b.tensors]
    assert keys == sorted(keys)
    cut = set()
    for name in ckpt.names():  # every tensor read exactly once, large ones as consecutive row pieces
        pieces = [t for b in batches for t in b.tensors if t.name == name]
        info = ckpt.headers[ckpt.where[name]][name]
        assert pieces[0].start == info["data_start"] and pieces[0].first_row == 0
        assert sum(t.nbytes for t in pieces) == info["data_offsets"][1] - info["data_offsets"][0]
        assert [t.first_row for t in pieces[1:]] == [t.first_row + t.shape[0] for t in pieces[:-1]]
        cut |= {name} if len(pieces) > 1 else set()
    assert "model.embed_tokens.weight" in cut  # larger than a batch
    for b in batches:
        assert len({t.path for t in b.tensors}) == 1
        assert b.end - b.start <= 30_000  # buffers never grow past a batch
        assert all(t.start + t.nbytes == u.start for t, u in zip(b.tensors, b.tensors[1:]))  # contiguous


@pytest.mark.parametrize("name,axes", [("llama3", dict(tensor=4, data=2)), ("qwen3_moe", dict(expert=4, tensor=2))])
def test_each_device_receives_only_its_shard(tmp_path, tiny_checkpoints, monkeypatch, name, axes):
    folder = resave(tiny_checkpoints[name], tmp_path / name, "bfloat16", 2)
    sent: dict = {}
    real_put = jax.device_put

    def counting_put(xs, devices, *args, **kwargs):
        for x, device in zip(xs, devices):
            sent[device] = sent.get(device, 0) + np.asarray(x).nbytes
        return real_put(xs, devices, *args, **kwargs)

    monkeypatch.setattr(loader.jax, "device_put", counting_put)
    mesh = make_mesh(**axes)
    cfg, family = load_config(folder)
    params = loader.load_params(folder, cfg, family, mesh, options=TIGHT)  # large tensors arrive in row pieces
    monkeypatch.undo()
    assert_bit_identical(params, plain_read(folder, cfg.dtype))
    held: dict = {}
    for leaf in jax.tree.leaves(params):
        assert len(leaf.addressable_shards) == 8
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    full = sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    assert sent == held  # exactly the bytes each device keeps: no full replica travels
    assert max(held.values()) < full / 2
    wq = decoder.flatten(params)["layers.0.attn.wq"]
    assert {s.data.shape for s in wq.addressable_shards} == {(wq.shape[0] // mesh.shape["tensor"], wq.shape[1])}


def test_corrupt_inputs_name_file_and_tensor(tmp_path, tiny_checkpoints):
    src = tiny_checkpoints["llama3"]
    # Unsupported dtype: rewrite one tensor's dtype in the header.
    bad = tmp_path / "dtype"
    shutil.copytree(src, bad)
    data = (bad / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "F4"
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    (bad / "model.safetensors").write_bytes(data[:8] + raw + data[8 + n :])
    with pytest.raises(CheckpointError, match=r"dtype/model.safetensors: tensor 'model.norm.weight' has unsupported"):
        load_model(bad)
    # Truncated: found from the header before any read.
    cut = tmp_path / "cut"
    shutil.copytree(src, cut)
    (cut / "model.safetensors").write_bytes(data[:-64])
    with pytest.raises(CheckpointError, match=r"cut/model.safetensors: truncated: tensor '.*' ends at byte"):
        load_model(cut)


def test_file_shrinking_under_the_reader_is_named(tmp_path, tiny_checkpoints):
    folder = resave(tiny_checkpoints["llama3"], tmp_path / "shrink", "float32", 1)
    ckpt = loader.Checkpoint(folder)
    batches = plan_reads(ckpt, ckpt.names(), batch_bytes=1 << 30)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: batches[0].end - 1000])  # cut after the plan was made
    reader = FileOrderReader(batches, TIGHT)
    with pytest.raises(CheckpointError, match=r"shrink/model.safetensors: truncated: read \d+ of \d+ bytes"):
        for _ in reader:
            pass
    reader.close()


def test_convert_restores_the_same_params_into_the_mesh(tmp_path, tiny_checkpoints, capsys):
    src = resave(tiny_checkpoints["qwen3_moe"], tmp_path / "src", "float32", 2)
    out = tmp_path / "converted"
    assert cli(["convert", str(src), str(out), "--dtype", "bfloat16"]) == 0
    assert is_converted(out) and not list(out.glob("*.safetensors"))
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file() is (src / "tokenizer.json").is_file()
    cfg, _, params = load_model(out)
    assert cfg.dtype == "bfloat16"
    assert_bit_identical(params, plain_read(src, "bfloat16"))
    mesh = make_mesh(expert=4, tensor=2)
    _, _, sharded = load_model(out, mesh=mesh)
    assert_bit_identical(sharded, plain_read(src, "bfloat16"))
    w = decoder.flatten(sharded)["layers.0.moe.w_gate"]
    assert {s.data.shape for s in w.addressable_shards} == {(w.shape[0] // 4, w.shape[1] // 2, w.shape[2])}
    # A second convert into the same folder refuses instead of mixing two checkpoints.
    assert cli(["convert", str(src), str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    # A converted folder whose config no longer matches its params fails naming the folder.
    hf = json.loads((out / "config.json").read_text())
    hf["hidden_size"] *= 2
    (out / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="converted checkpoint does not match its config.json"):
        load_model(out)


def test_dummy_weights_are_made_on_the_devices_in_their_sharding(tiny_checkpoints):
    from rtpjax.runner.model_runner import CompileCounter

    CompileCounter.install()
    mesh = make_mesh(tensor=4, data=2)
    before = CompileCounter.count
    cfg, _, params = load_model(tiny_checkpoints["llama3"], mesh=mesh, load_format="dummy")
    flat = decoder.flatten(params)
    shapes = decoder.param_shapes(cfg)
    assert {p: tuple(a.shape) for p, a in flat.items()} == shapes
    # one compiled maker per distinct (shape, sharding, kind), plus a few key-handling ops; not one per parameter
    distinct = {(shapes[p], a.sharding, p.endswith("norm")) for p, a in flat.items()}
    assert CompileCounter.count - before <= len(distinct) + 4 < len(flat)
    assert all(np.all(np.asarray(a) == 1) for p, a in flat.items() if p.endswith("norm"))
    wq = np.asarray(flat["layers.0.attn.wq"]).astype(np.float32)
    assert 0.015 < wq.std() < 0.025 and not np.array_equal(wq, np.asarray(flat["layers.1.attn.wq"]))
    assert {s.data.shape for s in flat["layers.0.attn.wq"].addressable_shards} == {(wq.shape[0] // 4, wq.shape[1])}
    again = decoder.flatten(load_model(tiny_checkpoints["llama3"], load_format="dummy")[2])
    assert np.array_equal(np.asarray(again["layers.0.attn.wq"]), np.asarray(flat["layers.0.attn.wq"]))  # seeded
    with pytest.raises(ValueError, match="load_format 'fake': choose one of auto, dummy"):
        load_model(tiny_checkpoints["llama3"], load_format="fake")

"""The memory plan: defaults fitted to the memory a process may take, explicit sizes that cannot fit refused with the
numbers, and what bounds the memory read from the kernel and the process's limits. (A default start of the default
model under an 8 GB limit: tests/test_readme.py, which serves it.)"""

import json
import resource
import subprocess
import sys

import pytest

from rtpjax.memory_plan import GB, Memory, MemoryPlanError, host_memory, plan
from rtpjax.options import EngineArgs

# SmolLM2-135M-Instruct's shape (the embedded default model).
SMOLLM2 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
               intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
               torch_dtype="float32")  # fmt: skip


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    from rtpjax.models import load_config

    folder = tmp_path_factory.mktemp("smollm2")
    (folder / "config.json").write_text(json.dumps(SMOLLM2))
    return load_config(folder)[0]


def test_defaults_fit_a_share_of_the_memory_and_say_what_they_chose(cfg):
    for available in (3, 8, 24):
        p = plan(cfg, EngineArgs(), Memory(int(available * GB), "test"))
        a = p.args
        assert p.footprint.total <= available * GB
        assert p.footprint.kv_cache <= 0.5 * (available * GB - (p.footprint.total - p.footprint.kv_cache)) + 1
        assert p.num_blocks * a.block_size >= a.max_model_len  # one whole sequence fits
        assert (a.max_num_seqs, a.max_num_batched_tokens) == (16, 256)
        assert set(p.chosen) == {"max_model_len", "max_num_seqs", "max_num_batched_tokens", "KV cache"}
        assert "memory plan:" in p.summary() and "available (test)" in p.summary()
    assert plan(cfg, EngineArgs(), Memory(int(24 * GB), "test")).args.max_model_len == 8192
    assert plan(cfg, EngineArgs(), Memory(int(3 * GB), "test")).args.max_model_len < 8192  # halved to fit
    # Plenty of memory: the cache holds max_num_seqs whole sequences, no more.
    big = plan(cfg, EngineArgs(), Memory(int(500 * GB), "test"))
    assert big.num_blocks == 16 * 8192 // 16


def test_kv_budget_does_not_drift_with_available_memory(cfg):
    """The cache's shape is in every compiled step: a start with a little more or less free memory must reuse them."""
    blocks = {plan(cfg, EngineArgs(), Memory(int((8 + d) * GB), "test")).num_blocks for d in (0, 0.05, 0.1, 0.2)}
    assert len(blocks) == 1


def test_explicit_sizes_that_cannot_fit_fail_with_the_numbers_and_the_flag(cfg):
    with pytest.raises(MemoryPlanError, match=r"not enough memory: .* needed, 3\.00 GB available \(test\); lower "
                                              r"--max-model-len or --cpu-kv-cache-bytes"):  # fmt: skip
        plan(cfg, EngineArgs(max_model_len=8192, cpu_kv_cache_bytes=10 << 30), Memory(int(3 * GB), "test"))
    with pytest.raises(MemoryPlanError, match="holds 48 tokens, less than one sequence of --max-model-len 8192"):
        plan(cfg, EngineArgs(max_model_len=8192, num_gpu_blocks=3), Memory(int(24 * GB), "test"))
    with pytest.raises(MemoryPlanError, match="the model alone does not fit; try --quantization int8"):
        plan(cfg, EngineArgs(), Memory(int(1.5 * GB), "test"))
    # An explicit size may go past the defaults' share, up to all that is available.
    p = plan(cfg, EngineArgs(max_model_len=8192, max_num_seqs=64), Memory(int(3.5 * GB), "test"))
    assert p.args.max_model_len == 8192 and p.footprint.total <= 3.5 * GB


def test_device_plan_shrinks_a_default_length_to_the_cache_and_refuses_an_explicit_one(cfg):
    device = Memory(int(80 * GB), "device memory", device=True)
    p = plan(cfg, EngineArgs(), device)
    assert (p.args.max_num_seqs, p.args.max_num_batched_tokens, p.num_blocks) == (256, 2048, None)
    assert p.with_blocks(100).args.max_model_len == 1600
    with pytest.raises(MemoryPlanError, match="--max-model-len 8192 does not fit: the KV cache holds 1600 tokens"):
        plan(cfg, EngineArgs(max_model_len=8192), device).with_blocks(100)


def test_host_memory_is_bounded_by_rlimits():
    assert 0 < host_memory().available
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, resource.RLIM_INFINITY)); "
            "from rtpjax.memory_plan import host_memory; m = host_memory(); print(m.source, m.available)")  # fmt: skip
    source, available = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       timeout=120, check=True).stdout.split()  # fmt: skip
    assert source == "RLIMIT_AS" and 0 < int(available) < 6 << 30
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY  # the child's limit stayed there


def test_a_device_cache_leaves_room_for_the_kv_tiers_staging(cfg, monkeypatch):
    """Fetched blocks are staged on the device before admission, at least one longest sequence of them, whole on every
    device, those taken stay there until the step that writes them, and evicted blocks wait there for their download:
    the device's KV cache leaves room for three."""
    import jax

    from rtpjax.kv import kv_cache
    from rtpjax.memory_plan import device_kv_blocks

    class Device:
        def memory_stats(self):
            return {"bytes_limit": 80 * GB, "bytes_in_use": 16 * GB}

    monkeypatch.setattr(jax, "local_devices", lambda: [Device()])
    per_block = kv_cache.bytes_per_block(cfg, 16, "auto")
    plain = device_kv_blocks(cfg, EngineArgs(max_model_len=8192, block_size=16))
    tiered = device_kv_blocks(cfg, EngineArgs(max_model_len=8192, block_size=16, kv_offloading_size=4))
    staging_blocks = 3 * 8192 // 16
    assert plain - tiered == staging_blocks
    # a context whose staging and cache do not both fit shares the memory between them, never down to one block
    huge = device_kv_blocks(cfg, EngineArgs(max_model_len=1 << 30, block_size=16, kv_offloading_size=4))
    assert huge == plain // 4


def test_kv_tiers_stage_into_what_the_cache_leaves(monkeypatch):
    """Staging takes what --gpu-memory-utilization leaves after the weights and the cache, less two sequences (rows
    taken, rows gathered), at least one sequence and at most the cache's size; a CPU (no statistics) one sequence."""
    import jax

    from rtpjax.memory_plan import staging_blocks

    in_use = {"now": 0}

    class Device:
        def memory_stats(self):
            return {"bytes_limit": 100 << 30, "bytes_in_use": in_use["now"]}

    monkeypatch.setattr(jax, "local_devices", lambda: [Device()])
    args, block = EngineArgs(gpu_memory_utilization=0.9), 2 << 20
    in_use["now"] = 50 << 30  # a capped cache: 40 GiB left under 90 GiB, 20,480 blocks
    assert staging_blocks(args, block, 512, 100_000) == 20480 - 2 * 512
    assert staging_blocks(args, block, 512, 100_000, landing=192) == 20480 - 2 * 512 - 192  # landing arrays' room
    assert staging_blocks(args, block, 512, 2048) == 2048  # never more than the cache holds
    in_use["now"] = 90 << 30  # a cache that took its share: the plan's one sequence
    assert staging_blocks(args, block, 512, 100_000) == 512

    class Cpu:
        def memory_stats(self):
            return None

    monkeypatch.setattr(jax, "local_devices", lambda: [Cpu()])
    assert staging_blocks(args, block, 512, 100_000) == 512

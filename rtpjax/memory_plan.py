"""What an engine's memory goes to, and the sizes that fit: the defaults picked from the machine.

On a GPU the KV cache fills what --gpu-memory-utilization leaves after the weights, sized after loading from the
device's own statistics (`device_kv_blocks`). A CPU has no such statistics, and running out there kills the process
minutes in, so the plan is made before loading: from the memory this process may still take (the least of
MemAvailable, the cgroup's memory.max and RLIMIT_AS / RLIMIT_DATA), of which defaults take at most `CPU_SHARE` so the
rest of the machine stays usable, and from the model's size. Every consumer is counted: weights, KV cache, the
sampler's per-slot state, a step's activations and logits (or prompt scoring's scratch cache, whichever is larger) and
the runtime (interpreter, JAX/XLA, the compiler at warm-up). An explicit size that cannot fit fails here, before
anything loads, with the numbers and the flag to change.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
from pathlib import Path

import numpy as np

from rtpjax.options import EngineArgs, flag
from rtpjax.sampling_params import MAX_LOGPROBS

GB = 1e9
# Of the memory a CPU process may still take, what the defaults plan to use: the rest stays with the machine.
CPU_SHARE = 0.5
# The interpreter with JAX, XLA and the tokenizer's libraries loaded, plus the compiler's working memory at warm-up
# (one compile per thread, see ModelRunner.warmup). Calibrated on SmolLM2-135M's peak resident size
# (tests/test_memory_plan.py checks that a default start stays under the plan).
CPU_RUNTIME_BYTES = 1 << 30
CPU_COMPILE_BYTES_PER_THREAD = 512 << 20
# Logits-sized float32 arrays a sampling step holds at once (scaled logits, sorted values and ids, their cumulative
# sum, noise, probabilities).
SAMPLER_COPIES = 6
# A default max_model_len is halved until one sequence of it fits, down to this.
MIN_MODEL_LEN = 256
# A GPU's KV budget in whole steps: the same budget on the next start gives the same cache shape, which every
# compiled step's signature includes, so the persistent compilation cache still answers (a few stray bytes would change
# the block count and recompile everything). On a CPU, the least KV budget worth planning.
BUDGET_STEP = 256 << 20


class MemoryPlanError(ValueError):
    """Options that cannot fit in memory: the numbers, and the flag to change."""


@dataclasses.dataclass(frozen=True)
class Memory:
    """What the engine may take: bytes, what bounds them, and whether they are a device's (GPU) or the host's."""

    available: int
    source: str
    device: bool = False


def host_memory() -> Memory:
    """The host memory this process may still take: the least of what the kernel, its cgroup and its rlimits allow."""
    bounds = [(_meminfo("MemAvailable"), "MemAvailable")]
    cgroups = (("memory.max", "memory.current", "cgroup memory.max"),  # v2, then v1
               ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "cgroup memory limit"))  # fmt: skip
    for limit, usage, name in cgroups:
        cap, used = _read_int(Path("/sys/fs/cgroup") / limit), _read_int(Path("/sys/fs/cgroup") / usage)
        if cap is not None and used is not None and cap < 1 << 60:
            bounds.append((cap - used, name))
    for which, status_key, name in ((resource.RLIMIT_AS, "VmSize", "RLIMIT_AS"),
                                    (resource.RLIMIT_DATA, "VmData", "RLIMIT_DATA")):  # fmt: skip
        soft = resource.getrlimit(which)[0]
        if soft != resource.RLIM_INFINITY:
            bounds.append((soft - (_status(status_key) or 0), name))
    available, source = min((b for b in bounds if b[0] is not None), key=lambda b: b[0])
    return Memory(max(0, available), source)


def device_memory() -> Memory | None:
    """The first device's memory statistics, where it has them (GPUs); None on a CPU."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return Memory(stats["bytes_limit"] - stats.get("bytes_in_use", 0), "device memory", device=True)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _meminfo(key: str) -> int | None:
    return _field(Path("/proc/meminfo"), key)


def _status(key: str) -> int | None:
    return _field(Path("/proc/self/status"), key)


def _field(path: Path, key: str) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError):
        pass
    return None


def sampler_bytes(cfg, args: EngineArgs, max_model_len: int) -> int:
    """The sampler state (runner.sampler): per slot, the penalties' rows over the vocabulary and, with speculation
    (its rounds chain: spec/chained.py), the slot's tokens and a device proposer's drafts."""
    spec = args.speculative_config or {}
    chained = (max_model_len + spec.get("num_speculative_tokens", 0) + 1) * 4 if spec else 0
    return (args.max_num_seqs + 1) * (cfg.vocab_size * 5 + chained)


@dataclasses.dataclass(frozen=True)
class Footprint:
    """Bytes by consumer; their sum is the planned peak."""

    weights: int
    kv_cache: int
    sampler: int
    activations: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.sampler + self.activations + self.runtime

    def describe(self) -> str:
        parts = ", ".join(f"{name.replace('_', ' ')} {value / GB:.2f}"
                          for name, value in dataclasses.asdict(self).items())  # fmt: skip
        return f"{self.total / GB:.2f} GB ({parts})"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """The sizes an engine runs with. `args` has max_model_len, max_num_seqs and max_num_batched_tokens filled in;
    `num_blocks` is None on a device until `device_kv_blocks` measures what the loaded weights left."""

    args: EngineArgs
    num_blocks: int | None
    memory: Memory
    footprint: Footprint | None
    chosen: tuple[str, ...]  # the sizes this plan picked (the others were given)

    def with_blocks(self, num_blocks: int) -> MemoryPlan:
        """The plan with a device's KV cache size: a default max_model_len shrinks to what it holds."""
        tokens = num_blocks * self.args.block_size
        if tokens >= self.args.max_model_len:
            return dataclasses.replace(self, num_blocks=num_blocks)
        if "max_model_len" not in self.chosen:
            raise MemoryPlanError(f"{flag('max_model_len')} {self.args.max_model_len} does not fit: the KV cache "
                                  f"holds {tokens} tokens in what {flag('gpu_memory_utilization')} "
                                  f"{self.args.gpu_memory_utilization} leaves after the weights; lower "
                                  f"{flag('max_model_len')} or raise {flag('gpu_memory_utilization')}")  # fmt: skip
        args = dataclasses.replace(self.args, max_model_len=tokens)
        return dataclasses.replace(self, args=args, num_blocks=num_blocks)

    def summary(self) -> str:
        """The one startup line: what was chosen and why."""
        a = self.args
        tokens = "?" if self.num_blocks is None else self.num_blocks * a.block_size
        sizes = (f"max_model_len {a.max_model_len}, max_num_seqs {a.max_num_seqs}, {a.max_num_batched_tokens} tokens "
                 f"per step, KV cache {tokens} tokens")  # fmt: skip
        picked = f" (picked here: {', '.join(self.chosen)}; the others were given)" if self.chosen else ""
        if self.memory.device:
            why = f"{flag('gpu_memory_utilization')} {a.gpu_memory_utilization} of the device's memory"
        else:
            why = (f"{self.footprint.describe()} planned of {self.memory.available / GB:.2f} GB available "
                   f"({self.memory.source})")  # fmt: skip
        return f"memory plan: {sizes}{picked}; {why}"


def weight_bytes(cfg, quantization: str | None, quantize_lm_head: bool = False) -> int:
    """The parameters' bytes in the model's dtype, quantized weights as stored (`quantized_bytes`): the linear weights
    with a method, and the head with `quantize_lm_head` (a copy of its own where the model ties it to the
    embedding)."""
    from rtpjax.loading.quantization import is_quantized_param
    from rtpjax.models import decoder

    shapes = decoder.param_shapes(cfg)
    head = quantization and quantize_lm_head
    if head and cfg.tie_word_embeddings:
        shapes = {**shapes, "lm_head": shapes["embed"]}
    total = 0
    for path, shape in shapes.items():
        if quantization and is_quantized_param(path) or head and path == "lm_head":
            total += quantized_bytes(shape, quantization)
        else:
            total += math.prod(shape) * np.dtype(cfg.jnp_dtype).itemsize
    return total


def quantized_bytes(shape, method: str) -> int:
    """A [..., out, in] weight quantized by `method`: int4 half a byte each, a float32 scale (and a byte's zero point
    when asymmetric) per group; one-byte formats a byte each and at most a float32 scale per row."""
    from rtpjax.loading.quantization import METHODS

    n, scheme = math.prod(shape), METHODS[method].for_input(shape[-1])
    if scheme.weight == "int4":
        groups = n // scheme.group_size(shape[-1])
        return n // 2 + groups * (4 + (0 if scheme.symmetric else 1))
    return n + 4 * math.prod(shape[:-1])


def kv_bytes_per_block(cfg, args: EngineArgs) -> int:
    """A block's bytes over all devices (on a CPU they all share the host's memory)."""
    from rtpjax.kv import kv_cache

    ways = args.tensor_parallel_size
    return kv_cache.bytes_per_block(cfg, args.block_size, args.kv_cache_dtype, ways) * ways


def activation_bytes(cfg, args: EngineArgs, max_model_len: int) -> int:
    """The larger of a step's working set (activations of the token budget, the logits of its rows as the sampler
    holds them) and prompt scoring's (a scratch cache for the longest prompt, one chunk's logits and log-softmax)."""
    tokens, vocab = args.max_num_batched_tokens, cfg.vocab_size
    rows = min(tokens, args.max_num_seqs)
    mlp = cfg.num_experts_per_tok * cfg.moe_intermediate_size if cfg.num_experts else cfg.intermediate_size
    width = 4 * cfg.hidden_size + 2 * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + 3 * mlp
    step = 4 * (tokens * width + SAMPLER_COPIES * rows * vocab)
    scored = -(-max_model_len // tokens) * tokens
    score = kv_bytes_per_block(cfg, args) * -(-scored // args.block_size) + 4 * (3 * tokens * vocab + tokens * width)
    score += 4 * scored * (1 + 2 * MAX_LOGPROBS)
    return max(step, score)


def runtime_bytes() -> int:
    threads = max(1, min(8, (os.cpu_count() or 2) - 1))  # ModelRunner.warmup's compile threads
    return CPU_RUNTIME_BYTES + threads * CPU_COMPILE_BYTES_PER_THREAD


_SIZES = ("max_model_len", "max_num_seqs", "max_num_batched_tokens")


def plan(cfg, args: EngineArgs, memory: Memory | None = None) -> MemoryPlan:
    """The sizes for `cfg` under `args`: on a device (memory.device), the platform defaults with the KV cache left to
    `device_kv_blocks`; on a CPU, everything that is not given, fitted to `memory` (default: `host_memory()`)."""
    chosen = tuple(name for name in _SIZES if getattr(args, name) is None)
    model_len = cfg.max_position_embeddings
    if memory is not None and memory.device:
        args = args.for_platform("gpu")
        args = dataclasses.replace(args, max_model_len=min(args.max_model_len or model_len, model_len))
        return MemoryPlan(args, args.num_gpu_blocks, memory, None, chosen)
    memory = memory or host_memory()
    args = args.for_platform("cpu")
    per_block = kv_bytes_per_block(cfg, args)

    def footprint(max_model_len: int, blocks: int) -> Footprint:
        return Footprint(weight_bytes(cfg, args.quantization, args.quantize_lm_head), blocks * per_block,
                         sampler_bytes(cfg, args, max_model_len), activation_bytes(cfg, args, max_model_len),
                         runtime_bytes())  # fmt: skip

    def kv_room(max_model_len: int) -> int:
        """Default KV bytes: a share of what the rest leaves, rounded down to two significant bits (x 1, 1.5, 2, 3,
        4, 6 ... 2^k): available memory drifts from start to start, and the cache's shape is part of every compiled
        step's signature, so the persistent compilation cache answers a second start only if this does not."""
        room = int((memory.available - footprint(max_model_len, 0).total) * CPU_SHARE)
        if room < BUDGET_STEP:
            return 0
        step = 1 << (room.bit_length() - 2)
        return room // step * step

    def one_sequence(max_model_len: int) -> int:
        return -(-max_model_len // args.block_size)

    max_model_len = min(args.max_model_len or model_len, model_len)
    if "max_model_len" in chosen:  # halved until one sequence fits the share
        while max_model_len > MIN_MODEL_LEN and one_sequence(max_model_len) * per_block > kv_room(max_model_len):
            max_model_len = max(MIN_MODEL_LEN, max_model_len // 2)
    if args.num_gpu_blocks is not None:
        blocks = args.num_gpu_blocks
    elif args.cpu_kv_cache_bytes is not None:
        blocks = args.cpu_kv_cache_bytes // per_block
    else:
        enough = args.max_num_seqs * one_sequence(max_model_len)
        blocks = min(enough, max(one_sequence(max_model_len), kv_room(max_model_len) // per_block))
        chosen += ("KV cache",)
    args = dataclasses.replace(args, max_model_len=max_model_len)
    result = MemoryPlan(args, blocks, memory, footprint(max_model_len, blocks), chosen)
    _check(result, one_sequence(max_model_len))
    return result


def _check(p: MemoryPlan, one_sequence: int) -> None:
    a, need = p.args, p.footprint
    kv_flag = flag("num_gpu_blocks") if a.num_gpu_blocks is not None else flag("cpu_kv_cache_bytes")
    if p.num_blocks < one_sequence:
        raise MemoryPlanError(f"a KV cache of {p.num_blocks} blocks ({kv_flag}) holds {p.num_blocks * a.block_size} "
                              f"tokens, less than one sequence of {flag('max_model_len')} {a.max_model_len}; raise "
                              f"{kv_flag} or lower {flag('max_model_len')}")  # fmt: skip
    if need.total <= p.memory.available:
        return
    given = [n for n in _SIZES if n not in p.chosen] + [n for n in ("num_gpu_blocks", "cpu_kv_cache_bytes")
                                                        if getattr(a, n) is not None]  # fmt: skip
    change = (f"lower {' or '.join(flag(n) for n in given)}" if given else
              f"the model alone does not fit; try {flag('quantization')} int8 or {flag('dtype')} bfloat16")  # fmt: skip
    raise MemoryPlanError(f"not enough memory: {need.describe()} needed, {p.memory.available / GB:.2f} GB available "
                          f"({p.memory.source}); {change}")  # fmt: skip


# KV tiers: blocks on the device outside the cache, in longest sequences (device_kv_blocks): staged for admission,
# taken by the scheduler until their step writes them, gathered on their way down
STAGED_SEQUENCES = 3


def staging_blocks(args: EngineArgs, block_bytes: int, one_sequence: int, num_blocks: int, landing: int = 0) -> int:
    """KV tiers: how many blocks may wait on the device, outside the cache, for their sequences' admission (block_bytes:
    a whole block, as every device holds staged rows). At least one longest sequence (what device_kv_blocks keeps for
    them); on a device with statistics, all that --gpu-memory-utilization leaves after the weights and the cache, less
    two sequences (rows the scheduler has taken, rows gathered for a download) and `landing` rows (the arrays staged
    rows land in, made at warm-up), up to the cache's size (more could never be admitted at once): a cache capped by
    --num-gpu-blocks leaves fetches room to stage instead of queueing behind each other."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return one_sequence
    free = stats["bytes_limit"] * args.gpu_memory_utilization - stats.get("bytes_in_use", 0)
    return int(min(num_blocks, max(one_sequence, free // block_bytes - 2 * one_sequence - landing)))


def device_kv_blocks(cfg, args: EngineArgs, kv_dtype=None) -> int:
    """On a device with memory statistics: the blocks that fill what --gpu-memory-utilization leaves after what is
    in use (the weights) and, with KV tiers, their staging, counting what each device holds (its share of the KV heads,
    or copies). kv_dtype: per-layer dtypes (rtpjax.quant.kv_precision) instead of --kv-cache-dtype."""
    import jax

    from rtpjax.kv import kv_cache

    if args.num_gpu_blocks is not None:
        return args.num_gpu_blocks
    kv_dtype = args.kv_cache_dtype if kv_dtype is None else kv_dtype
    per_block = kv_cache.bytes_per_block(cfg, args.block_size, kv_dtype, args.tensor_parallel_size,
                                         args.pipeline_parallel_size)  # fmt: skip
    stats = jax.local_devices()[0].memory_stats()
    free = stats["bytes_limit"] * args.gpu_memory_utilization - stats.get("bytes_in_use", 0)
    free = free // BUDGET_STEP * BUDGET_STEP
    if not args.kv_offloading_size:
        return max(1, int(free // per_block))
    # KV tiers stage at least one longest sequence's blocks (max_staged), whole on every device, the blocks taken by
    # the scheduler stay on the device (as rows) until the step that writes them, and evicted blocks wait there for
    # their download (max_gathered): three sequences' worth. Where that and a sequence's cache do not both fit, they
    # share what there is (the context shrinks to fit, see with_blocks).
    sequence = -(-(args.max_model_len or cfg.max_position_embeddings) // args.block_size)
    staged = STAGED_SEQUENCES * kv_cache.bytes_per_block(cfg, args.block_size, kv_dtype)
    if free - sequence * staged >= sequence * per_block:
        return int((free - sequence * staged) // per_block)
    return max(1, int(free // (per_block + staged)))

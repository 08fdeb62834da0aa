"""The model runner: host-side step inputs padded to buckets, and two executables per step on the device.

model(params, kv_cache, sampler_state, inputs) -> (logits, kv_cache), then sample(logits, sampler_state, sampling)
-> (tokens + logprobs, sampler_state), with the cache and sampler state donated so they update in place. Token and
sequence counts are padded to buckets that warm-up compiles once (the sampler per sequence bucket and variant, prompt
scoring per length bucket); real counts travel as array values. Dispatch returns at once: the host reads a step's
tokens only when it must, while the device runs the next step, whose inputs read still-unread tokens on the device.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.distributed import multihost
from rtpjax.distributed.messages import FollowAdmit, FollowScore, FollowStep
from rtpjax.kv import kv_cache as kv
from rtpjax.kv.block_copy import BlockCopier
from rtpjax.kv.host_blocks import BlockLoad, KVBlocks, KVLayout, PackedBlocks
from rtpjax.loading.quantization import QuantizedWeight
from rtpjax.runner import multi_step, prompt_logprobs, sampler
from rtpjax.runner.multi_step import MultiStepInputs
from rtpjax.runner.verify import VerifyInputs, verify
from rtpjax.kernels.metadata import AttentionMetadata
from rtpjax.sampling_params import MAX_STOP_TOKEN_IDS
from rtpjax.engine.scheduler import Schedule
from rtpjax.parallel import pipeline
from rtpjax.parallel.sharding import tensor_ways
from rtpjax.parallel.stages import PipelineMesh
from rtpjax.engine.sequence import PENDING
from rtpjax.spec.chained import ChainInputs, resolve_step
from rtpjax.runner.step_inputs import Packing, SeqChunk, build_step, pack

log = logging.getLogger("rtpjax")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepBatch:
    tokens: jax.Array  # [T] token ids; ignored where token_slot >= 0
    token_slot: jax.Array  # [T] read the token from this slot's last sampled token (-1: use `tokens`)
    positions: jax.Array  # [T]
    meta: AttentionMetadata
    logits_indices: jax.Array  # [S], or [S * (K+1)] in a verify step (every drafted position, see runner.verify)
    chain: ChainInputs | None = None  # a chaining engine's verify step: sequences laid out by the device (spec/chained)


def model_step(params, cache, state, flat, packing: Packing, *, cfg, forward, block_size, aux_layers=()):
    """The model half of a step: each sequence's last-token logits. Host inputs arrive packed into one int32 buffer.
    MoE: then the expert load [MoE layers, experts]; aux_layers (an EAGLE-3 proposer): then those layers' inputs and,
    last, the cache slot of each token (chained sequences' as the device placed them: where their features go)."""
    batch: StepBatch = packing.unpack(flat)
    if batch.chain is not None:
        batch = resolve_step(batch, state, block_size)
    tokens = jnp.where(batch.token_slot >= 0, state.last_token[batch.token_slot], batch.tokens)
    extra = dict(expert_load=True) if cfg.num_experts else {}
    if not aux_layers:  # the programs of engines without an EAGLE-3 head stay as they are
        return forward(params, cfg, tokens, batch.positions, cache, batch.meta, batch.logits_indices, **extra)
    out = forward(params, cfg, tokens, batch.positions, cache, batch.meta, batch.logits_indices, aux_layers=aux_layers,
                  **extra)  # fmt: skip
    return (*out, batch.meta.slot_mapping)


def sample_step(logits, state, flat, packing: Packing, variant: sampler.Variant):
    """The sampling half, its own executables (one per sequence bucket and variant), so the model's keeps its whole-step
    CUDA graph: fused, it measured 8.54 ms against 7.03 + 0.35 ms apart (H100, 8B, bucket 32)."""
    return sampler.sample(logits, state, packing.unpack(flat), variant)


def verify_step(logits, state, flat, packing: Packing, variant: sampler.Variant):
    """The sampling half of a step that verifies drafts (K+1 logits rows per sequence)."""
    return verify(logits, state, packing.unpack(flat), variant)


def _model_key(batch: StepBatch) -> tuple[int, int, int]:
    """What shapes a model executable: tokens, sequences, logits rows (a verify step's sequence bucket may differ
    from a plain step's of the same token bucket while its logits rows are equal)."""
    return batch.tokens.shape[0], batch.meta.seq_lens.shape[0], batch.logits_indices.shape[0]


def buckets(limit: int, smallest: int) -> list[int]:
    """Powers of two from `smallest` up to and including `limit`."""
    sizes, size = [], min(smallest, limit)
    while size < limit:
        sizes.append(size)
        size *= 2
    return sizes + [limit]


QUARTER_STEPS_FROM = 512  # step token buckets from here on also come in quarter steps between the powers of two


def step_buckets(limit: int, smallest: int) -> list[int]:
    """A step's token buckets: powers of two, and from QUARTER_STEPS_FROM tokens on also 5/4, 6/4 and 7/4 of each.
    There a step's cost grows with its padded tokens (matmuls are compute-bound), and a 1,024-token prompt chunk
    beside one decode row would otherwise run as 2,048 tokens; below it a step costs about the same whatever its
    size, and each bucket is one more executable to compile."""
    sizes = set(buckets(limit, smallest))
    for power in [s for s in sizes if s >= QUARTER_STEPS_FROM]:
        sizes |= {power * q // 4 for q in (5, 6, 7) if power * q // 4 < limit}
    return sorted(sizes)


def one_row(asked: bool | None, pipelined: bool, backend: str, quantized: bool = False) -> bool:
    """Whether a lone sequence's decode steps run as one token (`--one-row-decode`; they add a 1-token bucket where the
    smallest is 16, the Pallas attention's): by default (None) on a GPU without pipeline stages for unquantized
    weights, where it measured faster; not for quantized ones, whose one-row runs were no faster end to end
    (RESULTS.md, 2026-12-07e). Asked for with pipeline stages, a clear error."""
    if asked is None:
        return backend == "gpu" and not pipelined and not quantized
    if asked and pipelined:
        raise ValueError("--one-row-decode does not work with --pipeline-parallel-size > 1 (micro-batch halves pair "
                         "power-of-two buckets)")  # fmt: skip
    return asked


def pick(sizes: list[int], n: int) -> int:
    return next(s for s in sizes if s >= n)


class CompileCounter:
    """Counts XLA compilations in this process that the persistent compilation cache did not answer (`count`), and
    the executables it did answer (`fetched`); keeps the latest of both, named and timed, until `take_recent` (the
    engine's loop log names what compiled while serving: after warm-up nothing should)."""

    count = 0
    fetched = 0
    recent: collections.deque = collections.deque(maxlen=8)  # (function, seconds), compiled or fetched
    since = 0  # how many since the last take_recent (recent keeps the last few)
    _installed = False
    _lock = threading.Lock()  # (any thread may compile: the tiers' too)

    @classmethod
    def take_recent(cls) -> tuple[int, list[tuple[str, float]]]:
        """(count, the latest few (function, seconds)) of the executables compiled or fetched since the last call,
        in this process (all its engines)."""
        with cls._lock:
            taken, recent = cls.since, list(cls.recent)
            cls.since = 0
            cls.recent.clear()
        return taken, recent

    @classmethod
    def install(cls) -> None:
        if cls._installed:
            return

        def on_duration(event, duration, **kwargs):
            if event == "/jax/core/compile/backend_compile_duration":  # compiled, or fetched from the cache
                with cls._lock:
                    cls.count += 1
                    cls.since += 1
                    cls.recent.append((str(kwargs.get("fun_name", "?")), duration))

        def on_event(event, **kwargs):
            if event == "/jax/compilation_cache/cache_hits":
                cls.count -= 1
                cls.fetched += 1

        jax.monitoring.register_event_duration_secs_listener(on_duration)
        jax.monitoring.register_event_listener(on_event)
        cls._installed = True


class ModelRunner:
    def __init__(self, cfg, family, params, *, num_blocks: int, block_size: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, mesh=None, attention_impl: str = "reference",
                 kv_cache_dtype: str = "auto", kv_write: str = "auto", mosaic_prefill: bool = False,
                 one_row_decode: bool | None = None, num_speculative_tokens: int = 0, max_verify_seqs: int = 0,
                 kv_tiers: bool = False, aux_layers: tuple[int, ...] = (),
                 chain_lookup: tuple[int, int] | None = None, num_scheduler_steps: int = 1):  # fmt: skip
        """num_speculative_tokens (K) > 0: also compile verify steps, for up to max_verify_seqs sequences each.
        aux_layers: every step also returns these layers' inputs at each token (`self.aux`, for an EAGLE-3 head).
        chain_lookup: where verify steps may hold chained sequences (spec/chained.py): (prompt_lookup_min,
        prompt_lookup_max) of an n-gram engine's device lookup, (0, 0) where a device proposer makes every chained
        round's drafts (a draft model, an EAGLE-3 head); the sampler state then keeps every slot's tokens.
        num_scheduler_steps (K) > 1: also compile multi-step decode programs (runner/multi_step.py) for up to
        `multi_step_seqs` sequences."""
        self.cfg, self.params = cfg, params
        self.spec_k, self.max_verify_seqs = num_speculative_tokens, max_verify_seqs
        self.chain_lookup = chain_lookup if num_speculative_tokens else None
        # Pipeline stages (a PipelineMesh): per-stage programs and micro-batches (rtpjax/parallel/pipeline.py).
        self.pipeline = pipeline.Pipeline(cfg, params, mesh) if isinstance(mesh, PipelineMesh) else None
        if self.pipeline is not None and kv_tiers:
            raise ValueError("--kv-offloading-size does not work with --pipeline-parallel-size > 1 yet (block copies "
                             "span one mesh)")  # fmt: skip
        quantized = any(isinstance(w, QuantizedWeight) for w in jax.tree.leaves(
            params, is_leaf=lambda v: isinstance(v, QuantizedWeight)))  # fmt: skip
        self.one_row_decode = one_row(one_row_decode, self.pipeline is not None, jax.default_backend(), quantized)
        if self.pipeline is not None and num_speculative_tokens:
            raise ValueError("--speculative-config does not work with --pipeline-parallel-size > 1 yet (verify steps "
                             "span one mesh)")  # fmt: skip
        self._forward = family.forward
        self.block_size = block_size
        self.max_blocks = -(-max_model_len // block_size)
        self.attention_impl, self.mesh = attention_impl, mesh
        # The kernel needs the mesh to run per tensor-parallel shard (see AttentionMetadata.mesh).
        self.attention_mesh = mesh if attention_impl == "pallas" and tensor_ways(mesh) > 1 else None
        # What every step's attention metadata carries as static configuration (so part of each program's cache key).
        self.attention = dict(impl=attention_impl, mesh=self.attention_mesh, kv_write=kv_write,
                              mosaic_prefill=mosaic_prefill)  # fmt: skip
        # From one token off the GPU: there a step's cost follows its padded token count, and a single stream's decode
        # padded to 16 rows ran the model 16 times over. On the GPU from 16 (a step of fewer costs about the same),
        # and one_row_decode adds 1: a lone sequence's weights read as one row.
        # Pipeline stages warm up every bucket with each smaller one as a micro-batch half: powers of two alone there.
        self.token_buckets = (buckets if self.pipeline else step_buckets)(max_num_batched_tokens,
                                                                           16 if attention_impl == "pallas" else 1)
        if self.one_row_decode and self.token_buckets[0] > 1:
            self.token_buckets = [1] + self.token_buckets
        self.max_num_seqs = max_num_seqs
        self.sink = max_num_seqs
        self.kv_cache_dtype = kv_cache_dtype
        self.cache = kv.allocate(cfg, num_blocks, block_size, mesh=mesh, kv_dtype=kv_cache_dtype)
        self.state = jax.jit(sampler.init_state, static_argnums=(0, 1, 2, 3),  # on the last stage, beside the logits
                             out_shardings=self.pipeline and self.pipeline.logits_sharding)(
            max_num_seqs, cfg.vocab_size, *((max_model_len, num_speculative_tokens) if self.chain_lookup else (0, 0)))
        # aux: the last step's ([T, len(aux_layers) * H], each token's cache slot [T]), for the head's feature store
        self.aux_layers, self.aux = aux_layers, None
        # What executables are lowered against: the state a step leaves carries a sharding annotation the initial one
        # lacks, and lowering against it would give the same program another compilation-cache key.
        self._state_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                                       sharding=a.sharding if a.committed else None),
                                        self.state)  # an uncommitted state goes where the step's other inputs are
        self._model = jax.jit(functools.partial(model_step, cfg=cfg, forward=family.forward, block_size=block_size,
                                                aux_layers=aux_layers),
                              static_argnums=(4,), donate_argnums=(1,))  # fmt: skip
        self._sample = jax.jit(sample_step, static_argnums=(3, 4), donate_argnums=(1,))
        self._verify = jax.jit(verify_step, static_argnums=(3, 4), donate_argnums=(1,))
        self.multi_k = num_scheduler_steps
        self.multi_step_seqs = min(max_num_seqs, max_num_batched_tokens) if num_scheduler_steps > 1 else 0
        largest = pick(self.token_buckets, self.multi_step_seqs) if self.multi_step_seqs else 0
        self.multi_buckets = [t for t in self.token_buckets if t <= largest]  # those multi-steps of up to S run in
        self._multi = jax.jit(functools.partial(multi_step.multi_step, cfg=cfg, forward=family.forward,
                                                block_size=block_size, k=num_scheduler_steps),
                              static_argnums=(5, 6, 7), donate_argnums=(1, 2))  # fmt: skip
        self._multis: dict[tuple[int, sampler.Variant], object] = {}  # (token bucket, variant) -> executable
        self._compiled: dict[tuple[int, int, int], object] = {}  # _model_key -> model executable
        self._samplers: dict[tuple, object] = {}  # (logits rows, sharding, variant, verify) -> sample executable
        self._admit = jax.jit(sampler.admit, donate_argnums=(0,))
        self.admit_rows = max_num_seqs
        self.admit_buckets = buckets(1 << max(6, (max_model_len - 1).bit_length()), 64)
        self.kv_layout = KVLayout.of([layer[0].dtype for layer in self.cache], block_size, cfg.num_kv_heads,
                                     cfg.head_dim)  # fmt: skip
        self.copier = BlockCopier(self.cache, self.kv_layout, buckets(self.max_blocks, 4))
        self.kv_tiers = kv_tiers  # warm-up also compiles the packed copies KV tiers move blocks with
        self.score_chunk = self.token_buckets[-1]  # prompt scoring: chunks of the step's token budget
        self.score_buckets = buckets(-(-max_model_len // self.score_chunk) * self.score_chunk, self.score_chunk) \
            if self.pipeline is None else []  # fmt: skip
        self._score = jax.jit(functools.partial(prompt_logprobs.score, cfg=cfg, forward=family.forward,
                                                block_size=block_size, mesh=mesh, kv_dtype=kv_cache_dtype),
                              static_argnums=(2,))  # fmt: skip
        self._scorers: dict[int, object] = {}  # prompt length bucket -> score executable
        # MoE: tokens per expert per layer since start, summed on the host from steps whose counts have arrived.
        self.expert_load = np.zeros((sum(cfg.moe_layers), cfg.num_experts), np.int64)
        self._loads: list[jax.Array] = []
        # Multi-host: the leader's channel to its followers, set after warm-up (every process warms up alike). Each
        # piece of device work is sent to them before it is dispatched here (see distributed/multihost).
        self.mirror: multihost.Leader | None = None
        self._follow_packings: dict[tuple[int, int, int], tuple] = {}  # (tokens, seqs, iterations) -> packings
        CompileCounter.install()

    # -- warm-up ----------------------------------------------------------------------------------------------------

    def warmup(self, progress: bool = False) -> int:
        """Compile every bucket ahead of time, several at once (XLA compiles outside the GIL), then run each once;
        returns the count.

        The step then calls these executables directly, so serving can never trigger a compilation of its own.
        """
        from rtpjax.progress import progress_bar

        steps = [(t, self._seqs_for(t), 0) for t in self.token_buckets]
        if self.spec_k:  # verify steps: at least one draft, so two tokens
            steps += [(t, self._verify_seqs_for(t), self.spec_k) for t in self.token_buckets if t >= 2]
        multis = [(t, v) for t in self.multi_buckets for v in multi_step.VARIANTS]
        bar = progress_bar(len(steps) + len(multis) + len(self.score_buckets) + len(self.admit_buckets), "compiling",
                           "shape", progress)  # fmt: skip
        began = time.monotonic()
        samplers, first_step, copies = self._compile_all(steps, multis, bar)
        compiled = time.monotonic()
        self._first_runs(steps, samplers, first_step, copies)
        ran = time.monotonic()
        for n in self.admit_buckets:
            self.state = self._admit(self.state, *self._admit_arrays([], n))
            jax.block_until_ready(self.state)
            bar.update()
        bar.close()
        log.info("warm-up: %d step shapes, %d multi-step programs, %d samplers, %d prompt scorers and %d block copies "
                 "compiled or fetched in %.1f s, first runs %.1f s; %d admit shapes %.1f s",
                 len(steps), len(multis), len(samplers),
                 len(self.score_buckets), len(copies), compiled - began,
                 ran - compiled, len(self.admit_buckets), time.monotonic() - ran)  # fmt: skip
        return bar.total

    def _compile_all(self, steps: list[tuple[int, int, int]], multis: list[tuple[int, sampler.Variant]], bar):
        """The step shapes' model executables, one sampler per (logits rows, sharding, verify) and variant, the
        multi-step programs, the prompt scorers and the KV block copies, compiled side by side: (samplers, the first
        step shape of each sampler key, the copies' jobs)."""

        def compile_step(shape):
            batch = self._batch([], *shape)[0]
            key = _model_key(batch)
            if self.pipeline is not None:  # per-stage programs: compiled by the first runs
                return shape, key, None
            return shape, key, self._model_executable(*pack(batch))

        def compile_sampler(key):
            return key, self._sampler_executable(key, *pack(self._batch([], *first_step[key[0], key[1], key[3]])[1]))

        def compile_scorer(length):
            flat, packing = pack(self._score_inputs([], length))
            return length, self._score.lower(self.params, flat, packing).compile()

        with ThreadPoolExecutor(max(1, min(8, (os.cpu_count() or 2) - 1))) as pool:
            scorers = pool.map(compile_scorer, self.score_buckets)  # queued now: they compile alongside the steps
            multi_runs = pool.map(lambda key: (key, self._multi_executable(*key)), multis)
            keys = {}
            for shape, key, model in pool.map(compile_step, steps):
                self._compiled[key], keys[shape] = model, key
                bar.update()
            # Samplers depend on the logits' rows and sharding only (one per pair, not per step shape).
            first_step = {}
            for shape in steps:
                rows, compiled = keys[shape][2], self._compiled[keys[shape]]
                sharding = self.pipeline.logits_sharding if self.pipeline else compiled.output_shardings[0]
                first_step.setdefault((rows, sharding, shape[2]), shape)
            samplers = [(rows, sharding, v, k) for rows, sharding, k in first_step for v in sampler.VARIANTS]
            bar.total += len(samplers)
            for key, sample in pool.map(compile_sampler, samplers):
                self._samplers[key] = sample
                bar.update()
            copies = self.copier.jobs(self.cache, packed=self.kv_tiers) if self.pipeline is None else []  # KV block
            # copies (moving requests, tiers)
            bar.total += len(copies)
            for _ in pool.map(lambda job: job(), copies):
                bar.update()
            for length, scorer in scorers:
                self._scorers[length] = scorer
                bar.update()
            for key, run in multi_runs:
                self._multis[key] = run
                bar.update()
        return samplers, first_step, copies

    def _first_runs(self, steps, samplers, first_step, copies) -> None:
        """Runs each step shape and sampler once (the first call of an executable does one-time setup; pipeline
        stages compile theirs here, with both micro-batch halves), and the tiers' block copies."""
        for shape in steps:
            jax.block_until_ready(self.run_step(*self._batch([], *shape)))
            t, s = shape[0], shape[1]
            for half in self.token_buckets[: self.token_buckets.index(t)] if self.pipeline else []:  # 2 micro-batches
                empty = self._batch([], half, self._seqs_for(half))[0]
                micro = pipeline.MicroBatches((empty, empty), pipeline.join_rows(0, 0, self._seqs_for(half), s))
                jax.block_until_ready(self.run_step(micro, self._sampling([], s)))
        for rows, sharding, variant, k in samplers:
            jax.block_until_ready(self.run_step(*self._batch([], *first_step[rows, sharding, k]), variant=variant))
        for t, variant in self._multis:
            jax.block_until_ready(self.run_step(*self._multi_batch([], t), variant=variant))
        if copies and self.kv_tiers:  # (the tiers' copies: the memory plan leaves them room)
            self.cache = self.copier.first_runs(self.cache)

    def _model_executable(self, flat, packing):
        return self._model.lower(self.params, self.cache, self._state_spec, flat, packing).compile()

    def _multi_executable(self, num_tokens: int, variant: sampler.Variant):
        (flat, packing), (flat_sampling, sampling_packing) = (pack(x) for x in self._multi_batch([], num_tokens))
        return self._multi.lower(self.params, self.cache, self._state_spec, flat, flat_sampling, packing,
                                 sampling_packing, variant).compile()  # fmt: skip

    def _sampler_executable(self, key: tuple, flat, packing):
        """key: (logits rows, their sharding, variant, K drafts or 0)."""
        rows, sharding, variant, k = key
        logits = jax.ShapeDtypeStruct((rows, self.cfg.vocab_size), jnp.float32, sharding=sharding)
        fn = self._verify if k else self._sample
        return fn.lower(logits, self._state_spec, flat, packing, variant).compile()

    def _seqs_for(self, num_tokens: int) -> int:
        """One sequence bucket per token bucket: padding a few sequence rows costs far less than compiling
        (tokens x sequences) shapes (minutes for an 8B model)."""
        return min(num_tokens, self.max_num_seqs)

    def _verify_seqs_for(self, num_tokens: int) -> int:
        """A verify step's sequence bucket: its logits have K+1 rows per sequence, so it is capped lower (the
        scheduler speculates only while at most max_verify_seqs sequences run)."""
        return min(num_tokens, self.max_num_seqs, self.max_verify_seqs)

    # -- inputs -----------------------------------------------------------------------------------------------------

    def _batch(self, items, num_tokens: int, num_seqs: int, k: int = 0,
               device_drafts: bool = False) -> tuple[StepBatch, object]:  # fmt: skip
        """The step's model inputs and sampling inputs; k > 0: a verify step with K = k draft slots per sequence
        (device_drafts: chained ones' drafts are in the sampler state, Schedule.device_drafts)."""
        chunks, token_slot = [], np.full(num_tokens, -1, np.int32)
        offset = 0
        for item in items:
            seq = item.seq
            ids = seq.token_ids[item.start : item.start + item.num_tokens - len(item.drafts)]
            if item.chained:  # laid out from the worst-case start; the device fills in its tokens
                ids = [0]
            elif ids and ids[-1] == PENDING:  # only the last token can still be on the device (never with drafts)
                token_slot[offset + len(ids) - 1] = seq.slot
                ids = ids[:-1] + [0]
            ids = ids + (item.drafts if not item.chained else [0] * len(item.drafts))
            chunks.append(SeqChunk(ids, item.start, seq.block_table))
            offset += len(ids)
        step = build_step(chunks, self.block_size, num_tokens=num_tokens, num_seqs=num_seqs,
                          max_blocks=self.max_blocks, **self.attention)  # fmt: skip
        if not k:
            return StepBatch(step.tokens, token_slot, step.positions, step.meta, step.logits_indices), \
                self._sampling(items, num_seqs)
        drafts = np.zeros((num_seqs, k), np.int32)
        num_drafts = np.zeros(num_seqs, np.int32)
        for i, item in enumerate(items):
            drafts[i, : len(item.drafts)] = 0 if item.chained else item.drafts
            num_drafts[i] = len(item.drafts)
        # Row j of sequence i: the position before its draft j (its last position once j passes its drafts).
        j = np.arange(k + 1)[None, :]
        last = step.logits_indices[:, None]
        indices = np.where(j <= num_drafts[:, None], last - num_drafts[:, None] + j, last).astype(np.int32)
        chain = self._chain_inputs(items, num_seqs, k, device_drafts)
        batch = StepBatch(step.tokens, token_slot, step.positions, step.meta, indices.reshape(-1), chain)
        return batch, VerifyInputs(self._verify_rows(items, num_seqs, k), drafts, num_drafts, chain)

    def _multi_batch(self, items, num_tokens: int) -> tuple[MultiStepInputs, sampler.SamplingInputs]:
        """A multi-step decode's inputs: its first iteration as a plain step, and each sequence's iterations."""
        num_seqs = self._seqs_for(num_tokens)
        batch, sampling = self._batch(items, num_tokens, num_seqs)
        steps = np.zeros(num_seqs, np.int32)
        steps[: len(items)] = [item.steps for item in items]
        return MultiStepInputs(batch, steps), sampling

    def _chain_inputs(self, items, num_seqs: int, k: int, device_drafts: bool) -> ChainInputs | None:
        if self.chain_lookup is None:
            return None
        slot, max_drafts, num_prompt = (np.full(num_seqs, -1, np.int32), np.zeros(num_seqs, np.int32),
                                        np.zeros(num_seqs, np.int32))  # fmt: skip
        for i, item in enumerate(items):
            if item.chained:
                slot[i], max_drafts[i], num_prompt[i] = item.seq.slot, len(item.drafts), item.seq.num_prompt
        from_state = ((slot >= 0) & device_drafts).astype(np.int32)
        return ChainInputs(slot, max_drafts, num_prompt, from_state, k, *self.chain_lookup)

    def _verify_rows(self, items, num_seqs: int, k: int) -> sampler.SamplingInputs:
        """Each sequence's sampling row repeated K+1 times: row j draws output position + j, with EOS/stop ids
        suppressed while that position is below min_tokens."""
        base = self._sampling(items, num_seqs)
        rows = {f.name: np.repeat(getattr(base, f.name), k + 1, axis=0) for f in dataclasses.fields(base)}
        rows["position"] = rows["position"] + np.tile(np.arange(k + 1, dtype=np.int32), num_seqs)
        min_tokens = np.zeros(num_seqs, np.int32)
        min_tokens[: len(items)] = [item.seq.params.min_tokens for item in items]
        rows["suppress"][rows["position"] >= np.repeat(min_tokens, k + 1)] = -1
        return sampler.SamplingInputs(**rows)

    def _sampling(self, items, num_seqs: int) -> sampler.SamplingInputs:
        f32, i32 = np.float32, np.int32
        a = dict(
            slot=np.full(num_seqs, self.sink, i32), samples=np.zeros(num_seqs, bool),
            temperature=np.zeros(num_seqs, f32), top_k=np.zeros(num_seqs, i32), top_p=np.ones(num_seqs, f32),
            min_p=np.zeros(num_seqs, f32), repetition_penalty=np.ones(num_seqs, f32),
            presence_penalty=np.zeros(num_seqs, f32), frequency_penalty=np.zeros(num_seqs, f32),
            seed=np.zeros(num_seqs, np.uint32), index=np.zeros(num_seqs, i32), position=np.zeros(num_seqs, i32),
            suppress=np.full((num_seqs, MAX_STOP_TOKEN_IDS), -1, i32), logprobs=np.zeros(num_seqs, bool),
        )  # fmt: skip
        # Field by field over the step (a list per field, one array write each): a 256-sequence decode step
        # wrote ~3,500 numpy scalars one by one before.
        n, seqs = len(items), [item.seq for item in items]
        params = [seq.params for seq in seqs]
        a["slot"][:n] = [seq.slot for seq in seqs]
        a["samples"][:n] = [item.samples for item in items]
        a["temperature"][:n] = [p.temperature for p in params]
        a["top_p"][:n] = [p.top_p for p in params]
        a["min_p"][:n] = [p.min_p for p in params]
        a["top_k"][:n] = [min(p.top_k, self.cfg.vocab_size) for p in params]
        a["repetition_penalty"][:n] = [p.repetition_penalty for p in params]
        a["presence_penalty"][:n] = [p.presence_penalty for p in params]
        a["frequency_penalty"][:n] = [p.frequency_penalty for p in params]
        a["seed"][:n] = [seq.seed for seq in seqs]
        a["index"][:n] = [seq.index for seq in seqs]
        a["logprobs"][:n] = [p.logprobs is not None for p in params]
        generated = [item.start + item.num_tokens - len(item.drafts) - seq.num_prompt
                     for item, seq in zip(items, seqs)]  # before this one (the first drafted position's)  # fmt: skip
        a["position"][:n] = generated
        for i, (seq, p, g) in enumerate(zip(seqs, params, generated)):
            if g < p.min_tokens:
                ids = seq.stop_ids[:MAX_STOP_TOKEN_IDS]
                a["suppress"][i, : len(ids)] = ids
        return sampler.SamplingInputs(**a)

    def _admit_arrays(self, seqs, num_tokens: int):
        rows = np.full(self.admit_rows, self.sink, np.int32)
        tokens = np.zeros(num_tokens, np.int32)
        token_rows = np.full(num_tokens, self.sink, np.int32)
        is_output = np.zeros(num_tokens, bool)
        offset = 0
        for r, seq in enumerate(seqs):
            rows[r] = seq.slot
            n = len(seq.token_ids) - (seq.token_ids[-1] == PENDING)  # the token this step samples is not known yet
            tokens[offset : offset + n] = seq.token_ids[:n]
            token_rows[offset : offset + n] = seq.slot
            is_output[offset + seq.num_prompt : offset + n] = True
            offset += n
        return rows, tokens, token_rows, is_output

    # -- prompt logprobs --------------------------------------------------------------------------------------------

    def score_prompt(self, ids: list[int], top_n: int) -> list[dict[int, float] | None]:
        """Each prompt token's logprob (and the top-n alternatives) given the tokens before it: one extra prefill, only
        for requests that ask, by the executable warm-up compiled for the prompt's length bucket."""
        if self.pipeline is not None:
            raise ValueError("prompt_logprobs are not available with --pipeline-parallel-size > 1")
        length = pick(self.score_buckets, len(ids))
        flat, packing = pack(self._score_inputs(ids, length))
        if self.mirror is not None:
            self.mirror.send(FollowScore(list(ids), top_n))
        scorer = self._scorers.get(length)
        scored = scorer(self.params, flat) if scorer is not None else self._score(self.params, flat, packing)
        return prompt_logprobs.entries(ids, jax.device_get(jax.tree.map(multihost.local, scored)), top_n)

    def _score_inputs(self, ids: list[int], length: int) -> prompt_logprobs.ScoreBatch:
        return prompt_logprobs.score_inputs(ids, length, self.score_chunk, self.block_size, **self.attention)

    # -- dispatch ---------------------------------------------------------------------------------------------------

    def prepare(self, schedule: Schedule) -> tuple[StepBatch, sampler.SamplingInputs]:
        """The step's host-side inputs, padded to its buckets (the caller writes the step's block loads first:
        `load_blocks`)."""
        self._reset_rows([s for s in schedule.admitted if s.params.uses_penalties or self.chain_lookup])
        num_tokens = pick(self.token_buckets, max(schedule.num_tokens, len(schedule.items)))
        if schedule.steps > 1:
            return self._multi_batch(schedule.items, num_tokens)
        if schedule.verify:
            return self._batch(schedule.items, num_tokens, self._verify_seqs_for(num_tokens), self.spec_k,
                               schedule.device_drafts)  # fmt: skip
        batch, sampling = self._batch(schedule.items, num_tokens, self._seqs_for(num_tokens))
        return (batch if self.pipeline is None else self._micro_batches(schedule.items, batch)), sampling

    def _micro_batches(self, items, whole: StepBatch) -> pipeline.MicroBatches:
        """Pipeline stages: the step as two micro-batches of one smaller bucket, else as it is (pipeline.py)."""
        cut = pipeline.split_point([item.num_tokens for item in items])
        halves = (items[:cut], items[cut:])
        num_tokens = pick(self.token_buckets, max(max(sum(i.num_tokens for i in h), len(h)) for h in halves))
        if cut == 0 or num_tokens >= whole.tokens.shape[0]:
            return pipeline.MicroBatches((whole,))
        rows = self._seqs_for(num_tokens)
        return pipeline.MicroBatches(tuple(self._batch(h, num_tokens, rows)[0] for h in halves),
                                     pipeline.join_rows(cut, len(items) - cut, rows, whole.logits_indices.shape[0]))

    def launch(self, batch: StepBatch, sampling) -> sampler.SampleOutput:
        """Queue the step on the device and return its (not yet computed) outputs, already on their way to the host.
        Host work on the GPU, not a wait: 3.7 ms per 256-row step of Llama-3-8B on an H200, the same with the device
        drained first (`benchmarks/host_step.py --idle-launch`); queuing the ~360 arguments is ~0.15 ms of it."""
        out = jax.tree.map(multihost.local, self.run_step(batch, sampling))  # what this host reads
        for leaf in jax.tree.leaves(out):
            leaf.copy_to_host_async()
        return out

    def run_step(self, batch: StepBatch, sampling, variant: sampler.Variant | None = None) -> sampler.SampleOutput:
        """Queue one step on the device (the executables compiled at warm-up for its buckets and for the cheapest
        sampler variant its requests allow) and return its outputs. sampling: SamplingInputs, or VerifyInputs for a
        step that verifies drafts."""
        if isinstance(batch, MultiStepInputs):
            return self._dispatch_multi(batch, sampling, variant or multi_step.variant_for(sampling))
        k = sampling.drafts.shape[1] if isinstance(sampling, VerifyInputs) else 0
        variant = variant or sampler.variant_for(sampling.rows if k else sampling)
        flat_sampling, sampling_packing = pack(sampling)
        if self.pipeline is not None:  # pipeline stages: per-stage programs, micro-batches (a StepBatch: just one)
            micro = batch if isinstance(batch, pipeline.MicroBatches) else pipeline.MicroBatches((batch,))
            logits, self.cache, load = self.pipeline.run(self.cache, self.state.last_token, micro)
            load = [] if load is None else [load]
            return self._sample_step(logits, self.pipeline.logits_sharding, load, sampling.slot.shape[0], k, variant,
                                     flat_sampling, sampling_packing)  # fmt: skip
        flat, packing = pack(batch)
        key = _model_key(batch)
        if self.mirror is not None:
            self.mirror.send(FollowStep(key[0], key[2], flat.tobytes(), flat_sampling.tobytes(), variant.mode,
                                        variant.logprobs))  # fmt: skip
        return self._dispatch(key, flat, packing, flat_sampling, sampling_packing, variant, k)

    def _dispatch_multi(self, inputs: MultiStepInputs, sampling, variant: sampler.Variant) -> sampler.SampleOutput:
        """Queue a multi-step decode (the program warm-up compiled for its bucket and variant)."""
        flat, packing = pack(inputs)
        flat_sampling, sampling_packing = pack(sampling)
        num_tokens = inputs.batch.tokens.shape[0]
        if self.mirror is not None:
            self.mirror.send(FollowStep(num_tokens, inputs.steps.shape[0], flat.tobytes(), flat_sampling.tobytes(),
                                        variant.mode, variant.logprobs, steps=self.multi_k))  # fmt: skip
        return self._run_multi(num_tokens, variant, flat, packing, flat_sampling, sampling_packing)

    def _run_multi(self, num_tokens: int, variant, flat, packing, flat_sampling, sampling_packing):
        run = self._multis.get((num_tokens, variant))
        if run is None:  # as a model step's executable in `_dispatch`
            run = self._multis[num_tokens, variant] = self._multi_executable(num_tokens, variant)
        out, self.cache, self.state, *load = run(self.params, self.cache, self.state, flat, flat_sampling)
        self._note_load(load)
        return out

    def replay_step(self, step: FollowStep) -> None:
        """A follower: dispatch the step the leader sent (the same executables; the results stay unread)."""
        if step.steps > 1 and step.steps != self.multi_k:
            raise RuntimeError(f"the leader runs {step.steps} decode iterations per launch, this follower was started "
                               f"with --num-scheduler-steps {self.multi_k}; start every process with the same options")
        variant = sampler.Variant(step.mode, step.logprobs)
        flat, flat_sampling = np.frombuffer(step.inputs, np.int32), np.frombuffer(step.sampling, np.int32)
        shape = (step.num_tokens, step.num_seqs, step.steps)
        if shape not in self._follow_packings:  # a packing depends on the buckets only
            batch, sampling = self._multi_batch([], shape[0]) if step.steps > 1 else self._batch([], *shape[:2])
            key = None if step.steps > 1 else _model_key(batch)
            self._follow_packings[shape] = (key, pack(batch)[1], pack(sampling)[1])
        key, packing, sampling_packing = self._follow_packings[shape]
        if step.steps > 1:
            self._run_multi(step.num_tokens, variant, flat, packing, flat_sampling, sampling_packing)
        else:
            self._dispatch(key, flat, packing, flat_sampling, sampling_packing, variant)

    def _dispatch(self, key, flat, packing, flat_sampling, sampling_packing, variant, k: int = 0):
        model = self._compiled.get(key)
        if model is None:  # without warm-up (or a shape it left out): compiled, or fetched from the cache, now
            model = self._compiled[key] = self._model_executable(flat, packing)
        logits, self.cache, *load = model(self.params, self.cache, self.state, flat)
        if self.aux_layers:
            slots = load.pop()
            self.aux = (load.pop(), slots)
        return self._sample_step(logits, model.output_shardings[0], load, key[2], k, variant, flat_sampling,
                                 sampling_packing)  # fmt: skip

    def _sample_step(self, logits, sharding, load, rows, k, variant, flat_sampling, sampling_packing):
        """The step's sampler (or verifier, k drafts) on its logits; MoE expert counts on their way to the host."""
        self._note_load(load)
        key = (rows, sharding, variant, k)
        sample = self._samplers.get(key)
        if sample is None:  # as a model step's executable above
            sample = self._samplers[key] = self._sampler_executable(key, flat_sampling, sampling_packing)
        out, self.state = sample(logits, self.state, flat_sampling)
        return out

    def _note_load(self, load: list) -> None:
        """MoE: a step's expert counts ([] or [counts]) on their way to the host."""
        if load:
            self.read_expert_load()  # the arrived counts (keeps the pending list short)
            load[0].copy_to_host_async()
            self._loads.append(load[0])

    def read_expert_load(self) -> np.ndarray:
        """Tokens each expert of each MoE layer received so far ([MoE layers, experts]), counting the steps whose
        counts have reached the host: never waits for the device."""
        while self._loads and self._loads[0].is_ready():
            self.expert_load += np.asarray(multihost.local(self._loads.pop(0)))
        return self.expert_load

    def load_blocks(self, loads: list[BlockLoad]) -> None:
        """Write host K/V into cache blocks; queued on the device ahead of any step launched after it."""
        if loads and self.mirror is not None:
            raise RuntimeError("KV blocks from the host (KV tiers, adopted requests) work in one process only")
        for load in loads:
            if isinstance(load.kv, PackedBlocks):
                self.cache = self.copier.write_packed(self.cache, load.blocks, load.kv, load.rows)
            else:
                self.cache = self.copier.write(self.cache, load.blocks, load.kv, load.rows)

    def offload(self, blocks: list[int], download: bool = True) -> list:
        """Queue packed copies of cache blocks to the host (KV tiers; P/D hand-offs start the host copy later): they
        read the blocks as of every step launched so far and before anything launched later (a load, a step) writes
        them."""
        return self.copier.gather_packed(self.cache, blocks, download)

    def gather_blocks(self, blocks: list[int]) -> KVBlocks:
        """The contents of cache blocks on the host, after every step already launched has written them."""
        if self.mirror is not None:
            raise RuntimeError("KV blocks to the host (snapshots of requests) work in one process only")
        return self.copier.gather(self.cache, blocks)

    def _reset_rows(self, seqs) -> None:
        """Sequences get their slot rows rebuilt (prompt + tokens so far) before their first step: penalised ones,
        and every one where verify rounds chain (the device looks up their drafts in their tokens)."""
        limit = self.admit_buckets[-1]
        while seqs:
            group, total = [], 0
            while seqs and len(group) < self.admit_rows and total + len(seqs[0].token_ids) <= limit:
                total += len(seqs[0].token_ids)
                group.append(seqs.pop(0))
            self.admit(*self._admit_arrays(group, pick(self.admit_buckets, total)))

    def admit(self, rows, tokens, token_rows, is_output) -> None:
        """Rebuild sampler state rows (penalised sequences' histories)."""
        if self.mirror is not None:
            self.mirror.send(FollowAdmit(*(np.asarray(a).tolist() for a in (rows, tokens, token_rows, is_output))))
        arrays = (np.asarray(rows, np.int32), np.asarray(tokens, np.int32), np.asarray(token_rows, np.int32),
                  np.asarray(is_output, bool))  # fmt: skip
        self.state = self._admit(self.state, *arrays)

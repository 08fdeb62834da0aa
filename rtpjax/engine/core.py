"""The engine loop body: take requests, run a step, turn the previous step's tokens into outputs.

`step()` schedules and dispatches step N+1 before it reads step N's tokens, so the host's detokenizing, stop checks
and scheduling overlap the device's work. A sequence that stopped in step N may have one wasted token in step N+1;
it is dropped. LLM (blocking, in the caller's process) and AsyncLLM (in the engine process, see engine_process) both
drive this same loop.

With speculation on (rtpjax.spec), a proposer needs every sequence's latest tokens, so the loop reads step N's
tokens before it schedules step N+1 (and rolls back rejected drafts); only the outputs (text, stops) of step N are
made while N+1 runs. The n-gram proposer has a twin on the device: there, once a verify round runs, the next one is
chained to it (spec/chained.py): launched before N is read, as plain steps are.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np

from rtpjax import memory_plan
from rtpjax.distributed import multihost
from rtpjax.distributed.messages import CompletionDelta, EngineStats, RequestDelta
from rtpjax.engine import detokenizer
from rtpjax.kernels.attention import resolve_impl
from rtpjax.kv.block_pool import BlockPool
from rtpjax.kv.tiers import build as tiers_build
from rtpjax.runner.model_runner import CompileCounter, ModelRunner
from rtpjax.sampling_params import SamplingParams
from rtpjax.engine.scheduler import Schedule, Scheduler
from rtpjax.engine.request import CompletionOutput, ModelInfo, Request, RequestMaker, RequestOutput
from rtpjax.engine.snapshot import KVBlocks, RequestSnapshot, capture, restore
from rtpjax.kv.host_blocks import PackedBlocks
from rtpjax.engine.sequence import PENDING, Sequence
from rtpjax.loading.tokenizer import load_tokenizer, tokenizer_source
from rtpjax.models import load_config
from rtpjax.options import EngineArgs
from rtpjax.spec import eagle3
from rtpjax.spec.config import SpeculativeConfig
from rtpjax.spec.draft_model import DraftContext
from rtpjax.spec.ngram import NgramProposer
from rtpjax.spec.speculator import make_speculator

log = logging.getLogger("rtpjax")


@dataclasses.dataclass
class StepTimes:
    """Where one step() went, in seconds: reading tokens (waiting for the device), scheduling, the KV tiers' copies
    down, writing block loads (from a KV tier or another engine), the step's inputs, launching, outputs (the rest)."""

    PARTS = ("reading", "scheduling", "tiers", "loads", "inputs", "launch", "outputs")
    busy: float = 0.0
    reading: float = 0.0
    scheduling: float = 0.0
    tiers: float = 0.0
    loads: float = 0.0
    inputs: float = 0.0
    launch: float = 0.0
    outputs: float = 0.0


@dataclasses.dataclass
class LoopStats:
    """Where the engine loop's time goes, summed since the last report (the engine process logs it)."""

    steps: int = 0  # device steps (a multi-step decode's iterations each)
    rows: int = 0  # sequences scheduled
    computed: int = 0  # tokens run through the model (prompt chunks and decode inputs)
    sampled: int = 0  # tokens sampled (per step, one per sequence whose chunk reached its end)
    busy_s: float = 0.0  # inside step()
    prepare_s: float = 0.0  # of that: scheduling and building the step's inputs
    launch_s: float = 0.0  # queuing it on the device (host work: XLA enqueues the step's kernels)
    device_wait_s: float = 0.0  # reading the previous step's tokens
    propose_s: float = 0.0  # of prepare_s: speculation's proposals
    tiers_s: float = 0.0  # of prepare_s: the KV tiers' copies down (dispatch, and any wait for their download)
    slowest: StepTimes | None = None  # the longest step(), where one stall hides in the means
    compiles: tuple[int, list] = (0, [])  # executables compiled or fetched meanwhile (CompileCounter.take_recent)
    drafts: int = 0  # sequence-steps that verified drafts
    chained: int = 0  # verify rounds launched before the round ahead of them was read
    draft_tokens: int = 0
    accepted_tokens: int = 0
    # the rest of busy_s: turning those tokens into outputs

    def report(self, seconds: float) -> str:
        n, ms = max(self.steps, 1), 1e3 / max(self.steps, 1)
        outputs = self.busy_s - self.prepare_s - self.launch_s - self.device_wait_s
        return (f"{self.steps / seconds:.1f} steps/s, {self.rows / n:.0f} sequences per step, "
                f"{self.computed / seconds:.0f} tokens/s through the model, {self.sampled / seconds:.0f} sampled; "
                "per step "
                f"{self.prepare_s * ms:.2f} ms scheduling, {self.launch_s * ms:.2f} ms launching, "
                f"{self.device_wait_s * ms:.2f} ms reading tokens (waiting for the device), "
                f"{outputs * ms:.2f} ms on outputs" + self._tiers(ms) + self._speculation(ms) + self._slowest()
                + self._compiled())

    def _compiled(self) -> str:
        count, recent = self.compiles
        if not count:
            return ""
        named = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in recent)
        return f"; {count} executables compiled or fetched while serving (the latest: {named})"

    def add_step(self, step: StepTimes) -> None:
        """Count one step() in the sums."""
        self.busy_s += step.busy
        self.prepare_s += step.scheduling + step.tiers + step.loads + step.inputs
        self.tiers_s += step.tiers
        self.launch_s += step.launch
        if self.slowest is None or step.busy > self.slowest.busy:
            self.slowest = step

    def _tiers(self, ms: float) -> str:
        return f" ({self.tiers_s * ms:.2f} ms of the scheduling on KV tiers' copies down)" if self.tiers_s else ""

    def _slowest(self) -> str:
        step = self.slowest
        if step is None:
            return ""
        parts = ", ".join(f"{name} {1e3 * getattr(step, name):.1f}" for name in StepTimes.PARTS)
        return f"; the slowest step {1e3 * step.busy:.1f} ms ({parts})"

    def _speculation(self, ms: float) -> str:
        if not self.drafts:
            return ""
        return (f"; speculation: {self.accepted_tokens / self.draft_tokens:.0%} of {self.draft_tokens} drafts "
                f"accepted, mean acceptance length {1 + self.accepted_tokens / self.drafts:.2f}, "
                f"{self.propose_s * ms:.2f} ms proposing per step, {self.chained} rounds chained")


def _eos_ids(model_dir: Path, cfg, tokenizer) -> tuple[int, ...]:
    ids = set(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def traced(request: Request) -> dict[str, float]:
    """The request's hand-off phases with its first step's launch, its first token's read and now (time.monotonic())."""
    metrics = request.seqs[0].metrics
    points = {"scheduled": metrics.first_scheduled, "first_token": metrics.first_token, "output": time.monotonic()}
    return {**request.trace, **{k: v for k, v in points.items() if v is not None}}


def _timed(fn, *args):
    began = time.monotonic()
    return fn(*args), time.monotonic() - began


def enable_compilation_cache(path: str) -> None:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class LLMEngine:
    def _kv_dtypes(self, args: EngineArgs, plan, params, model, tokenizer) -> str | tuple[str, ...]:
        """--kv-cache-dtype, or the per-layer map --kv-cache-dtypes asks for (rtpjax.quant.kv_precision)."""
        if args.kv_cache_dtypes is None:
            return args.kv_cache_dtype
        from rtpjax.quant import kv_precision

        fits = (plan.num_blocks or memory_plan.device_kv_blocks(self.cfg, args)) * args.block_size
        max_model_len = args.max_model_len or self.cfg.max_position_embeddings
        kv_bound = fits < args.max_num_seqs * max_model_len  # requests would wait for blocks

        def tokenize(text: str) -> list[int]:  # without a tokenizer: the text's bytes as ids
            tok = tokenizer.result()[0]
            return tok.encode(text) if tok is not None else [b % self.cfg.vocab_size for b in text.encode()]

        return kv_precision.resolve(args.kv_cache_dtypes, args.kv_cache_dtype, params, self.cfg, self.family,
                                    budget=args.kv_calibration_budget, kv_bound=kv_bound, model_id=str(model),
                                    tokenize=tokenize, cache_dir=args.compilation_cache_dir)  # fmt: skip

    def __init__(self, model: str | None = None, args: EngineArgs | None = None):
        """model: a Hugging Face folder, a .gguf file, or None for the embedded SmolLM2-135M-Instruct."""
        from rtpjax.loading.model_source import load_model, resolve_model
        from rtpjax.models import load_config, moe
        from rtpjax.parallel.mesh import engine_mesh

        model = resolve_model(model)
        args = args or EngineArgs()
        multihost.initialize(args)  # several processes: jax.distributed before anything touches a device
        cfg, _ = load_config(model)
        # Sizes before anything loads: on a CPU the whole footprint is planned here (an explicit size that cannot fit
        # fails now, with the numbers); on a GPU the KV cache fills what the weights leave (after loading).
        plan = memory_plan.plan(cfg.with_dtype(args.dtype) if args.dtype else cfg, args, memory_plan.device_memory())
        args = self.args = plan.args

        if args.compilation_cache_dir:
            enable_compilation_cache(args.compilation_cache_dir)
        began = time.monotonic()
        source = tokenizer_source(model, args.tokenizer, args.skip_tokenizer_init)  # no tokenizer fails here, at once
        # The tokenizer loads alongside the weights and compilation: where transformers imports torch it takes
        # seconds (8 s on the GPU host), mostly in native code.
        pool = ThreadPoolExecutor(1, thread_name_prefix="rtpjax-tokenizer")
        tokenizer = pool.submit(_timed, load_tokenizer, source)
        pool.shutdown(wait=False)
        mesh = engine_mesh(load_config(model)[0], args.tensor_parallel_size, args.expert_parallel_size,
                           pipeline=args.pipeline_parallel_size)  # fmt: skip
        multihost.check_mesh(mesh)
        self.channel = multihost.connect(args)  # several processes: the leader's step channel to its followers
        self.cfg, self.family, params = load_model(model, dtype=args.dtype, mesh=mesh, progress=args.progress,
                                                   load_format=args.load_format, quantization=args.quantization,
                                                   quantized_decode=args.quantized_decode,
                                                   quantize_lm_head=args.quantize_lm_head)  # fmt: skip
        # MoE: how the experts run (part of the compiled programs' key) and their static placement.
        self.cfg = dataclasses.replace(self.cfg, moe_impl=args.moe_impl)
        self.expert_placement = moe.read_placement(args.expert_placement, self.cfg) if args.expert_placement else {}
        params = moe.apply_placement(params, self.expert_placement)
        loaded = time.monotonic()
        if tokenizer.done():
            tokenizer.result()  # a broken tokenizer fails before minutes of compilation, not after
        kv_dtype = self._kv_dtypes(args, plan, params, model, tokenizer)  # per layer, where --kv-cache-dtypes says so
        if plan.num_blocks is None:
            blocks = memory_plan.device_kv_blocks(self.cfg, args, kv_dtype)
            plan = plan.with_blocks(multihost.agree_min(blocks))  # one cache shape on every host
        args = self.args = plan.args
        self.plan, self.max_model_len, num_blocks = plan, args.max_model_len, plan.num_blocks
        log.info(plan.summary())
        self.pool = BlockPool(num_blocks, args.enable_prefix_caching, kv_events=args.enable_kv_cache_events)
        spec = None if args.speculative_config is None else SpeculativeConfig.parse(args.speculative_config)
        k = spec.num_speculative_tokens if spec else 0
        max_verify_seqs = min(spec.disable_by_batch_size, args.max_num_seqs) if spec else 0
        aux_layers = eagle3.aux_layers(spec.model, self.cfg) if spec and spec.method == "eagle3" else ()
        self.runner = ModelRunner(
            self.cfg, self.family, params, num_blocks=num_blocks, block_size=args.block_size,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=self.max_model_len, mesh=mesh,
            attention_impl=resolve_impl(args.attention_impl, self.cfg.head_dim),
            kv_cache_dtype=kv_dtype, kv_write=args.kv_write, mosaic_prefill=args.mosaic_prefill,
            one_row_decode=args.one_row_decode,
            kv_tiers=bool(args.kv_offloading_size),
            num_speculative_tokens=k, max_verify_seqs=max_verify_seqs, aux_layers=aux_layers,
            chain_lookup=spec and spec.chain_lookup, num_scheduler_steps=args.num_scheduler_steps,
        )  # fmt: skip
        self.scheduler = Scheduler(self.pool, args.block_size, args.max_num_seqs, args.max_num_batched_tokens,
                                   self.max_model_len, max_verify_seqs, decode_headroom=args.decode_headroom,
                                   policy=args.scheduling_policy,
                                   num_scheduler_steps=args.num_scheduler_steps)  # fmt: skip
        self.draft_context = DraftContext(self.cfg, model, args.dtype, args.block_size, self.max_model_len,
                                          args.max_num_batched_tokens, max_verify_seqs, mesh, args.attention_impl,
                                          args.kv_write, args.load_format, num_blocks,
                                          tuple(self.runner.token_buckets), args.quantized_decode,
                                          self.runner.max_blocks)  # what a draft model or head runs with
        self.speculator = make_speculator(spec, self.draft_context, self.runner.params["embed"])
        self.chain_rounds = True  # verify rounds chained where they can be (benchmarks turn it off to compare)
        self.tiers = self._attach_tiers(args, model, source)
        t0, misses = time.monotonic(), CompileCounter.count
        shapes = self._warm(args)
        compiled = time.monotonic()
        CompileCounter.take_recent()  # the loop log counts those after warm-up
        if isinstance(self.channel, multihost.Leader):
            self.runner.mirror = self.channel  # from here on the followers replay this process's device work
        self.tokenizer, tokenizer_seconds = tokenizer.result()
        self.eos_ids = _eos_ids(Path(model), self.cfg, self.tokenizer)
        done = time.monotonic()
        log.info("ready in %.1f s: weights %.1f s, KV cache %.1f s, %d step shapes %.1f s (%d compiled, the rest from "
                 "the compilation cache); tokenizer %.1f s alongside, then waited for %.1f s", done - began,
                 loaded - began, t0 - loaded, shapes, compiled - t0, CompileCounter.count - misses, tokenizer_seconds,
                 done - compiled)  # fmt: skip
        self.info = ModelInfo(self.cfg.vocab_size, self.max_model_len, self.eos_ids, args.max_num_seqs)
        self.maker = RequestMaker(self.tokenizer, self.info, args.seed)
        self.requests: dict[str, Request] = {}
        self.inflight: tuple[Schedule, object] | None = None
        self.loop_stats = LoopStats()
        self.lifetime = LoopStats()  # loop_stats of earlier report periods, summed (take_loop_stats)
        self._order = itertools.count()

    def _attach_tiers(self, args: EngineArgs, model: str, source: str | None):
        """The KV tiers below the block pool (--kv-offloading-size, --kv-disk-path), or None: evicted blocks are
        written down, the scheduler asks them for prefixes, and their copies go through the runner's copier."""
        tiers = tiers_build.make_tiers(args, self.runner.kv_layout,
                                       tiers_build.identity(model, source, self.runner.kv_layout, args))  # fmt: skip
        if tiers is None:
            return None
        self.pool.on_evict = tiers.write_down
        self.scheduler.tiers = tiers
        block_bytes = self.runner.kv_layout.block_bytes
        staged = memory_plan.staging_blocks(args, block_bytes, self.runner.max_blocks, self.pool.num_blocks,
                                            self.runner.copier.landing_rows)  # fmt: skip
        # loads reach the device before admission; evicted blocks wait there for their download
        tiers.use_copier(self.runner.copier, staged, self.runner.max_blocks)
        log.info("KV tiers: up to %d blocks (%.2f GiB) staged on the device before admission", staged,
                 staged * block_bytes / 2**30)  # fmt: skip
        return tiers

    def _warm(self, args: EngineArgs) -> int:
        """Compiles every step shape now (--warmup; else each at first use) and the speculator's, and measures the
        tiers' copy costs against recomputation (swap or recompute): the number of step shapes."""
        shapes = self.runner.warmup(progress=args.progress) if args.warmup else 0
        if args.warmup and self.speculator is not None:
            self.runner.state = self.speculator.warm(self.runner.state)
        if self.tiers is not None:
            self.tiers.costs = tiers_build.measure_costs(self.runner, self.tiers)
        return shapes

    # -- requests ---------------------------------------------------------------------------------------------------

    def make_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
                     priority: int = 0) -> Request:  # fmt: skip
        """Tokenize and validate; raises ValueError for bad input and touches no engine state."""
        return self.maker(prompt, params, request_id, priority)

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already running")
        if request.params.prompt_logprobs is not None:
            request.prompt_logprobs = self.runner.score_prompt(request.prompt_ids, request.params.prompt_logprobs)
        self.requests[request.request_id] = request
        for seq in request.seqs:
            seq.arrival_order = next(self._order)
            self.scheduler.add(seq)

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    priority: int = 0) -> str:  # fmt: skip
        request = self.make_request(prompt, params, request_id, priority)
        self.add(request)
        return request.request_id

    def abort(self, request_id: str, as_deltas: bool = False) -> RequestOutput | RequestDelta | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.finished:
                self._trim_pending(seq)
                self.scheduler.finish(seq, "abort")
        return self._output(request, as_deltas)

    # -- moving requests between engines ----------------------------------------------------------------------------

    def snapshot(self, request_id: str, detach: bool = True, gather: bool = True) -> tuple[RequestSnapshot, KVBlocks]:
        """The request's state and the K/V of its computed blocks, taken between steps (other requests keep running).
        Tokens still on the device are left out (the receiver samples them again). `detach`: the request leaves this
        engine: its blocks are freed and it reports nothing more here (its sequences finish as "migrated"). `gather`
        False: no K/V (None; a prefill hand-off gathered it already, asynchronously, behind the prompt's last step)."""
        request = self.requests.get(request_id)
        if request is None:
            raise ValueError(f"no request {request_id!r} in this engine")
        snap, blocks = capture(request, self.args.block_size)
        kv = self.runner.gather_blocks(blocks) if gather else None  # after the step in flight (it may write them)
        if detach:
            for seq in request.seqs:
                if not seq.finished:
                    self._trim_pending(seq)
                    self.scheduler.finish(seq, "migrated")
            del self.requests[request_id]
        return snap, kv

    def adopt(self, snap: RequestSnapshot, kv: KVBlocks) -> str:
        """Continue a request snapshotted elsewhere, as if it had always run here: it waits for blocks like any
        request (its K/V kept on the host meanwhile), then its K/V is written into fresh blocks before its first step
        and those blocks join the prefix cache. Raises ValueError, touching nothing, for K/V or a snapshot this engine
        cannot hold."""
        if snap.request_id in self.requests:
            raise ValueError(f"request id {snap.request_id!r} is already running")
        self.runner.kv_layout.require(kv.layout)
        kv.arrays()  # the contents match their layout
        request = restore(snap, kv, self.args.block_size, self.info)
        need = max((len(s.host_kv.rows) for s in request.seqs if s.host_kv is not None), default=0)
        if need > self.pool.num_blocks:
            raise ValueError(f"request {snap.request_id!r} needs {need} KV blocks; this cache has "
                             f"{self.pool.num_blocks}")
        self.requests[request.request_id] = request
        for seq in request.seqs:
            if not seq.finished:
                seq.arrival_order = next(self._order)
                self.scheduler.add(seq)
        return request.request_id

    def reset_inflight(self) -> None:
        """Forget a step whose results can no longer be read (after a failure)."""
        if self.inflight is not None:
            self._release_loads(self.inflight[0])
        self.inflight = None

    def _release_loads(self, schedule: Schedule) -> None:
        """The step has run, so have the writes before it: the tier rows they read may be reused."""
        for load in schedule.loads:
            if isinstance(load.kv, PackedBlocks) and load.kv.lease is not None:  # a tier's rows (a hand-off's own none)
                self.tiers.release(load.kv)

    def _gather_down(self, blocks: list[int]) -> list:
        """Packed copies of cache blocks left on the device for the KV tiers, whose own thread starts their download
        (into pinned memory it waits for the step ahead of the gather: never on this thread)."""
        return self.runner.offload(blocks, download=False)

    def close(self) -> None:
        """Write the prefix cache's blocks down to the KV tiers (the disk tier keeps them for the next start) and
        wait for the writes, then stop the tiers' threads; stop the followers of a multi-host engine. Idempotent."""
        if isinstance(self.channel, multihost.Leader):
            self.channel.close()
        if self.tiers is None or self.tiers.closed:
            return
        self.tiers.drain([(block, h) for h, block in self.pool.cached.items()], self._gather_down)
        self.tiers.close()

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.inflight is not None

    # -- the loop ---------------------------------------------------------------------------------------------------

    def step(self, final_only: bool = False, as_deltas: bool = False) -> list[RequestOutput] | list[RequestDelta]:
        """One scheduling round. `final_only`: return outputs only for finished requests (offline generation
        skips building per-step outputs, a cost per sequence per step). `as_deltas`: outputs as RequestDeltas (what
        the engine process sends)."""
        stats, began = self.loop_stats, time.perf_counter()
        waited = stats.device_wait_s  # (_read adds to it)
        speculating = self.speculator is not None and self.speculator.active(self.scheduler)
        read, chain = None, None
        if self.inflight is not None and (speculating or self.inflight[0].verify):
            if speculating and self.inflight[0].verify and self.chains():
                chain = self.scheduler.chain(self.inflight[0], self.speculator.chain_ks(self.scheduler.running))
                propose = getattr(self.speculator.proposer, "propose_on_device", None)
                if chain is not None and propose is not None:  # its program reads the state round N leaves
                    proposing = time.perf_counter()
                    self.runner.state, chain.device_drafts = propose(self.runner.state, chain.items), True
                    stats.propose_s += time.perf_counter() - proposing
            if chain is None:
                read = self._read(*self.inflight)  # the proposer needs the latest tokens; drafts must be settled
                self._release_loads(self.inflight[0])
                self.inflight = None
        scheduling = time.perf_counter()  # reading above counts as device wait and outputs, not scheduling
        if chain is not None:
            schedule, stats.chained = chain, stats.chained + 1
        else:
            drafts = self.speculator.drafts(self.scheduler) if speculating else None
            stats.propose_s += time.perf_counter() - scheduling
            schedule = self.scheduler.schedule(drafts)
        times = StepTimes(scheduling=time.perf_counter() - scheduling)
        if self.tiers is not None:  # blocks evicted just now are copied down before anything overwrites them
            self.tiers.dispatch(self._gather_down)
            times.tiers = time.perf_counter() - scheduling - times.scheduling
        launched = None
        if schedule.items:
            loading = time.perf_counter()
            self.runner.load_blocks(schedule.loads)  # blocks arriving from the host, written before the step
            preparing = time.perf_counter()
            inputs = self.runner.prepare(schedule)
            prepared = time.perf_counter()
            launched = (schedule, self.runner.launch(*inputs))
            if self.runner.aux_layers:  # an EAGLE-3 head: the step's hidden states, on the device
                self.speculator.observe(*self.runner.aux)
            times.loads, times.inputs = preparing - loading, prepared - preparing
            times.launch = time.perf_counter() - prepared
        if read is not None:
            outputs = self._emit(read, final_only, as_deltas)
        elif self.inflight is not None:  # (a chained round's items move back as the round ahead is read)
            then = {item.seq: item for item in schedule.items} if chain is not None else None
            outputs = self._emit(self._read(*self.inflight, then), final_only, as_deltas)
            self._release_loads(self.inflight[0])
        else:
            outputs = []
        self.inflight = launched
        if self.speculator is not None:
            self.speculator.release_finished()
        stats.steps, stats.rows = stats.steps + schedule.steps, stats.rows + len(schedule.items) * schedule.steps
        stats.computed += schedule.computed
        stats.sampled += sum(item.steps for item in schedule.items if item.samples)
        times.busy, times.reading = time.perf_counter() - began, stats.device_wait_s - waited
        times.outputs = times.busy - sum(getattr(times, part) for part in StepTimes.PARTS[:-1])
        stats.add_step(times)
        return outputs

    def chains(self) -> bool:
        """Whether verify rounds may be chained: the n-gram proposer (whose lookup the device repeats) or one that
        proposes on the device (a draft model, an EAGLE-3 head) is in use (spec/chained.py; the latter on one host:
        followers replay steps only)."""
        proposer = self.speculator.proposer
        on_device = hasattr(proposer, "propose_on_device") and self.channel is None
        return self.chain_rounds and self.runner.chain_lookup is not None and (isinstance(proposer, NgramProposer)
                                                                               or on_device)  # fmt: skip

    def _read(self, schedule: Schedule, out, then: dict | None = None) -> tuple[list[tuple], object]:
        """Step N's tokens into its sequences (and rejected drafts rolled back), before anything schedules around
        them; returns what `_emit` turns into outputs: (sequence, index of its first new token, the new tokens, the
        step's row of it) per sequence that sampled, and the step's outputs, whose logprobs `_emit` reads (with
        speculation on, after the next step is launched: only the tokens stand between two steps). then: the
        chained round launched after N, by sequence (its items move back by what N rejected)."""
        began, waiting = time.perf_counter(), time.monotonic()
        accepted = np.asarray(out.num_accepted)
        tokens = np.asarray(out.tokens)
        num_drafts = np.asarray(out.num_drafts)
        self.loop_stats.device_wait_s += time.perf_counter() - began
        then = then or {}
        if any(item.chained for item in schedule.items):
            self.speculator.note_round(bool(num_drafts.any()))
        tokens = tokens.reshape(len(accepted), -1)  # K+1 rows per sequence in a verify step, K in a multi-step, else 1
        read = []
        for i, item in enumerate(schedule.items):
            seq = item.seq
            if seq.finished:
                continue  # stopped (or aborted) after this step was dispatched
            if item.samples:
                n = 1 + int(accepted[i])
                index = item.start + item.num_tokens - len(item.drafts)
                if item.drafts or seq in then:
                    self.scheduler.accept(item, tokens[i, :n].tolist(), then.get(seq))
                    drafted = int(num_drafts[i])  # a chained round's: what the device found
                    if item.chained:
                        seq.drafts_found = drafted > 0
                    if drafted:
                        self.speculator.record(seq, drafted, n - 1)
                        stats = self.loop_stats
                        stats.drafts, stats.draft_tokens = stats.drafts + 1, stats.draft_tokens + drafted
                        stats.accepted_tokens += n - 1
                else:  # (a multi-step decode's: n tokens)
                    assert seq.token_ids[index : index + n] == [PENDING] * n
                    seq.token_ids[index : index + n] = tokens[i, :n].tolist()
                if index == seq.num_prompt and self.requests[seq.request_id].trace:  # a hand-off's first token
                    self.requests[seq.request_id].trace.setdefault("read_began", waiting)
                read.append((seq, index, tokens[i, :n], i))
            if item.steps == 1:  # (a multi-step's blocks once its stops are applied: `_emit`)
                self.scheduler.register_full_blocks(seq)
        return read, out

    def _emit(self, read: tuple[list[tuple], object], final_only: bool, as_deltas: bool) -> list:
        """Text, stops and outputs for the tokens `_read` placed (a stop drops the tokens after it)."""
        entries, out = read
        now = time.monotonic()
        touched: dict[str, Request] = {}
        if entries:
            rows = out.tokens.shape[0] // out.num_accepted.shape[0]  # K+1 in a verify step, K in a multi-step, else 1
            logprob = np.asarray(out.logprob).reshape(-1, rows)
            top_ids = np.asarray(out.top_ids).reshape(logprob.shape[0], rows, -1)
            top_lp = np.asarray(out.top_logprobs).reshape(logprob.shape[0], rows, -1)
        for seq, index, tokens, i in entries:
            for m in range(len(tokens)):
                if seq.finished:
                    break
                self._accept(seq, index + m, int(tokens[m]), float(logprob[i, m]), top_ids[i, m], top_lp[i, m], now)
            if not seq.finished:  # blocks of tokens past a stop are never published
                self.scheduler.register_full_blocks(seq)
            touched[seq.request_id] = self.requests[seq.request_id]
        return [self._output(r, as_deltas) for r in touched.values() if not final_only or r.finished]

    def _accept(self, seq: Sequence, index: int, token: int, lp: float, top_ids, top_lp, now: float) -> None:
        """One new token (already in token_ids): logprobs, text, stops."""
        seq.metrics.on_token(now)
        p = seq.params
        if p.logprobs is not None:
            entry = {token: lp}
            entry.update((int(t), float(v)) for t, v in zip(top_ids[: p.logprobs], top_lp[: p.logprobs]))
            seq.logprobs.append(entry)
        generated = index + 1 - seq.num_prompt
        if token in seq.stop_ids and generated > p.min_tokens:  # EOS/stop ids: in token_ids, not in the text
            self._finish(seq, index, "stop", None if token in self.eos_ids and token not in p.stop_token_ids else token)
            return
        new = "" if self.tokenizer is None else \
            detokenizer.append_tokens(self.tokenizer, seq.detok, seq.token_ids, p.skip_special_tokens, index + 1)
        stop = detokenizer.find_stop(seq.detok, p.stop, len(new), p.include_stop_str_in_output)
        if stop is not None:
            self._finish(seq, index, "stop", stop)
        elif generated >= seq.max_tokens or index + 1 >= self.max_model_len:
            self._finish(seq, index, "length", None)

    def _finish(self, seq: Sequence, index: int, reason: str, stop_reason) -> None:
        self._trim_pending(seq, index + 1)
        self.scheduler.register_full_blocks(seq)  # (a multi-step's, up to the stop: `_read` left them to `_emit`)
        self.scheduler.finish(seq, reason, stop_reason)

    @staticmethod
    def _trim_pending(seq: Sequence, keep: int | None = None) -> None:
        """Drop tokens sampled after the one that finished the sequence (or still on the device at abort)."""
        if keep is None:
            keep = seq.token_ids.index(PENDING) if PENDING in seq.token_ids else len(seq.token_ids)
        del seq.token_ids[keep:]
        del seq.logprobs[keep - seq.num_prompt :]

    def _delta(self, request: Request) -> RequestDelta:
        """The request's news since its last report: what the engine process sends (see messages.RequestDelta)."""
        completions = []
        for i, seq in enumerate(request.seqs):
            ids, first = seq.token_ids, seq.num_prompt
            end = len(ids)  # tokens still on the device (PENDING) can only be the last few
            while end > first and ids[end - 1] == PENDING:
                end -= 1
            sent = request.sent[i]
            lps = seq.logprobs[sent : end - first] if seq.params.logprobs is not None else None
            text = detokenizer.stream_delta(seq.detok, seq.params.stop, seq.finished)
            completions.append(CompletionDelta(seq.index, text, ids[first + sent : end], lps, seq.finish_reason,
                                               seq.stop_reason))  # fmt: skip
            request.sent[i] = end - first
        finished = request.finished
        if finished:
            del self.requests[request.request_id]
        prompt_logprobs = None if request.reported else request.prompt_logprobs
        request.reported = True
        timings = request.seqs[0].metrics.timings() if finished else None
        trace = None
        if request.trace and any(c.token_ids for c in completions) and not request.seqs[0].hand_off:
            # a pulled hand-off's first tokens: its phases go along (a prefill hand-off's, as it leaves)
            trace = traced(request)
            request.trace = {}
        return RequestDelta(request.request_id, finished, completions, prompt_logprobs, timings, trace=trace)

    def _output(self, request: Request, as_delta: bool = False) -> RequestOutput | RequestDelta:
        """The request's output: its whole text and tokens so far, and what is new since the last one."""
        delta = self._delta(request)
        if as_delta:
            return delta
        outs = []
        for seq, d in zip(request.seqs, delta.completions):
            n, first = request.sent[d.index], seq.num_prompt
            # The text so far is what the deltas spelled: a tail that may still become a stop string waits.
            whole = seq.detok.text[: seq.detok.streamed]
            outs.append(CompletionOutput(d.index, whole, seq.token_ids[first : first + n],
                                         seq.logprobs[:n] if d.logprobs is not None else None, d.finish_reason,
                                         d.stop_reason, d.text, d.token_ids, d.logprobs))  # fmt: skip
        return RequestOutput(request.request_id, request.prompt, request.prompt_ids, outs, delta.finished,
                             request.seqs[0].metrics, request.prompt_logprobs)  # fmt: skip

    # -- gauges -----------------------------------------------------------------------------------------------------

    def take_loop_stats(self) -> LoopStats:
        """The loop's stats since the last call (what the engine process logs); they stay in the lifetime totals
        stats() reports."""
        taken, self.loop_stats = self.loop_stats, LoopStats()
        taken.compiles = CompileCounter.take_recent()
        life = self.lifetime
        life.steps, life.computed, life.busy_s = life.steps + taken.steps, life.computed + taken.computed, \
            life.busy_s + taken.busy_s  # fmt: skip
        return taken

    def stats(self) -> EngineStats:
        pool, scheduler, now, life = self.pool, self.scheduler, self.loop_stats, self.lifetime
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=pool.usage(),
            prefix_cache_queries=pool.queries,
            prefix_cache_hits=pool.hits,
            num_free_blocks=pool.num_free,
            num_blocks=pool.num_blocks,
            kv_tiers=self.tiers.stats() if self.tiers is not None else [],
            num_loading=self.scheduler.loading() if self.tiers is not None else 0,
            num_preemptions=scheduler.num_preemptions,
            expert_load=self._expert_load(),
            waiting_prompt_tokens=sum(len(s.token_ids) - s.num_computed for s in scheduler.waiting),
            running_tokens=sum(len(s.token_ids) for s in scheduler.running),
            max_num_batched_tokens=self.args.max_num_batched_tokens,
            block_size=self.args.block_size,
            total_steps=life.steps + now.steps,
            total_tokens=life.computed + now.computed,
            total_busy_s=life.busy_s + now.busy_s,
            **(self.speculator.stats() if self.speculator is not None else {}),
        )

    def _expert_load(self) -> list[list[int]]:
        if not self.cfg.num_experts:
            return []
        from rtpjax.models import moe

        return moe.logical_load(self.runner.read_expert_load(), self.cfg, self.expert_placement).tolist()

"""The engine's scheduler on a simulated GPU: a serving run in virtual time, to compare scheduling choices where no
GPU is at hand, and to see what a capped KV pool costs.

The real Scheduler and BlockPool run every step; the model does not. A step costs `step_ms` plus `token_ms` per
prompt token it computes (a decode row costs `step_ms` alone: weight-bound), and a sampled token is a fresh id. With
`--host-tier`, every block ever published stays in a host tier of unbounded size and a waiting sequence's prefix
below the device comes back at admission as a block load costing `load_ms_per_block` (an adopted request's host
blocks, standing in for the engine's tier with its asynchronous fetch taken as already done). Traffic is
serve_bench's prefix_repetition (each prefix sent num-prompts / num-prefixes times, in shuffled order) or multi_turn
(conversations of `--num-turns` turns, each sending the conversation so far and `--input-len` new tokens, after
`--think-time` seconds on average), `--max-concurrency` clients, ignore_eos; closed loop (each client sends when its
last request ends), or with `--request-rate R` Poisson arrivals at R requests (or conversations) a second
(serve_bench's open loop; TTFT counts from arrival, or from when a client was free under the concurrency cap). In a
closed loop a faster server gets more work at once, so TTFT falls only as much as throughput rises; at a fixed rate
below saturation it falls with the work each request costs. A later turn counts its TTFT from the end of its pause.
Turns join as exact tokens here; serve_bench's re-tokenized text (and a chat template) may hit a little less.
`--scheduler-module` runs another version's scheduler.py beside this one.

What it leaves out: the engine's overlap of host work with the device, speculation, the tiers' own logic and waits
(pins, staging, rows from disk) and the host tier's capacity. Calibrate `step_ms` / `token_ms` from a real run's loop
log (a decode step's time; "recompute N tokens/s" of the tiers' start line) before trusting absolute times; orderings
between scheduling choices are what it is for.

    git show c66b3b6:rtpjax/engine/scheduler.py > /tmp/old_scheduler.py
    python -m rtpjax.benchmarks.sched_sim --max-concurrency 32 --scheduler-module /tmp/old_scheduler.py, \
        --scheduling-policy lpm,fcfs --decode-headroom 0,1 --host-tier both --out sched_sim.json
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import importlib.util
import inspect
import itertools
import json
import sys

import numpy as np

from rtpjax.benchmarks.serve_bench import think_times
from rtpjax.engine.scheduler import Scheduler
from rtpjax.engine.sequence import PENDING, HostKV, Sequence
from rtpjax.kv.block_pool import BlockPool
from rtpjax.runner.model_runner import buckets, pick, step_buckets
from rtpjax.sampling_params import SamplingParams


@dataclasses.dataclass
class SimConfig:
    num_blocks: int = 2048
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    policy: str = "lpm"  # the Scheduler's (--scheduling-policy)
    decode_headroom: float = 0.0  # the Scheduler's (--decode-headroom)
    host_tier: bool = False
    scheduler_module: str | None = None  # another version's scheduler.py to run instead (see scheduler_class)
    step_ms: float = 7.5
    token_ms: float = 1 / 42.589  # one prompt token at 42,589 tokens/s (H100, 8B, the tiers' start line)
    load_ms_per_block: float = 2 * 2**20 / 34.66e6  # 2 MiB at 34.66 GB/s (H100 onload)
    # what a step with prompt tokens pays token_ms for: its prompt tokens ("exact"), or those and the padding of its
    # rows to the engine's token buckets ("powers": powers of two; "quarters": the runner's step_buckets); a step's
    # decode rows are in step_ms either way
    token_buckets: str = "exact"

    def __post_init__(self):
        if self.token_buckets not in ("exact", "powers", "quarters"):
            raise ValueError(f"--token-buckets must be exact, powers or quarters, got {self.token_buckets!r}")

    def prompt_cost_tokens(self, prompt_tokens: int, rows: int) -> int:
        """The tokens a step with `prompt_tokens` prompt tokens among its `rows` pays token_ms for."""
        if self.token_buckets == "exact" or not prompt_tokens:
            return prompt_tokens
        sizes = (buckets if self.token_buckets == "powers" else step_buckets)(self.max_num_batched_tokens, 16)
        return pick(sizes, rows) - (rows - prompt_tokens)


@dataclasses.dataclass
class Traffic:
    dataset_name: str = "prefix_repetition"  # or multi_turn (serve_bench's names)
    num_prompts: int = 256  # requests (multi_turn: turns, num_turns to a conversation)
    num_prefixes: int = 32
    prefix_len: int = 4096
    suffix_len: int = 256
    num_turns: int = 4  # multi_turn: each turn sends the conversation so far and input_len new tokens
    input_len: int = 1024
    think_time: float = 0.0  # multi_turn: mean seconds between an answer and the next turn (serve_bench's pauses)
    output_len: int = 128
    max_concurrency: int = 32
    request_rate: float = float("inf")  # requests/s (multi_turn: conversations/s), Poisson arrivals; inf: closed loop
    seed: int = 0

    def __post_init__(self):
        if self.dataset_name not in ("prefix_repetition", "multi_turn"):
            raise ValueError(f"--dataset-name must be prefix_repetition or multi_turn, got {self.dataset_name!r}")
        if self.max_concurrency < 1 or not self.request_rate > 0 or not self.think_time >= 0:
            raise ValueError(f"--max-concurrency must be >= 1, --request-rate > 0 (inf: closed loop) and "
                             f"--think-time >= 0, got {self.max_concurrency}, {self.request_rate}, "
                             f"{self.think_time}")  # fmt: skip

    def units(self) -> list[list[list[int]]]:
        """What each client unit sends, turn by turn: a request's prompt (one turn), or a conversation's new inputs."""
        rng = np.random.default_rng(self.seed)
        if self.dataset_name == "multi_turn":
            return [[rng.integers(0, 100_000, self.input_len).tolist() for _ in range(self.num_turns)]
                    for _ in range(max(1, self.num_prompts // self.num_turns))]  # fmt: skip
        prefixes = [rng.integers(0, 100_000, self.prefix_len).tolist() for _ in range(self.num_prefixes)]
        prompts = [prefixes[i % self.num_prefixes] + rng.integers(0, 100_000, self.suffix_len).tolist()
                   for i in range(self.num_prompts)]  # fmt: skip
        rng.shuffle(prompts)
        return [[prompt] for prompt in prompts]

    def arrivals(self, n: int) -> np.ndarray:
        """The arrival times in seconds of n units: all at 0 in a closed loop (sent as clients free up)."""
        if self.request_rate == float("inf"):
            return np.zeros(n)
        gaps = np.random.default_rng(self.seed + 1).exponential(1 / self.request_rate, n)
        return np.cumsum(gaps) - gaps[0]


class Clients:
    """serve_bench's clients: units arrive at their times and their requests are sent in the order they became
    ready (the concurrency gate's FIFO) while fewer than max_concurrency are in flight; a conversation's next turn
    (all of its last one, generated tokens included, then new input) is ready its pause after that one ends. A
    request's TTFT counts from when it was ready, or from when a client became free if none was."""

    def __init__(self, traffic: Traffic):
        self.traffic, self.inputs = traffic, traffic.units()
        arrivals = traffic.arrivals(len(self.inputs))
        self.ready = [(t, u, u, 0) for u, t in enumerate(arrivals)]  # (time, FIFO order: the unit at first, unit, turn)
        heapq.heapify(self.ready)
        self.pauses = [think_times(traffic.think_time, traffic.seed, u, len(turns)) for u, turns in
                       enumerate(self.inputs)]  # fmt: skip
        self.history: dict[int, list[int]] = {}  # a conversation's tokens so far (its last turn's, answer included)
        self.fifo, self.orders = itertools.count(len(self.inputs)), itertools.count()
        self.in_flight: dict[Sequence, tuple[float, int, int]] = {}  # sent when, unit, turn
        self.free_since = 0.0  # when a client last became free (the cap reached: not yet)

    def send_due(self, now: float) -> list[Sequence]:
        sent = []
        while self.ready and self.ready[0][0] <= now and len(self.in_flight) < self.traffic.max_concurrency:
            ready, _, unit, turn = heapq.heappop(self.ready)
            prompt = self.history.pop(unit, []) + self.inputs[unit][turn]
            out = self.traffic.output_len
            seq = Sequence(f"{unit}.{turn}", 0, prompt, SamplingParams(max_tokens=out, ignore_eos=True), 0, out,
                           arrival_order=next(self.orders))  # fmt: skip
            self.in_flight[seq] = (max(ready, self.free_since), unit, turn)
            sent.append(seq)
        if len(self.in_flight) >= self.traffic.max_concurrency:
            self.free_since = float("inf")
        return sent

    def sent_at(self, seq: Sequence) -> float:
        return self.in_flight[seq][0]

    def done(self, seq: Sequence, now: float) -> float:
        """A request ended: its client is free, and its conversation's next turn ready after its pause. Returns when
        it was sent."""
        sent, unit, turn = self.in_flight.pop(seq)
        self.free_since = min(self.free_since, now)
        if turn + 1 < len(self.inputs[unit]):
            self.history[unit] = list(seq.token_ids)
            heapq.heappush(self.ready, (now + self.pauses[unit][turn + 1], next(self.fifo), unit, turn + 1))
        return sent

    def next_ready(self) -> float | None:
        return self.ready[0][0] if self.ready else None


class HostTier:
    """Every published block's hash, forever: what an unbounded host tier would hold."""

    def __init__(self, pool: BlockPool):
        self.below: set[bytes] = set()
        register = pool.register

        def register_and_keep(block, h, *rest):
            self.below.add(h)
            register(block, h, *rest)

        pool.register = register_and_keep

    def offer(self, scheduler: Scheduler, seq: Sequence) -> None:
        """Give a waiting sequence the blocks below the device that continue its device share, as HostKV."""
        hashes = scheduler._hashes(seq)
        max_shared = (len(seq.token_ids) - 1) // scheduler.block_size
        on_device = len(scheduler.pool.lookup(hashes)[:max_shared])
        n = on_device
        while n < max_shared and hashes[n] in self.below:
            n += 1
        seq.host_kv = HostKV(None, list(range(n)), n * scheduler.block_size) if n > on_device else None


def scheduler_class(path: str | None) -> type:
    """The Scheduler of another version of rtpjax/engine/scheduler.py, to compare with (`git show
    REV:rtpjax/engine/scheduler.py > old.py`); None: this one."""
    if path is None:
        return Scheduler
    spec = importlib.util.spec_from_file_location(f"compared_scheduler_{abs(hash(path))}", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # (its dataclasses look it up)
    spec.loader.exec_module(module)
    return module.Scheduler


def run(config: SimConfig, traffic: Traffic) -> dict:
    pool = BlockPool(config.num_blocks)
    tier = HostTier(pool) if config.host_tier else None
    cls = scheduler_class(config.scheduler_module)
    options = {"decode_headroom": config.decode_headroom, "policy": config.policy}
    known = inspect.signature(cls).parameters  # an older scheduler may lack some
    scheduler = cls(pool, config.block_size, config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len,
                    **{k: v for k, v in options.items() if k in known})  # fmt: skip
    longest = traffic.num_turns * (traffic.input_len + traffic.output_len)
    if traffic.dataset_name == "multi_turn" and longest > config.max_model_len:
        raise ValueError(f"{traffic.num_turns} turns of {traffic.input_len} + {traffic.output_len} tokens reach "
                         f"{longest}, past --max-model-len {config.max_model_len}")  # fmt: skip
    clients, ids = Clients(traffic), itertools.count(1_000_000)
    now, steps, computed, loaded = 0.0, 0, 0, 0
    ttft, e2el = [], []

    def read(schedule) -> None:
        """The step's tokens into its sequences (those stopped meanwhile skipped), as the engine's _read."""
        for item in schedule.items:
            seq = item.seq
            if seq.finished:
                continue
            if item.samples:
                index = item.start + item.num_tokens  # its PENDING token (the next step may have added another)
                seq.token_ids[index] = next(ids)
                if index == seq.num_prompt:
                    ttft.append(now - clients.sent_at(seq))
            scheduler.register_full_blocks(seq)
            if seq.num_generated >= seq.max_tokens and PENDING not in seq.token_ids[-1:]:
                scheduler.finish(seq, "length")
                e2el.append(now - clients.done(seq, now))

    inflight, stalled = None, 0  # the step launched last: as the engine does, the next is scheduled before it is read
    while clients.next_ready() is not None or scheduler.has_work() or inflight is not None:
        for seq in clients.send_due(now):
            scheduler.add(seq)
        if not scheduler.has_work() and inflight is None:
            now = clients.next_ready()  # idle until the next arrival (a client is free: none is in flight)
            continue
        if tier is not None:
            for seq in scheduler.waiting:
                tier.offer(scheduler, seq)
        schedule = scheduler.schedule()
        if tier is not None:
            for seq in scheduler.waiting:
                seq.host_kv = None  # offered again next round, from what is below then
        prompt_tokens = sum(item.num_tokens for item in schedule.items if not (item.samples and item.num_tokens == 1))
        blocks_loaded = sum(len(load.blocks) for load in schedule.loads)
        if inflight is not None:
            read(inflight)
        inflight = schedule if schedule.items else None
        stalled = 0 if schedule.items else stalled + 1
        if stalled > 1000:
            raise RuntimeError("the simulated run does not finish: the scheduler admits nothing")
        rows = sum(item.num_tokens for item in schedule.items)
        cost_tokens = config.prompt_cost_tokens(prompt_tokens, rows)
        now += (config.step_ms + config.token_ms * cost_tokens + config.load_ms_per_block * blocks_loaded) / 1e3
        steps, computed, loaded = steps + 1, computed + prompt_tokens, loaded + blocks_loaded
    return {
        "duration_s": now, "steps": steps, "preemptions": scheduler.num_preemptions,
        "prompt_tokens_computed": computed, "blocks_loaded": loaded,
        "prefix_hit_rate": pool.hits / max(pool.queries, 1),
        "output_tok_s": len(e2el) * traffic.output_len / now,
        "p50_ttft_ms": float(np.percentile(ttft, 50) * 1e3), "p95_ttft_ms": float(np.percentile(ttft, 95) * 1e3),
        "p99_ttft_ms": float(np.percentile(ttft, 99) * 1e3), "max_ttft_ms": float(np.max(ttft) * 1e3),
        "mean_ttft_ms": float(np.mean(ttft) * 1e3), "p95_e2el_ms": float(np.percentile(e2el, 95) * 1e3),
    }  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Traffic):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    varied = ("policy", "decode_headroom", "host_tier", "scheduler_module")  # lists: every combination runs
    for f in dataclasses.fields(SimConfig):
        if f.name not in varied:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    p.add_argument("--scheduling-policy", default="lpm,fcfs", help="comma-separated: lpm, fcfs")
    p.add_argument("--decode-headroom", default="0", help="comma-separated shares in [0, 1]")
    p.add_argument("--host-tier", choices=("off", "on", "both"), default="both")
    p.add_argument("--scheduler-module", default="", help="comma-separated paths of other versions' scheduler.py "
                   "(each a run of its own; an empty item: this version's)")
    p.add_argument("--out", default=None)
    args = vars(p.parse_args(argv))
    traffic = Traffic(**{f.name: args[f.name] for f in dataclasses.fields(Traffic)})
    base = {f.name: args[f.name] for f in dataclasses.fields(SimConfig) if f.name not in varied}
    tiers = {"off": [False], "on": [True], "both": [False, True]}[args["host_tier"]]
    rows = []
    runs = []
    for module in args["scheduler_module"].split(","):
        known = inspect.signature(scheduler_class(module or None)).parameters  # an older one may lack options
        policies = args["scheduling_policy"].split(",") if "policy" in known else ["-"]
        headrooms = args["decode_headroom"].split(",") if "decode_headroom" in known else ["0"]
        runs += itertools.product([module], tiers, policies, headrooms)
    for module, host_tier, policy, headroom in runs:
        config = SimConfig(**base, policy=policy, decode_headroom=float(headroom), host_tier=host_tier,
                           scheduler_module=module or None)  # fmt: skip
        row = {"scheduler": module or "this", "host_tier": host_tier, "policy": policy,
               "decode_headroom": float(headroom)}  # fmt: skip
        rows.append(row | run(config, traffic))
    columns = ("scheduler", "tier", "policy", "headroom", "P50 TTFT", "P95 TTFT", "max TTFT", "tok/s", "preempt",
               "computed", "loaded")  # fmt: skip
    print(" ".join(f"{c:>9}" for c in columns))
    for r in rows:
        cells = (r["scheduler"][-9:], "host" if r["host_tier"] else "dev", r["policy"], f"{r['decode_headroom']:g}",
                 *(f"{r[k]:.0f}" for k in ("p50_ttft_ms", "p95_ttft_ms", "max_ttft_ms", "output_tok_s")),
                 r["preemptions"], r["prompt_tokens_computed"], r["blocks_loaded"])  # fmt: skip
        print(" ".join(f"{c:>9}" for c in cells))
    if args["out"]:
        with open(args["out"], "w") as f:
            json.dump({"traffic": dataclasses.asdict(traffic), "config": base, "runs": rows}, f, indent=1)


if __name__ == "__main__":
    main()

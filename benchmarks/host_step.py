"""The engine loop's host work per step: `--rows` streams decoding at once, the loop run as the engine process runs it
(deltas, encoded as the step's message), its time split as the engine's own log splits it.

On a GPU at high concurrency the loop can be bound by this host work rather than by the device step (see
benchmarks/RESULTS.md). With the default tiny random model (so the device part is negligible) and SmolLM2's BPE
tokenizer it runs anywhere; `--shape llama3-8b` makes random weights of a real shape on the device (`--load-format
dummy`). `--profile` says where the host time goes. `--idle-launch` also runs the steps with the device drained before
each launch: if launching then gets much cheaper, queuing a step waits on the previous one rather than costing host
work (on the H200 it did not: 3.7 ms either way). `--dispatch-cost` times queuing a compiled no-op of 10, 100 and 400
arrays (the step passes ~360: weights, KV cache, state; 155 us for 400 there, so the arguments are not the cost).

    python -m rtpjax.benchmarks.host_step --rows 256 --steps 60 [--profile] [--out host_step.json]
    python -m rtpjax.benchmarks.host_step --shape llama3-8b --rows 256 --steps 100 --idle-launch --dispatch-cost

Every engine option is a flag (`rtpjax.options`) but those --rows, --steps and --shape set: max-num-seqs (= rows),
max-num-batched-tokens, max-model-len and load-format.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import json
import pstats
import shutil
import tempfile
import time
from pathlib import Path

from rtpjax.engine.stall_meter import GcTimes
from rtpjax.options import add_engine_arguments, engine_args_from


def tiny_model(folder: Path) -> Path:
    """The "tiny" random checkpoint (384-token vocabulary) with SmolLM2's BPE tokenizer (its ids < 384 are real)."""
    from rtpjax.benchmarks.random_checkpoint import write_random_checkpoint
    from rtpjax.loading.model_source import resolve_model

    write_random_checkpoint(folder, "tiny", shards=1, dtype="float32")
    source = Path(resolve_model(None))
    for f in source.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copy(f, folder / f.name)
    return folder


# Engine options the workload sets (no flags for them here).
SIZED = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "load_format")


def make_engine(shape: str, rows: int, steps: int, prompt_len: int, args):
    """An engine of `args` (EngineArgs) with the SIZED options set for the workload."""
    from rtpjax import LLMEngine
    from rtpjax.benchmarks.random_checkpoint import write_config_only

    with tempfile.TemporaryDirectory() as tmp:
        if shape == "tiny":
            model, load_format = tiny_model(Path(tmp) / "tiny"), "auto"
        else:
            model, load_format = write_config_only(Path(tmp) / shape, shape), "dummy"
        # Contexts just long enough: the CPU's reference attention reads every token's whole block table.
        args = dataclasses.replace(args, max_model_len=prompt_len + steps + 64, max_num_seqs=rows,
                                   max_num_batched_tokens=max(2048, rows), load_format=load_format)  # fmt: skip
        return LLMEngine(str(model), args)


def run_steps(engine, steps: int, profiler=None, drain: bool = False) -> dict:
    """`steps` engine steps as the engine process runs them; `drain`: wait for the device before each one."""
    import jax

    from rtpjax.distributed import messages
    from rtpjax.engine.core import LoopStats

    engine.loop_stats = LoopStats()
    collections = GcTimes()
    gc.callbacks.append(collections)
    began, encode_s = time.perf_counter(), 0.0
    if profiler:
        profiler.enable()
    for _ in range(steps):
        if drain and engine.inflight is not None:
            jax.block_until_ready(engine.inflight[1])
        outputs = engine.step(as_deltas=True)
        t = time.perf_counter()
        messages.encode(messages.StepOutputs(outputs, [], engine.stats()))  # as sent
        encode_s += time.perf_counter() - t
    if profiler:
        profiler.disable()
    seconds = time.perf_counter() - began
    gc.callbacks.remove(collections)
    s, ms = engine.loop_stats, 1e3 / steps
    outputs = s.busy_s - s.prepare_s - s.launch_s - s.device_wait_s
    return dict(rows_per_step=s.rows / steps, step_ms=seconds * ms, scheduling_ms=s.prepare_s * ms,
                launching_ms=s.launch_s * ms, reading_ms=s.device_wait_s * ms, outputs_ms=outputs * ms,
                encoding_ms=encode_s * ms, gc=collections.summary())


def measure(rows: int, steps: int, profile: bool = False, shape: str = "tiny", idle_launch: bool = False,
            prompt_len: int = 128, engine_args=None) -> dict:
    """engine_args: EngineArgs (default: the defaults) whose SIZED options the workload replaces."""
    import numpy as np

    from rtpjax import EngineArgs, SamplingParams

    total = steps * (1 + idle_launch)
    engine = make_engine(shape, rows, total, prompt_len, engine_args or EngineArgs())
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=total + 32, temperature=0, ignore_eos=True)  # never finishes while measured
    for _ in range(rows):
        engine.add(engine.make_request(rng.integers(3, 384, prompt_len).tolist(), params))
    while engine.scheduler.waiting or engine.loop_stats.rows < rows * 3:  # prompts in, a few decode steps warm
        engine.step(as_deltas=True)
    profiler = cProfile.Profile() if profile else None
    result = dict(shape=shape, rows=rows, steps=steps, profiled=profile, **run_steps(engine, steps, profiler))
    if idle_launch:
        result["idle_launch"] = run_steps(engine, steps, drain=True)
    if profiler:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        result["profile"] = text.getvalue()
    return result


def dispatch_cost(counts=(10, 100, 400), calls: int = 200) -> dict:
    """Host microseconds to queue a compiled no-op that takes n small arrays (one of them donated), device idle:
    what the engine's ~360 step arguments (weights, KV cache, state) cost per launch on this backend."""
    import jax
    import jax.numpy as jnp

    out = {}
    for n in counts:
        xs = [jnp.ones((8, 128)) for _ in range(n - 1)]
        step = jax.jit(lambda xs, c: (xs[0][0, 0] + c[0, 0], c + 1), donate_argnums=(1,))
        c = jnp.ones((8, 128))
        compiled = step.lower(xs, c).compile()
        for _ in range(3):
            _, c = compiled(xs, c)
        jax.block_until_ready(c)
        began = time.perf_counter()
        for _ in range(calls):
            _, c = compiled(xs, c)
        out[n] = (time.perf_counter() - began) / calls * 1e6
        jax.block_until_ready(c)
    return out


def describe(r: dict) -> str:
    collected = ", ".join(f"{g} {c['count']} in {c['ms']:.1f} ms" for g, c in r["gc"].items())
    return (f"{r['rows_per_step']:.0f} rows per step: {r['step_ms']:.2f} ms per step = {r['scheduling_ms']:.2f} "
            f"scheduling + {r['launching_ms']:.2f} launching + {r['reading_ms']:.2f} reading tokens + "
            f"{r['outputs_ms']:.2f} outputs (+ {r['encoding_ms']:.2f} encoding the step's message); Python's "
            f"collections: {collected}")


def main():
    from rtpjax.benchmarks.random_checkpoint import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--profile", action="store_true", help="cProfile the measured steps (slows them ~2x)")
    parser.add_argument("--idle-launch", action="store_true", help="also time steps launched on a drained device")
    parser.add_argument("--dispatch-cost", action="store_true", help="also time queuing a no-op of 10/100/400 arrays")
    parser.add_argument("--out")
    add_engine_arguments(parser, exclude=SIZED)
    args = parser.parse_args()
    r = measure(args.rows, args.steps, args.profile, args.shape, args.idle_launch, engine_args=engine_args_from(args))
    print(describe(r))
    if args.idle_launch:
        print("device drained before each launch: " + describe(r["idle_launch"]))
    if args.dispatch_cost:
        r["dispatch_us"] = dispatch_cost()
        print("queuing a no-op: " + ", ".join(f"{n} arrays {us:.0f} us" for n, us in r["dispatch_us"].items()))
    if args.profile:
        print(r["profile"])
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()

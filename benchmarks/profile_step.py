"""Where a compiled engine step's device time goes: traces a few back-to-back steps per batch bucket with the JAX
profiler and sums GPU kernel time by kernel, against the step's wall time and the time the GPU was busy at all.

    python -m rtpjax.benchmarks.profile_step --shape llama3-8b --batch-sizes 1,32 --out profile.json
    python -m rtpjax.benchmarks.profile_step --batch-sizes 256 --context 640     # real decode rows at 640 tokens
    python -m rtpjax.benchmarks.profile_step --prefill 2048 --context 2048         # a prefill chunk after 2048 tokens
    python -m rtpjax.benchmarks.profile_step --prefill 2048 --context 2048 --mosaic-prefill --kv-write pallas

Every engine option is a flag (`rtpjax.options`), prefix caching off by default; weights are random (`--shape`).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import tempfile
from pathlib import Path


def kernel_times(trace_dir: Path) -> tuple[dict[str, float], int, float, dict[str, float]]:
    """From the perfetto trace: kernel name -> total microseconds on the GPU, the number of kernel launches, the
    microseconds the GPU was busy at all (the union of its events, so overlaps count once), and host event totals."""
    path = next(trace_dir.rglob("perfetto_trace.json.gz"))
    events = json.loads(gzip.decompress(path.read_bytes()))
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    totals: dict[str, float] = collections.defaultdict(float)
    host: dict[str, float] = collections.defaultdict(float)
    spans = []
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            if e.get("pid") in gpu:
                args = e.get("args") or {}
                label = args.get("hlo_op") or e["name"]
                totals[f"{label} [{e['name'][:60]}]"] += float(e["dur"])
                spans.append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
            else:
                host[f"{names.get(e.get('pid'), '')[:20]}: {e['name'][:80]}"] += float(e["dur"])
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return dict(totals), len(spans), busy, dict(host)


def main():
    import jax

    from rtpjax.benchmarks.offline import ENGINE_DEFAULTS, RtpjaxRunner
    from rtpjax.benchmarks.random_checkpoint import SHAPES, write_config_only
    from rtpjax.options import add_engine_arguments, engine_args_from

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--context", type=int, default=0,
                        help="profile real decode rows holding this many tokens each (default: padding rows, no "
                             "context; in a MoE model those all route to the same experts: give --context there)")
    parser.add_argument("--prefill", type=int, default=0,
                        help="profile one prompt's prefill chunk of this many tokens after --context cached tokens "
                             "(a multiple of it; the step's token budget becomes this) instead of decode "
                             "batches")  # fmt: skip
    parser.add_argument("--out", default=None)
    # max-model-len is raised to hold --context and --prefill; the weights are --shape's random ones.
    add_engine_arguments(parser, exclude=("load_format",), max_model_len=2048, **ENGINE_DEFAULTS)
    args = parser.parse_args()
    folder = write_config_only(tempfile.mkdtemp(prefix="rtpjax-profile-"), args.shape)
    engine_args = engine_args_from(args, load_format="dummy",
                                   max_model_len=max(args.max_model_len, args.context + args.prefill + 8),
                                   max_num_batched_tokens=args.prefill or args.max_num_batched_tokens)  # fmt: skip
    runner = RtpjaxRunner(str(folder), **dataclasses.asdict(engine_args))
    engine = runner.llm.engine.runner
    result = {"shape": args.shape, "device": jax.devices()[0].device_kind, "block_size": args.block_size,
              "kv_write": args.kv_write, "mosaic_prefill": args.mosaic_prefill, "batches": {}}  # fmt: skip
    for b in [args.prefill] if args.prefill else map(int, args.batch_sizes.split(",")):
        if args.prefill:
            inputs, ids = runner.prefill_inputs(args.prefill, args.context)
        else:
            inputs, ids = runner.decode_inputs(b, args.context) if args.context else (None, [])
        wall_ms = runner.device_step_ms(b, steps=args.steps, inputs=inputs)
        trace = Path(tempfile.mkdtemp(prefix="rtpjax-trace-"))
        with jax.profiler.trace(str(trace), create_perfetto_trace=True):
            runner.device_step_ms(b, steps=args.steps, inputs=inputs)
        runner.release(ids)
        totals, launches, busy, host = kernel_times(trace)
        kernel_ms = sum(totals.values()) / args.steps / 1e3
        busy_ms = busy / args.steps / 1e3
        t = next(x for x in engine.token_buckets if x >= b)
        top = sorted(totals.items(), key=lambda kv: -kv[1])[: args.top]
        result["batches"][b] = {
            "context": args.context, "bucket": [t, engine._seqs_for(t)], "step_ms": wall_ms, "kernel_ms": kernel_ms,
            "gpu_busy_ms": busy_ms,
            "kernels_per_step": launches / args.steps,
            "top": [{"kernel": k, "ms_per_step": v / args.steps / 1e3} for k, v in top],
        }  # fmt: skip
        print(f"batch {b} (bucket {t}): step {wall_ms:.2f} ms, kernels {kernel_ms:.2f} ms, GPU busy {busy_ms:.2f} ms "
              f"(idle {wall_ms - busy_ms:.2f} ms), {launches / args.steps:.0f} launches/step")  # fmt: skip
        for k, v in top:
            print(f"  {v / args.steps / 1e3:7.3f} ms  {k[:110]}")
        busy = sorted(host.items(), key=lambda kv: -kv[1])[: args.top]
        result["batches"][b]["host_top"] = [{"event": k, "ms_per_step": v / args.steps / 1e3} for k, v in busy]
        print("  host side:")
        for k, v in busy:
            print(f"  {v / args.steps / 1e3:7.3f} ms  {k[:110]}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

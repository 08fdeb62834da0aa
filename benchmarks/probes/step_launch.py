"""Host cost of launching one decode step's model executable, and how often XLA re-records its CUDA graph for it.

    python -m rtpjax.benchmarks.probes.step_launch --shape llama3-8b --out step_launch.json
    python -m rtpjax.benchmarks.probes.step_launch --shape llama3-8b --tensor-parallel-size 2 \
        --setting= --setting="XLA_PYTHON_CLIENT_ALLOCATOR=vmm --xla_gpu_command_buffer_update_mode=SKIP_TEMP"

XLA reads its flags once per process, so each setting runs in a child process with XLA's command-buffer log on; a
setting's NAME=VALUE words are environment variables, the rest XLA_FLAGS. The child reports, for the smallest token
bucket: host ms per call (until the call returns), ms per call back to back, and how many calls re-recorded the
step's CUDA graph ("updates"), and the step's greedy tokens, which every setting must leave unchanged, for:
- as_runner: the runner's executable, the same packed inputs (on the device) every call;
- logits_into_buffer: the logits written into a donated buffer (so no output needs a fresh address);
- fresh_inputs: the runner's executable with the inputs moved to the device anew each call, as the engine does;
- fresh_inputs_copied: as fresh_inputs, the inputs first copied by a kernel XLA cannot fuse away, and the logits into
  a donated buffer: only that copy and the logits' writer then see an address that changes, every other command an
  XLA temporary (stable under SKIP_TEMP with the VMM allocator) or an unchanged argument.
A call that re-records pays for the update and for a slower graph launch; one that does not launches the whole step
for a few microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

from rtpjax.benchmarks.probes import report

CALLS = 30
COPY_BLOCK = 1024


def kernel_copy(x):
    """x (1-D, a multiple of COPY_BLOCK long) copied by a Pallas kernel: a custom call, which XLA neither fuses into
    its consumers nor elides, so they read an XLA temporary rather than the argument."""
    import jax
    from jax.experimental import pallas as pl

    def copy(x_ref, o_ref):
        o_ref[...] = x_ref[...]

    spec = pl.BlockSpec((COPY_BLOCK,), lambda i: (i,))
    return pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), grid=(x.shape[0] // COPY_BLOCK,),
                          in_specs=[spec], out_specs=spec, interpret=jax.default_backend() == "cpu")(x)  # fmt: skip


def child(shape: str, tp: int) -> None:
    import jax

    from rtpjax.benchmarks.offline import RtpjaxRunner
    from rtpjax.benchmarks.random_checkpoint import write_config_only
    from rtpjax.runner.model_runner import _model_key, model_step
    from rtpjax.runner.step_inputs import pack

    model = str(write_config_only(tempfile.mkdtemp(), shape))
    runner = RtpjaxRunner(model, load_format="dummy", max_num_seqs=32, max_model_len=1024, max_num_batched_tokens=256,
                          tensor_parallel_size=tp, one_row_decode=False,
                          warmup=False).llm.engine.runner  # one step shape is probed (16 rows, as in earlier runs)
    tokens = runner.token_buckets[0]
    batch, _ = runner._batch([], tokens, runner._seqs_for(tokens))
    flat, packing = pack(batch)
    as_runner = runner._compiled.get(_model_key(batch)) or runner._model_executable(flat, packing)

    def into_buffer(params, cache, state, flat, buffer, packing):
        del buffer  # donated: the logits take its place
        return model_step(params, cache, state, flat, packing, cfg=runner.cfg, forward=runner._forward,
                          block_size=runner.block_size)

    def copied_into_buffer(params, cache, state, padded, buffer, packing):
        del buffer
        return into_buffer(params, cache, state, kernel_copy(padded)[: flat.shape[0]], None, packing)

    logits, runner.cache = as_runner(runner.params, runner.cache, runner.state, flat)
    into = jax.jit(into_buffer, static_argnums=(5,), donate_argnums=(1, 4)).lower(
        runner.params, runner.cache, runner.state, flat, logits, packing).compile()  # fmt: skip
    host_flat = np.pad(np.asarray(flat), (0, -flat.shape[0] % COPY_BLOCK))
    copied = jax.jit(copied_into_buffer, static_argnums=(5,), donate_argnums=(1, 4)).lower(
        runner.params, runner.cache, runner.state, host_flat, logits, packing).compile()  # fmt: skip

    on_device = jax.device_put(flat)  # (pack gives a host array: passed as it is, it would move every call)

    def inputs(fresh=None):  # the cache is donated each call: read the latest
        return runner.params, runner.cache, runner.state, on_device if fresh is None else jax.device_put(fresh.copy())

    calls = {"as_runner": lambda logits: as_runner(*inputs()),
             "logits_into_buffer": lambda logits: into(*inputs(), logits),
             "fresh_inputs": lambda logits: as_runner(*inputs(np.asarray(flat))),
             "fresh_inputs_copied": lambda logits: copied(*inputs(host_flat), logits)}
    result = {}
    for name, call in calls.items():
        for _ in range(3):
            logits, runner.cache = call(logits)
        jax.block_until_ready(logits)
        print(f"PROBE-MARK {name}", file=sys.stderr, flush=True)
        began = time.perf_counter()
        for _ in range(CALLS):
            logits, runner.cache = call(logits)
        host = time.perf_counter() - began
        jax.block_until_ready(logits)
        print("PROBE-MARK end", file=sys.stderr, flush=True)  # (the next executable's warm-up is not this loop's)
        result[name] = {"host_ms": host / CALLS * 1e3, "step_ms": (time.perf_counter() - began) / CALLS * 1e3,
                        "greedy_tokens": [int(t) for t in jax.numpy.argmax(logits, axis=-1)]}  # fmt: skip
    print("PROBE-RESULT " + json.dumps(result), flush=True)


def updates_per_mark(log: str) -> dict[str, int]:
    """Re-recordings of the step's command buffer (the one with the most commands, counted in each timed loop on its
    own: each loop times another executable) inside each timed loop."""
    counts, largest, mark = {}, {}, None
    for line in log.splitlines():
        if "PROBE-MARK" in line:
            mark = line.split("PROBE-MARK ")[1].strip()
            if mark != "end":
                counts.setdefault(mark, 0)
            continue
        found = re.search(r"by recoding command buffer cmd sequence.*num_commands=(\d+)", line)
        if found and mark and mark != "end":
            n = int(found.group(1))
            if n > largest.get(mark, 0):
                counts[mark], largest[mark] = 0, n
            if n == largest[mark]:
                counts[mark] += 1
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="llama3-8b")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--setting", action="append", dest="settings", metavar="SETTING",
                        help="XLA_FLAGS and NAME=VALUE environment variables for one child process (repeat; write "
                             "--setting=--xla_...); default: none, then the update modes that give stable addresses "
                             "(rejected ones: reported)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        return child(args.shape, args.tensor_parallel_size)
    rows = []
    # JAX 0.11.2's XLA: ALWAYS_UPDATE (default), SKIP_TEMP, SKIP_PROFILED; SKIP_TEMP's stable temporaries need the VMM
    # allocator (without it XLA falls back to updating them)
    mode, vmm = "--xla_gpu_command_buffer_update_mode=", "XLA_PYTHON_CLIENT_ALLOCATOR=vmm "
    for setting in args.settings or ["", mode + "SKIP_TEMP", vmm + mode + "SKIP_TEMP", vmm + mode + "SKIP_PROFILED"]:
        words = setting.split()
        if any(not word.startswith("-") and "=" not in word for word in words):
            parser.error(f"--setting {setting!r}: each word is an XLA flag (--...) or NAME=VALUE")
        variables = dict(word.split("=", 1) for word in words if not word.startswith("-"))
        flags = " ".join(word for word in words if word.startswith("-"))
        xla_flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), variables.pop("XLA_FLAGS", ""), flags]))
        env = {**os.environ, **variables, "XLA_FLAGS": xla_flags, "TF_CPP_MIN_LOG_LEVEL": "0",
               "TF_CPP_MAX_VLOG_LEVEL": "0", "TF_CPP_VMODULE": "command_buffer_thunk=3"}  # fmt: skip
        cmd = [sys.executable, "-m", "rtpjax.benchmarks.probes.step_launch", "--child", "--shape", args.shape,
               "--tensor-parallel-size", str(args.tensor_parallel_size)]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        row = {"setting": setting}
        found = re.search(r"^PROBE-RESULT (.*)$", done.stdout, re.M)
        if found:
            row.update(json.loads(found.group(1)))
            for name, n in updates_per_mark(done.stderr).items():
                row[name]["graph_updates_per_call"] = n / CALLS
        else:
            lines = done.stderr.strip().splitlines() or ["(no output)"]
            fatal = [line for line in lines if re.match(r"F\d{4} |\w*Error", line)]  # XLA's fatal line, or Python's
            row["error"] = (fatal or lines)[-1][:300]
        if rows and "error" not in rows[0] and "error" not in row:  # a setting must not change what the step computes
            row["same_tokens_as_first_setting"] = all(row[n]["greedy_tokens"] == rows[0][n]["greedy_tokens"]
                                                      for n in row if isinstance(row[n], dict))  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    report(dict(shape=args.shape, tensor_parallel_size=args.tensor_parallel_size, rows=rows), args.out)


if __name__ == "__main__":
    main()

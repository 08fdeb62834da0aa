"""Prefill/decode hand-off costs: the K/V channel's bandwidth and latency per 1k tokens by path (shared memory, TCP,
jax.experimental.transfer where it works) beside the host-staged copy floor for the same bytes, and the TTFT of one
prompt disaggregated (prefill engine -> decode engine) against colocated, engines in processes of their own.

    python -m rtpjax.benchmarks.pd_bench transfer --tokens 1024 2048 --out transfer.json   (8B KV: 32 x 8 x 128 bf16)
    python -m rtpjax.benchmarks.pd_bench ttft MODEL --prompt-len 2048 --out ttft.json [engine flags]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

import numpy as np


def _timed(fn, repeats: int, fresh=lambda: None) -> float:
    """Median seconds of fn(fresh()) after a warm-up; `fresh` (untimed) makes each call's input."""
    fn(fresh())  # warm
    times = []
    for _ in range(repeats):
        arg = fresh()
        began = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def transfer(args) -> dict:
    """Device to device through the channel, as an engine pair does it: gathered rows on the device (their host copy
    started, as BlockCopier.gather_packed leaves them) staged into shared memory with their checksums, pulled, each
    chunk put on the device as soon as it is staged (`shm_sequential`: once all are); beside it the floors for the
    same bytes: one D2H plus one H2D (host-staged), a memcpy."""
    import jax

    from rtpjax.disagg import channel, staging
    from rtpjax.kv.host_blocks import KVLayout

    rows, device = [], jax.devices()[0]
    for tokens in args.tokens:
        layout = KVLayout(args.dtype, 16, args.layers, args.kv_heads, args.head_dim)
        blocks = -(-tokens // layout.block_size)
        host = np.random.default_rng(0).integers(0, 255, (blocks, layout.block_bytes), dtype=np.uint8)
        nbytes = host.size
        on_device = jax.device_put(host)
        store = staging.HeldStore()
        server = channel.TransferServer(store, "127.0.0.1", 0)
        row = {"tokens": tokens, "bytes": nbytes}

        def fresh():  # a jax.Array keeps its host copy once fetched: each run needs a new one
            return (on_device + 0).block_until_ready()

        def load(_, r):  # as BlockCopier.put_rows: the CPU client may alias host memory, so copy there
            return jax.device_put(list(np.array(r) if device.platform == "cpu" else r), device, may_alias=False)

        def via(path, phases, pipelined=True):
            def once(x):
                x.copy_to_host_async()
                staged = store.stage([(blocks, x)], layout)
                if not pipelined:
                    staged.done.result()  # every chunk staged before the pull starts
                store.put("t", staging.Held(layout, blocks, tokens, [], time.monotonic() + 60, staged))
                got = channel.pull("127.0.0.1", server.port, "t", path, time.monotonic() + 60, load)
                d2h, copy = staged.done.result()
                phases.append({"gather_d2h": d2h, "stage": copy, **got.times})

            return once

        for path in ("shm", "tcp"):
            phases = []
            row[f"{path}_s"] = _timed(via(path, phases), args.repeats, fresh)
            for phase in phases[0]:  # where the time goes (medians; they overlap: each chunk moves on once staged)
                row[f"{path}_{phase}_s"] = statistics.median(p[phase] for p in phases[1:])
        row["shm_sequential_s"] = _timed(via("shm", [], pipelined=False), args.repeats, fresh)  # the pipelining's gain
        row["crc32_s"] = _timed(lambda _: channel.checksums([host]), args.repeats)
        row["memcpy_s"] = _timed(lambda _: np.copyto(np.empty_like(host), host), args.repeats)  # the floor
        row["h2d_s"] = _timed(lambda _: jax.device_put(host, device, may_alias=False).block_until_ready(),
                              args.repeats)  # fmt: skip
        row["d2h_s"] = _timed(lambda x: np.asarray(jax.device_get(x)), args.repeats, fresh)
        row["staged_s"] = row["d2h_s"] + row["h2d_s"]  # the floor any host-staged path pays
        try:
            row["jax_transfer_s"] = _timed(lambda _: _jax_transfer([on_device]), args.repeats)
        except Exception as e:  # noqa: BLE001 - recorded: where it does not work is the finding
            row["jax_transfer_error"] = f"{type(e).__name__}: {e}"
        server.close()
        store.close()
        for key in [k for k in row if k.endswith("_s")]:
            row[key.replace("_s", "_GBps")] = nbytes / row[key] / 1e9
            row[key.replace("_s", "_ms_per_1k")] = row[key] * 1e3 * 1024 / tokens
        row["shm_of_staged"] = row["staged_s"] / row["shm_s"]  # the goal: >= 0.8
        rows.append(row)
        print(f"{tokens:6d} tokens {nbytes / 1e6:7.1f} MB: " + "  ".join(
            f"{k[:-5]} {row[k]:6.1f} GB/s" for k in row if k.endswith("_GBps") and k[:-5].count("_") < 1 + k.startswith(
                "jax_")))  # fmt: skip
        for path in ("shm", "tcp"):
            print(f"       {path} ms: {row[path + '_s'] * 1e3:.1f}, phases (overlapping) " + "  ".join(
                f"{k[len(path) + 1 : -2]} {row[k] * 1e3:.1f}" for k in row if k.startswith(path + "_") and
                k.endswith("_s") and k not in (path + "_s", "shm_sequential_s")))  # fmt: skip
    return {"shape": {k: getattr(args, k) for k in ("layers", "kv_heads", "head_dim", "dtype")}, "rows": rows}


_JAX_SERVER = []


def _jax_transfer(arrays) -> None:
    """One pull of `arrays` through jax.experimental.transfer (a server and a connection in this process)."""
    import jax
    from jax.experimental import transfer as jt

    if not _JAX_SERVER:
        _JAX_SERVER.append(jt.start_transfer_server(jax.devices()[0].client, "127.0.0.1:0", ["127.0.0.1:0"]))
    server = _JAX_SERVER[0]
    uid = random.getrandbits(48)
    server.await_pull(uid, arrays)
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for a in arrays]
    for y in server.connect(server.address()).pull(uid, specs):
        y.block_until_ready()


def ttft(args, engine_args: dict) -> dict:
    from rtpjax import AsyncLLM, SamplingParams

    pre = AsyncLLM(args.model, **dict(engine_args, role="prefill"))
    dec = AsyncLLM(args.model, **dict(engine_args, role="both"))
    vocab = dec.info.vocab_size
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    rng = random.Random(0)

    async def first(llm, prompt, rid, params=None):
        async for out in llm.generate(prompt, one, request_id=rid, kv_transfer_params=params):
            return out

    async def run():
        colocated, disagg, handoff = [], [], []
        for i in range(args.repeats + 1):  # the first of each is a warm-up
            prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
            began = time.perf_counter()
            await first(dec, prompt, f"c{i}")
            colocated.append(time.perf_counter() - began)
            prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
            began = time.perf_counter()
            out = await first(pre, prompt, f"p{i}", {"do_remote_decode": True})
            prefilled = time.perf_counter()
            await first(dec, prompt, f"d{i}", out.kv_transfer_params)
            disagg.append(time.perf_counter() - began)
            handoff.append(time.perf_counter() - prefilled)
        return colocated[1:], disagg[1:], handoff[1:]

    try:
        colocated, disagg, handoff = asyncio.run(run())
        phases = {**pre.stats()["kv_transfer_ms"], **dec.stats()["kv_transfer_ms"]}  # means over all, warm-up too
    finally:
        pre.shutdown()
        dec.shutdown()
    result = {"prompt_len": args.prompt_len, "colocated_ttft_ms": statistics.median(colocated) * 1e3,
              "disaggregated_ttft_ms": statistics.median(disagg) * 1e3,
              "handoff_ms": statistics.median(handoff) * 1e3}  # fmt: skip
    result["overhead"] = result["disaggregated_ttft_ms"] / result["colocated_ttft_ms"] - 1
    result["handoff_phases_ms"] = phases
    print(f"TTFT of a {args.prompt_len}-token prompt: colocated {result['colocated_ttft_ms']:.1f} ms, disaggregated "
          f"{result['disaggregated_ttft_ms']:.1f} ms (+{100 * result['overhead']:.0f}%; decode side after the "
          f"prefill answered {result['handoff_ms']:.1f} ms)")  # fmt: skip
    print("hand-off phases (mean ms): " + "  ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    return result


def main(argv=None) -> None:
    from rtpjax.options import add_engine_arguments, engine_args_from

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    t = sub.add_parser("transfer")
    t.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    t.add_argument("--layers", type=int, default=32)
    t.add_argument("--kv-heads", type=int, default=8)
    t.add_argument("--head-dim", type=int, default=128)
    t.add_argument("--dtype", default="bfloat16")
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--out")
    f = sub.add_parser("ttft")
    f.add_argument("model")
    f.add_argument("--prompt-len", type=int, default=2048)
    f.add_argument("--repeats", type=int, default=5)
    f.add_argument("--out")
    add_engine_arguments(f, exclude=("role",))
    args = parser.parse_args(argv)
    if args.part == "transfer":
        result = transfer(args)
    else:
        import dataclasses

        result = ttft(args, dataclasses.asdict(engine_args_from(args)))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)


if __name__ == "__main__":
    main()

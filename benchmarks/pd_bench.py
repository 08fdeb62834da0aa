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


def _kv(tokens: int, layers: int, heads: int, head_dim: int, dtype: str, block: int = 16):
    import jax.numpy as jnp

    from rtpjax.kv.host_blocks import KVBlocks, KVLayout

    blocks = -(-tokens // block)
    shape = (layers, heads, blocks, block, head_dim)
    rng = np.random.default_rng(0)
    size = int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    raw = [rng.integers(0, 255, size, dtype=np.uint8).tobytes() for _ in range(2)]
    return KVBlocks(KVLayout(dtype, block, layers, heads, head_dim), blocks, *raw)


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
    import jax

    from rtpjax.disagg import channel

    rows = []
    for tokens in args.tokens:
        kv = _kv(tokens, args.layers, args.kv_heads, args.head_dim, args.dtype)
        nbytes = len(kv.keys) + len(kv.values)
        store = channel.HeldStore()
        server = channel.TransferServer(store, "127.0.0.1", 0)
        row = {"tokens": tokens, "bytes": nbytes}

        def via(path):
            def once(_):
                store.put("t", channel.Held(kv, tokens, [], time.monotonic() + 60))
                channel.pull("127.0.0.1", server.port, "t", path, time.monotonic() + 60)

            return once

        for path in ("shm", "tcp"):
            row[f"{path}_s"] = _timed(via(path), args.repeats)
        host = np.frombuffer(kv.keys, np.uint8), np.frombuffer(kv.values, np.uint8)
        row["crc32_s"] = _timed(lambda _: channel.checksums([kv.keys, kv.values]), args.repeats)
        row["memcpy_s"] = _timed(lambda _: [np.copyto(np.empty_like(a), a) for a in host], args.repeats)  # the floor
        on_device = [jax.device_put(a) for a in host]
        row["h2d_s"] = _timed(lambda _: [x.block_until_ready() for x in [jax.device_put(a) for a in host]], args.repeats)
        # fresh device arrays each time: a jax.Array keeps its host copy once fetched, so a repeat would cost nothing
        row["d2h_s"] = _timed(lambda xs: [np.asarray(jax.device_get(x)) for x in xs], args.repeats,
                              lambda: [(x + 0).block_until_ready() for x in on_device])  # fmt: skip
        row["staged_s"] = row["d2h_s"] + row["h2d_s"]  # the floor any host-staged path pays
        try:
            row["jax_transfer_s"] = _timed(lambda _: _jax_transfer(on_device), args.repeats)
        except Exception as e:  # noqa: BLE001 - recorded: where it does not work is the finding
            row["jax_transfer_error"] = f"{type(e).__name__}: {e}"
        server.close()
        for key in [k for k in row if k.endswith("_s")]:
            row[key.replace("_s", "_GBps")] = nbytes / row[key] / 1e9
            row[key.replace("_s", "_ms_per_1k")] = row[key] * 1e3 * 1024 / tokens
        rows.append(row)
        print(f"{tokens:6d} tokens {nbytes / 1e6:7.1f} MB: " + "  ".join(
            f"{k[:-5]} {row[k]:6.1f} GB/s" for k in row if k.endswith("_GBps")))  # fmt: skip
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
    finally:
        pre.shutdown()
        dec.shutdown()
    result = {"prompt_len": args.prompt_len, "colocated_ttft_ms": statistics.median(colocated) * 1e3,
              "disaggregated_ttft_ms": statistics.median(disagg) * 1e3,
              "handoff_ms": statistics.median(handoff) * 1e3}  # fmt: skip
    result["overhead"] = result["disaggregated_ttft_ms"] / result["colocated_ttft_ms"] - 1
    print(f"TTFT of a {args.prompt_len}-token prompt: colocated {result['colocated_ttft_ms']:.1f} ms, disaggregated "
          f"{result['disaggregated_ttft_ms']:.1f} ms (+{100 * result['overhead']:.0f}%; decode side after the "
          f"prefill answered {result['handoff_ms']:.1f} ms)")  # fmt: skip
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

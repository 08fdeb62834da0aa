"""Prefill/decode hand-off costs: the K/V channel's bandwidth and latency per 1k tokens by path (shared memory, TCP,
jax.experimental.transfer where it works) beside the host-staged copy floor for the same bytes, and the TTFT of one
prompt disaggregated (prefill engine -> decode engine) against colocated, engines in processes of their own.

    python -m rtpjax.benchmarks.pd_bench transfer --tokens 1024 2048 --out transfer.json   (8B KV: 32 x 8 x 128 bf16)
    python -m rtpjax.benchmarks.pd_bench ttft MODEL --prompt-len 2048 --out ttft.json [engine flags]
    python -m rtpjax.benchmarks.pd_bench serve MODEL --prompt-len 2048 --out serve.json -- [rtpjax serve flags]

`ttft` runs both engines in this process's AsyncLLMs and reports each disaggregated request's timeline (the engines'
hand-off phases between the client's send and its first token). `serve` runs the whole path over HTTP: a prefill and a
role-both `rtpjax serve` and `rtpjax router --pd-disaggregation` in processes of their own, streaming clients timing
the first and second token event, straight from the role-both server (colocated) and through the router (which
streams the prefill's token at once: the hand-off moves to the second token).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time

import numpy as np


def median_seconds(fn, repeats: int, fresh=lambda: None) -> float:
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
    from rtpjax.kv.block_copy import pinned
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
            row[f"{path}_s"] = median_seconds(via(path, phases), args.repeats, fresh)
            for phase in phases[0]:  # where the time goes (medians; they overlap: each chunk moves on once staged)
                row[f"{path}_{phase}_s"] = statistics.median(p[phase] for p in phases[1:])
        row["shm_sequential_s"] = median_seconds(via("shm", [], pipelined=False), args.repeats, fresh)  # the pipelining's gain
        row["crc32_s"] = median_seconds(lambda _: channel.checksums([host]), args.repeats)
        row["memcpy_s"] = median_seconds(lambda _: np.copyto(np.empty_like(host), host), args.repeats)  # the floor
        row["h2d_s"] = median_seconds(lambda _: jax.device_put(host, device, may_alias=False).block_until_ready(),
                              args.repeats)  # fmt: skip
        row["d2h_s"] = median_seconds(lambda x: np.asarray(jax.device_get(x)), args.repeats, fresh)
        row["staged_s"] = row["d2h_s"] + row["h2d_s"]  # a host-staged path through pageable memory
        at = pinned(jax.sharding.SingleDeviceSharding(device))
        if at is not None:  # the best host-staged path: both copies by DMA from and to page-locked memory
            row["pinned_d2h_s"] = median_seconds(lambda x: jax.device_put(x, at).block_until_ready(), args.repeats,
                                                 fresh)  # fmt: skip
            up = jax.device_put(on_device, at).block_until_ready()
            back = at.with_memory_kind(device.default_memory().kind)
            row["pinned_h2d_s"] = median_seconds(lambda _: jax.device_put(up, back).block_until_ready(), args.repeats)
            row["pinned_staged_s"] = row["pinned_d2h_s"] + row["pinned_h2d_s"]
        row.update(_device_to_device(store, server, layout, blocks, tokens, fresh, host, args.repeats))
        try:
            row["jax_transfer_s"] = median_seconds(lambda _: _jax_transfer([on_device]), args.repeats)
        except Exception as e:  # noqa: BLE001 - recorded: where it does not work is the finding
            row["jax_transfer_error"] = f"{type(e).__name__}: {e}"
        server.close()
        store.close()
        for key in [k for k in row if k.endswith("_s")]:
            row[key[:-2] + "_GBps"] = nbytes / row[key] / 1e9
            row[key[:-2] + "_ms_per_1k"] = row[key] * 1e3 * 1024 / tokens
        row["shm_of_staged"] = row["staged_s"] / row["shm_s"]
        if "pinned_staged_s" in row:
            row["shm_of_pinned_staged"] = row["pinned_staged_s"] / row["shm_s"]  # the goal: >= 0.8
            if "device_s" in row:  # the path two engines of one CUDA host take
                row["device_of_pinned_staged"] = row["pinned_staged_s"] / row["device_s"]
        rows.append(row)
        print(f"{tokens:6d} tokens {nbytes / 1e6:7.1f} MB: " + "  ".join(
            f"{k[:-5]} {row[k]:6.1f} GB/s" for k in row if k.endswith("_GBps") and k[:-5].count("_") < 1 + k.startswith(
                ("jax_", "pinned_"))))  # fmt: skip
        for path in [p for p in ("shm", "tcp", "device") if p + "_s" in row]:
            print(f"       {path} ms: {row[path + '_s'] * 1e3:.1f}, phases (overlapping) " + "  ".join(
                f"{k[len(path) + 1 : -2]} {row[k] * 1e3:.1f}" for k in row if k.startswith(path + "_") and
                k.endswith("_s") and k not in (path + "_s", "shm_sequential_s")))  # fmt: skip
    return {"shape": {k: getattr(args, k) for k in ("layers", "kv_heads", "head_dim", "dtype")}, "rows": rows}


def _device_to_device(store, server, layout, blocks: int, tokens: int, fresh, host: np.ndarray, repeats: int) -> dict:
    """The "device" path between two processes (CUDA IPC): a child process pulls the gathered rows `repeats` + 1 times
    (the first a warm-up), each pull timed there and its bytes' sha256 checked here against what was offered."""
    import hashlib
    import multiprocessing

    import jax

    from rtpjax.disagg import device_ipc, staging

    if not device_ipc.available(jax.devices()[0]):
        return {"device_error": "not a CUDA device with its driver library: no device-to-device path"}
    mine, theirs = multiprocessing.get_context("spawn").Pipe()
    child = multiprocessing.get_context("spawn").Process(target=_device_puller, args=(theirs, server.port), daemon=True)
    child.start()
    times, split, want = [], [], hashlib.sha256(host).hexdigest()
    try:
        for i in range(repeats + 1):
            x = fresh()
            store.put(f"d{i}", staging.Held(layout, blocks, tokens, [], time.monotonic() + 60, None, [(blocks, x)],
                                            lambda: store.stage([(blocks, x)], layout)))  # fmt: skip
            mine.send(f"d{i}")
            if not mine.poll(120):
                raise TimeoutError("the device-to-device puller did not answer in 120 s")
            seconds, digest, error, phases = mine.recv()
            if error is not None:
                return {"device_error": error}
            if digest != want:
                return {"device_error": "the bytes pulled device to device differ from those offered"}
            times.append(seconds)
            split.append(phases)
    finally:
        mine.send(None)
        child.join(30)
        if child.is_alive():
            child.kill()
    row = {"device_s": statistics.median(times[1:] or times), "device_bytes_equal": True}
    for phase in split[-1]:  # where it goes (medians, warm-up left out): offer (the prefill side's export), then
        row[f"device_{phase}_s"] = statistics.median(p[phase] for p in split[1:] or split)  # the decode side's
    return row


def _device_puller(conn, port: int) -> None:
    """The child of _device_to_device: pulls each named hand-off device to device, answers (seconds, sha256, error)."""
    import hashlib
    import os

    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.15")  # the parent holds most of the device
    import jax

    from rtpjax.disagg import channel, device_ipc

    device = jax.devices()[0]
    phases, copy_in = {}, device_ipc.copy_in
    device_ipc.copy_in = lambda *a: copy_in(*a, times=phases)  # this process's copies, their phases timed

    def take(layout, copied, pieces):  # a fresh array of each piece's real rows (the copies are reused), as the engine
        rows = [jax.numpy.array(c[: p.real], copy=True) for c, p in zip(copied, pieces)]
        jax.block_until_ready(rows)
        device_ipc.give_back(copied)
        return rows

    while (name := conn.recv()) is not None:
        try:
            began = time.perf_counter()
            got = channel.pull("127.0.0.1", port, name, "device", time.monotonic() + 60,
                               load_device=channel.DeviceLoad(device, take))  # fmt: skip
            seconds = time.perf_counter() - began
            digest = hashlib.sha256(np.asarray(got.rows[0])).hexdigest()
            conn.send((seconds, digest, None, {"offer": got.times["d2d_offer"], **phases,
                                               "check_and_take": got.times["d2d_copy"] - sum(phases.values())}))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which records it
            conn.send((0.0, "", f"{type(e).__name__}: {e}", {}))


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


PREFILL_PHASES = ("added", "scheduled", "gather_began", "gather_queued", "read_began", "first_token", "output")
DECODE_PHASES = ("added", "reserved", "pulled", "adopted", "scheduled", "read_began", "first_token", "output")


def timeline(began: float, prefill: dict, answered: float, decode: dict, first: float) -> dict[str, float]:
    """One disaggregated request's phases in ms after the client sent it, in the order they happen: the engines'
    traces (RequestOutput.trace; time.monotonic() of the same host) between the client's own points."""
    points = {f"prefill.{k}": prefill[k] for k in PREFILL_PHASES if k in prefill}
    points["client.prefill_answered"] = answered
    points.update((f"decode.{k}", decode[k]) for k in DECODE_PHASES if k in decode)
    points["client.first_token"] = first
    return {k: 1e3 * (t - began) for k, t in points.items()}


def _median_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rows if k in r) for k in rows[0]}


def ttft(args, engine_args: dict) -> dict:
    """TTFT and the time to the second token of one prompt, colocated on the decode-side engine (role both) and
    disaggregated (prefill engine, then the decode engine pulls the K/V), with every disaggregated request's
    timeline: where between the client's send and its first token the time goes."""
    from rtpjax import AsyncLLM, SamplingParams

    pre = AsyncLLM(args.model, **dict(engine_args, role="prefill"))
    dec = AsyncLLM(args.model, **dict(engine_args, role="both"))
    vocab = dec.info.vocab_size
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    two = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    rng = random.Random(0)

    async def tokens(llm, prompt, rid, params, transfer=None):
        """(the last output, time.monotonic() of the output that brought each token)."""
        times, out = [], None
        async for out in llm.generate(prompt, params, request_id=rid, kv_transfer_params=transfer):
            now = time.monotonic()
            times += [now] * (len(out.outputs[0].token_ids) - len(times))
        return out, times

    async def run():
        rows = []
        for i in range(args.repeats + 1):  # the first is a warm-up
            row = {}
            prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
            began = time.monotonic()
            out, times = await tokens(dec, prompt, f"c{i}", two)
            row["colocated"] = [times[0] - began, times[1] - began]
            prompt = [rng.randrange(3, vocab) for _ in range(args.prompt_len)]
            began = time.monotonic()
            pout, _ = await tokens(pre, prompt, f"p{i}", one, {"do_remote_decode": True})
            answered = time.monotonic()
            dout, times = await tokens(dec, prompt, f"d{i}", two, pout.kv_transfer_params)
            row["disaggregated"] = [times[0] - began, times[1] - began]
            row["handoff"] = times[0] - answered
            row["timeline"] = timeline(began, pout.trace or {}, answered, dout.trace or {}, times[0])
            rows.append(row)
        return rows[1:]

    try:
        rows = asyncio.run(run())
        phases = {**pre.stats()["kv_transfer_ms"], **dec.stats()["kv_transfer_ms"]}  # means over all, warm-up too
    finally:
        pre.shutdown()
        dec.shutdown()

    def ms(key: str, i: int) -> float:
        return statistics.median(r[key][i] for r in rows) * 1e3

    result = {"prompt_len": args.prompt_len, "colocated_ttft_ms": ms("colocated", 0),
              "disaggregated_ttft_ms": ms("disaggregated", 0), "colocated_second_token_ms": ms("colocated", 1),
              "disaggregated_second_token_ms": ms("disaggregated", 1),
              "handoff_ms": statistics.median(r["handoff"] for r in rows) * 1e3}  # fmt: skip
    result["overhead"] = result["disaggregated_ttft_ms"] / result["colocated_ttft_ms"] - 1
    result["handoff_phases_ms"] = phases
    result["timeline_ms"] = _median_rows([r["timeline"] for r in rows])  # medians per phase
    result["rows_ms"] = [{k: [1e3 * t for t in r[k]] for k in ("colocated", "disaggregated")} for r in rows]
    result["timelines_ms"] = [r["timeline"] for r in rows]
    print(f"TTFT of a {args.prompt_len}-token prompt: colocated {result['colocated_ttft_ms']:.1f} ms, disaggregated "
          f"{result['disaggregated_ttft_ms']:.1f} ms (+{100 * result['overhead']:.0f}%; decode side after the "
          f"prefill answered {result['handoff_ms']:.1f} ms); second token colocated "
          f"{result['colocated_second_token_ms']:.1f} ms, disaggregated {result['disaggregated_second_token_ms']:.1f} "
          "ms")  # fmt: skip
    print("hand-off phases (mean ms): " + "  ".join(f"{k} {v:.1f}" for k, v in phases.items()))
    print("timeline (median ms after the client sent): " + "  ".join(
        f"{k} {v:.1f}" for k, v in result["timeline_ms"].items()))  # fmt: skip
    return result


def _events(chunks: bytes) -> tuple[list[dict], bytes]:
    """The complete SSE events in `chunks` (JSON payloads; [DONE] left out), and the incomplete rest."""
    *done, rest = chunks.split(b"\n\n")
    return [json.loads(e[6:]) for e in done if e.startswith(b"data: {")], rest


async def _stream(session, url: str, body: dict) -> list[float]:
    """time.monotonic() of each event of a completion stream that brings tokens (its text), from the send."""
    began, times, pending = time.monotonic(), [], b""
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url} answered {r.status}: {(await r.read())[:300]!r}")
        async for chunk in r.content.iter_any():
            events, pending = _events(pending + chunk)
            for e in events:
                if "error" in e:
                    raise RuntimeError(f"{url}: {e['error']}")
                if any(c.get("text") or c.get("finish_reason") is None for c in e["choices"]):
                    times.append(time.monotonic() - began)
    return times


def serve(args) -> dict:
    """TTFT and time to the second token over HTTP, colocated (straight to the role-both server) and through the
    P/D router, with the engines' mean hand-off phases from /pd/status."""
    import os
    import tempfile
    from pathlib import Path

    import aiohttp

    from rtpjax.benchmarks.pd_mixed import start, wait_healthy
    from rtpjax.benchmarks.router_bench import free_port

    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    logs = Path(args.logs or tempfile.mkdtemp(prefix="pd_bench_"))
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for role in ("prefill", "both"):
            port = free_port()
            argv = [sys.executable, "-m", "rtpjax.cli", "serve", args.model, "--port", str(port), "--role", role,
                    "--served-model-name", "m", *args.serve_args]  # fmt: skip
            procs.append(start(role, argv, dict(os.environ), logs, port))
        for p in procs:
            wait_healthy(p, args.start_timeout)
        prefill, decode, port = procs[0], procs[1], free_port()
        procs.append(start("router", [sys.executable, "-m", "rtpjax.cli", "router", "--pd-disaggregation", "--prefill",
                                      prefill.url, "--decode", decode.url, "--host", "127.0.0.1", "--port", str(port)],
                           dict(os.environ), logs, port))  # fmt: skip
        wait_healthy(procs[2], 60)
        rng = random.Random(0)

        async def run():
            rows = []
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
                for _ in range(args.repeats + 1):  # the first is a warm-up
                    row = {}
                    for name, url in (("colocated", decode.url), ("disaggregated", procs[2].url)):
                        body = {"model": "m", "prompt": [rng.randrange(3, vocab) for _ in range(args.prompt_len)],
                                "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
                        row[name] = (await _stream(session, url, body))[:2]
                    rows.append(row)
                async with session.get(prefill.url + "/pd/status") as r:
                    phases = (await r.json())["kv_transfer_ms"]
                async with session.get(decode.url + "/pd/status") as r:
                    phases.update((await r.json())["kv_transfer_ms"])
            return rows[1:], phases

        rows, phases = asyncio.run(run())
    finally:
        for p in reversed(procs):
            p.stop()

    def ms(key: str, i: int) -> float | None:
        """The median over the runs whose stream had that event (a CPU's engine may send all tokens as one)."""
        seen = [r[key][i] for r in rows if len(r[key]) > i]
        return statistics.median(seen) * 1e3 if seen else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b - 1 if a is not None and b is not None else None

    result = {"prompt_len": args.prompt_len, "colocated_ttft_ms": ms("colocated", 0),
              "router_ttft_ms": ms("disaggregated", 0), "colocated_second_token_ms": ms("colocated", 1),
              "router_second_token_ms": ms("disaggregated", 1), "handoff_phases_ms": phases,
              "rows_ms": [{k: [1e3 * t for t in v] for k, v in r.items()} for r in rows]}  # fmt: skip
    result["ttft_overhead"] = ratio(result["router_ttft_ms"], result["colocated_ttft_ms"])
    result["second_token_overhead"] = ratio(result["router_second_token_ms"], result["colocated_second_token_ms"])
    def show(key: str, over: str) -> str:
        r = result
        if r[f"router_{key}_ms"] is None or r[f"colocated_{key}_ms"] is None:
            return "n/a (every stream sent its tokens as one event)"
        return f"colocated {r[f'colocated_{key}_ms']:.1f} ms, through the P/D router {r[f'router_{key}_ms']:.1f} ms " \
               f"({100 * r[over]:+.0f}%)"  # fmt: skip

    print(f"over HTTP, a {args.prompt_len}-token prompt: TTFT {show('ttft', 'ttft_overhead')}; second token "
          f"{show('second_token', 'second_token_overhead')}")  # fmt: skip
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
    h = sub.add_parser("serve")
    h.add_argument("model")
    h.add_argument("--prompt-len", type=int, default=2048)
    h.add_argument("--repeats", type=int, default=5)
    h.add_argument("--start-timeout", type=float, default=400.0)
    h.add_argument("--logs", help="folder of the servers' and router's logs (default: a temporary one)")
    h.add_argument("--out")
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args = argv[argv.index("--") + 1 :] if "--" in argv else []  # serve: flags of every rtpjax serve
    args = parser.parse_args(argv[: len(argv) - len(serve_args) - ("--" in argv)])
    args.serve_args = serve_args
    if args.part == "transfer":
        result = transfer(args)
    elif args.part == "serve":
        result = serve(args)
    else:
        import dataclasses

        result = ttft(args, dataclasses.asdict(engine_args_from(args)))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1, default=str)


if __name__ == "__main__":
    main()

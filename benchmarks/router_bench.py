"""Routers over the same replicas, the same run: prefix-cache hit rate (the engines' own counters), P95 TTFT, and
the router's CPU; and the router's own overhead per request.

    # replicas already serving (rtpjax serve ... --port 8001, 8002): each router in turn, each workload, each load:
    # open loop at each --request-rates (Poisson arrivals), closed loop at each --concurrencies (saturation)
    python -m rtpjax.benchmarks.router_bench compare --replicas http://127.0.0.1:8001 http://127.0.0.1:8002 \\
        --tokenizer MODEL_DIR --routers round_robin sglang_cache_aware cache_aware --request-rates 8 32 \\
        --concurrencies 64 --num-prefixes 48 --out r.json
    # overhead: stub replicas that answer at once, requests at --rate for --seconds, direct and through the router
    # (--stream: each answer an SSE stream of a few events; --policy: the router's, cache_aware by default)
    python -m rtpjax.benchmarks.router_bench overhead --tokenizer MODEL_DIR --rate 200 --seconds 10 --out o.json

Routers: `round_robin`, `least_load`, `cache_aware` (rtpjax router --policy ...) and `sglang_round_robin`,
`sglang_cache_aware` (sglang-router, where installed). Every router gets the same prompts for a workload and load (one
seed), each run after the replicas' caches were filled with unrelated prompts (`flush`), so no run finds an earlier
one's prefixes cached. Workloads (the serving benchmark's): `prefix_repetition`, --num-prefixes shared
prefixes of --prefix-len tokens, each request one of them plus --suffix-len tokens of its own; `multi_turn`,
conversations of --turns turns, each turn the history plus --turn-input-len new tokens. Every request asks for
--output-len tokens. Routing matters to the hit rate once the prefixes outgrow one replica's cache (round robin puts
every prefix on every replica): size the replicas' caches (--num-gpu-blocks) and --num-prefixes to that regime.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx
import numpy as np

from rtpjax.router.policy import POLICIES

WORKLOADS = ("prefix_repetition", "multi_turn")
STUB_CHUNKS = 8  # SSE events in a stub replica's streamed answer
REPEAT_SEEDS = 1000  # seeds a repeat moves by (each run of a repeat has its own seed below it)
_ports_given: set[int] = set()  # free_port's, so far


def free_port() -> int:
    """A loopback port that binds now, below the kernel's ephemeral range and never handed out twice in this process.
    A port from bind(0) comes from that range, so an outgoing connection could take it before the server meant for it
    binds it, or two calls could return the same port (a router then exits with 'Address already in use')."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except OSError:  # not Linux: the IANA ephemeral range
        ephemeral_low = 49152
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randrange(10000, ephemeral_low)
        if port in _ports_given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    raise RuntimeError(f"no free loopback port in 10000-{ephemeral_low} in 200 tries")


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_router(kind: str, replicas: list[str], tokenizer: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind.startswith("sglang_"):
        argv = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *replicas, "--policy",
                kind.removeprefix("sglang_"), "--host", "127.0.0.1", "--port", str(port), "--prometheus-port",
                str(free_port())]  # fmt: skip
    else:
        argv = [sys.executable, "-m", "rtpjax.cli", "router", "--worker-urls", *replicas, "--policy", kind,
                "--port", str(port), *(["--model", tokenizer] if tokenizer else [])]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"router {kind} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"router {kind} did not come up")


def counters(replicas: list[str]) -> list[tuple[int, int]]:
    """(prefix-cache hit tokens, queried tokens) of each replica so far, from its engine's own counters."""
    loads = [httpx.get(u + "/load", timeout=10).json() for u in replicas]
    return [(x["prefix_cache_hits"], x["prefix_cache_queries"]) for x in loads]


def wait_workers(kind: str, url: str, replicas: list[str], timeout: float = 60.0) -> None:
    """Until the router has every replica in: sglang-router answers /health before its workers are registered (and
    registers them under the name their /server_info gives), rtpjax's router before its first health round."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            workers = httpx.get(url + "/workers", timeout=2).json()
            if kind.startswith("sglang_"):
                ready = [w for w in workers["workers"] if w["is_healthy"] and w["model_id"] != "unknown"]
            else:
                ready = [w for w in workers if w["healthy"]]
            if len(ready) == len(replicas):
                return
        except (httpx.HTTPError, KeyError, TypeError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"router {kind}: not every replica in within {timeout:.0f} s")


FLUSH_MAX_TOKENS = 1 << 22  # a replica whose cache holds more is not flushed but refused: size it (--num-gpu-blocks)


def flush(replicas: list[str], concurrency: int = 16) -> None:
    """Fill every replica's prefix cache with unrelated prompts (fresh random token ids, one token answered each), so
    that what it held for the last run is evicted (and the routers hear so from its KV events) before the next one."""
    import random

    rng = random.Random()

    async def fill(client: httpx.AsyncClient, url: str) -> None:
        stats = (await client.get(url + "/load")).json()
        context = (await client.get(url + "/server_info")).json()["context_length"]
        length = max(16, min(1024, context - 8))
        tokens = stats["num_blocks"] * stats["block_size"]
        if tokens > FLUSH_MAX_TOKENS:
            raise SystemExit(f"{url} caches {tokens} tokens: too many to flush between runs; give the replicas "
                             f"--num-gpu-blocks (at most {FLUSH_MAX_TOKENS // stats['block_size']} here)")
        count = tokens // length + 2
        gate = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with gate:
                r = await client.post(url + "/v1/completions", json={"prompt": [rng.randrange(32, 256) for _ in
                                      range(length)], "max_tokens": 1})  # fmt: skip
                r.raise_for_status()

        await asyncio.gather(*(one() for _ in range(count)))

    async def run() -> None:
        async with httpx.AsyncClient(timeout=600) as client:
            await asyncio.gather(*(fill(client, u) for u in replicas))

    asyncio.run(run())


def decisions(kind: str, url: str) -> dict[str, float]:
    """rtpjax's router: its routing decisions so far by reason, and the prompt tokens it predicted cached where it
    sent them (its Prometheus counters); nothing for other routers."""
    if kind.startswith("sglang_"):
        return {}
    counts: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("rtpjax_router:decisions_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counts[reason] = counts.get(reason, 0.0) + float(line.rsplit(" ", 1)[1])
        elif line.startswith("rtpjax_router:predicted_cache_hit_tokens_total{"):
            counts["predicted_hit_tokens"] = counts.get("predicted_hit_tokens", 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def workload_argv(name: str, args) -> list[str]:
    if name == "prefix_repetition":
        return ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(args.prefix_len),
                "--prefix-repetition-suffix-len", str(args.suffix_len), "--prefix-repetition-num-prefixes",
                str(args.num_prefixes), "--prefix-repetition-output-len", str(args.output_len)]  # fmt: skip
    return ["--dataset-name", "multi_turn", "--multi-turn-num-turns", str(args.turns), "--multi-turn-input-len",
            str(args.turn_input_len), "--multi-turn-output-len", str(args.output_len)]  # fmt: skip


def load_points(args) -> list[tuple[str, float, int | None]]:
    """(label, request rate, max concurrency): open loop at each rate, closed loop (no pacing) at each concurrency."""
    points = [(f"{r:g}/s", r, None) for r in args.request_rates]
    points += [(f"c{c}", float("inf"), c) for c in args.concurrencies]
    if not points:
        raise SystemExit("give at least one --request-rates or --concurrencies value")
    return points


def run_one(args, kind: str, url: str, pid: int, workload: str, load: tuple, seed: int) -> dict:
    """One router, workload and load: the serving benchmark through the router, the engines' hit counters and the
    router's CPU around it."""
    from rtpjax.benchmarks import serve_bench

    label, rate, concurrency = load
    flush(args.replicas)
    before, routed = counters(args.replicas), decisions(kind, url)
    cpu0, began = cpu_seconds(pid), time.monotonic()
    m = serve_bench.main(["--base-url", url, "--tokenizer", args.tokenizer, *workload_argv(workload, args),
                          "--num-prompts", str(args.num_prompts), "--request-rate", str(rate),
                          *(["--max-concurrency", str(concurrency)] if concurrency else []), "--seed", str(seed),
                          "--ignore-eos", "--disable-tqdm", "--metric-percentiles", "50,95,99"])  # fmt: skip
    cpu, wall = cpu_seconds(pid) - cpu0, time.monotonic() - began
    after, routed = counters(args.replicas), {k: v - routed.get(k, 0.0) for k, v in decisions(kind, url).items()}
    queried = [a[1] - b[1] for a, b in zip(after, before)]
    hits = sum(a[0] - b[0] for a, b in zip(after, before))
    row = {"router": kind, "workload": workload, "load": label, "request_rate": rate, "max_concurrency": concurrency,
            "hit_rate": hits / max(sum(queried), 1), "replica_queried_tokens": queried,
            "p50_ttft_ms": m["median_ttft_ms"], "p95_ttft_ms": m["p95_ttft_ms"], "p99_ttft_ms": m["p99_ttft_ms"],
            "request_throughput": m["request_throughput"], "output_throughput": m["output_throughput"],
            "completed": m["completed"], "failed": m["failed"], "router_cpu_s": cpu, "router_cpu_util": cpu / wall,
            "decisions": routed, "ttfts_ms": [round(t * 1e3, 1) for t in m["ttfts"]]}  # fmt: skip
    if workload == "multi_turn":
        row["p95_ttft_ms_by_turn"] = by_turn(m["ttfts"], args.turns)
    return row


def by_turn(ttfts: list[float], turns: int) -> list[float]:
    """P95 TTFT (ms) of each turn index of a multi_turn run (its requests come conversation by conversation)."""
    return [float(np.percentile(np.asarray(ttfts[t::turns]) * 1e3, 95)) for t in range(turns)]


def report(rows: dict) -> None:
    """Each workload, load and repeat: every router's row, and each one's hit rate and P95 TTFT against round
    robin's; with repeats, each router's median and range over them."""
    groups: dict = {}
    for r in rows.values():
        groups.setdefault((r["workload"], r["load"], r.get("repeat", 0)), []).append(r)
    print("-- every router against round_robin, same workload, load and prompts --")
    for group in groups.values():
        base = next((r for r in group if r["router"] == "round_robin"), None)
        for r in group:
            versus = ""
            if base is not None and r is not base and base["hit_rate"] > 0 and base["p95_ttft_ms"] > 0:
                versus = (f"  vs round_robin: hit rate {r['hit_rate'] / base['hit_rate']:.2f}x, P95 TTFT "
                          f"{r['p95_ttft_ms'] / base['p95_ttft_ms'] - 1:+.0%}")  # fmt: skip
            print(line(r) + versus)
    runs: dict = {}
    for r in rows.values():
        runs.setdefault((r["workload"], r["load"], r["router"]), []).append(r)
    if any(len(v) > 1 for v in runs.values()):
        print("-- over the repeats: median [min, max] --")
        for (workload, load, router), rs in runs.items():
            hits, p95 = [r["hit_rate"] * 100 for r in rs], [r["p95_ttft_ms"] for r in rs]
            print(f"{workload:17s} {load:>7s} {router:18s} hit rate {statistics.median(hits):5.1f}% "
                  f"[{min(hits):.1f}, {max(hits):.1f}]  P95 TTFT {statistics.median(p95):5.0f} [{min(p95):.0f}, "
                  f"{max(p95):.0f}] ms  ({len(rs)} runs)")  # fmt: skip


def line(r: dict) -> str:
    return (f"{r['workload']:17s} {r['load']:>7s} {r['router']:18s} hit rate {r['hit_rate']:6.1%}  TTFT p50/p95 "
            f"{r['p50_ttft_ms']:7.0f} / {r['p95_ttft_ms']:7.0f} ms  {r['request_throughput']:6.1f} req/s  "
            f"router CPU {r['router_cpu_util']:5.1%}  failed {r['failed']}" + "".join(
                f"  {k} {r['decisions'][k]:.0f}" for k in ("moved", "balance") if r.get("decisions", {}).get(k)))


def compare(args) -> dict:
    """Every router started once; then, `--repeats` times, each workload and load with every router in turn on the
    same prompts (a new seed per repeat): runs that differ only by the router, interleaved so that a drift of the
    machine meets them all."""
    rows, points, routers = {}, load_points(args), {}
    try:
        for kind in args.routers:
            try:
                routers[kind] = start_router(kind, args.replicas, args.tokenizer)
            except RuntimeError as e:  # e.g. sglang-router not installed on this host
                print(f"skipped {kind}: {e}")
                continue
            wait_workers(kind, routers[kind][1], args.replicas)
        for rep in range(args.repeats):
            for j, workload in enumerate(args.workloads):
                for k, load in enumerate(points):
                    seed = args.seed + REPEAT_SEEDS * rep + j * len(points) + k  # the same prompts for every router
                    for kind, (proc, url) in routers.items():
                        row = run_one(args, kind, url, proc.pid, workload, load, seed) | {"repeat": rep}
                        rows[f"{kind}/{workload}/{load[0]}" + (f"/r{rep}" if args.repeats > 1 else "")] = row
                        print(f"done: {line(row)}", flush=True)
                        if args.out:  # each run as it ends: a run cut short by a timeout keeps the finished ones
                            with open(args.out, "w") as f:
                                json.dump(rows, f, indent=1)
    finally:
        for proc, _ in routers.values():
            proc.kill()
            proc.wait()
    report(rows)
    return rows


# -- overhead -------------------------------------------------------------------------------------------------------


def stub_app():
    """A replica that answers at once: what is left of a request's latency through the router is the router's."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    load = {"num_unfinished": 0, "num_running": 0, "waiting_prompt_tokens": 0, "max_num_batched_tokens": 2048,
            "block_size": 16, "prefix_cache_hits": 0, "prefix_cache_queries": 0, "total_steps": 0}  # fmt: skip
    body = json.dumps({"id": "cmpl-stub", "object": "text_completion", "choices": [{"index": 0, "text": "x",
                      "finish_reason": "length"}]}).encode()  # fmt: skip

    chunk = b"data: " + json.dumps({"id": "cmpl-stub", "object": "text_completion", "choices": [{"index": 0,
                                   "text": "x", "finish_reason": None}]}).encode() + b"\n\n"  # fmt: skip

    async def sse():
        for _ in range(STUB_CHUNKS):
            yield chunk
        yield b"data: [DONE]\n\n"

    async def completions(request):
        if json.loads(await request.body()).get("stream"):
            return StreamingResponse(sse(), media_type="text/event-stream")
        return Response(body, media_type="application/json")

    async def events(request):
        return JSONResponse({"instance": "stub", "oldest": 0, "next": 0, "batches": []})

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/load", lambda r: JSONResponse(load)), Route("/kv_events", events),
                             Route("/health", lambda r: Response())])  # fmt: skip


async def drive(url: str, rate: float, seconds: float, prompt: str, stream: bool = False) -> list[float]:
    """Requests at `rate` per second (evenly spaced) for `seconds`; each one's latency (for a stream: to its end).
    The load comes from aiohttp: httpx's connection pool costs more CPU the more connections it holds, so under a
    slow router the load generator itself falls behind and the latencies it reports are its own."""
    import aiohttp

    latencies: list[float] = []
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 1, "stream": stream}).encode()
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:  # fmt: skip

        async def one():
            t = time.perf_counter()
            async with session.post(url + "/v1/completions", data=body, headers=headers) as r:
                content = await r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {content[:200]!r}")
            if stream and not content.endswith(b"data: [DONE]\n\n"):
                raise RuntimeError(f"a stream ended without [DONE]: {content[-200:]!r}")
            latencies.append(time.perf_counter() - t)

        tasks, began = [], time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, began + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return latencies


def overhead(args) -> dict:
    stubs = []
    for _ in range(2):
        port = free_port()
        code = ("import uvicorn; from rtpjax.benchmarks.router_bench import stub_app; "
                f"uvicorn.run(stub_app(), host='127.0.0.1', port={port}, log_level='error')")  # fmt: skip
        stubs.append((subprocess.Popen([sys.executable, "-c", code]), f"http://127.0.0.1:{port}"))
    urls = [u for _, u in stubs]
    try:
        for u in urls:
            for _ in range(300):
                try:
                    if httpx.get(u + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
        prompt = "Once upon a time " * 128  # ~500 tokens to tokenize and hash
        direct = asyncio.run(drive(urls[0], args.rate, args.seconds, prompt, args.stream))
        proc, url = start_router(args.policy, urls, args.tokenizer)
        try:
            time.sleep(1)
            cpu0 = cpu_seconds(proc.pid)
            routed = asyncio.run(drive(url, args.rate, args.seconds, prompt, args.stream))
            cpu = cpu_seconds(proc.pid) - cpu0
        finally:
            proc.kill()
            proc.wait()
    finally:
        for p, _ in stubs:
            p.kill()
            p.wait()
    p50 = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    p95 = lambda xs: sorted(xs)[int(0.95 * len(xs))] * 1e3  # noqa: E731
    row = {"policy": args.policy, "rate": args.rate, "stream": args.stream, "requests": len(routed),
           "direct_p50_ms": p50(direct), "routed_p50_ms": p50(routed), "direct_p95_ms": p95(direct),
           "routed_p95_ms": p95(routed), "overhead_p50_ms": p50(routed) - p50(direct),
           "overhead_p95_ms": p95(routed) - p95(direct), "router_cpu_ms_per_request": cpu * 1e3 / len(routed),
           "router_cpu_util": cpu / args.seconds}  # fmt: skip
    print(f"{args.policy} {args.rate:.0f} req/s{' streamed' if args.stream else ''}: latency p50 direct "
          f"{row['direct_p50_ms']:.2f} ms, through the router {row['routed_p50_ms']:.2f} ms "
          f"(+{row['overhead_p50_ms']:.2f}); p95 {row['direct_p95_ms']:.2f} / {row['routed_p95_ms']:.2f} ms; "
          f"router CPU {row['router_cpu_ms_per_request']:.2f} ms a request ({row['router_cpu_util']:.0%} of a core)")
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--replicas", nargs="+", required=True)
    c.add_argument("--tokenizer", required=True, help="the replicas' model folder (prompts and routing)")
    c.add_argument("--routers", nargs="+", default=["round_robin", "sglang_cache_aware", "cache_aware"])
    c.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    c.add_argument("--num-prompts", type=int, default=400, help="requests per run (multi_turn: turns in all)")
    c.add_argument("--request-rates", "--request-rate", type=float, nargs="*", default=[],
                   help="open-loop loads, requests (multi_turn: conversations) per second")  # fmt: skip
    c.add_argument("--concurrencies", type=int, nargs="*", default=[],
                   help="closed-loop loads: requests in flight, each sent as soon as one ends")  # fmt: skip
    c.add_argument("--prefix-len", type=int, default=1024)
    c.add_argument("--suffix-len", type=int, default=128)
    c.add_argument("--num-prefixes", type=int, default=8)
    c.add_argument("--turns", type=int, default=6)
    c.add_argument("--turn-input-len", type=int, default=256)
    c.add_argument("--output-len", type=int, default=64)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--repeats", type=int, default=1, help="runs of each router, workload and load (new prompts each)")
    o = sub.add_parser("overhead")
    o.add_argument("--tokenizer", required=True)
    o.add_argument("--rate", type=float, default=200.0)
    o.add_argument("--seconds", type=float, default=10.0)
    o.add_argument("--stream", action="store_true", help=f"SSE answers of {STUB_CHUNKS} chunks and [DONE]")
    o.add_argument("--policy", choices=POLICIES, default="cache_aware")
    for q in (c, o):
        q.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.mode == "compare" and not args.request_rates and not args.concurrencies:
        args.request_rates = [8.0]
    result = compare(args) if args.mode == "compare" else overhead(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

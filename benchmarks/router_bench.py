"""Routers over the same replicas, the same run: prefix-cache hit rate (the engines' own counters), P95 TTFT, and
the router's CPU; and the router's own overhead per request.

    # replicas already serving (rtpjax serve ... --port 8001, 8002): each router in turn, each workload
    python -m rtpjax.benchmarks.router_bench compare --replicas http://127.0.0.1:8001 http://127.0.0.1:8002 \\
        --tokenizer MODEL_DIR --routers round_robin sglang_cache_aware cache_aware --request-rate 8 --out r.json
    # overhead: stub replicas that answer at once, requests at --rate for --seconds, direct and through the router
    # (--stream: each answer an SSE stream of a few events)
    python -m rtpjax.benchmarks.router_bench overhead --tokenizer MODEL_DIR --rate 200 --seconds 10 --out o.json

Routers: `round_robin`, `least_load`, `cache_aware` (rtpjax router --policy ...) and `sglang_round_robin`,
`sglang_cache_aware` (sglang-router, where installed). Each router's run draws its own prompts (another seed), so no
run finds the previous one's prefixes cached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx

WORKLOADS = {
    "prefix_repetition": ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", "1024",
                          "--prefix-repetition-suffix-len", "128", "--prefix-repetition-num-prefixes", "8",
                          "--prefix-repetition-output-len", "64"],
    "multi_turn": ["--dataset-name", "multi_turn", "--multi-turn-num-turns", "6", "--multi-turn-input-len", "256",
                   "--multi-turn-output-len", "64"],
}  # fmt: skip
STUB_CHUNKS = 8  # SSE events in a stub replica's streamed answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def counters(replicas: list[str]) -> tuple[int, int]:
    loads = [httpx.get(u + "/load", timeout=10).json() for u in replicas]
    return sum(x["prefix_cache_hits"] for x in loads), sum(x["prefix_cache_queries"] for x in loads)


def compare(args) -> dict:
    from rtpjax.benchmarks import serve_bench

    rows = {}
    for i, kind in enumerate(args.routers):
        try:
            proc, url = start_router(kind, args.replicas, args.tokenizer)
        except RuntimeError as e:  # e.g. sglang-router not installed on this host
            print(f"skipped {kind}: {e}")
            continue
        time.sleep(2)  # every replica in
        try:
            for workload in args.workloads:
                hits0, queries0 = counters(args.replicas)
                cpu0, began = cpu_seconds(proc.pid), time.monotonic()
                m = serve_bench.main(["--base-url", url, "--tokenizer", args.tokenizer, *WORKLOADS[workload],
                                      "--num-prompts", str(args.num_prompts), "--request-rate", str(args.request_rate),
                                      "--seed", str(args.seed + i), "--ignore-eos", "--disable-tqdm",
                                      "--metric-percentiles", "50,95,99"])  # fmt: skip
                cpu, wall = cpu_seconds(proc.pid) - cpu0, time.monotonic() - began
                hits, queries = counters(args.replicas)
                rows[f"{kind}/{workload}"] = {
                    "hit_rate": (hits - hits0) / max(queries - queries0, 1), "p50_ttft_ms": m["median_ttft_ms"],
                    "p95_ttft_ms": m["p95_ttft_ms"], "output_throughput": m["output_throughput"],
                    "failed": m["failed"], "router_cpu_s": cpu, "router_cpu_util": cpu / wall,
                }  # fmt: skip
        finally:
            proc.kill()
            proc.wait()
    for name, r in rows.items():
        print(f"{name:40s} hit rate {r['hit_rate']:6.1%}  TTFT p50/p95 {r['p50_ttft_ms']:7.0f} / "
              f"{r['p95_ttft_ms']:7.0f} ms  out {r['output_throughput']:7.0f} tok/s  router CPU "
              f"{r['router_cpu_util']:5.1%}  failed {r['failed']}")
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
        proc, url = start_router("cache_aware", urls, args.tokenizer)
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
    row = {"rate": args.rate, "stream": args.stream, "requests": len(routed), "direct_p50_ms": p50(direct),
           "routed_p50_ms": p50(routed), "direct_p95_ms": p95(direct), "routed_p95_ms": p95(routed),
           "overhead_p50_ms": p50(routed) - p50(direct), "overhead_p95_ms": p95(routed) - p95(direct),
           "router_cpu_ms_per_request": cpu * 1e3 / len(routed), "router_cpu_util": cpu / args.seconds}  # fmt: skip
    print(f"{args.rate:.0f} req/s{' streamed' if args.stream else ''}: latency p50 direct {row['direct_p50_ms']:.2f} "
          f"ms, through the router {row['routed_p50_ms']:.2f} ms (+{row['overhead_p50_ms']:.2f}); p95 "
          f"{row['direct_p95_ms']:.2f} / {row['routed_p95_ms']:.2f} ms; router CPU "
          f"{row['router_cpu_ms_per_request']:.2f} ms a request ({row['router_cpu_util']:.0%} of a core)")
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("compare")
    c.add_argument("--replicas", nargs="+", required=True)
    c.add_argument("--tokenizer", required=True, help="the replicas' model folder (prompts and routing)")
    c.add_argument("--routers", nargs="+", default=["round_robin", "sglang_cache_aware", "cache_aware"])
    c.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    c.add_argument("--num-prompts", type=int, default=400)
    c.add_argument("--request-rate", type=float, default=8.0)
    c.add_argument("--seed", type=int, default=0)
    o = sub.add_parser("overhead")
    o.add_argument("--tokenizer", required=True)
    o.add_argument("--rate", type=float, default=200.0)
    o.add_argument("--seconds", type=float, default=10.0)
    o.add_argument("--stream", action="store_true", help=f"SSE answers of {STUB_CHUNKS} chunks and [DONE]")
    for q in (c, o):
        q.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args(argv)
    result = compare(args) if args.mode == "compare" else overhead(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

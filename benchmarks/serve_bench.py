"""Load generator for any OpenAI-compatible server, with `vllm bench serve`'s flags, metrics and JSON field names.

Streams /v1/completions (or /v1/chat/completions with --backend openai-chat), from a Poisson (or gamma, with
--burstiness) arrival process or at a fixed --max-concurrency, and reports TTFT, TPOT, ITL and E2E latency
(mean, median, std, chosen percentiles), request/output/total token throughput and goodput under SLOs.

Datasets (--dataset-name):
  random             random token ids: --random-input-len, --random-output-len, --random-range-ratio,
                     --random-prefix-len (a fixed prefix shared by all prompts)
  prefix_repetition  groups of prompts behind long shared prefixes (system prompts): --prefix-repetition-prefix-len,
                     --prefix-repetition-suffix-len, --prefix-repetition-num-prefixes, --prefix-repetition-output-len
  sharegpt           a ShareGPT-like length mix, synthesised (no download): log-normal input and output lengths
                     with ShareGPT's published means (161 prompt and 338 output tokens, vLLM paper, Table 1),
                     prompts < 4 tokens or prompt + output > 2048 dropped as vLLM's loader does
  multi_turn         conversations of --multi-turn-num-turns turns; each turn resends the history plus
                     --multi-turn-input-len new tokens and asks for --multi-turn-output-len, after a pause of
                     --multi-turn-think-time seconds on average (exponential; 0: at once) as a user reads and types

    rtpjax bench serve --base-url http://127.0.0.1:8000 --dataset-name random --random-input-len 1024 \\
        --random-output-len 128 --num-prompts 512 --max-concurrency 64 --ignore-eos --save-result --plot
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np

SHAREGPT_MEAN_INPUT, SHAREGPT_MEAN_OUTPUT, SHAREGPT_SIGMA = 161.0, 338.0, 1.0


@dataclasses.dataclass
class Request:
    prompt: str
    prompt_len: int
    output_len: int
    conversation: int | None = None  # multi_turn: which conversation, turns of one run in order
    turn: int = 0


@dataclasses.dataclass
class Result:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    error: str = ""


# --- datasets -------------------------------------------------------------------------------------------------------


def _random_ids(rng: np.random.Generator, tokenizer, n: int) -> list[int]:
    special = set(tokenizer.all_special_ids)
    ids = rng.integers(0, len(tokenizer), size=2 * n + 8)
    return [int(i) for i in ids if int(i) not in special][:n]


def _text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _lens(rng, mean: int, ratio: float, n: int) -> np.ndarray:
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.integers(low, high + 1, size=n)


def sample_requests(args, tokenizer) -> list[Request]:
    """--num-warmups requests, then the measured ones, from one seeded stream. Warm-ups are sent first and left out
    of the metrics, so that caches hold what a long-running server's would: with prefix_repetition they take each
    prefix in turn (as many as prefixes touch each once); with other datasets they are the first requests."""
    rng = np.random.default_rng(args.seed)
    n, name, warm = args.num_prompts + args.num_warmups, args.dataset_name, args.num_warmups
    if warm < 0 or args.num_prompts < 1:
        raise SystemExit(f"--num-warmups must be >= 0 and --num-prompts >= 1, got {warm} and {args.num_prompts}")
    if warm and name == "multi_turn":
        raise SystemExit("--num-warmups: not for multi_turn (a conversation's turns belong to one run)")
    if not args.multi_turn_think_time >= 0:
        raise SystemExit(f"--multi-turn-think-time must be >= 0 seconds, got {args.multi_turn_think_time}")
    requests = []
    if name == "random":
        prefix = _random_ids(rng, tokenizer, args.random_prefix_len)
        ins = _lens(rng, args.random_input_len, args.random_range_ratio, n)
        outs = _lens(rng, args.random_output_len, args.random_range_ratio, n)
        for i, o in zip(ins, outs):
            ids = prefix + _random_ids(rng, tokenizer, int(i))
            requests.append(Request(_text(tokenizer, ids), len(ids), int(o)))
    elif name == "prefix_repetition":
        groups = args.prefix_repetition_num_prefixes
        prefixes = [_random_ids(rng, tokenizer, args.prefix_repetition_prefix_len) for _ in range(groups)]
        for i in range(n):
            ids = prefixes[i % groups] + _random_ids(rng, tokenizer, args.prefix_repetition_suffix_len)
            requests.append(Request(_text(tokenizer, ids), len(ids), args.prefix_repetition_output_len))
        measured = requests[warm:]
        rng.shuffle(measured)
        requests[warm:] = measured
    elif name == "sharegpt":
        while len(requests) < n:
            i = int(rng.lognormal(math.log(SHAREGPT_MEAN_INPUT) - SHAREGPT_SIGMA**2 / 2, SHAREGPT_SIGMA))
            o = int(rng.lognormal(math.log(SHAREGPT_MEAN_OUTPUT) - SHAREGPT_SIGMA**2 / 2, SHAREGPT_SIGMA))
            if i < 4 or o < 4 or i + o > 2048:
                continue
            ids = _random_ids(rng, tokenizer, i)
            requests.append(Request(_text(tokenizer, ids), len(ids), o))
    elif name == "multi_turn":
        turns = args.multi_turn_num_turns
        for c in range(max(1, n // turns)):
            for t in range(turns):
                ids = _random_ids(rng, tokenizer, args.multi_turn_input_len)
                requests.append(Request(_text(tokenizer, ids), len(ids), args.multi_turn_output_len, c, t))
    else:
        raise SystemExit(f"unknown --dataset-name {name!r}")
    return requests


# --- one streamed request -------------------------------------------------------------------------------------------


async def send(client, args, model: str, prompt: str | list[dict], prompt_len: int, max_tokens: int) -> Result:
    chat = args.backend == "openai-chat"
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": args.temperature,
            "stream_options": {"include_usage": True}}  # fmt: skip
    body |= {"messages": prompt} if chat else {"prompt": prompt}
    if args.ignore_eos:
        body["ignore_eos"] = True
    result = Result(prompt_len=prompt_len)
    began = last = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", args.base_url + args.endpoint, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                    result.prompt_len = event["usage"].get("prompt_tokens", prompt_len)
                choices = event.get("choices") or []
                delta = (choices[0].get("delta", {}).get("content") if chat else choices[0].get("text")) if choices else None
                if delta:
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - began
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
                    result.text += delta
        result.latency = time.perf_counter() - began
        result.output_tokens = result.output_tokens or chunks
        result.success = chunks > 0
        if not result.success:
            result.error = "no tokens streamed"
    except Exception as e:  # a failed request is counted, not fatal (as vllm bench serve does)
        result.error = f"{type(e).__name__}: {e}"
    return result


# --- the run --------------------------------------------------------------------------------------------------------


async def arrivals(n: int, rate: float, burstiness: float, rng: random.Random, sleep=asyncio.sleep):
    """Yield request indices at a Poisson (burstiness 1) or gamma process of mean `rate` per second."""
    for i in range(n):
        yield i
        if rate != float("inf") and i < n - 1:
            theta = 1.0 / (rate * burstiness)
            await sleep(rng.gammavariate(burstiness, theta))


def think_times(mean: float, seed: int, conversation: int, turns: int) -> list[float]:
    """Each turn's pause before it is sent: none before the first, then `mean` seconds on average (exponential), the
    same for a conversation in every run of a seed."""
    rng = random.Random(f"think-{seed}-{conversation}")  # not the arrivals' stream (random.Random(seed))
    return [0.0] + [rng.expovariate(1 / mean) if mean > 0 else 0.0 for _ in range(turns - 1)]


async def run(args, model: str, requests: list[Request]) -> tuple[list[Result], float]:
    import httpx

    limit = args.max_concurrency or len(requests)
    gate = asyncio.Semaphore(limit)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    limits = httpx.Limits(max_connections=limit + 8, max_keepalive_connections=limit + 8)
    results: list[Result | None] = [None] * len(requests)
    bar = _bar(len(requests), args.disable_tqdm)
    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits) as client:

        async def one(i: int):
            async with gate:
                r = requests[i]
                prompt = [{"role": "user", "content": r.prompt}] if args.backend == "openai-chat" else r.prompt
                results[i] = await send(client, args, model, prompt, r.prompt_len, r.output_len)
                bar.update(1)

        async def conversation(indices: list[int]):
            history: list[dict] | str = [] if args.backend == "openai-chat" else ""
            length = 0
            pauses = think_times(args.multi_turn_think_time, args.seed, requests[indices[0]].conversation, len(indices))
            for i, pause in zip(indices, pauses):  # turns in order: each resends the history plus its new input
                await asyncio.sleep(pause)  # a client waits outside the gate, as a user between turns
                r = requests[i]
                async with gate:
                    if args.backend == "openai-chat":
                        prompt = history + [{"role": "user", "content": r.prompt}]
                    else:
                        prompt = (history + " " + r.prompt).strip()
                    res = await send(client, args, model, prompt, length + r.prompt_len, r.output_len)
                results[i] = res
                bar.update(1)
                length = res.prompt_len + res.output_tokens
                if args.backend == "openai-chat":
                    history = prompt + [{"role": "assistant", "content": res.text}]
                else:
                    history = prompt + res.text

        began = time.perf_counter()
        tasks = []
        if args.dataset_name == "multi_turn":
            convs: dict[int, list[int]] = {}
            for i, r in enumerate(requests):
                convs.setdefault(r.conversation, []).append(i)
            units = list(convs.values())
        else:
            units = [[i] for i in range(len(requests))]
        async for u in arrivals(len(units), args.request_rate, args.burstiness, random.Random(args.seed)):
            idx = units[u]
            multi_turn = args.dataset_name == "multi_turn"
            tasks.append(asyncio.create_task(conversation(idx) if multi_turn else one(idx[0])))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - began
    bar.close()
    return [r for r in results if r is not None], duration


def _bar(total: int, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=disable, desc="requests")


def _goodput_slos(spec: list[str] | None) -> dict[str, float]:
    slos = {}
    for item in spec or []:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise SystemExit(f"--goodput takes ttft:MS, tpot:MS or e2el:MS, got {item!r}")
        slos[key] = float(value)
    return slos


def summarize(args, results: list[Result], duration: float) -> dict:
    """Metrics as `vllm bench serve` defines and names them (latencies in ms)."""
    ok = [r for r in results if r.success]
    ttfts = [r.ttft for r in ok]
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itl]
    e2els = [r.latency for r in ok]
    total_in, total_out = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    slos = _goodput_slos(args.goodput)
    good = 0
    for r in ok:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        measured = {"ttft": r.ttft * 1e3, "tpot": tpot * 1e3, "e2el": r.latency * 1e3}
        good += all(measured[k] <= v for k, v in slos.items())
    out = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": args.backend, "model_id": args.model,
        "tokenizer_id": args.tokenizer or args.model, "dataset_name": args.dataset_name,
        "num_prompts": len(results), "request_rate": args.request_rate if args.request_rate != float("inf") else "inf",
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "num_warmups": args.num_warmups,
        "multi_turn_think_time": args.multi_turn_think_time if args.dataset_name == "multi_turn" else None,
        "duration": duration,
        "completed": len(ok), "failed": len(results) - len(ok), "total_input_tokens": total_in,
        "total_output_tokens": total_out, "request_throughput": len(ok) / duration,
        "request_goodput": good / duration if slos else None, "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
    }  # fmt: skip
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    for metric, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        ms = np.asarray(values or [0.0]) * 1e3
        out |= {f"mean_{metric}_ms": float(ms.mean()), f"median_{metric}_ms": float(np.median(ms)),
                f"std_{metric}_ms": float(ms.std())}  # fmt: skip
        for p in percentiles:
            out[f"p{p:g}_{metric}_ms"] = float(np.percentile(ms, p))
    out |= {"input_lens": [r.prompt_len for r in results], "output_lens": [r.output_tokens for r in results],
            "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
            "e2els": [r.latency for r in results], "errors": [r.error for r in results],
            "generated_texts": [r.text for r in results] if args.save_detailed else None}  # fmt: skip
    return out


def print_table(m: dict, percentiles: str) -> None:
    rows = [("Successful requests", m["completed"]), ("Failed requests", m["failed"]),
            ("Benchmark duration (s)", m["duration"]), ("Total input tokens", m["total_input_tokens"]),
            ("Total generated tokens", m["total_output_tokens"]),
            ("Request throughput (req/s)", m["request_throughput"]),
            ("Output token throughput (tok/s)", m["output_throughput"]),
            ("Total token throughput (tok/s)", m["total_token_throughput"])]  # fmt: skip
    if m["request_goodput"] is not None:
        rows.append(("Request goodput (req/s)", m["request_goodput"]))
    for metric, title in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        rows += [(f"Mean {title} (ms)", m[f"mean_{metric}_ms"]), (f"Median {title} (ms)", m[f"median_{metric}_ms"])]
        rows += [(f"P{float(p):g} {title} (ms)", m[f"p{float(p):g}_{metric}_ms"]) for p in percentiles.split(",")]
    print("=" * 50)
    for name, value in rows:
        print(f"{name:<38}{value:>12.2f}" if isinstance(value, float) else f"{name:<38}{value:>12}")
    print("=" * 50)


def plot_latencies(m: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [i for i, e in enumerate(m["errors"]) if not e]
    series = {
        "TTFT (ms)": [m["ttfts"][i] * 1e3 for i in ok],
        "TPOT (ms)": [(m["e2els"][i] - m["ttfts"][i]) * 1e3 / (m["output_lens"][i] - 1) for i in ok
                      if m["output_lens"][i] > 1],
        "ITL (ms)": [x * 1e3 for i in ok for x in m["itls"][i]],
        "E2E latency (s)": [m["e2els"][i] for i in ok],
    }  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, (title, values) in zip(axes, series.items()):
        ax.hist(values or [0], bins=40)
        ax.set_title(title)
    fig.suptitle(f"{m['model_id']} {m['dataset_name']} concurrency={m['max_concurrency']} rate={m['request_rate']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(files: list[Path], path: Path) -> None:
    """Output throughput and TTFT p95 against max concurrency, one point per saved result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((json.loads(Path(f).read_text()) for f in files), key=lambda m: m["max_concurrency"] or 0)
    x = [m["max_concurrency"] or m["num_prompts"] for m in runs]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(x, [m["output_throughput"] for m in runs], marker="o")
    a.set(xscale="log", xlabel="max concurrency", ylabel="output tokens/s")
    b.plot(x, [m.get("p95_ttft_ms", m["median_ttft_ms"]) for m in runs], marker="o")
    b.set(xscale="log", xlabel="max concurrency", ylabel="TTFT p95 (ms)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtpjax bench serve", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--backend", choices=["openai", "openai-chat", "vllm"], default="openai")
    p.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default=None, help="default /v1/completions (/v1/chat/completions for openai-chat)")
    p.add_argument("--model", default=None, help="default: the first model /v1/models lists")
    p.add_argument("--tokenizer", default=None, help="default: --model (a local folder or a hub-cached name)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset-name", default="random", choices=["random", "prefix_repetition", "sharegpt", "multi_turn"])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--num-warmups", type=int, default=0,
                   help="requests of the same dataset sent first and not measured (prefix_repetition: one per prefix "
                        "in turn, so as many as prefixes fill the caches as a long-running server's are)")
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--random-prefix-len", type=int, default=0)
    p.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    p.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    p.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    p.add_argument("--prefix-repetition-output-len", type=int, default=128)
    p.add_argument("--multi-turn-num-turns", type=int, default=4)
    p.add_argument("--multi-turn-input-len", type=int, default=128)
    p.add_argument("--multi-turn-output-len", type=int, default=64)
    p.add_argument("--multi-turn-think-time", type=float, default=0.0, help="mean seconds between a turn's answer "
                   "and the next turn (exponential; 0: none)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrival times (1: Poisson)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric-percentiles", default="50,90,95,99")
    p.add_argument("--goodput", nargs="+", default=None, help="SLOs as ttft:MS tpot:MS e2el:MS")
    p.add_argument("--request-timeout", type=float, default=6 * 3600)
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--save-detailed", action="store_true", help="also save generated texts")
    p.add_argument("--result-dir", default=".")
    p.add_argument("--result-filename", default=None)
    p.add_argument("--metadata", nargs="*", default=[], help="KEY=VALUE pairs stored with the result")
    p.add_argument("--plot", action="store_true", help="save a latency histogram PNG next to the result")
    p.add_argument("--plot-sweep", nargs="+", default=None, metavar="RESULT_JSON",
                   help="only plot throughput and TTFT against concurrency from saved results, then exit")  # fmt: skip
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict | None:
    args = parser().parse_args(argv)
    if args.plot_sweep:
        out = Path(args.result_dir) / (args.result_filename or "sweep.png")
        plot_sweep([Path(f) for f in args.plot_sweep], out)
        print(out)
        return None
    import httpx
    from transformers import AutoTokenizer

    args.base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    args.endpoint = args.endpoint or ("/v1/chat/completions" if args.backend == "openai-chat" else "/v1/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.model is None:
        args.model = httpx.get(args.base_url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    requests = sample_requests(args, tokenizer)
    warmups, requests = requests[: args.num_warmups], requests[args.num_warmups :]
    if warmups:
        results, seconds = asyncio.run(run(args, args.model, warmups))
        failed = [r.error for r in results if not r.success]
        if failed:
            raise SystemExit(f"{len(failed)} of {len(warmups)} warm-up requests failed, the first: {failed[0]}")
        print(f"{len(warmups)} warm-up requests in {seconds:.1f} s (not measured)")
    print(f"{len(requests)} requests, {args.dataset_name}, rate {args.request_rate}, concurrency {args.max_concurrency}")
    results, duration = asyncio.run(run(args, args.model, requests))
    metrics = summarize(args, results, duration)
    metrics |= dict(kv.split("=", 1) for kv in args.metadata)
    print_table(metrics, args.metric_percentiles)
    if args.save_result or args.plot:
        name = args.result_filename or (
            f"{args.backend}-{args.request_rate}qps-concurrency{args.max_concurrency}-"
            f"{Path(args.model).name}-{metrics['date']}.json"
        )
        path = Path(args.result_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if args.save_result:
            path.write_text(json.dumps(metrics))
        if args.plot:
            plot_latencies(metrics, path.with_suffix(".png"))
    return metrics


if __name__ == "__main__":
    main()

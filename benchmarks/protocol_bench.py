"""What one engine step's output message costs on the wire: the typed msgspec message (rtpjax.distributed.messages)
against pickle, per message encoded and decoded, and its size.

The message is a decode step at `--streams` requests, each with one completion that adds one token and a few
characters of text, without and with 5 logprobs (the sampled token's and 5 alternatives). Pickle is timed on the
positional tuples the engine process sent before the typed protocol, and on the typed message itself.

    python -m rtpjax.benchmarks.protocol_bench [--streams 256] [--iters 300] [--out protocol.json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import time
import uuid

import msgspec

from rtpjax.distributed import messages as m

STATS = m.EngineStats(num_running=256, num_waiting=0, kv_cache_usage=0.5, prefix_cache_queries=65536,
                      prefix_cache_hits=32768, num_free_blocks=4096, num_blocks=8192)  # fmt: skip
WORDS = (" the", " a", " girl", " named", " Lily", ".", ",", " and", " she", " happy")


def step_message(streams: int, logprobs: int | None, seed: int = 0) -> m.StepOutputs:
    rng = random.Random(seed)
    outputs = []
    for _ in range(streams):
        token = rng.randrange(50000)
        lps = None
        if logprobs is not None:
            lps = [{token: -rng.random(), **{rng.randrange(50000): -rng.random() * 5 for _ in range(logprobs)}}]
        completion = m.CompletionDelta(0, rng.choice(WORDS), [token], lps)
        outputs.append(m.RequestDelta(f"cmpl-{uuid.UUID(int=rng.getrandbits(128)).hex}", False, [completion]))
    return m.StepOutputs(outputs, [], STATS)


def as_tuples(step: m.StepOutputs) -> tuple:
    """The same step as the engine process pickled it before the typed protocol."""
    wire = [(r.request_id, r.finished, None, r.prompt_logprobs,
             [(c.index, c.text, c.token_ids, c.logprobs, c.finish_reason, c.stop_reason) for c in r.completions])
            for r in step.outputs]  # fmt: skip
    return "step", wire, [], msgspec.structs.asdict(step.stats)


def _best_us(fn, arg, iters: int, repeats: int) -> float:
    """The fastest of `repeats` runs, in microseconds per call (the least disturbed by other work on the host)."""
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        for _ in range(iters):
            fn(arg)
        best = min(best, (time.perf_counter() - began) / iters)
    return best * 1e6


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)


def _decode_step(data: bytes) -> m.StepOutputs:
    return m.decode(data, m.StepOutputs)


def measure(streams: int = 256, iters: int = 300, repeats: int = 5) -> list[dict]:
    rows = []
    for logprobs in (None, 5):
        step = step_message(streams, logprobs)
        formats = (("msgspec", step, m.encode, _decode_step),
                   ("pickle, tuples", as_tuples(step), _pickle, pickle.loads),
                   ("pickle, typed", step, _pickle, pickle.loads))  # fmt: skip
        for name, message, encode, decode in formats:
            data = encode(message)
            assert decode(data) == message, f"{name} does not round-trip"
            enc, dec = _best_us(encode, message, iters, repeats), _best_us(decode, data, iters, repeats)
            rows.append(dict(format=name, streams=streams, logprobs=logprobs or 0, encode_us=enc, decode_us=dec,
                             total_us=enc + dec, bytes=len(data)))  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'format':<16}{'logprobs':>9}{'encode us':>11}{'decode us':>11}{'total us':>10}{'bytes':>9}"]
    lines += [f"{r['format']:<16}{r['logprobs']:>9}{r['encode_us']:>11.1f}{r['decode_us']:>11.1f}{r['total_us']:>10.1f}"
              f"{r['bytes']:>9}" for r in rows]  # fmt: skip
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--iters", type=int, default=300, help="messages per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the fastest counts")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = measure(args.streams, args.iters, args.repeats)
    print(f"one step's output message at {args.streams} streams (1 token each), per message:")
    print(table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(streams=args.streams, iters=args.iters, repeats=args.repeats, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

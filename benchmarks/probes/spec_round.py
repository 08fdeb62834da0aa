"""Host cost of a speculative round at batch 1 against a plain decode step, on a tiny model (stories260K on the CPU):
what the engine loop itself spends per round, apart from the device.

    python -m rtpjax.benchmarks.probes.spec_round --model PATH/stories260K --out spec_round.json
    python -m rtpjax.benchmarks.probes.spec_round --model PATH/stories260K --profile 25

One greedy request of `--max-tokens` tokens runs with speculation opted out (plain steps, fully overlapped), then
with a proposer that proposes the true greedy continuation (each draft replaced by a random token with probability
`--corrupt`, so acceptance stops at a random place), then with the engine's n-gram proposer. Each run reports wall ms
per engine step, tokens per second, mean acceptance length, the loop's own split of its time, and its host ms per
step: the step less its waits for tokens and less the executables' calls (on the CPU those run part of the step
inline, and a verify step's bucket is larger than a plain one's, so wall times there mix in device work the GPU
does not have). The speculative runs' tokens must equal the plain run's, and no run may compile after warm-up.
`--profile N`: the N functions with the most own time in one truth run, under cProfile.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np

from rtpjax.benchmarks.probes import report


class TruthProposer:
    """The true greedy continuation, each draft corrupted with probability `corrupt` (a seeded random token)."""

    def __init__(self, truth: list[int], corrupt: float, vocab: int, seed: int = 0):
        self.truth, self.corrupt, self.vocab, self.rng = truth, corrupt, vocab, np.random.default_rng(seed)

    def propose(self, seqs, ks):
        out = []
        for seq, k in zip(seqs, ks):
            drafts = self.truth[len(seq.token_ids) : len(seq.token_ids) + k]
            out.append([int(self.rng.integers(3, self.vocab)) if self.rng.random() < self.corrupt else t for t in drafts])
        return out


def run(llm, prompt: list[int], max_tokens: int, speculative: bool) -> dict:
    """One request driven step by step: wall ms per step and the tokens."""
    from rtpjax import SamplingParams
    from rtpjax.runner.model_runner import CompileCounter

    engine = llm.engine
    engine.take_loop_stats()
    counters = engine.speculator.counters
    drafts0, accepted0 = counters.num_drafts, counters.num_accepted_tokens
    compiled = CompileCounter.count
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, speculative=speculative)
    engine.add(engine.make_request(prompt, params))
    times, out = [], None
    dispatch, calls = engine.runner._dispatch, [0.0]

    def timed_dispatch(*a, **kw):  # the executables' calls: on the CPU they run part of the step inline
        t = time.perf_counter()
        result = dispatch(*a, **kw)
        calls[0] += time.perf_counter() - t
        return result

    engine.runner._dispatch = timed_dispatch
    began = time.perf_counter()
    try:
        while engine.has_work():
            t = time.perf_counter()
            for o in engine.step(final_only=True):
                out = o
            times.append(time.perf_counter() - t)
    finally:
        del engine.runner._dispatch
    seconds = time.perf_counter() - began
    stats = engine.take_loop_stats()
    n = len(out.outputs[0].token_ids)
    drafts = counters.num_drafts - drafts0
    ms = 1e3 / max(stats.steps, 1)
    outputs = stats.busy_s - stats.prepare_s - stats.launch_s - stats.device_wait_s
    return {"tokens": n, "steps": len(times), "seconds": seconds, "tokens_per_s": n / seconds,
            "ms_per_step_median": 1e3 * float(np.median(times)), "ms_per_step_mean": 1e3 * seconds / len(times),
            "mean_acceptance_length": 1 + (counters.num_accepted_tokens - accepted0) / drafts if drafts else None,
            "verify_steps": drafts, "compiled_after_warmup": CompileCounter.count - compiled,
            "host_ms_per_step": (stats.busy_s - stats.device_wait_s - calls[0]) * ms,
            "split_ms_per_step": {"scheduling": stats.prepare_s * ms, "of_which_proposing": stats.propose_s * ms,
                                  "launching": stats.launch_s * ms, "reading": stats.device_wait_s * ms,
                                  "outputs": outputs * ms},
            "token_ids": out.outputs[0].token_ids}  # fmt: skip


def main():
    from rtpjax import LLM

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--corrupt", type=float, default=0.25, help="the mixed run's chance of a wrong draft")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind; the fastest is reported")
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    k = args.num_speculative_tokens
    llm = LLM(args.model, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=512, block_size=16,
              speculative_config={"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
                                  "prompt_lookup_min": 2})  # fmt: skip
    speculator = llm.engine.speculator
    ngram = speculator.proposer
    prompt = [1] + llm.tokenizer.encode("Once upon a time, there was a little girl named Lily.", add_special_tokens=False)

    def best(speculative: bool) -> dict:
        runs = [run(llm, prompt, args.max_tokens, speculative) for _ in range(args.repeats)]
        return min(runs, key=lambda r: r["seconds"])

    best(False)  # first runs of every executable, caches warm
    result = {"model": args.model, "k": k, "max_tokens": args.max_tokens, "plain": best(False)}
    truth = prompt + result["plain"]["token_ids"]
    vocab = llm.engine.cfg.vocab_size
    for name, corrupt in (("truth", 0.0), ("mixed", args.corrupt)):
        speculator.proposer = TruthProposer(truth, corrupt, vocab)
        result[name] = best(True)
    speculator.proposer = ngram
    result["ngram"] = best(True)
    plain = result["plain"]
    for name in ("truth", "mixed", "ngram"):
        r = result[name]
        r["identical_to_plain"] = r["token_ids"] == plain["token_ids"]
        r["speedup"] = r["tokens_per_s"] / plain["tokens_per_s"]
        r["round_over_plain_step"] = r["ms_per_step_mean"] / plain["ms_per_step_mean"]
    if args.profile:
        speculator.proposer = TruthProposer(truth, 0.0, vocab)
        profile = cProfile.Profile()
        profile.enable()
        run(llm, prompt, args.max_tokens, True)
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.profile)
        print(text.getvalue())
    for r in result.values():
        if isinstance(r, dict):
            r.pop("token_ids", None)
    report(result, args.out)


if __name__ == "__main__":
    main()

"""Speculative decoding: what a verify step costs and what n-gram speculation gains end to end. Writes JSON.

    python -m rtpjax.benchmarks.spec_bench --shape llama3-8b --out spec.json      # GPU, random weights
    python -m rtpjax.benchmarks.spec_bench --prompts copy --out spec_cpu.json       # the default SmolLM2, CPU

cost: device time of one step verifying t tokens per sequence (t - 1 drafts) at each batch, all at `--context`
tokens of context, against the plain decode step (t = 1). end to end (greedy): batch 1 over copy-heavy prompts (the
"copy" set: summarize / rewrite / code-edit chat prompts; or random ids) with n-gram speculation and with it opted
out per request in the same engine, mean acceptance length beside the speedup; a batch of `--large-batch`
sequences both ways (above disable_by_batch_size speculation is off: what it costs there is its policy's overhead);
then, at each of `--replay-lengths`, batch 1 with drafts replayed from a recorded greedy run so that every
verify step yields exactly that many tokens (what speculation gains at a given acceptance length, whatever proposes;
replayed on the device, rounds chained as n-gram's, and on the host, unchained);
then batch 1 again with a `--draft-layers`-layer draft model of the target's shape (random weights: its acceptance
says nothing, its cost per step is what it measures); last, an EAGLE-3 head's wall time per proposal round at
`--eagle-batch-sizes` (a random head of the target's shape: its cost, not its acceptance).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.benchmarks.offline import ENGINE_DEFAULTS, RtpjaxRunner, prompts
from rtpjax.options import add_engine_arguments, engine_args_from

CODE = '''def total_price(items, tax_rate):
    total = 0
    for item in items:
        total = total + item["price"] * item["quantity"]
    total = total + total * tax_rate
    return total


def average_price(items):
    total = 0
    for item in items:
        total = total + item["price"]
    return total / len(items)
'''
STORY = ("The old lighthouse stood at the end of the rocky point for more than a hundred years. Every night the keeper "
         "climbed the spiral stairs, trimmed the wick and lit the great lamp, so that the fishing boats could find "
         "their way home through the fog. When the keeper grew old, his granddaughter Mara learned the work: she "
         "polished the lens, wound the clockwork that turned the light, and wrote the weather in the logbook each "
         "morning. One winter a storm broke the power line to the village, and the lighthouse was the only light "
         "on the whole coast. Mara kept the lamp burning for three nights without sleep, and every boat came home.")
COPY_PROMPTS = [
    f"Rewrite this code so that it uses the built-in sum() function, and keep everything else the same:\n\n{CODE}",
    f"Add type hints and a docstring to each function below. Repeat the full code in your answer.\n\n{CODE}",
    f"Summarize the following story in three sentences, reusing its own words where you can:\n\n{STORY}",
    f"Rewrite the following story in the present tense, changing nothing else:\n\n{STORY}",
]


def copy_prompts(llm) -> list[list[int]]:
    tok = llm.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in COPY_PROMPTS]  # fmt: skip
    return [list(tok.encode(t, add_special_tokens=False)) for t in texts]


def verify_cost(runner: RtpjaxRunner, batches: list[int], tokens: list[int], context: int) -> dict:
    """Device ms of one step per (batch, tokens per sequence); t = 1 is the plain decode step."""
    from rtpjax.engine.scheduler import ScheduledSeq

    engine = runner.llm.engine
    out = {}
    for b in batches:
        (batch, sampling), ids = runner.decode_inputs(b, context)
        items = engine.inflight[0].items
        row = {1: runner.device_step_ms(b, inputs=(batch, sampling))}
        for t in [t for t in tokens if t > 1]:
            spec = []
            for item in items:  # the same sequences, each verifying t - 1 drafts after its last token
                seq = item.seq
                need = -(-(item.start + t) // engine.args.block_size) - len(seq.block_table)
                seq.block_table += engine.pool.allocate(max(0, need)) or []
                spec.append(ScheduledSeq(seq, item.start, t, True, [7] * (t - 1)))
            size = next(s for s in engine.runner.token_buckets if s >= b * t)
            inputs = engine.runner._batch(spec, size, engine.runner._verify_seqs_for(size), engine.runner.spec_k)
            row[t] = runner.device_step_ms(b, inputs=inputs)
        out[b] = {"device_ms": row, "ratio": {t: ms / row[1] for t, ms in row.items()}}
        print(f"batch {b:3d}: " + "  ".join(f"{t} tok {ms:6.2f} ms ({ms / row[1]:.2f}x)" for t, ms in row.items()),
              flush=True)  # fmt: skip
        runner.release(ids)
    return out


def end_to_end(llm, batch: list[list[int]], max_tokens: int, method: str = "ngram") -> dict:
    """The same greedy batch with speculation (the engine's proposer, named `method`) and opted out; tokens must
    agree (lossless). A proposer whose rounds chain (n-gram, or one that proposes on the device) also runs with its
    verify rounds read before the next is scheduled ("<method>_unchained": what chaining them, spec/chained.py,
    gains)."""
    from rtpjax import SamplingParams

    engine = llm.engine
    counters = engine.speculator.counters
    result = {}
    unchained = f"{method}_unchained"
    runs = (("off", False), (method, True)) + (((unchained, True),) if engine.chains() else ())
    for name, speculative in runs:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, speculative=speculative)
        before = dataclasses.replace(counters, accepted_per_pos=list(counters.accepted_per_pos))
        engine.chain_rounds, chained = name != unchained, engine.loop_stats.chained
        began = time.perf_counter()
        outs = llm.generate(batch, params)
        seconds = time.perf_counter() - began
        engine.chain_rounds = True
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        drafts = counters.num_drafts - before.num_drafts
        accepted = counters.num_accepted_tokens - before.num_accepted_tokens
        result[name] = {"seconds": seconds, "tokens": n, "tokens_per_s": n / seconds,
                        "mean_acceptance_length": 1 + accepted / drafts if drafts else None, "rounds": drafts,
                        "draft_tokens": counters.num_draft_tokens - before.num_draft_tokens, "accepted_tokens": accepted,
                        "chained_rounds": engine.loop_stats.chained - chained,
                        "outputs": [o.outputs[0].token_ids for o in outs]}  # fmt: skip
    off, on = result["off"], result[method]
    result["speedup"] = on["tokens_per_s"] / off["tokens_per_s"]
    if unchained in result:
        result["speedup_unchained"] = result[unchained]["tokens_per_s"] / off["tokens_per_s"]
        same = sum(a == b for a, b in zip(result[unchained].pop("outputs"), on["outputs"]))
        result["identical_unchained"] = same / len(batch)
    result["identical_outputs"] = sum(a == b for a, b in zip(off.pop("outputs"), on.pop("outputs"))) / len(batch)
    return result


def draft_model_run(llm, model: str, layers: int, batch: list[list[int]], max_tokens: int) -> dict:
    """Batch 1 with a draft model in place of the n-gram proposer: the target's config cut to `layers` layers (its
    own random weights where the target's are random; with real weights, a random draft: acceptance near zero)."""
    import shutil
    from pathlib import Path

    from rtpjax.spec.draft_model import DraftModelProposer

    folder = Path(tempfile.mkdtemp(prefix="draft-"))
    for f in Path(model).iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(f, folder / f.name)
    hf = json.loads((Path(model) / "config.json").read_text()) | {"num_hidden_layers": layers}
    (folder / "config.json").write_text(json.dumps(hf))
    ctx = dataclasses.replace(llm.engine.draft_context, load_format="dummy")
    speculator = llm.engine.speculator
    speculator.proposer = DraftModelProposer(str(folder), speculator.config.num_speculative_tokens, ctx)
    end_to_end(llm, batch[:1], 8, "draft_model")  # first-call costs
    single = [end_to_end(llm, [p], max_tokens, "draft_model") for p in batch]
    for i, s in enumerate(single):
        print(f"batch 1, prompt {i}, {layers}-layer random draft: {s['off']['tokens_per_s']:7.1f} -> "
              f"{s['draft_model']['tokens_per_s']:7.1f} tok/s ({s['speedup']:.2f}x), mean acceptance length "
              f"{s['draft_model']['mean_acceptance_length'] or 1:.2f}, identical {s['identical_outputs']:.0%}",
              flush=True)  # fmt: skip
    return {"layers": layers, "random_weights": True, "per_prompt": single}


class ReplayProposer:
    """Drafts taken from a recorded greedy continuation: the first `length - 1` of each round are the tokens the target
    goes on to produce, the rest of the K are wrong, so every verify step yields exactly `length` tokens while the
    sequence follows its recording. What the engine gains at a chosen acceptance length, on weights no proposer
    could guess (random ones): the cost side of speculation, apart from any proposer's quality."""

    def __init__(self, recorded: dict[tuple, list[int]], length: int, vocab: int):
        self.recorded, self.length, self.vocab = recorded, length, vocab
        self.index = {prompt: i for i, prompt in enumerate(recorded)}  # a recording's row in `table`
        self.table = self.lengths = None  # on the device, made by the first propose_on_device
        self.rows: dict = {}  # sequence -> its recording's row (the last row: none)

    def propose(self, seqs, ks: list[int]) -> list[list[int]]:
        out = []
        for seq, k in zip(seqs, ks):
            ref = self.recorded.get(tuple(seq.token_ids[: seq.num_prompt]), [])
            done = len(seq.token_ids) - seq.num_prompt  # drafts by position: a run that left its recording (numerics)
            right = ref[done : done + min(k, self.length - 1)]  # gets them rejected, which its acceptance shows
            wrong = [(t + 1) % self.vocab for t in ref[done + len(right) : done + k]]
            out.append(right + wrong)
        return out

    def propose_on_device(self, state, items):
        """The same drafts for a chained round (queued before the round ahead of it is read), made on the device
        from each slot's token count in the sampler state, as a model-based proposer's program would (spec/chained.py):
        what chaining gains at a given acceptance length. Every item's row is written (no recording: no drafts)."""
        if self.table is None:  # the recordings, uploaded once (a last, empty row for sequences without one)
            width = _pow2(max(map(len, self.recorded.values()), default=1))
            table = np.zeros((len(self.recorded) + 1, width), np.int32)
            for i, ref in enumerate(self.recorded.values()):
                table[i, : len(ref)] = ref
            self.table = jnp.asarray(table)
            self.lengths = jnp.asarray([len(r) for r in self.recorded.values()] + [0], jnp.int32)
        rows = state.last_token.shape[0]  # a row per slot and the sink: one shape, compiled once
        slots, num_prompt = np.full(rows, rows - 1, np.int32), np.zeros(rows, np.int32)  # padding: the sink
        recording = np.full(rows, len(self.recorded), np.int32)
        for i, item in enumerate(items):
            seq = item.seq
            if seq not in self.rows:
                self.rows[seq] = self.index.get(tuple(seq.token_ids[: seq.num_prompt]), len(self.recorded))
            slots[i], num_prompt[i], recording[i] = seq.slot, seq.num_prompt, self.rows[seq]
        return _replay_drafts(state, self.table, self.lengths, slots, recording, num_prompt, length=self.length,
                              vocab=self.vocab)  # fmt: skip


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.partial(jax.jit, static_argnames=("length", "vocab"), donate_argnums=(0,))
def _replay_drafts(state, table, lengths, slots, recording, num_prompt, *, length: int, vocab: int):
    """ReplayProposer.propose's drafts for each slot at its current length, written to the state's proposals (the
    state donated: the engine keeps only the returned one)."""
    k = state.proposals.shape[1]
    done = state.history_len[slots] - num_prompt  # tokens generated, the one round N left last included
    j = jnp.arange(k)[None, :]
    ref = table[recording[:, None], jnp.clip(done[:, None] + j, 0, table.shape[1] - 1)]
    drafts = jnp.where(j < length - 1, ref, (ref + 1) % vocab)
    count = jnp.clip(lengths[recording] - done, 0, k)
    return dataclasses.replace(state, proposals=state.proposals.at[slots].set(drafts),
                               num_proposals=state.num_proposals.at[slots].set(count))  # fmt: skip


def replay_run(llm, batch: list[list[int]], max_tokens: int, lengths: list[int], vocab: int) -> dict:
    """Batch 1 per prompt at each forced acceptance length (ReplayProposer), against the same prompts opted out."""
    from rtpjax import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, speculative=False)
    # each prompt alone, as it runs below: in bfloat16 a batch's numerics differ from one sequence's
    recorded = {tuple(p): llm.generate([p], params)[0].outputs[0].token_ids for p in batch}
    speculator = llm.engine.speculator
    ngram, config, result = speculator.proposer, speculator.config, {}
    if max(lengths) > config.num_speculative_tokens + 1:
        raise ValueError(f"--replay-lengths: a verify step yields at most num_speculative_tokens + 1 = "
                         f"{config.num_speculative_tokens + 1} tokens, got {max(lengths)}")  # fmt: skip
    # acceptance here is (length - 1) / K by construction: the low-acceptance fallback to one draft must not cut in
    speculator.config = dataclasses.replace(config, min_acceptance_rate=0.0)
    try:
        for length in lengths:
            speculator.proposer = ReplayProposer(recorded, length, vocab)
            end_to_end(llm, batch[:1], 8, "replay")  # first-call costs
            mine, passes = refine_recordings(llm, recorded, length, vocab, max_tokens)
            speculator.proposer = ReplayProposer(mine, length, vocab)
            runs = [end_to_end(llm, [p], max_tokens, "replay") for p in batch]
            on = sum(r["replay"]["tokens_per_s"] for r in runs)
            off = sum(r["off"]["tokens_per_s"] for r in runs)
            result[length] = {"per_prompt": runs, "speedup": on / off, "refine_passes": passes,
                              "speedup_unchained": sum(r["replay_unchained"]["tokens_per_s"] for r in runs) / off}
            accepted = [r["replay"]["mean_acceptance_length"] or 1 for r in runs]
            print(f"batch 1, replayed drafts, acceptance length {length} (measured {min(accepted):.2f}-"
                  f"{max(accepted):.2f}): {result[length]['speedup']:.2f}x chained "
                  f"({result[length]['speedup_unchained']:.2f}x unchained), identical "
                  f"{sum(r['identical_outputs'] for r in runs) / len(runs):.0%}", flush=True)  # fmt: skip
    finally:
        speculator.proposer, speculator.config = ngram, config
    return result


def refine_recordings(llm, recorded: dict, length: int, vocab: int, max_tokens: int, passes: int = 8):
    """Recordings the speculative run at `length` keeps to: in bfloat16 a verify step's rows round differently from a
    one-row step's, so a run leaves a plain run's recording at the first near-tie and then rejects every draft. Each
    pass records what the speculative run itself produced: up to where it left the old recording it repeats itself
    (same drafts, same step shapes, row-wise the same sums), and there the new recording now agrees with it, so each
    pass keeps to it further. Returns the recordings and the passes it took (`passes` + 1: some never settled)."""
    from rtpjax import SamplingParams

    speculator, params = llm.engine.speculator, SamplingParams(temperature=0, max_tokens=max_tokens)
    mine = dict(recorded)
    for done in range(passes):
        speculator.proposer = ReplayProposer(mine, length, vocab)
        outs = {p: llm.generate([list(p)], params)[0].outputs[0].token_ids for p in mine}
        if all(outs[p] == mine[p] for p in mine):
            return mine, done
        mine = outs
    return mine, passes + 1


def eagle_round_cost(llm, k: int, batches: list[int], context: int, prompt: list[int], max_tokens: int,
                     rounds: int = 20) -> dict:  # fmt: skip
    """Wall ms of one EAGLE-3 proposal round on the host (catch up on 2 new rows per sequence, then K chained
    guesses) at each batch, a random head of the target's shape (its guesses mean nothing; its cost is what this
    measures), beside the first round's catch-up over the whole context. Fake running sequences over the target's
    first blocks. Then the head proposes for the engine at batch 1 (`prompt`), its rounds chained (the head's
    program on the device) and not: what a verify round with its proposal costs in plain steps, at K drafts a round
    whatever the acceptance (the target's features are not stored here, and the n-gram engine's chained rounds also
    run its lookup, whose drafts the head's replace: cost only, a little above an EAGLE-3 engine's)."""
    from rtpjax import SamplingParams
    from rtpjax.engine.sequence import Sequence, Status
    from rtpjax.spec.eagle3 import Eagle3Proposer
    from rtpjax.spec.eagle3_head import write_random_head

    engine = llm.engine
    cfg, bs = engine.cfg, engine.args.block_size
    folder = write_random_head(tempfile.mkdtemp(prefix="eagle3-"), cfg, num_heads=cfg.num_heads,
                               num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
                               draft_vocab_size=min(cfg.vocab_size, 32000), scale=0.02)  # fmt: skip
    proposer = Eagle3Proposer(str(folder), k, engine.draft_context, engine.runner.params["embed"])
    out = {}
    for b in batches:
        seqs = [Sequence(f"eagle-{b}-{i}", 0, [7] * context, SamplingParams(), 0, 1 << 20, status=Status.RUNNING,
                         block_table=list(range(-(-(context + 2 * rounds + 2) // bs)))) for i in range(b)]  # fmt: skip
        began = time.perf_counter()
        proposer.propose(seqs, [k] * b)
        first = time.perf_counter() - began
        times = []
        for _ in range(rounds):
            for seq in seqs:
                seq.token_ids += [11, 13]
            began = time.perf_counter()
            proposer.propose(seqs, [k] * b)
            times.append(time.perf_counter() - began)
        for seq in seqs:
            seq.status = Status.FINISHED
        proposer.release_finished()
        out[b] = {"round_ms": 1e3 * float(np.median(times)), "first_round_ms": 1e3 * first}
        print(f"EAGLE-3 head (random, target shape), batch {b:3d}, K={k}: {out[b]['round_ms']:.2f} ms per round "
              f"(first, over {context} tokens of context: {out[b]['first_round_ms']:.1f} ms)", flush=True)  # fmt: skip
    speculator = engine.speculator
    kept = speculator.proposer, speculator.config
    engine.runner.state = proposer.warm(engine.runner.state)  # its chained programs, compiled before anything is timed
    speculator.proposer = proposer
    speculator.config = dataclasses.replace(speculator.config, num_speculative_tokens=k, min_acceptance_rate=0.0)
    try:
        run = end_to_end(llm, [prompt], max_tokens, method="eagle3")
    finally:
        speculator.proposer, speculator.config = kept
    step_s = run["off"]["seconds"] / run["off"]["tokens"]  # batch 1: a plain step per token
    out["round_cost"] = {name: run[name]["seconds"] / max(1, run[name]["rounds"]) / step_s
                         for name in ("eagle3", "eagle3_unchained")}  # fmt: skip
    print(f"EAGLE-3 at batch 1, K={k}: a verify round with its proposal costs {out['round_cost']['eagle3']:.2f} plain "
          f"steps chained, {out['round_cost']['eagle3_unchained']:.2f} unchained", flush=True)  # fmt: skip
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a checkpoint folder (default: the embedded SmolLM2)")
    parser.add_argument("--shape", help="a shape from random_checkpoint.SHAPES: random weights made on the device")
    parser.add_argument("--prompts", choices=["copy", "random"], default="copy")
    parser.add_argument("--batch-sizes", default="1,8,32,64", help="verify cost ('' to skip)")
    parser.add_argument("--verify-tokens", default="1,2,4,8")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--large-batch", type=int, default=64, help="sequences of the large-batch run (0 to skip)")
    parser.add_argument("--draft-layers", type=int, default=2, help="batch 1 again with a draft model: the target's "
                        "shape cut to this many layers, random weights with --shape (0 to skip)")
    parser.add_argument("--eagle-batch-sizes", default="1,8", help="EAGLE-3 head's cost per proposal round at these "
                        "batches, a random head of the target's shape ('' to skip)")
    parser.add_argument("--replay-lengths", default="", help="batch 1 again with drafts replayed from a recorded run "
                        "so that each verify step yields exactly this many tokens, e.g. 2,3,4 ('' to skip)")
    parser.add_argument("--out", default=None)
    add_engine_arguments(parser, max_model_len=2048, **ENGINE_DEFAULTS)
    args = parser.parse_args()

    model = args.model
    if args.shape:
        from rtpjax.benchmarks.random_checkpoint import write_config_only

        model, args.load_format = str(write_config_only(tempfile.mkdtemp(prefix=f"{args.shape}-"), args.shape)), "dummy"
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    lengths = [int(n) for n in args.replay_lengths.split(",") if n]
    if lengths and not 1 <= min(lengths) <= max(lengths) <= args.num_speculative_tokens + 1:
        parser.error(f"--replay-lengths: each from 1 to num_speculative_tokens + 1 = {args.num_speculative_tokens + 1}")
    tokens = [int(t) for t in args.verify_tokens.split(",")]
    k = max(args.num_speculative_tokens, max(tokens) - 1)
    args.speculative_config = {"method": "ngram", "num_speculative_tokens": k,
                               "disable_by_batch_size": max(batches + [32])}  # fmt: skip
    runner = RtpjaxRunner(model, **dataclasses.asdict(engine_args_from(args)))
    llm = runner.llm
    result = {"model": args.model or args.shape or "SmolLM2-135M-Instruct", "random_weights": bool(args.shape),
              "context": args.context, "verify_cost": {}}  # fmt: skip
    speculator = llm.engine.speculator
    if batches:  # stepping the sequences to their context: plain steps
        speculator.config = dataclasses.replace(speculator.config, disable_by_batch_size=0)
        result["verify_cost"] = verify_cost(runner, batches, tokens, args.context)
    speculator.config = dataclasses.replace(speculator.config, num_speculative_tokens=args.num_speculative_tokens,
                                            disable_by_batch_size=32)  # the default policy  # fmt: skip
    rng = np.random.default_rng(0)
    batch = copy_prompts(llm) if args.prompts == "copy" and llm.tokenizer else prompts(rng, 4, 128, runner.vocab)
    end_to_end(llm, batch[:1], 8)  # first-call costs
    single = [end_to_end(llm, [p], args.max_tokens) for p in batch]
    off = sum(s["off"]["tokens_per_s"] for s in single)
    result["batch1"] = {"per_prompt": single, "speedup": sum(s["ngram"]["tokens_per_s"] for s in single) / off,
                        "speedup_unchained": sum(s["ngram_unchained"]["tokens_per_s"] for s in single) / off}
    for i, s in enumerate(single):
        print(f"batch 1, prompt {i}: {s['off']['tokens_per_s']:7.1f} -> {s['ngram']['tokens_per_s']:7.1f} tok/s "
              f"({s['speedup']:.2f}x; {s['speedup_unchained']:.2f}x unchained), mean acceptance length "
              f"{s['ngram']['mean_acceptance_length'] or 1:.2f}, identical {s['identical_outputs']:.0%}",
              flush=True)  # fmt: skip
    if args.large_batch:
        large = [batch[i % len(batch)] + [int(t) for t in rng.integers(3, runner.vocab, 4)] for i in range(args.large_batch)]
        result["large_batch"] = end_to_end(llm, large, min(args.max_tokens, 128))
        lb = result["large_batch"]
        print(f"batch {args.large_batch}: {lb['off']['tokens_per_s']:.1f} -> {lb['ngram']['tokens_per_s']:.1f} tok/s "
              f"({lb['speedup']:.3f}x)", flush=True)  # fmt: skip
    if lengths:
        result["replay"] = replay_run(llm, batch, args.max_tokens, lengths, runner.vocab)
    save(result, args.out)  # before the draft model's run, which compiles its own programs first
    eagle_batches = [int(b) for b in args.eagle_batch_sizes.split(",") if b]
    if eagle_batches:
        result["eagle3_round"] = eagle_round_cost(llm, args.num_speculative_tokens, eagle_batches, args.context,
                                                  batch[0], args.max_tokens)  # fmt: skip
        save(result, args.out)
    if args.draft_layers:
        result["draft_model"] = draft_model_run(llm, model, args.draft_layers, batch, args.max_tokens)
        save(result, args.out)


def save(result: dict, out: str | None) -> None:
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

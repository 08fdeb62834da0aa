"""Offline latency and throughput through the Python API: decode tokens/s at batch 1, 8, 32 (greedy, fixed prompt
length) and a batch throughput workload, for rtpjax or transformers on the same checkpoint or shape. Writes JSON.

Decode speed is measured as `vllm bench latency` and gpt-fast do, without the prefill: each batch runs twice, with 1
and with N output tokens, and decode tokens/s = batch x (N - 1) / (t_N - t_1). Beside it, the device step alone:
the compiled step replayed back to back on real decode rows at the mid-point context (and on padding rows, which in
a MoE model all route to the same experts and so understate a routed step: `decode_step_ms`).

    python -m rtpjax.benchmarks.offline --shape llama3-8b --out offline.json            # random weights on the GPU
    python -m rtpjax.benchmarks.offline --shape llama3-8b --tensor-parallel-size 2     # heads over 2 GPUs
    python -m rtpjax.benchmarks.offline --model /data/llama3-8b --engine transformers   # the same, with torch

Every engine option is a flag (`rtpjax.options`: --kv-write, --mosaic-prefill, ...), prefix caching off by default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from rtpjax.options import add_engine_arguments, engine_args_from


def prompts(rng: np.random.Generator, n: int, length: int, vocab: int) -> list[list[int]]:
    return [[int(t) for t in rng.integers(3, vocab, size=length)] for _ in range(n)]


# Engine options the benchmarks default to unlike the engine: random prompts share no prefixes worth caching.
ENGINE_DEFAULTS = dict(enable_prefix_caching=False)


class RtpjaxRunner:
    def __init__(self, model: str, **options):
        """options: engine options (EngineArgs fields), over ENGINE_DEFAULTS."""
        from rtpjax import LLM

        began = time.perf_counter()
        self.llm = LLM(model, **{**ENGINE_DEFAULTS, **options})
        self.startup_seconds = time.perf_counter() - began
        self.vocab = self.llm.engine.cfg.vocab_size

    def loop_ms(self) -> dict:
        """The engine loop's host time per step since the last call (ms): where a step that outruns the device goes;
        reading is the wait for the device, so a loop bound by its host work reads in about no time."""
        stats = self.llm.engine.take_loop_stats()
        n = max(stats.steps, 1)
        outputs = stats.busy_s - stats.prepare_s - stats.launch_s - stats.device_wait_s
        return {"steps": stats.steps, "scheduling": stats.prepare_s * 1e3 / n, "launching": stats.launch_s * 1e3 / n,
                "reading": stats.device_wait_s * 1e3 / n, "outputs": outputs * 1e3 / n}

    def generate(self, batch: list[list[int]], max_tokens: int) -> int:
        from rtpjax import SamplingParams

        outs = self.llm.generate(batch, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        return sum(len(o.outputs[0].token_ids) for o in outs)


    def device_step_ms(self, batch: int, steps: int = 50, inputs=None) -> float:
        """The compiled step alone, back to back with no host work between: the device's share of a decode step.
        Without `inputs`, padding rows (attention reads no context; matmuls, sampling and weights' bytes are as in
        decode); `decode_inputs` gives a real batch at a chosen context."""
        import jax

        runner = self.llm.engine.runner
        if inputs is None:
            t = next(b for b in runner.token_buckets if b >= batch)
            inputs = runner._batch([], t, runner._seqs_for(t))
        jax.block_until_ready(runner.run_step(*inputs))
        began = time.perf_counter()
        for _ in range(steps):
            out = runner.run_step(*inputs)
        jax.block_until_ready(out)
        return (time.perf_counter() - began) / steps * 1e3

    def decode_step_ms(self, batch: int, context: int, prompt_len: int = 128) -> float:
        """The device step on `batch` real decode rows at `context` tokens: the step the loop runs. Not padding rows:
        those are all alike, so in a MoE model every one routes to the same top-k experts and a routed step (grouped,
        pallas) reads k experts' weights per layer where a real batch reads many more (Qwen3-30B-A3B at batch 32:
        8 of 128 against about 112). A multi-step decode's launch counts per iteration."""
        inputs, ids = self.decode_inputs(batch, context, prompt_len)
        iterations = self.llm.engine.runner.multi_k if hasattr(inputs[0], "steps") else 1  # (a multi-step's program)
        try:
            return self.device_step_ms(batch, inputs=inputs) / iterations
        finally:
            self.release(ids)

    def decode_inputs(self, batch: int, context: int, prompt_len: int = 128):
        """A real decode step's inputs: `batch` sequences stepped until each attends to at least `context` tokens
        (prompts admitted over several steps make the first ones a little longer). Replaying them
        rewrites the same cache slots, so the engine is left as it was; `release` frees the sequences after."""
        from rtpjax import SamplingParams

        engine = self.llm.engine
        rng = np.random.default_rng(batch)
        params = SamplingParams(temperature=0.0, max_tokens=context - prompt_len + 8, ignore_eos=True)
        ids = [engine.add_request(p, params) for p in prompts(rng, batch, prompt_len, self.vocab)]
        while engine.inflight is None or min(i.start + i.num_tokens for i in engine.inflight[0].items) < context:
            engine.step(final_only=True)
        return engine.runner.prepare(engine.inflight[0]), ids

    def prefill_inputs(self, chunk: int, context: int):
        """A prefill step's inputs: `chunk` tokens of one prompt after `context` of it are cached (chunked prefill
        with max_num_batched_tokens == chunk; context a multiple of it). Replays rewrite the same cache slots, as in
        `decode_inputs`; `release` frees the sequence after."""
        from rtpjax import SamplingParams

        engine = self.llm.engine
        rng = np.random.default_rng(chunk)
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        ids = [engine.add_request(p, params) for p in prompts(rng, 1, context + chunk, self.vocab)]
        while engine.inflight is None or engine.inflight[0].items[0].start < context:
            engine.step(final_only=True)
        return engine.runner.prepare(engine.inflight[0]), ids

    def release(self, request_ids) -> None:
        engine = self.llm.engine
        for request_id in request_ids:
            engine.abort(request_id)
        while engine.has_work():
            engine.step(final_only=True)


class TransformersRunner:
    def __init__(self, model: str):
        import torch
        from transformers import AutoModelForCausalLM

        began = time.perf_counter()
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, device_map="cuda").eval()
        self.startup_seconds = time.perf_counter() - began
        self.vocab = self.model.config.vocab_size

    def generate(self, batch: list[list[int]], max_tokens: int) -> int:
        torch = self.torch
        ids = torch.tensor(batch, device="cuda")
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                      min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)  # fmt: skip
        torch.cuda.synchronize()
        return int((out.shape[1] - ids.shape[1]) * ids.shape[0])


# Engine options a result records (the ones its measurements are compared by).
RESULT_OPTIONS = ("quantization", "quantize_lm_head", "quantized_decode", "tensor_parallel_size", "block_size",
                  "kv_write", "mosaic_prefill", "moe_impl", "expert_parallel_size", "pipeline_parallel_size",
                  "one_row_decode", "num_scheduler_steps", "kv_cache_dtype")


def timed(runner, batch, max_tokens) -> tuple[float, int]:
    began = time.perf_counter()
    tokens = runner.generate(batch, max_tokens)
    return time.perf_counter() - began, tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a checkpoint folder")
    source.add_argument("--shape", help="a shape from random_checkpoint.SHAPES: random weights made on the device")
    parser.add_argument("--engine", choices=["rtpjax", "transformers"], default="rtpjax")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=256, help="throughput workload (0 to skip)")
    parser.add_argument("--throughput-input-len", type=int, default=512)
    parser.add_argument("--throughput-output-len", type=int, default=128)
    parser.add_argument("--out", default=None)
    parser.add_argument("--ttft-len", type=int, default=0,
                        help="also time one prompt of this many tokens to its first token (0: skip)")
    # max-model-len as the server is run in gpu_run.sh, so compiled shapes are shared (raised to fit the prompts);
    # --max-num-seqs also sizes transformers' batches.
    add_engine_arguments(parser, max_model_len=2048, max_num_seqs=256, **ENGINE_DEFAULTS)  # batches are cut at it
    args = parser.parse_args()

    model = args.model
    if args.shape:
        from rtpjax.benchmarks.random_checkpoint import write_config_only

        model, args.load_format = str(write_config_only(tempfile.mkdtemp(prefix=f"{args.shape}-"), args.shape)), "dummy"
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    context = args.input_len + args.output_len // 2  # where the device step alone is timed: mid-way through decode
    args.max_model_len = max(args.max_model_len, args.input_len + args.output_len, context + 8,
                             args.throughput_input_len + args.throughput_output_len, args.ttft_len + 1)  # fmt: skip
    engine_args = engine_args_from(args)
    if args.engine == "rtpjax":
        runner = RtpjaxRunner(model, **dataclasses.asdict(engine_args))
    else:
        runner = TransformersRunner(model)
    rng = np.random.default_rng(0)
    result = {"engine": args.engine, "model": args.model or args.shape, "startup_seconds": runner.startup_seconds,
              **{name: getattr(engine_args, name) for name in RESULT_OPTIONS},
              "input_len": args.input_len, "output_len": args.output_len, "decode": {}}  # fmt: skip
    if args.engine == "rtpjax":  # as resolved (the option's default, None, is decided by the device and weights)
        result["one_row_decode"] = runner.llm.engine.runner.one_row_decode
    timed(runner, prompts(rng, 1, args.input_len, runner.vocab), 8)  # first-call costs (cuBLAS handles, caches)
    for b in sizes:
        t1, _ = timed(runner, prompts(rng, b, args.input_len, runner.vocab), 1)
        if args.engine == "rtpjax":
            runner.loop_ms()  # (counting from here: the timed run's steps)
        tn, tokens = timed(runner, prompts(rng, b, args.input_len, runner.vocab), args.output_len)
        decode = b * (args.output_len - 1) / (tn - t1)
        result["decode"][b] = {"decode_tokens_per_s": decode, "ms_per_step": (tn - t1) / (args.output_len - 1) * 1e3,
                               "end_to_end_tokens_per_s": tokens / tn, "prefill_seconds": t1}  # fmt: skip
        if args.engine == "rtpjax":
            row = result["decode"][b]
            row["loop_ms"] = loop = runner.loop_ms()
            row["device_step_ms"] = runner.decode_step_ms(b, context, args.input_len)
            row["padding_step_ms"] = runner.device_step_ms(b)  # device_step_ms in results up to h200_2026-12-03
            print(f"rtpjax batch {b:4d}: device step alone {row['device_step_ms']:.2f} ms on real rows at {context} "
                  f"tokens ({row['padding_step_ms']:.2f} ms on padding rows); the loop per step: "
                  f"{loop['scheduling']:.2f} ms scheduling, {loop['launching']:.2f} launching, {loop['reading']:.2f} "
                  f"waiting for the device, {loop['outputs']:.2f} on outputs")  # fmt: skip
        print(f"{args.engine} batch {b:4d}: {decode:9.1f} decode tok/s  {(tn - t1) / (args.output_len - 1) * 1e3:7.2f} "
              f"ms/step  prefill {t1 * 1e3:7.1f} ms", flush=True)  # fmt: skip
    if args.num_prompts:
        batch = prompts(rng, args.num_prompts, args.throughput_input_len, runner.vocab)
        if args.engine == "transformers":  # eager generate pads one static batch; run it in max-num-seqs chunks
            began = time.perf_counter()
            out_tokens = sum(runner.generate(batch[i : i + args.max_num_seqs], args.throughput_output_len)
                             for i in range(0, len(batch), args.max_num_seqs))  # fmt: skip
            seconds = time.perf_counter() - began
        else:
            seconds, out_tokens = timed(runner, batch, args.throughput_output_len)
        total = out_tokens + args.num_prompts * args.throughput_input_len
        result["throughput"] = {"num_prompts": args.num_prompts, "input_len": args.throughput_input_len,
                                "output_len": args.throughput_output_len, "seconds": seconds,
                                "requests_per_s": args.num_prompts / seconds, "output_tokens_per_s": out_tokens / seconds,
                                "total_tokens_per_s": total / seconds}  # fmt: skip
        print(f"{args.engine} throughput: {args.num_prompts / seconds:.2f} req/s, {out_tokens / seconds:.0f} output "
              f"tok/s, {total / seconds:.0f} total tok/s", flush=True)  # fmt: skip
    if args.ttft_len:
        timed(runner, prompts(rng, 1, args.ttft_len, runner.vocab), 1)  # first-call costs at this length
        seconds, _ = timed(runner, prompts(rng, 1, args.ttft_len, runner.vocab), 1)
        result["ttft"] = {"input_len": args.ttft_len, "seconds": seconds}
        print(f"{args.engine} ttft of {args.ttft_len} tokens: {seconds * 1e3:.1f} ms", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

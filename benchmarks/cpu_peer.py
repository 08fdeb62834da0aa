"""rtpjax against Hugging Face transformers on the same model, prompts and machine, end to end (prefill included):
greedy, a fixed number of new tokens, batch 1 and batch 8. Made for the CPU (the embedded SmolLM2-135M-Instruct by
default); prints a short table and writes JSON.

    python -m rtpjax.benchmarks.cpu_peer --out cpu_peer.json
    python -m rtpjax.benchmarks.cpu_peer --model path/to/hf-folder --batch-sizes 1,8 --max-tokens 100
"""

from __future__ import annotations

import argparse
import json
import time

PROMPT = "Write a short story about a robot who learns to paint."


def chat_prompt(tokenizer) -> str:
    """The prompt in the model's chat template (as `rtpjax generate --chat` sends it), or as it is without one."""
    if not getattr(tokenizer, "chat_template", None):
        return PROMPT
    return tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)


def run_rtpjax(folder: str, batches: list[int], max_tokens: int, repeats: int, **options) -> dict:
    from rtpjax import LLM, SamplingParams

    began = time.perf_counter()
    llm = LLM(folder, **{"max_model_len": 2048, "max_num_seqs": max(batches), **options})
    startup = time.perf_counter() - began
    prompt, params = chat_prompt(llm.tokenizer), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(prompt, params)  # the first call of each executable does one-time setup
    rates = {}
    for batch in batches:
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            outs = llm.generate([prompt] * batch, params)
            best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t))
        rates[batch] = best
    return dict(startup_s=startup, tok_s=rates)


def run_transformers(folder: str, batches: list[int], max_tokens: int, repeats: int, **_) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokenizer(chat_prompt(tokenizer), return_tensors="pt").input_ids
    rates = {}
    with torch.inference_mode():
        for batch in batches:
            inputs = ids.repeat(batch, 1)
            best = 0.0
            for _ in range(repeats):
                t = time.perf_counter()
                out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=False,
                                     max_new_tokens=max_tokens, min_new_tokens=max_tokens)  # fmt: skip
                best = max(best, batch * (out.shape[1] - inputs.shape[1]) / (time.perf_counter() - t))
            rates[batch] = best
    return dict(tok_s=rates, torch_threads=torch.get_num_threads())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a Hugging Face folder or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--engines", default="rtpjax,transformers")
    p.add_argument("--out", default=None)
    p.add_argument("--compilation-cache-dir", default=None, help="rtpjax's compilation cache (a warm start)")
    args = p.parse_args(argv)
    from rtpjax.loading.model_source import resolve_model

    folder = resolve_model(args.model)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    runners = {"rtpjax": run_rtpjax, "transformers": run_transformers}
    options = {"compilation_cache_dir": args.compilation_cache_dir}
    result = {name: runners[name](folder, batches, args.max_tokens, args.repeats, **options)
              for name in args.engines.split(",")}
    print(f"{'engine':14s}" + "".join(f"{f'batch {b} tok/s':>16s}" for b in batches))
    for name, r in result.items():
        print(f"{name:14s}" + "".join(f"{r['tok_s'][b]:16.1f}" for b in batches))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(model=folder, max_tokens=args.max_tokens, **result), f, indent=1)
    return result


if __name__ == "__main__":
    main()

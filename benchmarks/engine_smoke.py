"""End-to-end engine check on a GPU: real model tokens through the Pallas path, and decode throughput of a random
Llama-shaped model (bf16) at a few batch sizes. Writes JSON.

    python benchmarks/engine_smoke.py --stories PATH/stories260K --out engine_smoke.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np


def random_llama(folder: Path, tokenizer_from: Path, hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192,
                 vocab=512) -> Path:  # fmt: skip
    """A random bf16 Llama-shaped checkpoint (weights drawn on the device) with a borrowed tokenizer."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from rtpjax.loading.loader import random_params
    from rtpjax.models import llama
    from rtpjax.models.config import base_config
    from rtpjax.models.decoder import flatten

    hf = dict(architectures=["LlamaForCausalLM"], vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, torch_dtype="bfloat16",
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(hf))
    cfg = base_config(hf)
    params = flatten(random_params(cfg, llama))
    tensors = {}
    for path, source in llama.weight_names(cfg).items():
        array = np.asarray(params[path].astype(jax.numpy.float32)).astype(ml_dtypes.bfloat16)
        tensors[source.names[0]] = np.ascontiguousarray(array)
    save_file(tensors, folder / "model.safetensors")
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stories", required=True)
    parser.add_argument("--out", default="engine_smoke.json")
    args = parser.parse_args()
    from rtpjax import LLM, SamplingParams

    out = dict(device=str(jax.devices()[0]), jax=jax.__version__)
    greedy = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    for kv in ("auto", "int8"):
        llm = LLM(args.stories, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, kv_cache_dtype=kv)
        text = llm.generate([1], greedy)[0].outputs[0].text
        out[f"stories_{kv}"] = dict(impl=llm.engine.runner.attention_impl, text=text[:120])
        print(f"stories260K kv={kv} impl={llm.engine.runner.attention_impl}: {text[:80]!r}", flush=True)
        del llm
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_llama(Path(tmp) / "llama1b", Path(args.stories))
        llm = LLM(str(folder), max_num_seqs=64, max_num_batched_tokens=512, max_model_len=1024,
                  gpu_memory_utilization=0.5)  # fmt: skip
        rows = []
        for batch in (1, 8, 32, 64):
            prompts = [list(np.random.default_rng(i).integers(3, 512, 128)) for i in range(batch)]
            params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
            llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            dt = time.perf_counter() - t
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            rows.append(dict(batch=batch, prompt=128, output=128, seconds=dt, output_tokens_per_s=tokens / dt))
            print(f"random 1.3B-shaped bf16: batch {batch:3d}: {tokens / dt:9.1f} output tok/s ({dt:.2f} s)", flush=True)
        out["decode"] = rows
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

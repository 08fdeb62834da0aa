"""Random Hugging Face checkpoints of real model shapes, written at disk speed, with a tokenizer of the right size.

Benchmarks need an 8B checkpoint on a machine that cannot download one. The weights are slices of one random pool
(std 0.02, norms 1), streamed straight into safetensors shards; the tokenizer is a word-level vocabulary "w0 w1 ..."
so any token id decodes and re-encodes to itself. transformers and rtpjax both load the result.

    python -m rtpjax.benchmarks.random_checkpoint llama3-8b /data/llama3-8b --shards 4
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np

SHAPES = {
    "llama3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                      intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5),
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "llama-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
                     intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5),
    # Llama-3-70B's hidden size, heads, MLP and vocabulary with 20 of its 80 layers: fits one H200 for TP=1 (~21 GB)
    "llama3-70b-cut": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=8192,
                           intermediate_size=28672, num_hidden_layers=20, num_attention_heads=64,
                           num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                           rms_norm_eps=1e-5),
    # MoE (config only: the engine makes its random weights on the device with --load-format dummy)
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936,
                          hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "tiny-moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=384, hidden_size=64,
                     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, norm_topk_prob=True,
                     max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-6),
    "tiny": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=384, hidden_size=64,
                 intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5),
}  # fmt: skip
_ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def _tensors(hf: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face tensor names and shapes, in the order transformers writes them."""
    from rtpjax.models import family_for
    from rtpjax.models.decoder import param_shapes

    family = family_for(hf["architectures"][0])
    cfg = family.read_config(hf)
    shapes = param_shapes(cfg)
    names = [(src.names[0], shapes[path]) for path, src in family.weight_names(cfg).items()]
    return sorted(names, key=lambda n: (n[0] != "model.embed_tokens.weight", n[0] == "lm_head.weight"))


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}"
        "w3 {% endif %}"
    )
    fast.save_pretrained(folder)


def write_config_only(folder: str | Path, shape: str) -> Path:
    """config.json and tokenizer without weights: for load_format="dummy" (random weights made on the device)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = SHAPES[shape] | dict(torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    (folder / "config.json").write_text(json.dumps(hf))
    write_tokenizer(folder, hf["vocab_size"])
    return folder


def write_random_checkpoint(folder: str | Path, shape: str = "llama3-8b", shards: int = 4, dtype: str = "bfloat16",
                            seed: int = 0) -> Path:  # fmt: skip
    import ml_dtypes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = SHAPES[shape] | dict(torch_dtype=dtype, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    np_dtype = np.dtype({"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[dtype])
    pool = (np.random.default_rng(seed).standard_normal(1 << 22, np.float32) * 0.02).astype(np_dtype)
    ones = np.ones(1 << 16, np_dtype)
    tensors = _tensors(hf)
    sizes = [int(np.prod(s)) * np_dtype.itemsize for _, s in tensors]
    per_shard = -(-sum(sizes) // shards)
    groups: list[list] = [[]]
    filled = 0
    for (name, shp), size in zip(tensors, sizes):
        if filled >= per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, shp))
        filled += size
    weight_map = {}
    rng = np.random.default_rng(seed + 1)
    for i, group in enumerate(groups):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shp in group:
            nbytes = int(np.prod(shp)) * np_dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shp), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shp in group:
                source = ones if name.endswith("norm.weight") else pool
                left = int(np.prod(shp))
                while left:
                    start = int(rng.integers(0, len(source) // 2)) if source is pool else 0
                    n = min(left, len(source) - start)
                    f.write(source[start : start + n].view(np.uint8).data)
                    left -= n
        weight_map |= {name: fname for name, _ in group}
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    write_tokenizer(folder, hf["vocab_size"])
    return folder


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(_ST_DTYPES), default="bfloat16")
    args = parser.parse_args()
    print(write_random_checkpoint(args.out, args.shape, args.shards, args.dtype))


if __name__ == "__main__":
    main()

"""Llama 2, 3, 3.1/3.2 (llama3 RoPE scaling, tied or untied embeddings) and Mistral (sliding window).

The baseline: the other families are written as differences from this file.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from rtpjax.models.config import ModelConfig, base_config
from rtpjax.models.decoder import HFTensor, forward  # noqa: F401  (forward is this family's model function)

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")

# First match wins; anything unmatched (norms) is replicated. Dims that a mesh axis does not divide stay whole.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"^embed$", P("tensor", None)),  # vocab-parallel
    (r"^lm_head$", P("tensor", None)),  # vocab-parallel
    (r"\.attn\.w[qkv]$", P("tensor", None)),  # column-parallel (weights are [out, in]): heads split over devices
    (r"\.attn\.b[qkv]$", P("tensor")),
    (r"\.attn\.wo$", P(None, "tensor")),  # row-parallel
    (r"\.mlp\.w_(gate|up)$", P("tensor", None)),
    (r"\.mlp\.w_down$", P(None, "tensor")),
)


def read_config(hf: dict) -> ModelConfig:
    return base_config(hf)


def weight_names(cfg: ModelConfig) -> dict[str, HFTensor]:
    """Our parameter path -> the Hugging Face tensor(s) it is read from."""
    names = {"embed": HFTensor(("model.embed_tokens.weight",)), "final_norm": HFTensor(("model.norm.weight",))}
    if not cfg.tie_word_embeddings:
        names["lm_head"] = HFTensor(("lm_head.weight",))
    for i in range(cfg.num_layers):
        L, hf = f"layers.{i}", f"model.layers.{i}"
        names[f"{L}.input_norm"] = HFTensor((f"{hf}.input_layernorm.weight",))
        names[f"{L}.post_attn_norm"] = HFTensor((f"{hf}.post_attention_layernorm.weight",))
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            names[f"{L}.attn.{ours}"] = HFTensor((f"{hf}.self_attn.{theirs}.weight",))
        if cfg.attention_bias:
            for x in "qkv":
                names[f"{L}.attn.b{x}"] = HFTensor((f"{hf}.self_attn.{x}_proj.bias",))
        if not cfg.is_moe_layer(i):
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                names[f"{L}.mlp.{ours}"] = HFTensor((f"{hf}.mlp.{theirs}.weight",))
    return names

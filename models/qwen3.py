"""Qwen3: Llama plus an RMSNorm over each head of q and k, before RoPE (and an explicit head_dim)."""

from __future__ import annotations

import dataclasses

from rtpjax.models import llama
from rtpjax.models.config import ModelConfig
from rtpjax.models.decoder import HFTensor, forward  # noqa: F401  (this family's model function)

ARCHITECTURES = ("Qwen3ForCausalLM",)
PARTITION_RULES = llama.PARTITION_RULES  # the q/k norms span one head_dim: replicated


def read_config(hf: dict) -> ModelConfig:
    return dataclasses.replace(llama.read_config(hf), qk_norm=True)


def weight_names(cfg: ModelConfig) -> dict[str, HFTensor]:
    names = llama.weight_names(cfg)
    for i in range(cfg.num_layers):
        for x in "qk":
            names[f"layers.{i}.attn.{x}_norm"] = HFTensor((f"model.layers.{i}.self_attn.{x}_norm.weight",))
    return names

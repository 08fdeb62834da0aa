"""Qwen2 / Qwen2.5: Llama with a bias on the q, k and v projections, always."""

from __future__ import annotations

import dataclasses

from rtpjax.models import llama
from rtpjax.models.config import ModelConfig
from rtpjax.models.decoder import forward  # noqa: F401  (this family's model function)

ARCHITECTURES = ("Qwen2ForCausalLM",)
PARTITION_RULES = llama.PARTITION_RULES
weight_names = llama.weight_names  # the biases follow from attention_bias


def read_config(hf: dict) -> ModelConfig:
    return dataclasses.replace(llama.read_config(hf), attention_bias=True)

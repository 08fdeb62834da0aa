"""Qwen3-MoE: Qwen3 attention; on sparse layers the MLP is softmax top-k routed experts.

A layer is sparse when it is not in `mlp_only_layers` and (index + 1) is a multiple of `decoder_sparse_step`.
"""

from __future__ import annotations

import dataclasses

from rtpjax.models import moe, qwen3
from rtpjax.models.config import ConfigError, ModelConfig
from rtpjax.models.decoder import HFTensor, forward  # noqa: F401

ARCHITECTURES = ("Qwen3MoeForCausalLM",)

PARTITION_RULES = (
    (r"\.moe\.w_gate$", moe.SPECS["w_gate"]),  # experts over the expert axis, each column-parallel
    (r"\.moe\.w_up$", moe.SPECS["w_up"]),
    (r"\.moe\.w_down$", moe.SPECS["w_down"]),
) + qwen3.PARTITION_RULES  # the router stays replicated


def read_config(hf: dict) -> ModelConfig:
    cfg = qwen3.read_config(hf)
    experts = hf.get("num_experts", hf.get("num_local_experts"))  # transformers >= 5 says num_local_experts
    if not experts:
        raise ConfigError("Qwen3-MoE config.json lacks num_experts / num_local_experts")
    step, dense_only = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    moe_layers = tuple(i not in dense_only and step > 0 and (i + 1) % step == 0 for i in range(cfg.num_layers))
    return dataclasses.replace(
        cfg,
        num_experts=experts,
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        moe_layers=moe_layers,
    )


def weight_names(cfg: ModelConfig) -> dict[str, HFTensor]:
    names = qwen3.weight_names(cfg)
    for i in range(cfg.num_layers):
        if cfg.is_moe_layer(i):
            hf = f"model.layers.{i}.mlp"
            names[f"layers.{i}.moe.router"] = HFTensor((f"{hf}.gate.weight",))
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                experts = tuple(f"{hf}.experts.{e}.{theirs}.weight" for e in range(cfg.num_experts))
                names[f"layers.{i}.moe.{ours}"] = HFTensor(experts)
    return names

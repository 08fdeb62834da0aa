"""The model zoo: one file per family, each a difference from the shared decoder.

A family module provides ARCHITECTURES, read_config(hf_config) -> ModelConfig, weight_names(cfg) -> {path: HFTensor},
PARTITION_RULES and forward (the pure model function).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from rtpjax.models import llama, qwen2, qwen3, qwen3_moe
from rtpjax.models.config import ConfigError, ModelConfig, read_config_json

FAMILIES: dict[str, ModuleType] = {arch: fam for fam in (llama, qwen2, qwen3, qwen3_moe) for arch in fam.ARCHITECTURES}


def family_for(architecture: str) -> ModuleType:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise ConfigError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(sorted(FAMILIES))}"
        ) from None


def load_config(model_dir: str | Path) -> tuple[ModelConfig, ModuleType]:
    """Read a Hugging Face config.json into a ModelConfig, with the family module that serves it."""
    hf = read_config_json(model_dir)
    archs = hf.get("architectures") or []
    if not archs:
        raise ConfigError(f"{model_dir}/config.json names no architecture; supported: {', '.join(sorted(FAMILIES))}")
    family = family_for(archs[0])
    return family.read_config(hf), family

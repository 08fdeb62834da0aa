"""One frozen description of a decoder-only model, read from a Hugging Face config.json.

Frozen and hashable so it can be a static argument of `jax.jit`: every family reads its config.json into this one
shape, and the shared layers switch on its fields (bias, q/k norm, sliding window, experts) rather than on class types.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config.json that rtpjax cannot serve, with the reason."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is one of "default", "linear" or "llama3" (Llama 3.1/3.2)."""

    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None means full attention
    # Mixture of experts (Qwen3-MoE); num_experts == 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[bool, ...] = ()  # per layer: True where the MLP is a sparse MoE block
    moe_impl: str = "auto"  # how the experts run: models/moe.py IMPLS (EngineArgs.moe_impl)
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def jnp_dtype(self):
        return _DTYPES[self.dtype]

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]

    def with_dtype(self, dtype: str) -> "ModelConfig":
        if dtype not in _DTYPES:
            raise ConfigError(f"unsupported dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
        return dataclasses.replace(self, dtype=dtype)


def read_config_json(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json (is {model_dir} a Hugging Face model folder?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e


def _rope(hf: dict) -> tuple[float, RopeScaling]:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files have `rope_theta` + `rope_scaling`.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"unsupported RoPE scaling type {kind!r}; supported: {', '.join(_ROPE_TYPES)}")
    scaling = RopeScaling(
        kind=kind,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(
            params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        ),
    )
    return theta, scaling


def _eos_ids(hf: dict) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _sliding_windows(hf: dict, num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if window is None or hf.get("use_sliding_window") is False:
        return ()
    return (window,) * num_layers


def _require(hf: dict, key: str, source: str):
    if key not in hf:
        raise ConfigError(f"{source}: config.json lacks {key!r}")
    return hf[key]


def base_config(hf: dict, source: str = "config.json") -> ModelConfig:
    """The fields every family shares, with Llama's defaults."""
    hidden = _require(hf, "hidden_size", source)
    heads = _require(hf, "num_attention_heads", source)
    layers = _require(hf, "num_hidden_layers", source)
    theta, scaling = _rope(hf)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: unsupported hidden_act {act!r}; the supported families use 'silu'")
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    return ModelConfig(
        architecture=hf["architectures"][0],
        vocab_size=_require(hf, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_require(hf, "intermediate_size", source),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        sliding_windows=_sliding_windows(hf, layers),
        dtype=dtype if dtype in _DTYPES else "bfloat16",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf),
    )

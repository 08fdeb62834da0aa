"""An EAGLE-3 head as its authors publish it and vLLM / SGLang load it: read, checked against the target, and run.

The folder holds a Llama-style config.json (LlamaForCausalLMEagle3: one decoder layer, `draft_vocab_size`, optionally
`target_hidden_size` and `eagle_aux_hidden_state_layer_ids`, at the top or under `eagle_config`) and the weights
(model.safetensors, or pytorch_model.bin as the EAGLE authors ship it):

- `fc` [H, 3 * H_target]: folds the target's three aux hidden states (inputs of layers (2, L // 2, L - 3) by default;
  0 is the embedding) into one H-wide feature per token;
- `midlayer.*` (`layers.0.*` in some exports): a decoder layer whose q/k/v read [input_layernorm(embed(token)) ;
  hidden_norm(feature)] (2H wide), with post_attention_layernorm and a SwiGLU mlp; the feature is the residual;
- `norm`, `lm_head` [draft_vocab, H]: logits over a smaller draft vocabulary, `d2t` [draft_vocab] its offsets to
  target ids (target = draft + d2t[draft]); `t2d` (the reverse mask) is not needed to propose;
- `embed_tokens` when the head has its own; otherwise the target's embedding is shared.

Chained guesses feed the layer's output before `norm` back as the next token's feature, as the head was trained.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rtpjax.kernels.attention import plan_step
from rtpjax.models import layers
from rtpjax.models.config import ConfigError, ModelConfig, base_config

# Our parameter path -> the head's tensor name (after "model." is stripped and "layers.0." read as "midlayer.").
_NAMES = {
    "fc": "fc.weight", "input_norm": "midlayer.input_layernorm.weight", "hidden_norm": "midlayer.hidden_norm.weight",
    "post_attn_norm": "midlayer.post_attention_layernorm.weight", "final_norm": "norm.weight",
    "lm_head": "lm_head.weight", "d2t": "d2t",
    **{f"attn.{ours}": f"midlayer.self_attn.{theirs}.weight"
       for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj"))},
    **{f"mlp.{ours}": f"midlayer.mlp.{theirs}.weight"
       for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj"))},
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    cfg: ModelConfig  # the head's decoder layer (num_layers 1, the target's vocabulary)
    draft_vocab_size: int
    aux_layers: tuple[int, ...]  # the target layers whose inputs the head reads
    target_hidden_size: int


def _fail(head_dir, message: str):
    raise ValueError(f"speculative_config: the EAGLE-3 head {head_dir} {message}")


def read_config(head_dir: str, target: ModelConfig) -> Eagle3Config:
    """The head's config.json, checked against the target's (vocabulary, hidden size, layer ids)."""
    try:
        hf = json.loads(Path(head_dir, "config.json").read_text())
        cfg = base_config(hf, f"{head_dir}/config.json")
    except (OSError, json.JSONDecodeError, ConfigError, KeyError, IndexError, TypeError) as e:
        _fail(head_dir, f"has no readable Llama-style config.json ({e})")
    if cfg.num_layers != 1:
        _fail(head_dir, f"has {cfg.num_layers} layers; EAGLE-3 heads have one (num_hidden_layers: 1)")
    if cfg.vocab_size != target.vocab_size:
        _fail(head_dir, f"has a vocabulary of {cfg.vocab_size} tokens, the target {target.vocab_size}")
    target_hidden = hf.get("target_hidden_size") or cfg.hidden_size
    if target_hidden != target.hidden_size:
        _fail(head_dir, f"reads hidden states of size {target_hidden}, the target's are {target.hidden_size}")
    n = target.num_layers
    ids = hf.get("eagle_aux_hidden_state_layer_ids") or (hf.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids") or (2, n // 2, n - 3)  # fmt: skip
    ids = tuple(int(i) for i in ids)
    if len(ids) != 3 or not all(0 <= i < n for i in ids):
        _fail(head_dir, f"reads target layers {list(ids)}; it needs three of the target's 0..{n - 1}")
    return Eagle3Config(cfg, int(hf.get("draft_vocab_size") or cfg.vocab_size), ids, target_hidden)


def _tensors(head_dir: str) -> dict[str, np.ndarray]:
    folder = Path(head_dir)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors.numpy import load_file

        out = {}
        for f in files:
            out.update(load_file(f))
    elif (folder / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError:
            _fail(head_dir, "ships pytorch_model.bin, which needs torch installed (or its tensors as safetensors)")

        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        out = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
    else:
        _fail(head_dir, "has no weights (*.safetensors or pytorch_model.bin)")
    names = {}
    for key, value in out.items():
        key = key.removeprefix("model.")
        names["midlayer." + key.removeprefix("layers.0.") if key.startswith("layers.0.") else key] = value
    return names


def load_params(head_dir: str, head: Eagle3Config, target_embed, dtype) -> dict:
    """The head's parameters (the pytree `layer` and `draft_tokens` read), every tensor checked for its shape."""
    cfg, h = head.cfg, head.cfg.hidden_size
    q, kv, f = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    shapes = {"fc": (h, 3 * head.target_hidden_size), "input_norm": (h,), "hidden_norm": (h,), "post_attn_norm": (h,), "final_norm": (h,),
              "lm_head": (head.draft_vocab_size, h), "d2t": (head.draft_vocab_size,), "attn.wq": (q, 2 * h),
              "attn.wk": (kv, 2 * h), "attn.wv": (kv, 2 * h), "attn.wo": (h, q), "mlp.w_gate": (f, h),
              "mlp.w_up": (f, h), "mlp.w_down": (h, f)}  # fmt: skip
    tensors = _tensors(head_dir)
    if head.draft_vocab_size == cfg.vocab_size and "d2t" not in tensors:  # a full-vocabulary head: no map
        tensors["d2t"] = np.zeros(cfg.vocab_size, np.int64)
    params: dict = {}
    for ours, shape in shapes.items():
        theirs = _NAMES[ours]
        if theirs not in tensors:
            _fail(head_dir, f"lacks the tensor {theirs}")
        value = tensors[theirs]
        if tuple(value.shape) != shape:
            _fail(head_dir, f"has {theirs} of shape {list(value.shape)}, expected {list(shape)} from its config.json")
        node, (*parents, leaf) = params, ours.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(value, jnp.int32 if ours == "d2t" else dtype)
    ids = np.arange(head.draft_vocab_size) + np.asarray(tensors["d2t"])
    if ids.min() < 0 or ids.max() >= cfg.vocab_size:
        _fail(head_dir, f"maps draft ids outside the target's vocabulary of {cfg.vocab_size} (d2t)")
    embed = tensors.get("embed_tokens.weight")
    if embed is not None and tuple(embed.shape) != (cfg.vocab_size, h):
        _fail(head_dir, f"has embed_tokens.weight of shape {list(embed.shape)}, expected {[cfg.vocab_size, h]}")
    params["embed"] = jnp.asarray(embed, dtype) if embed is not None else target_embed
    return params


def layer(p: dict, cfg: ModelConfig, embeds, features, positions, cache, meta, attention=None):
    """The decoder layer on [T, H] token embeddings and features: (its output before `norm` [T, H], cache).
    attention: in place of the paged one (training: a dense causal one, which reverse-mode differentiation takes)."""
    x = jnp.concatenate([layers.rms_norm(embeds, p["input_norm"], cfg.rms_norm_eps),
                         layers.rms_norm(features, p["hidden_norm"], cfg.rms_norm_eps)], axis=-1)  # fmt: skip
    if attention is None:
        meta = plan_step(meta, x.shape[0], cfg.num_heads, cache[0].shape[0])
        attention = layers.attention
    attn, cache = attention(p["attn"], cfg, x, positions, cache, meta)
    residual = features + attn
    return residual + layers.swiglu_mlp(p["mlp"], layers.rms_norm(residual, p["post_attn_norm"], cfg.rms_norm_eps)), cache


def draft_tokens(p: dict, cfg: ModelConfig, hidden) -> jax.Array:
    """Greedy guesses as target ids from the layer's outputs [S, H]."""
    logits = layers.linear(layers.rms_norm(hidden, p["final_norm"], cfg.rms_norm_eps), p["lm_head"])
    best = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    return best + p["d2t"][best]


def write_random_head(out: str | Path, target: ModelConfig, *, num_heads: int, num_kv_heads: int,
                      intermediate_size: int, draft_vocab_size: int, seed: int = 0,
                      layer_ids: tuple[int, ...] | None = None, scale: float = 0.1) -> Path:  # fmt: skip
    """A random head for `target` in the published layout (config.json + model.safetensors, torch's tensor names);
    its draft vocabulary is every (vocab // draft_vocab)-th target id. For tests and benchmarks: no trained head is
    reachable here."""
    from safetensors.numpy import save_file

    out, rng, h = Path(out), np.random.default_rng(seed), target.hidden_size
    head_dim = h // num_heads
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": intermediate_size, "num_hidden_layers": 1, "num_attention_heads": num_heads,
              "num_key_value_heads": num_kv_heads, "vocab_size": target.vocab_size, "draft_vocab_size": draft_vocab_size,
              "rms_norm_eps": target.rms_norm_eps, "rope_theta": target.rope_theta, "hidden_act": "silu",
              "max_position_embeddings": target.max_position_embeddings, "torch_dtype": "float32"}  # fmt: skip
    if layer_ids is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(layer_ids)}
    q, kv, f = num_heads * head_dim, num_kv_heads * head_dim, intermediate_size
    shapes = {"fc.weight": (h, 3 * h), "midlayer.self_attn.q_proj.weight": (q, 2 * h),
              "midlayer.self_attn.k_proj.weight": (kv, 2 * h), "midlayer.self_attn.v_proj.weight": (kv, 2 * h),
              "midlayer.self_attn.o_proj.weight": (h, q), "midlayer.mlp.gate_proj.weight": (f, h),
              "midlayer.mlp.up_proj.weight": (f, h), "midlayer.mlp.down_proj.weight": (h, f),
              "lm_head.weight": (draft_vocab_size, h)}  # fmt: skip
    tensors = {name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in shapes.items()}
    for name in ("midlayer.input_layernorm", "midlayer.hidden_norm", "midlayer.post_attention_layernorm", "norm"):
        tensors[f"{name}.weight"] = np.ones(h, np.float32)
    ids = np.arange(draft_vocab_size) * (target.vocab_size // draft_vocab_size)
    tensors["d2t"] = (ids - np.arange(draft_vocab_size)).astype(np.int64)
    tensors["t2d"] = np.isin(np.arange(target.vocab_size), ids)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, out / "model.safetensors")
    return out

"""config.json reading for every family, and clear errors for checkpoints that do not fit the model."""

import json
import shutil
import struct

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rtpjax.loading.loader import CheckpointError, read_header
from rtpjax.loading.model_source import load_model, resolve_model
from rtpjax.models import load_config
from rtpjax.models.config import ConfigError


def test_configs_of_every_family(tiny_checkpoints):
    cfg, _ = load_config(tiny_checkpoints["llama3"])
    assert cfg.rope_scaling.kind == "llama3" and cfg.rope_scaling.factor == 8.0 and cfg.rope_theta == 500000.0
    assert not cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
    assert load_config(tiny_checkpoints["llama_tied"])[0].tie_word_embeddings
    assert load_config(tiny_checkpoints["mistral"])[0].sliding_windows == (6, 6, 6)
    assert load_config(tiny_checkpoints["qwen2"])[0].attention_bias
    qwen3, _ = load_config(tiny_checkpoints["qwen3"])
    assert qwen3.qk_norm and qwen3.head_dim == 16
    moe, family = load_config(tiny_checkpoints["qwen3_moe"])
    assert family.__name__ == "rtpjax.models.qwen3_moe"
    assert (moe.num_experts, moe.num_experts_per_tok, moe.norm_topk_prob) == (8, 2, True)
    assert moe.moe_layers == (True, False, True)


def test_decoder_sparse_step_and_legacy_rope_keys(tmp_path):
    hf = json.loads(json.dumps(dict(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        decoder_sparse_step=2, mlp_only_layers=[3], rope_theta=1e6,
        rope_scaling=dict(type="linear", factor=2.0),
    )))  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg, _ = load_config(tmp_path)
    assert cfg.moe_layers == (False, True, False, False)
    assert cfg.rope_theta == 1e6 and cfg.rope_scaling.kind == "linear" and cfg.rope_scaling.factor == 2.0


@pytest.mark.parametrize(
    "patch, message",
    [
        (dict(architectures=["GPT2LMHeadModel"]), "unsupported architecture 'GPT2LMHeadModel'; supported: Llama"),
        (dict(architectures=[]), "names no architecture"),
        (dict(rope_parameters=dict(rope_type="yarn", factor=4.0)), "unsupported RoPE scaling type 'yarn'"),
        (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    ],
)
def test_unsupported_configs_fail_clearly(tmp_path, tiny_checkpoints, patch, message):
    hf = json.loads((tiny_checkpoints["llama3"] / "config.json").read_text()) | patch
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path)


def test_supported_list_names_every_family(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(architectures=["Nope"])))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        assert arch in str(e.value)



def test_a_model_argument_that_is_no_model_fails_in_one_sentence(tmp_path, tiny_checkpoints):
    (tmp_path / "weights.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'absent'}: no such file or folder"):
        resolve_model(tmp_path / "absent")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'weights.bin'}: not a model folder or a .gguf file"):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(tmp_path)
    assert resolve_model(tiny_checkpoints["llama3"]) == str(tiny_checkpoints["llama3"])


def copy_with(src, dst, edit):
    """Copy a checkpoint folder, letting `edit` change its tensors dict."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_unexpected_and_misshaped_tensors(tmp_path, tiny_checkpoints):
    src = tiny_checkpoints["qwen2"]
    name = "model.layers.1.self_attn.k_proj.bias"
    missing = copy_with(src, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing.*lacks tensor\(s\) {name}"):
        load_model(missing)
    extra = copy_with(src, tmp_path / "extra", lambda t: t.update({"model.layers.9.mystery": np.ones(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"extra/model.safetensors: unexpected tensor\(s\) model.layers.9.mystery"):
        load_model(extra)
    bad = "model.layers.0.mlp.up_proj.weight"
    shaped = copy_with(src, tmp_path / "shaped", lambda t: t.update({bad: t[bad][:-1]}))
    with pytest.raises(CheckpointError, match=rf"shaped/model.safetensors: tensor '{bad}' has shape \[127, 64\]"):
        load_model(shaped)


def test_sharded_index_loads_identically(tmp_path, tiny_checkpoints):
    src = tiny_checkpoints["qwen3"]
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    out = tmp_path / "sharded"
    shutil.copytree(src, out)
    (out / "model.safetensors").unlink()
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, out / fname)
        weight_map |= {n: fname for n in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, b = load_model(src)[2], load_model(out)[2]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # A shard listed in the index but absent is named.
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists model-00002-of-00002.safetensors, which is missing"):
        load_model(out)


def test_truncated_and_corrupt_files(tmp_path, tiny_checkpoints):
    src = tiny_checkpoints["llama3"] / "model.safetensors"
    data = src.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"truncated.safetensors: truncated: tensor '.*' ends at byte"):
        read_header(tmp_path / "truncated.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="tiny.safetensors: truncated safetensors file"):
        read_header(tmp_path / "tiny.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError, match="huge.safetensors: bad safetensors header"):
        read_header(tmp_path / "huge.safetensors")
    header = b"{not json"
    (tmp_path / "json.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(CheckpointError, match="json.safetensors: bad safetensors header"):
        read_header(tmp_path / "json.safetensors")
    header = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "dtype.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match="dtype.safetensors: tensor 'w' has unsupported dtype 'C64'"):
        read_header(tmp_path / "dtype.safetensors")

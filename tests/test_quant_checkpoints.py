"""Pre-quantized checkpoints load as they are: tiny ones written in each format (compressed-tensors packing through the
registry's own `compressed_tensors` helpers; GPTQ and AWQ packing as their projects publish it), read back bit for bit
and run against the same checkpoint dequantized to float32."""

import dataclasses
import json
import shutil

import jax

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from rtpjax.loading.convert import convert
from rtpjax.loading.loader import CheckpointError
from rtpjax.loading.model_source import load_model
from rtpjax.loading.quantization import QuantizedWeight, dequantize
from rtpjax.models import decoder
from test_hf_parity import ragged_prefill

G = 32  # group / block size: the tiny model's linears have 64 or 128 inputs
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's pack order: nibble i holds output column order[i] of each 8


def _int4_asym(w: np.ndarray, g_idx: np.ndarray, groups: int):
    """Round-to-nearest asymmetric int4 per (output, group): unsigned q [out, in], scale (float16) and zero
    [out, groups], and the dequantized weight."""
    out = w.shape[0]
    lo, hi = np.zeros((out, groups)), np.zeros((out, groups))
    for k in range(groups):
        cols = w[:, g_idx == k]
        lo[:, k], hi[:, k] = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
    scale = ((hi - lo) / 15).astype(np.float16)
    s = scale.astype(np.float32)
    zero = np.clip(np.round(-lo / s), 0, 15).astype(np.int64)
    q = np.clip(np.round(w / s[:, g_idx]) + zero[:, g_idx], 0, 15).astype(np.int64)
    return q, scale, zero, ((q - zero[:, g_idx]) * s[:, g_idx]).astype(np.float32)


def _pack8(u: np.ndarray, order=range(8)) -> np.ndarray:
    """[rows, 8k] nibbles -> [rows, k] int32, nibble i of each word from column order[i] of its 8."""
    u = u.reshape(u.shape[0], -1, 8).astype(np.uint32)
    word = sum(u[:, :, c] << np.uint32(4 * i) for i, c in enumerate(order))
    return word.astype(np.uint32).view(np.int32)


def _gptq(name, w, rng):
    in_features, groups = w.shape[1], w.shape[1] // G
    g_idx = rng.permutation(np.arange(in_features) // G)  # act order: groups scattered over the inputs
    q, scale, zero, deq = _int4_asym(w, g_idx, groups)
    return {f"{name}.qweight": _pack8(q).T.copy(), f"{name}.qzeros": _pack8((zero - 1).T & 15),
            f"{name}.scales": scale.T.copy(), f"{name}.g_idx": g_idx.astype(np.int32)}, deq  # fmt: skip


def _awq(name, w, rng):
    groups = w.shape[1] // G
    q, scale, zero, deq = _int4_asym(w, np.arange(w.shape[1]) // G, groups)
    return {f"{name}.qweight": _pack8(q.T, AWQ_ORDER), f"{name}.qzeros": _pack8(zero.T, AWQ_ORDER),
            f"{name}.scales": scale.T.copy()}, deq  # fmt: skip


def _ct_w4a16(name, w, rng):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    groups = w.shape[1] // G
    q, scale, zero, deq = _int4_asym(w, np.arange(w.shape[1]) // G, groups)
    signed = lambda a: torch.from_numpy((a - 8).astype(np.int8))  # noqa: E731 - compressed-tensors stores q - 8
    return {f"{name}.weight_packed": pack_to_int32(signed(q), 4),
            f"{name}.weight_zero_point": pack_to_int32(signed(zero), 4, packed_dim=0),
            f"{name}.weight_scale": torch.from_numpy(scale),
            f"{name}.weight_shape": torch.tensor(w.shape)}, deq  # fmt: skip


def _one_byte(w, kind, rows=1, group=None):
    """Symmetric 1-byte quantization per (rows x group) block: q (torch), scale [out/rows, in/group], dequantized."""
    group = group or w.shape[1]
    blocks = w.reshape(w.shape[0] // rows, rows, w.shape[1] // group, group)
    largest = 448.0 if kind == "fp8" else 127.0
    scale = (np.abs(blocks).max((1, 3)) / largest).astype(np.float32)
    scaled = torch.from_numpy((blocks / scale[:, None, :, None]).reshape(w.shape))
    q = scaled.to(torch.float8_e4m3fn) if kind == "fp8" else scaled.round().to(torch.int8)
    deq = (q.to(torch.float32).numpy().reshape(blocks.shape) * scale[:, None, :, None]).reshape(w.shape)
    return q, scale, deq


def _ct_fp8(name, w, rng):
    q, scale, _ = _one_byte(w, "fp8")
    scale = torch.from_numpy(scale).to(torch.bfloat16)  # llm-compressor writes the model's dtype
    return {f"{name}.weight": q, f"{name}.weight_scale": scale}, q.float().numpy() * scale.float().numpy()


def _ct_int8(name, w, rng):
    q, scale, deq = _one_byte(w, "int8")
    return {f"{name}.weight": q, f"{name}.weight_scale": torch.from_numpy(scale)}, deq


def _fp8_block(name, w, rng):
    q, scale, deq = _one_byte(w, "fp8", G, G)
    return {f"{name}.weight": q, f"{name}.weight_scale_inv": torch.from_numpy(scale)}, deq


def _ct_config(fmt, bits, kind, strategy, acts):
    weights = dict(num_bits=bits, type=kind, strategy=strategy, symmetric=bits == 8, dynamic=False,
                   group_size=G if strategy == "group" else None)  # fmt: skip
    act = dict(num_bits=8, type=kind, strategy="token", dynamic=True, symmetric=True) if acts else None
    group = dict(targets=["Linear"], weights=weights, input_activations=act)
    return dict(quant_method="compressed-tensors", format=fmt, ignore=["lm_head"], config_groups=dict(group_0=group))


FORMATS = {  # name -> (tensor writer, quantization_config, W8A8)
    "gptq": (_gptq, dict(quant_method="gptq", bits=4, group_size=G, desc_act=True, sym=False), False),
    "awq": (_awq, dict(quant_method="awq", bits=4, group_size=G, zero_point=True, version="gemm"), False),
    "ct-w4a16": (_ct_w4a16, _ct_config("pack-quantized", 4, "int", "group", False), False),
    "ct-fp8-dynamic": (_ct_fp8, _ct_config("float-quantized", 8, "float", "channel", True), True),
    "ct-w8a8-int8": (_ct_int8, _ct_config("int-quantized", 8, "int", "channel", True), True),
    "fp8-block": (_fp8_block, dict(quant_method="fp8", weight_block_size=[G, G], activation_scheme="dynamic"), True),
}


def write_pair(src, root, fmt, head=False):
    """(the checkpoint in `fmt`, the same weights dequantized to float32 as a plain checkpoint); `head`: the output head
    quantized too."""
    writer, qc, _ = FORMATS[fmt]
    quant, plain = root / fmt, root / f"{fmt}-float32"
    for folder in (quant, plain):
        shutil.copytree(src, folder)
    tensors = load_file(src / "model.safetensors")
    rng = np.random.default_rng(0)
    qt, pt = {}, {}
    for name, t in tensors.items():
        if name.endswith("_proj.weight") or head and name == "lm_head.weight":
            parts, deq = writer(name.removesuffix(".weight"), t.float().numpy(), rng)
            qt |= {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))).contiguous()
                   for k, v in parts.items()}  # fmt: skip
            pt[name] = torch.from_numpy(np.asarray(deq, np.float32))
        else:
            qt[name] = pt[name] = t
    save_file(qt, quant / "model.safetensors")
    save_file(pt, plain / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    (quant / "config.json").write_text(json.dumps(config | {"quantization_config": qc}))
    return quant, plain


@pytest.fixture(scope="module")
def llama(tiny_checkpoints, tmp_path_factory):
    from test_fast_loading import resave

    return resave(tiny_checkpoints["llama3"], tmp_path_factory.mktemp("q") / "src", "float32", 1)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_prequantized_checkpoint_loads_as_written(llama, tmp_path, fmt):
    quant, plain = write_pair(llama, tmp_path, fmt)
    cfg, family, params = load_model(quant, dtype="float32")
    _, _, ref = load_model(plain, dtype="float32")
    ref_flat = decoder.flatten(ref)
    tree = params
    wq = tree["layers"][0]["attn"]["wq"]
    assert isinstance(wq, QuantizedWeight) and wq.scheme.act == ("fp8" if "fp8" in fmt else "int8" if "int8" in fmt
                                                                 else None)  # fmt: skip
    for i, layer in enumerate(tree["layers"]):  # every linear reads back as the format's own dequantized weight
        for group, names in (("attn", ("wq", "wk", "wv", "wo")), ("mlp", ("w_gate", "w_up", "w_down"))):
            for n in names:
                got = np.asarray(dequantize(layer[group][n], np.float32))
                want = np.asarray(ref_flat[f"layers.{i}.{group}.{n}"])
                assert np.allclose(got, want, rtol=1e-6, atol=1e-7), (fmt, i, n)
    prompts = [np.random.default_rng(5).integers(3, cfg.vocab_size, n).tolist() for n in (9, 4)]
    want = np.concatenate(ragged_prefill(cfg, family, ref, prompts))
    weight_only = jax.tree.map(
        lambda w: dataclasses.replace(w, scheme=dataclasses.replace(w.scheme, act=None)) if isinstance(
            w, QuantizedWeight) else w, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))  # fmt: skip
    for tree, limit in ((weight_only, 1e-4), (params, {"fp8": 0.4, "int8": 0.2, None: 1e-4}[wq.scheme.act])):
        got = np.concatenate(ragged_prefill(cfg, family, tree, prompts))
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"{fmt}: max relative logits error against the dequantized float32 checkpoint {err:.2e}")
        assert err <= limit  # exact but for float32 sums; W8A8 adds the activations' rounding (random tiny model)
    with pytest.raises(CheckpointError, match=r"already quantized \(.*\); load it without --quantization"):
        load_model(quant, quantization="int8")
    with pytest.raises(ValueError, match="a pre-quantized checkpoint .* loads as it is; rtpjax convert does not"):
        convert(quant, tmp_path / "converted")


@pytest.mark.parametrize("fmt", ["gptq", "ct-fp8-dynamic"])
def test_a_quantized_head_loads_quantized(llama, tmp_path, fmt):
    """A checkpoint that quantized its head too (GPTQ's lm_head_quantized, an llm-compressor recipe without the
    head ignored) loads it as a QuantizedWeight whose values are the format's own."""
    quant, plain = write_pair(llama, tmp_path, fmt, head=True)
    cfg, family, params = load_model(quant, dtype="float32")
    _, _, ref = load_model(plain, dtype="float32")
    head = params["lm_head"]
    assert isinstance(head, QuantizedWeight) and head.shape == (cfg.vocab_size, cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(dequantize(head, np.float32)), np.asarray(ref["lm_head"]), rtol=1e-6,
                               atol=1e-7)  # fmt: skip
    weight_only = jax.tree.map(
        lambda w: dataclasses.replace(w, scheme=dataclasses.replace(w.scheme, act=None)) if isinstance(
            w, QuantizedWeight) else w, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))  # fmt: skip
    prompts = [np.random.default_rng(6).integers(3, cfg.vocab_size, n).tolist() for n in (6, 5)]
    got = np.concatenate(ragged_prefill(cfg, family, weight_only, prompts))
    want = np.concatenate(ragged_prefill(cfg, family, ref, prompts))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

"""An int4 weight written out in the activations' dtype by one Pallas kernel (Triton lowering), for steps too large
for `small_matmul`: the large GEMM then runs on cuBLAS at the 16-bit rate, and the weight's bytes are read once,
its 16-bit form written once.

XLA's own dequantization of the packed layout (`rtpjax.loading.quantization.dequantize`: the nibbles unpacked by a
concatenation, then scaled) is a fusion that runs far below the memory's bandwidth, and it runs for every layer of
every step that is not decode-sized, so on a GPU it dominated int4's prefill and mixed steps (RESULTS.md, 12-07d).
Here each program owns `block_n` output channels and `groups` whole groups of inputs: it loads their packed bytes
once, and writes each group's low nibbles (inputs j) and high nibbles (inputs j + g/2) as the two contiguous halves
they are in the output. Values are the reference's exactly: (nibble - zero) * scale in float32, then rounded to the
output dtype. The output is in q's column order (act-order weights: the caller permutes x, as `linear` does).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from rtpjax.loading.quantization import QuantizedWeight
from rtpjax.quant.small_matmul import fit


@dataclasses.dataclass(frozen=True)
class DequantTiles:
    """A program's share (static per compiled kernel; `quant_bench --sweep-rows` over 64 times others)."""

    block_n: int = 64  # output channels
    block_bytes: int = 256  # packed bytes of each channel (whole groups; 512 inputs)
    num_warps: int = 4
    num_stages: int = 2


def applies(w: QuantizedWeight) -> bool:
    """Whether the kernel takes `w`: a 2-D grouped int4 weight whole on the device (a sharded one would be gathered
    for the custom call), its groups a power of two of at least 32 inputs, its channels a multiple of 16."""
    s = w.scheme
    if s.weight != "int4" or not s.whole or w.q.ndim != 2:
        return False
    out, in_features = w.shape
    group = s.group_size(in_features)
    return group >= 32 and group & (group - 1) == 0 and in_features % group == 0 and out % 16 == 0


def _kernel(q_ref, s_ref, *rest, group: int, groups: int, zero_point: bool):
    z_ref, o_ref = rest if zero_point else (None, rest[0])
    half = group // 2
    for g in range(groups):  # unrolled: each group's bytes load once and fill both of its halves
        packed = q_ref[:, pl.ds(g * half, half)].astype(jnp.int32)  # [bn, g/2]
        zero = z_ref[:, pl.ds(g, 1)].astype(jnp.int32) if zero_point else 8
        scale = s_ref[:, pl.ds(g, 1)]
        o_ref[:, pl.ds(g * group, half)] = (((packed & 15) - zero).astype(jnp.float32) * scale).astype(o_ref.dtype)
        o_ref[:, pl.ds(g * group + half, half)] = (((packed >> 4) - zero).astype(jnp.float32) * scale).astype(
            o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("dtype", "interpret", "tiles"))
def dequantize_int4(w: QuantizedWeight, dtype, interpret: bool = False, tiles: DequantTiles = DequantTiles()):
    """`w` ([out, in], int4: `applies`) as `dtype` in q's column order: `dequantize(w, dtype, stored_order=True)`."""
    if not applies(w):
        raise ValueError(f"int4_dequant: weight {w.shape} ({w.scheme.weight}, whole={w.scheme.whole}): need a 2-D "
                         "int4 weight whole on the device, power-of-two groups of >= 32 inputs, channels % 16 == 0")
    out, in_features = w.shape
    group = w.scheme.group_size(in_features)
    groups = fit(max(1, 2 * tiles.block_bytes // group), in_features // group)  # whole groups per program
    # a group longer than the tiles' bytes (whole-row groups) takes fewer channels: the same bytes per program
    block_n = fit(max(16, tiles.block_n * tiles.block_bytes // (groups * group // 2)), out)
    inputs, specs = [w.q, w.scale], [
        pl.BlockSpec((block_n, groups * group // 2), lambda j, k: (j, k)),
        pl.BlockSpec((block_n, groups), lambda j, k: (j, k)),
    ]
    if w.zero is not None:
        inputs.append(w.zero)
        specs.append(specs[1])
    kernel = functools.partial(_kernel, group=group, groups=groups, zero_point=w.zero is not None)
    params = None if interpret else plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return pl.pallas_call(
        kernel, grid=(out // block_n, in_features // (groups * group)), in_specs=specs,
        out_specs=pl.BlockSpec((block_n, groups * group), lambda j, k: (j, k)),
        out_shape=jax.ShapeDtypeStruct((out, in_features), dtype), compiler_params=params, interpret=interpret,
        name="int4_dequant",
    )(*inputs)  # fmt: skip

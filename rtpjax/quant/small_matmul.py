"""x @ W.T for decode-sized x (at most `MAX_ROWS` rows; more are tiled) and a quantized W streamed from HBM: one
Pallas kernel (Triton lowering) for one-byte (fp8 e4m3, int8; one scale per output channel) and packed int4 weights
(a scale, and a zero point when asymmetric, per group of inputs), the format a static parameter.

At a few rows the weight's bytes are the whole cost, so the kernel reads them as stored and converts each tile to the
activations' dtype in registers; activations stay unquantized (no per-token quantize pass, no scaled fp8 dot to set
up). Each program owns `block_n` output channels of a `block_m`-row tile and walks its share of the inputs in steps
of `block_k` (int4: one group), accumulating in float32. The dot is taken weights-first, [block_n, k] x [k, block_m]
(the "swap AB" of small-M GEMMs), so the wide side of the tensor-core tile is the weights' and the padded rows are the
narrow one; per-channel scales then multiply the accumulator's rows once at the end, int4 group scales each group's
partial sum (the nibbles less their zero are exact in bfloat16). When out/block_n programs cannot fill the SMs the
inputs split `split_k` ways: each split writes a float32 partial and XLA sums them.

More rows than a decode step's (prefill chunks, large batches) are tiled: `Tiles.row_tile` rows per program, the rows
the grid's last (fastest) axis, so the programs that share a weight tile run side by side and can find it in L2,
where XLA's path for int4 first writes the whole dequantized weight to HBM. `quant.matmul.linear`
sends no step past MAX_ROWS here yet: `benchmarks/kernels/quant_bench.py --tokens` times both paths at any row count.

One row (batch-1 decode, `Tiles.one_row`) skips the tensor cores: padded to 16 rows the dot does 16 times the work
and its operands pass through shared memory in the dot's layout. The row multiplies each weight tile on the vector
units instead, into a float32 accumulator of the tile's own shape (int4: half a group wide, each group's products
scaled as they are added), summed across the inputs once at the end. The row is widened to float32 once, before
the kernel, not inside it for every weight it meets; its int4 "magic" works in float32 (`_nibbles_f32`: each byte
widened once, both nibbles by one AND-OR each, the high ones left in place: 16 times their value, so each group's
high half of the row comes divided by 16).

int4 layout: `rtpjax.loading.quantization` (byte j of a group holds input j low and input j + g/2 high), so each
half group is one dot against its own nibbles with nothing interleaved. Three ways to turn a nibble into the
activations' dtype (Tiles.unpack): "convert" (int32 arithmetic, then an integer-to-float conversion, a quarter-rate
instruction on NVIDIA GPUs); "magic" (the nibble ORed into the mantissa of a float whose exponent makes the low bits
units, e.g. bfloat16 0x4300 | n == 128 + n, then one subtraction of 128 + zero: no conversion instruction at all);
"asm", the magic by hand in inline PTX on 16-bit pairs (`rtpjax.kernels.ptx`: float16 for float16 activations, else
bfloat16), where Triton spends several instructions on each nibble. int4's default tiles take "asm" where the GPU runs
it (`ptx.runs`), else "magic"; named tiles are taken as they are (a plain `Tiles()` converts). Interpreted (no PTX),
"asm" takes the "magic" path, the same exact values.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from rtpjax.kernels import SMS, ptx
from rtpjax.loading.quantization import QuantizedWeight

FORMATS = ("fp8", "int8", "int4")
MIN_ROWS = 16  # a tensor-core tile's narrow side: fewer rows are padded to it
MAX_ROWS = 64  # a decode-sized step: all its rows in one tile


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes (static per compiled kernel; the benchmark sweeps them). int4 steps whole groups (block_k rounded
    down to them, at least one); split_k 0 picks the fewest splits that give every SM two programs."""

    block_n: int = 64
    block_k: int = 256
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 3
    unpack: str = "convert"  # int4 nibbles to floats: "convert", "magic" or "asm" (module docstring)
    one_row: bool = False  # True: a single row multiplies on the vector units (module docstring), not a padded dot
    row_tile: int = 64  # rows per program past MAX_ROWS (a power of two, >= MIN_ROWS)


# One tile shape for every format. `benchmarks/kernels/quant_bench.py`'s sweep on an H200 (8B shapes, 16 rows) timed the
# one-byte formats fastest with two warps on 32 channels, but the engine's decode step ran slower with them: the
# kernel alone, on one weight called back to back, is not the step (RESULTS.md, quantization rows). int4's nibbles go
# by the PTX (1.09-1.20x the conversion at 1 and 32 rows on an H100, RESULTS.md 12-06) where the GPU runs it, else by
# the magic (`small_matmul`).
DEFAULT_TILES = {"fp8": Tiles(), "int8": Tiles(), "int4": Tiles(unpack="asm")}
# One row on the vector units: on an H200 within 2% of the padded tensor-core dot (RESULTS.md, 12-05b); int4's with
# the PTX (H100, 12-06) 31.6 / 30.0 us (8B up / down) against the padded dot's 30.1 / 31.0. So not the default;
# `quant_bench --sweep-rows 1` times these and more against it and XLA's dot. (int4's "asm": see `ptx.runs`.)
ONE_ROW_TILES = {"fp8": Tiles(block_n=16, block_k=512, one_row=True),
                 "int8": Tiles(block_n=16, block_k=512, one_row=True),
                 "int4": Tiles(block_n=32, block_k=512, num_warps=8, unpack="asm", one_row=True)}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Plan:
    """Tiles resolved for one shape."""

    block_m: int  # the padded rows of a tile: all of a decode step's (1: one row on the vector units)
    block_n: int
    step: int  # inputs per loop step
    split_k: int
    row_tiles: int = 1  # tiles over the rows (past MAX_ROWS)


def default_tiles(fmt: str, dtype) -> Tiles:
    """The format's DEFAULT_TILES for activations of `dtype`: int4's PTX only where this GPU runs it."""
    tiles = DEFAULT_TILES[fmt]
    if tiles.unpack == "asm" and not ptx.runs(dtype):
        tiles = dataclasses.replace(tiles, unpack="magic")
    return tiles


def plan(rows: int, out: int, in_features: int, fmt: str, group: int = 0, tiles: Tiles | None = None) -> Plan:
    """The tiles for x [rows, in] @ W[out, in].T (`tiles`, or the format's DEFAULT_TILES), or a ValueError naming what
    does not fit."""
    if fmt not in FORMATS:
        raise ValueError(f"small_matmul: weight format {fmt!r}: choose one of {', '.join(FORMATS)}")
    tiles = tiles or DEFAULT_TILES[fmt]  # (only their sizes matter here)
    if tiles.unpack not in UNPACKS:
        raise ValueError(f"small_matmul: unpack {tiles.unpack!r}: choose one of {', '.join(UNPACKS)}")
    if rows < 1:
        raise ValueError(f"small_matmul: {rows} rows: the kernel takes 1 or more")
    if rows > MAX_ROWS and (tiles.row_tile < MIN_ROWS or tiles.row_tile & (tiles.row_tile - 1)):
        raise ValueError(f"small_matmul: row_tile {tiles.row_tile} must be a power of two >= {MIN_ROWS}")
    if fmt == "int4" and (group % 32 or in_features % group):
        raise ValueError(f"small_matmul: int4 group {group} with {in_features} inputs: need group % 32 == 0 "
                         "dividing the inputs")  # fmt: skip
    if out % 16 or in_features % 16:
        raise ValueError(f"small_matmul: output {out} and input {in_features} must be multiples of 16")
    if fmt == "int4":  # whole groups per step: the most of block_k's that divide the input
        step = group * fit(max(1, tiles.block_k // group), in_features // group)
    else:
        step = fit(tiles.block_k, in_features)
    block_n = fit(tiles.block_n, out)
    if rows > MAX_ROWS:
        block_m, row_tiles = tiles.row_tile, -(-rows // tiles.row_tile)
    else:
        block_m, row_tiles = (1 if rows == 1 and tiles.one_row else max(MIN_ROWS, pl.next_power_of_2(rows))), 1
    steps = in_features // step
    split = tiles.split_k
    if split == 0:  # the fewest splits reaching 2 programs per SM (SMS), each keeping 2+ steps to pipeline
        split = 1
        while (out // block_n * row_tiles * split < 2 * SMS and steps % (split * 2) == 0
               and steps // (split * 2) >= 2):  # fmt: skip
            split *= 2
    if steps % split:
        raise ValueError(f"small_matmul: split_k {split} does not divide the {steps} steps of {step} inputs")
    return Plan(block_m, block_n, step, split, row_tiles)


def fit(tile: int, size: int) -> int:
    """The largest power of two <= `tile` dividing `size`: Triton's tiles are powers of two."""
    tile = min(1 << (tile.bit_length() - 1), pl.next_power_of_2(size))
    while size % tile:
        tile //= 2
    return tile


def supported(rows: int, out: int, in_features: int, fmt: str, group: int = 0, tiles: Tiles | None = None) -> bool:
    try:
        plan(rows, out, in_features, fmt, group, tiles)
    except ValueError:
        return False
    return True


UNPACKS = ("convert", "magic", "asm")


def _nibbles(packed, zero, dtype, unpack: str, x_dtype):
    """The low and high nibbles of uint8 `packed` less `zero` (8, or a uint8 column per row), as `dtype`: exact."""
    if unpack == "asm":  # in the PTX's 16-bit dtype for activations of x_dtype, then widened if need be
        lo, hi = ptx.nibbles(packed, zero, ptx.pair_dtype(x_dtype))
        return lo.astype(dtype), hi.astype(dtype)
    if unpack == "convert":
        wide = packed.astype(jnp.int32)
        z = zero if isinstance(zero, int) else zero.astype(jnp.int32)
        return ((wide & 15) - z).astype(dtype), ((wide >> 4) - z).astype(dtype)
    uint, bits, base = ptx.MAGIC[jnp.dtype(dtype)]

    def as_float(n):  # n in 0..15 (uint8) -> base + n in dtype, by its bits
        return lax.bitcast_convert_type(n.astype(uint) | uint(bits), dtype)

    z = jnp.asarray(base + zero, dtype) if isinstance(zero, int) else as_float(zero)
    return as_float(packed & 15) - z, as_float(packed >> 4) - z


def _nibbles_f32(packed, zero):
    """One row's float32 magic: each byte widened once, its low nibble ORed into the mantissa of 2^23 (2^23 + n) and
    its high nibble left in place (2^23 + 16 n), one AND-OR each; then one subtraction of the magic and the zero (16
    times it for the high nibbles). Exact: the low nibbles less `zero`, and 16 times the high ones less `zero`."""
    wide = packed.astype(jnp.uint32)
    uint, bits, base = ptx.MAGIC[jnp.dtype(jnp.float32)]
    z = float(zero) if isinstance(zero, int) else zero.astype(jnp.float32)
    as_float = lambda mask: lax.bitcast_convert_type((wide & uint(mask)) | uint(bits), jnp.float32)  # noqa: E731
    return as_float(0x0F) - (base + z), as_float(0xF0) - (base + 16 * z)


def _dot(w, x):
    """w [n, k] @ x[m, k].T: [n, m] in float32."""
    return lax.dot_general(w, x, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _products(w, x):
    """One row: w [n, k] * x [1, k] element by element (the caller sums over k once, at the end)."""
    return w * x


def _kernel(x_ref, q_ref, s_ref, *rest, fmt: str, step: int, steps: int, group: int, zero_point: bool,
            unpack: str, x_dtype, hi_over_16: bool):  # fmt: skip
    z_ref, o_ref = rest if zero_point else (None, rest[0])
    one_row = x_ref.shape[0] == 1
    dtype, mul = (jnp.float32, _products) if one_row else (x_ref.dtype, _dot)
    if fmt == "int4":
        half, per_step = group // 2, step // group

        def body(k, acc):
            for i in range(per_step):  # unrolled: the step's groups load (and pipeline) side by side
                g = k * per_step + i
                packed = q_ref[:, pl.ds(g * half, half)]  # [bn, g/2] uint8
                zero = z_ref[:, pl.ds(g, 1)] if zero_point else 8
                x_lo = x_ref[:, pl.ds(g * group, half)].astype(dtype)
                x_hi = x_ref[:, pl.ds(g * group + half, half)].astype(dtype)
                if hi_over_16:  # high nibbles in place, 16 times their value: x_hi came / 16
                    lo, hi = _nibbles_f32(packed, zero)
                else:
                    lo, hi = _nibbles(packed, zero, dtype, unpack, x_dtype)
                acc = acc + (mul(lo, x_lo) + mul(hi, x_hi)) * s_ref[:, pl.ds(g, 1)]
            return acc

        width = half
    else:

        def body(k, acc):
            cols = pl.ds(k * step, step)
            return acc + mul(q_ref[:, cols].astype(dtype), x_ref[:, cols].astype(dtype))

        width = step
    acc_shape = (q_ref.shape[0], width if one_row else x_ref.shape[0])
    acc = lax.fori_loop(0, steps, body, jnp.zeros(acc_shape, jnp.float32))
    if one_row:
        acc = jnp.sum(acc, axis=1, keepdims=True)  # [bn, 1]
    if fmt != "int4":
        acc = acc * s_ref[...]  # [bn, 1]: one scale per output channel
    o_ref[...] = acc.T.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("fmt", "group", "tiles", "interpret"))
def small_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, zero: jax.Array | None = None, *, fmt: str,
                 group: int = 0, tiles: Tiles | None = None, interpret: bool = False) -> jax.Array:  # fmt: skip
    """x [M, K] @ W.T in x's dtype. W: fmt "fp8" / "int8": q [N, K] one-byte, scale [N, 1] float32; "int4": q [N, K/2]
    uint8 packed, scale [N, K/group] float32, zero [N, K/group] uint8 or None (symmetric, zero 8)."""
    rows, in_features = x.shape
    out = q.shape[0]
    tiles = tiles or default_tiles(fmt, x.dtype)
    p = plan(rows, out, in_features, fmt, group, tiles)
    padded = p.block_m * p.row_tiles
    xp = jnp.pad(x, ((0, padded - rows), (0, 0)))
    unpack = "magic" if interpret and tiles.unpack == "asm" else tiles.unpack
    hi_over_16 = p.block_m == 1 and fmt == "int4" and unpack == "magic"  # one row's float32 magic: `_nibbles_f32`
    if p.block_m == 1:  # one row multiplies in float32: widened once here, not for every weight it meets
        xp = xp.astype(jnp.float32)
        if hi_over_16:  # each group's high half / 16, for `_nibbles_f32`'s high nibbles
            xp = (xp.reshape(1, -1, 2, group // 2) * jnp.asarray([1, 1 / 16], jnp.float32)[:, None]).reshape(xp.shape)
    part = in_features // p.split_k  # inputs per split
    q_cols = part // 2 if fmt == "int4" else part
    # grid (output block j, split s, row tile i): the row tiles of one weight tile run one after another
    scale_spec = (pl.BlockSpec((p.block_n, part // group), lambda j, s, i: (j, s)) if fmt == "int4"
                  else pl.BlockSpec((p.block_n, 1), lambda j, s, i: (j, 0)))  # fmt: skip
    in_specs = [
        pl.BlockSpec((p.block_m, part), lambda j, s, i: (i, s)),
        pl.BlockSpec((p.block_n, q_cols), lambda j, s, i: (j, s)),
        scale_spec,
    ]
    inputs = [xp, q, scale]
    if fmt == "int4" and zero is not None:
        in_specs.append(scale_spec)
        inputs.append(zero)
    if p.split_k == 1:
        out_shape = jax.ShapeDtypeStruct((padded, out), x.dtype)
        out_spec = pl.BlockSpec((p.block_m, p.block_n), lambda j, s, i: (i, j))
    else:
        out_shape = jax.ShapeDtypeStruct((p.split_k, padded, out), jnp.float32)
        out_spec = pl.BlockSpec((None, p.block_m, p.block_n), lambda j, s, i: (s, i, j))
    kernel = functools.partial(_kernel, fmt=fmt, step=p.step, steps=part // p.step, group=group,
                               zero_point=len(inputs) == 4, x_dtype=x.dtype, hi_over_16=hi_over_16,
                               unpack=unpack)
    params = None if interpret else plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    result = pl.pallas_call(
        kernel, grid=(out // p.block_n, p.split_k, p.row_tiles), in_specs=in_specs, out_specs=out_spec,
        out_shape=out_shape, compiler_params=params, interpret=interpret, name=f"small_matmul_{fmt}",
    )(*inputs)  # fmt: skip
    if p.split_k > 1:
        result = result.sum(0).astype(x.dtype)
    return result[:rows]


def applies(rows: int, w: QuantizedWeight, tiles: Tiles | None = None) -> bool:
    """Whether `quantized_matmul` can take x [rows, in] @ w: per-channel one-byte or grouped int4 weights, whole on
    the device (a sharded weight would be gathered for a custom call), 2-D, shapes the tiles fit."""
    s = w.scheme
    return (s.whole and w.q.ndim == 2 and (s.per_channel or s.weight == "int4")
            and supported(rows, w.shape[0], w.shape[1], s.weight, s.group_size(w.shape[1]), tiles))  # fmt: skip


def quantized_matmul(x: jax.Array, w: QuantizedWeight, tiles: Tiles | None = None,
                     interpret: bool = False) -> jax.Array:  # fmt: skip
    """x [M, in] @ w.T through the kernel (x already in q's column order), in x's dtype."""
    group = w.scheme.group_size(w.shape[1]) if w.scheme.weight == "int4" else 0
    return small_matmul(x, w.q, w.scale, w.zero, fmt=w.scheme.weight, group=group, tiles=tiles, interpret=interpret)

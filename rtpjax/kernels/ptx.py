"""Conversions Triton makes one element at a time, written in inline PTX to work on 16-bit pairs: packed int4 nibbles
(a quantized weight) and int8 (a quantized KV cache) to 16-bit floats. Both set the integer into the mantissa of a
"magic" float whose exponent makes the mantissa's low bits units (bfloat16 0x4300 | n == 128 + n, float16
0x6400 | n == 1024 + n), then subtract the magic and the zero point from two elements at once: no integer-to-float
conversion (a quarter-rate instruction on NVIDIA GPUs), a few instructions per four elements (RESULTS.md has what
they buy). The bfloat16 subtraction needs sm_90 (Hopper); float16's sm_53.

Each call is one `elementwise_inline_asm` of four elements per instance (pack=4: four bytes in one 32-bit register,
four 16-bit results in two). Pallas lowers an instance with one result only, so the int4 nibbles take two calls (low,
high). The interpreter cannot run PTX: kernels take their plain-jnp path when interpreted, and the tests check the
PTX by emulating its instructions on every byte value."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

# dtype -> (unsigned type of its width, the bits of 2^m whose mantissa's low bits are units, 2^m): 2^m | n == 2^m + n
# (float32 for kernels' jnp paths); the 16-bit ones' paired subtraction
MAGIC = {jnp.dtype(jnp.bfloat16): (jnp.uint16, 0x4300, 128.0), jnp.dtype(jnp.float16): (jnp.uint16, 0x6400, 1024.0),
         jnp.dtype(jnp.float32): (jnp.uint32, 0x4B000000, 8388608.0)}  # fmt: skip
SUB = {jnp.dtype(jnp.bfloat16): "sub.rn.bf16x2", jnp.dtype(jnp.float16): "sub.rn.f16x2"}

# Four bytes' low or high nibbles. Byte order [b0, b2, b1, b3] (the prmt, the same in both calls) puts elements 0
# and 1 (then 2 and 3) 16 bits apart, so one AND-OR (lop3, LUT 0xEA = (a & b) | c) per pair makes two magic floats.
# Registers: $0-$1 the pairs out, $2 the bytes, $3-$4 magic + zero (elements 0-1, 2-3). The low nibbles shift by 0
# and 8, the high ones by 4 and 12.
NIBBLES_ASM = """{
.reg .b32 w, t;
prmt.b32 w, $2, 0, 0x3120;
shr.b32 t, w, SHIFT_A;
lop3.b32 $0, t, 0x000F000F, MAGIC, 0xEA;
shr.b32 t, w, SHIFT_B;
lop3.b32 $1, t, 0x000F000F, MAGIC, 0xEA;
SUB $0, $0, $3;
SUB $1, $1, $4;
}"""
NIBBLES_CONSTRAINTS = "=r,=r,r,r,r"

# Four int8 to float16: XOR 0x80 makes each byte b + 128 (unsigned); prmt sets it under the magic's high byte 0x64
# (1024 + 128 + b), and the subtraction of 1152 (0x6480) leaves b. Registers: $0-$1 the pairs out, $2 the bytes.
INT8_ASM = """{
.reg .b32 u, c;
xor.b32 u, $2, 0x80808080;
mov.b32 c, 0x64806480;
prmt.b32 $0, u, 0x64646464, 0x4140;
prmt.b32 $1, u, 0x64646464, 0x4342;
sub.rn.f16x2 $0, $0, c;
sub.rn.f16x2 $1, $1, c;
}"""
INT8_CONSTRAINTS = "=r,=r,r"


def nibbles_asm(dtype, high: bool) -> str:
    """NIBBLES_ASM for a 16-bit float dtype (its magic in both halves, its paired subtraction), one half."""
    bits = MAGIC[jnp.dtype(dtype)][1]
    shift_a, shift_b = (4, 12) if high else (0, 8)
    return (NIBBLES_ASM.replace("SHIFT_A", str(shift_a)).replace("SHIFT_B", str(shift_b))
            .replace("MAGIC", f"0x{bits:04X}{bits:04X}").replace("SUB", SUB[jnp.dtype(dtype)]))  # fmt: skip


def nibbles(packed: jax.Array, zero, dtype) -> tuple[jax.Array, jax.Array]:
    """uint8 `packed`'s low and high nibbles less `zero` (an int, or a uint8 array broadcasting to packed), as the
    16-bit float `dtype`: exact. Inside a Pallas kernel on the GPU."""
    dtype = jnp.dtype(dtype)
    _, bits, base = MAGIC[dtype]
    if isinstance(zero, int):
        z = jnp.full(packed.shape, base + zero, dtype)
    else:  # magic + zero, by its bits
        z = jax.lax.bitcast_convert_type(zero.astype(jnp.uint16) | jnp.uint16(bits), dtype)
        z = jnp.broadcast_to(z, packed.shape)
    out = jax.ShapeDtypeStruct(packed.shape, dtype)
    return tuple(plgpu.elementwise_inline_asm(nibbles_asm(dtype, high), args=[packed, z],
                                              constraints=NIBBLES_CONSTRAINTS, pack=4, result_shape_dtypes=[out])[0]
                 for high in (False, True))  # fmt: skip


def int8_to_f16(x: jax.Array) -> jax.Array:
    """int8 `x` as float16 (exact). Inside a Pallas kernel on the GPU."""
    out = jax.ShapeDtypeStruct(x.shape, jnp.float16)
    return plgpu.elementwise_inline_asm(INT8_ASM, args=[x], constraints=INT8_CONSTRAINTS, pack=4,
                                        result_shape_dtypes=[out])[0]  # fmt: skip


def pair_dtype(x_dtype):
    """The 16-bit dtype the conversions produce for activations of `x_dtype`: float16 for float16, else bfloat16."""
    return jnp.dtype(jnp.float16) if jnp.dtype(x_dtype) == jnp.float16 else jnp.dtype(jnp.bfloat16)


def compute_capability() -> tuple[int, int] | None:
    """This process's first CUDA GPU's compute capability (major, minor); None without one (a CPU, a ROCm GPU)."""
    if jax.default_backend() != "gpu":
        return None
    device = jax.local_devices(backend="gpu")[0]
    if "cuda" not in device.client.platform_version.lower():
        return None
    try:
        major, minor = str(getattr(device, "compute_capability", "")).split(".")
        return int(major), int(minor)
    except ValueError:
        return None


def runs(x_dtype) -> bool:
    """Whether this process's GPU runs the conversions for activations of `x_dtype`: float16 pairs on any CUDA GPU,
    bfloat16 ones (every other dtype's) on sm_90 and later."""
    cc = compute_capability()
    return cc is not None and (pair_dtype(x_dtype) == jnp.float16 or cc >= (9, 0))

"""The inline PTX conversions (rtpjax.kernels.ptx) checked on the CPU: an emulator of the instructions they use runs
each snippet on every byte value, and the results must be exact. Kernels take their plain-jnp path when interpreted,
so this is where the PTX itself is tested; test_quant_matmul and test_pallas_attention lower it to Triton."""

import jax.numpy as jnp
import numpy as np
import pytest

from rtpjax.kernels.ptx import INT8_ASM, INT8_CONSTRAINTS, MAGIC, NIBBLES_CONSTRAINTS, nibbles_asm


def run_ptx(asm: str, regs: dict) -> dict:
    """Emulate prmt, lop3, shr, xor, mov and paired 16-bit float subtraction on uint32 numpy arrays, one element per
    instance: `regs` maps "$2" etc. to their values; returns every register after the last line."""
    regs = dict(regs)
    val = lambda a: regs[a] if a in regs else np.uint32(int(a, 0))
    for line in asm.strip().strip("{}").strip().splitlines():
        op, _, rest = line.strip().rstrip(";").partition(" ")
        if op.startswith(".reg"):
            continue
        d, *a = [part.strip() for part in rest.split(",")]
        if op == "prmt.b32":  # bytes of (a, b) picked by the selector's nibbles (bit 3: the byte's sign, spread)
            both = [(val(a[0]) >> np.uint32(8 * i)) & 0xFF for i in range(4)]
            both += [(val(a[1]) >> np.uint32(8 * i)) & 0xFF for i in range(4)]
            sel, out = int(a[2], 0), np.uint32(0)
            for i in range(4):
                nib = (sel >> (4 * i)) & 15
                byte = both[nib & 7]
                byte = np.where(byte & 0x80, 0xFF, 0) if nib & 8 else byte
                out = out | (np.asarray(byte).astype(np.uint32) << np.uint32(8 * i))
            regs[d] = out
        elif op == "lop3.b32":  # each bit from the look-up table at (a, b, c)'s bits
            x, y, z, lut = val(a[0]), val(a[1]), val(a[2]), int(a[3], 0)
            out = np.zeros_like(x)
            for bit in range(32):
                idx = (((x >> bit) & 1) << 2) | (((y >> bit) & 1) << 1) | ((z >> bit) & 1)
                out |= ((np.uint32(lut) >> idx) & 1) << np.uint32(bit)
            regs[d] = out
        elif op == "shr.b32":
            regs[d] = val(a[0]) >> np.uint32(int(a[1], 0))
        elif op == "xor.b32":
            regs[d] = val(a[0]) ^ val(a[1])
        elif op == "mov.b32":
            regs[d] = val(a[0])
        elif op in ("sub.rn.bf16x2", "sub.rn.f16x2"):
            dt = jnp.bfloat16 if "bf16" in op else jnp.float16
            res = [(p.astype(np.float32) - q.astype(np.float32)).astype(dt).view(np.uint16).astype(np.uint32)
                   for p, q in zip(_halves(val(a[0]), dt), _halves(val(a[1]), dt))]  # fmt: skip
            regs[d] = res[0] | (res[1] << np.uint32(16))
        else:
            raise AssertionError(f"an instruction the emulator does not know: {line}")
    return regs


def _words(data: np.ndarray) -> np.ndarray:
    """[n, 4] bytes -> [n] uint32, little-endian (element i in bits 8i..8i+7, as Triton packs them)."""
    return np.ascontiguousarray(data).view("<u4")[:, 0].astype(np.uint32)


def _halves(r, dtype) -> list:
    """A register of 16-bit pairs -> its low and high halves as `dtype`."""
    return [np.asarray(((r >> np.uint32(s)) & 0xFFFF).astype(np.uint16)).view(dtype) for s in (0, 16)]


def _values(r0, r1, dtype) -> np.ndarray:
    """Two registers of 16-bit pairs -> [n, 4] float32 values, element i in register i // 2, half i % 2."""
    return np.stack(_halves(r0, dtype) + _halves(r1, dtype), axis=1).astype(np.float32)


# Every byte value in every lane of the four: row r holds r, r + 64, r + 128, r + 192 (mod 256), over 256 rows
EVERY_BYTE = ((np.arange(256)[:, None] + 64 * np.arange(4)) % 256).astype(np.uint8)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_the_nibbles_ptx_gives_each_nibble_less_its_zero(dtype):
    """Four bytes and their elements' magic + zero in, the low (then high) nibbles less the zero out, each in its
    element's place of the two 16-bit pairs."""
    _, bits, base = MAGIC[jnp.dtype(dtype)]
    data = np.repeat(EVERY_BYTE, 16, axis=0)  # [instances, 4 bytes], each row with every zero (lanes apart)
    zero = ((np.arange(data.shape[0])[:, None] + 5 * np.arange(4)) % 16).astype(np.uint16)
    z16 = (zero | np.uint16(bits)).astype(np.uint32)  # magic + zero, by its bits
    regs = {"$2": _words(data), "$3": z16[:, 0] | (z16[:, 1] << np.uint32(16)),
            "$4": z16[:, 2] | (z16[:, 3] << np.uint32(16))}  # fmt: skip
    assert NIBBLES_CONSTRAINTS.count("=r") == 2 and NIBBLES_CONSTRAINTS.count(",r") == 3
    for high, want in ((False, data & 15), (True, data >> 4)):
        out = run_ptx(nibbles_asm(dtype, high), regs)
        np.testing.assert_array_equal(_values(out["$0"], out["$1"], dtype), want - zero.astype(np.float32))
    assert base == {jnp.bfloat16: 128.0, jnp.float16: 1024.0}[dtype]


def test_the_int8_ptx_gives_each_byte_as_float16():
    data = EVERY_BYTE.view(np.int8)
    assert INT8_CONSTRAINTS.count("=r") == 2 and INT8_CONSTRAINTS.count(",r") == 1
    out = run_ptx(INT8_ASM, {"$2": _words(data.view(np.uint8))})
    np.testing.assert_array_equal(_values(out["$0"], out["$1"], jnp.float16), data.astype(np.float32))

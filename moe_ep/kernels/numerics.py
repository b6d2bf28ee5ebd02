"""Rounding conversions that give the same bits on every device.

Both conversions round to nearest even in integer arithmetic, bit for bit as torch does, on
every target: Triton's interpreter truncates in its native casts (and mishandles mantissa
carries), and native fp8 casts differ between vendors. The few integer operations per value
cost nothing in these memory-bound kernels.
Quantisation follows the reference: one float32 scale per 128 values,
``scale = max(amax, FP8_AMAX_FLOOR) / FP8_MAX``.
"""

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)
FP8_AMAX_FLOOR = tl.constexpr(1e-4)
QUANT_BLOCK = tl.constexpr(128)


@triton.jit
def _to_bf16(x):
    """float32 -> bfloat16, round to nearest even (inputs are finite)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _to_fp8e4m3(x):
    """float32 in [-448, 448] -> float8_e4m3fn, round to nearest even."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    # Normal fp8 (|x| >= 2**-6): keep 8 exponent + 3 mantissa bits, rounding carries into the
    # exponent; then rebias the exponent from 127 to 7.
    normal = (magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20
    normal = normal - ((127 - 7) << 3)
    # Subnormal fp8: a multiple of 2**-9, rounded to nearest even by the integer part of the
    # float32 sum with 2**23 (whose ulp is 1).
    scaled = (magnitude.to(tl.float32, bitcast=True)) * 512.0
    subnormal = ((scaled + 8388608.0).to(tl.uint32, bitcast=True) - 0x4B000000)
    code = tl.where(magnitude >= 0x3C800000, normal, subnormal) | sign
    return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _quantize_fp8(x, BLOCK_H: tl.constexpr):
    """Quantise ``[BLOCK_H]`` float32 values in groups of 128.

    Returns ``(q, scales)``: ``[BLOCK_H]`` float8_e4m3fn and ``[BLOCK_H // 128]`` float32.
    """
    groups = tl.reshape(x, (BLOCK_H // QUANT_BLOCK, QUANT_BLOCK))  # [G, 128]
    amax = tl.max(tl.abs(groups), axis=1)  # [G]
    # IEEE divisions (div_rn), as torch's: bf16 inputs often put x / scale exactly on an fp8
    # rounding tie, where the approximate division of ``/`` (div.full.f32 on NVIDIA) tips it.
    scales = tl.math.div_rn(tl.maximum(amax, FP8_AMAX_FLOOR), tl.full(amax.shape, FP8_MAX, tl.float32))
    scaled = tl.math.div_rn(groups, tl.broadcast_to(scales[:, None], groups.shape))
    scaled = tl.minimum(tl.maximum(scaled, -FP8_MAX), FP8_MAX)
    q = _to_fp8e4m3(scaled)
    return tl.reshape(q, (BLOCK_H,)), scales

"""Rounding conversions that give the same bits on every device.

Both conversions round to nearest even in integer arithmetic, bit for bit as torch does, on
every target: Triton's interpreter truncates in its native casts (and mishandles mantissa
carries), and native fp8 casts differ between vendors. The few integer operations per value
cost nothing in these memory-bound kernels.
Quantisation follows the reference (``moe_ep.reference.quantize_fp8``): one float32 scale per
128 values, ``scale = max(amax, FP8_AMAX_FLOOR) / fp8_max``, in one of two formats, a kernel's
``FP8_FORMAT`` constexpr (``fp8_format`` gives a torch dtype's):
  E4M3FN    OCP float8_e4m3fn (NVIDIA, AMD gfx950 / MI355X): largest value 448, exponent bias 7;
            -0 is 0x80; NaN 0x7F.
  E4M3FNUZ  float8_e4m3fnuz (AMD gfx942 / MI300X): largest 240, bias 8; no negative zero (a value
            that rounds to zero is 0x00 whatever its sign); 0x80 is its only NaN, so it is never
            emitted for a finite input.
Non-finite inputs give what the reference gives: a group holding a NaN gets a NaN scale (the
quiet NaN 0x7FC00000) and NaN codes throughout; a group holding an infinity gets scale inf, NaN
codes where the infinities were (inf / inf) and zeros elsewhere. NaN codes are 0x7F (e4m3fn) and
0x80 (e4m3fnuz) whatever the sign of the float32 NaN (which differs between devices). Min / max
on GPUs drop NaN, so NaN is tested for explicitly. ``_to_bf16`` rounds infinities as torch does
and gives the quiet NaN 0x7FC0 for any NaN (torch's own NaN bits differ by device and path).
The quantiser returns the codes as the destination's element type (``CODE_DTYPE``): the fp8 type
itself, or uint8 where a tensor's bytes travel as such (float8_e4m3fnuz under Triton's interpreter
and on NVIDIA, which have no such type: ``moe_ep._platform.kernel_arg``).
"""

import torch
import triton
import triton.language as tl

FP8_AMAX_FLOOR = tl.constexpr(1e-4)
QUANT_BLOCK = tl.constexpr(128)
E4M3FN = tl.constexpr(0)
E4M3FNUZ = tl.constexpr(1)


def fp8_format(dtype: torch.dtype) -> int:
    """The ``FP8_FORMAT`` of a dispatch dtype (E4M3FN for bf16, which never quantises)."""
    return E4M3FNUZ.value if dtype == torch.float8_e4m3fnuz else E4M3FN.value


@triton.jit
def _to_bf16(x):
    """float32 -> bfloat16, round to nearest even; infinities stay, any NaN gives 0x7FC0 (the
    rounding's carry would turn some NaN payloads into an infinity or -0)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    bits = tl.where(x != x, 0x7FC00000, bits)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _fp8_code(x, FP8_FORMAT: tl.constexpr):
    """float32 within the format's range -> its fp8 code (uint8), round to nearest even."""
    FNUZ: tl.constexpr = FP8_FORMAT == E4M3FNUZ
    BIAS: tl.constexpr = 8 if FNUZ else 7
    # The smallest normal value, 2**(1 - BIAS), as float32 bits, and 1 / the subnormal step 2**(-2 - BIAS).
    MIN_NORMAL_BITS: tl.constexpr = (128 - BIAS) << 23
    SUBNORMAL_STEPS: tl.constexpr = 1024.0 if FNUZ else 512.0
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    # Normal fp8: keep 8 exponent + 3 mantissa bits, rounding carries into the exponent; then
    # rebias the exponent from 127 to BIAS.
    normal = (magnitude + 0x7FFFF + ((magnitude >> 20) & 1)) >> 20
    normal = normal - ((127 - BIAS) << 3)
    # Subnormal fp8: a multiple of the subnormal step, rounded to nearest even by the integer part
    # of the float32 sum with 2**23 (whose ulp is 1).
    scaled = (magnitude.to(tl.float32, bitcast=True)) * SUBNORMAL_STEPS
    subnormal = ((scaled + 8388608.0).to(tl.uint32, bitcast=True) - 0x4B000000)
    code = tl.where(magnitude >= MIN_NORMAL_BITS, normal, subnormal)
    if FNUZ:
        code = tl.where(code == 0, 0, code | sign)  # no negative zero: 0x80 is NaN
    else:
        code = code | sign
    return code.to(tl.uint8)


@triton.jit
def _fp8_nan_code(FP8_FORMAT: tl.constexpr):
    """The NaN code of FP8_FORMAT: 0x80 (e4m3fnuz's only NaN) or 0x7F (e4m3fn's positive NaN)."""
    return 0x80 if FP8_FORMAT == E4M3FNUZ else 0x7F


@triton.jit
def _quantize_fp8(x, BLOCK_H: tl.constexpr, FP8_FORMAT: tl.constexpr, CODE_DTYPE: tl.constexpr):
    """Quantise ``[BLOCK_H]`` float32 values in groups of 128 into format FP8_FORMAT.

    Returns ``(q, scales)``: ``[BLOCK_H]`` codes as CODE_DTYPE and ``[BLOCK_H // 128]`` float32.
    """
    FP8_MAX: tl.constexpr = 240.0 if FP8_FORMAT == E4M3FNUZ else 448.0
    groups = tl.reshape(x, (BLOCK_H // QUANT_BLOCK, QUANT_BLOCK))  # [G, 128]
    amax = tl.max(tl.abs(groups), axis=1)  # [G] (on GPUs, the largest value other than NaN)
    has_nan = tl.max((groups != groups).to(tl.int32), axis=1) > 0  # [G]
    # IEEE divisions (div_rn), as torch's: bf16 inputs often put x / scale exactly on an fp8
    # rounding tie, where the approximate division of ``/`` (div.full.f32 on NVIDIA) tips it.
    scales = tl.math.div_rn(tl.maximum(amax, FP8_AMAX_FLOOR), tl.full(amax.shape, FP8_MAX, tl.float32))
    scales = tl.where(has_nan, tl.full(amax.shape, 0x7FC00000, tl.uint32).to(tl.float32, bitcast=True), scales)
    scaled = tl.math.div_rn(groups, tl.broadcast_to(scales[:, None], groups.shape))  # NaN: a NaN group, inf / inf
    is_nan = scaled != scaled  # [G, 128], before the clamp (which drops NaN on GPUs)
    scaled = tl.minimum(tl.maximum(scaled, -FP8_MAX), FP8_MAX)
    code = tl.where(is_nan, _fp8_nan_code(FP8_FORMAT), _fp8_code(scaled, FP8_FORMAT))
    q = code.to(tl.uint8).to(CODE_DTYPE, bitcast=True)
    return tl.reshape(q, (BLOCK_H,)), scales

"""Triton helpers shared by the fast kernels: the reference's quantization arithmetic on fp32 bits, and fp32
sin / cos. No float64 anywhere: libdevice's sinf / cosf multiply in float64 on their large-argument path (RoPE
angles reach ~1e6 rad), so `sincos` replaces tl.sin / tl.cos.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The reference's fp32 constants (quant.py): 1/fmt_max rounded to fp32 and the amax floors.
INV_FP4_MAX: tl.constexpr = tl.constexpr(float(torch.tensor(1.0 / 6.0, dtype=torch.float32)))
FP4_FLOOR: tl.constexpr = tl.constexpr(6 * 2.0 ** -126)
INV_FP8_MAX: tl.constexpr = tl.constexpr(float(torch.tensor(1.0 / 448.0, dtype=torch.float32)))
FP8_FLOOR: tl.constexpr = tl.constexpr(float(torch.tensor(1e-4, dtype=torch.float32)))


@triton.jit
def ue8m0_scale(amax, inv_max, floor):
    """The reference's power-of-two scale 2^ceil(log2(max(amax, floor) * inv_max)), from the fp32 bits; also
    returns its UE8M0 byte (the biased exponent) as int32."""
    y = tl.maximum(amax, floor) * inv_max
    bits = y.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (exponent << 23).to(tl.float32, bitcast=True), exponent


@triton.jit
def round_e2m1(x):
    """fp32 -> nearest e2m1 value (ties to even), saturated to +-6. a * (1/step) is exact, and adding 2^23 rounds
    to an integer with the FPU's round-to-nearest-even."""
    a = tl.minimum(tl.abs(x), 6.0)
    step = tl.where(a < 2.0, 0.5, tl.where(a < 4.0, 1.0, 2.0))
    inv_step = tl.where(a < 2.0, 2.0, tl.where(a < 4.0, 1.0, 0.5))
    r = (a * inv_step + 8388608.0) - 8388608.0
    q = r * step
    # copysign on the bits (Triton's unary minus is 0 - x, which loses -0; quant.py keeps it: code 8)
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


# pi/2 = A + B + C: A and B with 12 significant bits (A = 3217 / 2^11, B = -2391 / 2^29), C to fp32. With the
# quadrant index j split as jh * 2^11 + jl (|jh|, |jl| <= 2^10), every product with A or B is exact in fp32 and
# every subtraction but the last two is exact too, so the reduced angle is within ~1 ulp for all |x| < 2^21 (any
# RoPE angle) with or without FMA contraction.
HALF_PI_A: tl.constexpr = tl.constexpr(1.57080078125)
HALF_PI_B: tl.constexpr = tl.constexpr(-4.453584551811218e-06)
HALF_PI_C: tl.constexpr = tl.constexpr(-8.705515752716053e-10)


@triton.jit
def sincos(x):
    """(sin x, cos x) in fp32 for |x| < 2^21, a few ulp: exact Cody-Waite quadrant reduction, then Cephes' sinf /
    cosf polynomials on [-pi/4, pi/4]. Replaces tl.sin / tl.cos, whose libdevice large-argument path uses fp64."""
    j = (x * 0.6366197466850281 + 12582912.0) - 12582912.0        # nearest integer to x * 2/pi (1.5 * 2^23 trick)
    jh = (j * 0.00048828125 + 12582912.0) - 12582912.0
    jl = j - jh * 2048.0
    r = x - jh * (2048.0 * HALF_PI_A)
    r = r - jl * HALF_PI_A
    r = r - jh * (2048.0 * HALF_PI_B)
    r = r - jl * HALF_PI_B
    r = r - j * HALF_PI_C
    r2 = r * r
    s = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    c = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3 + r2 * 2.443315711809948e-5))
    quadrant = j.to(tl.int32) & 3
    sin = tl.where(quadrant == 0, s, tl.where(quadrant == 1, c, tl.where(quadrant == 2, -s, -c)))
    cos = tl.where(quadrant == 0, c, tl.where(quadrant == 1, -s, tl.where(quadrant == 2, -c, s)))
    return sin, cos


@triton.jit
def exp2_int(e):
    """2^e for int32 e as fp32 (0 below 2^-126)."""
    return tl.where(e > -127, ((e + 127).to(tl.int32) << 23).to(tl.float32, bitcast=True), 0.0)

"""Bit-exact reference quantizers for DeepSeek-V4's number formats (spec §4, §5.3, §6.2, §7.3).

Formats:
- e4m3 (`float8_e4m3fn`): 1-4-3, bias 7, max 448, no inf. Round-to-nearest-even, saturating to ±448.
- e2m1 (FP4): 1-2-1, values {0, .5, 1, 1.5, 2, 3, 4, 6}; code = sign << 3 | grid index. Round-to-nearest-even
  (ties go to the even mantissa: 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4), saturating to ±6.
- UE8M0 (`float8_e8m0fnu`): a bare power of two, byte b means 2^(b - 127).

Scale choice (official `kernel.py` `fast_round_scale`): s = 2^ceil(log2(amax * fl32(1/fmt_max))), where the
product is one fp32 multiply and ceil(log2) is read off the fp32 bits (exponent, +1 if any mantissa bit is set).
amax is floored first: 1e-4 for FP8, 6·2^-126 for FP4. Every scale is therefore a power of two, and
value / scale is exact, so quantize -> dequantize is exactly `round(x / s) * s`.

All functions are pure PyTorch and run anywhere; they are the oracles of the CUDA kernels.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP4_MAX = 6.0
FP8_AMAX_FLOOR = 1e-4
FP4_AMAX_FLOOR = 6 * 2.0 ** -126
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

ACT_BLOCK = 128      # per-token activation quantization before FP8/FP4 linears
WEIGHT_BLOCK = 128   # FP8 weights: one scale per 128x128 tile
KV_BLOCK = 64        # FP8 KV entries: one scale per 64 of the 448 non-rope dims
FP4_BLOCK = 32       # FP4 expert weights (1x32) and MXFP4 indexer q/k


# ----------------------------------------------------------------------------------------------- element codecs
def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest e4m3 value (ties to even), saturated to ±448; returned as fp32 values."""
    x = x.float()
    a = x.abs().clamp(max=FP8_MAX)
    # Normal numbers: 3 mantissa bits => step 2^(e-3); subnormals (a < 2^-6): step 2^-9.
    e = torch.floor(torch.log2(a.clamp(min=2.0 ** -6)))
    e = torch.where(torch.exp2(e) > a, e - 1, e).clamp(min=-6)   # guard log2 rounding at exact powers of two
    e = torch.where(torch.exp2(e + 1) <= a, e + 1, e)
    step = torch.exp2(e - 3)
    q = torch.round(a / step) * step          # torch.round is round-half-to-even; a / step is exact
    return torch.copysign(q.clamp(max=FP8_MAX), x)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest e2m1 value (ties to even), saturated to ±6; returned as fp32 values."""
    x = x.float()
    a = x.abs().clamp(max=FP4_MAX)
    # Steps: 0.5 below 2 (subnormals 0, .5 and normals 1, 1.5), 1 in [2, 4), 2 in [4, 6].
    step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
    q = torch.round(a / step) * step
    return torch.copysign(q.clamp(max=FP4_MAX), x)


def e4m3_codes(values: torch.Tensor) -> torch.Tensor:
    """e4m3-representable fp32 values -> their bytes (uint8)."""
    return values.to(torch.float8_e4m3fn).view(torch.uint8)


def e4m3_values(codes: torch.Tensor) -> torch.Tensor:
    """bytes (uint8) -> fp32 values."""
    return codes.view(torch.float8_e4m3fn).float()


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """e2m1-representable fp32 values -> 4-bit codes (uint8, 0..15): sign << 3 | grid index."""
    a = values.abs()
    grid = torch.tensor(E2M1_GRID, dtype=a.dtype, device=a.device)
    index = (a.unsqueeze(-1) == grid).to(torch.uint8).argmax(dim=-1).to(torch.uint8)
    sign = torch.signbit(values).to(torch.uint8) << 3   # -0 keeps its sign bit (code 8), as PTX cvt does
    return sign | index


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (any integer dtype, 0..15) -> fp32 values."""
    table = torch.tensor(E2M1_GRID + tuple(-v for v in E2M1_GRID), dtype=torch.float32, device=codes.device)
    return table[codes.long() & 0xF]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2n] codes -> [..., n] int8 bytes; element 2k in the low nibble, 2k+1 in the high nibble."""
    c = codes.to(torch.uint8)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).view(torch.int8)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] int8/uint8 bytes -> [..., 2n] uint8 codes (low nibble first)."""
    b = packed.view(torch.uint8)
    return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)


SPLIT_SPAN = 64       # columns per span of the split nibble order


def split_fp4_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Checkpoint FP4 bytes [..., K/2] -> the same codes in split nibble order (the fast MoE kernels' layout): in
    each span of 64 columns, byte j holds column j in its low nibble and column 32 + j in its high nibble, so each
    nibble plane is 32 consecutive columns (one FP4 scale group). Same bytes count, same scales; K % 64 == 0."""
    codes = unpack_fp4(packed)
    if codes.shape[-1] % SPLIT_SPAN:
        raise ValueError(f"split nibble order needs a multiple of {SPLIT_SPAN} columns, got {codes.shape[-1]}")
    spans = codes.unflatten(-1, (-1, SPLIT_SPAN))
    half = SPLIT_SPAN // 2
    return (spans[..., :half] | (spans[..., half:] << 4)).flatten(-2).view(torch.int8)


def merge_fp4_nibbles(split: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_fp4_nibbles`: split-order bytes -> checkpoint order (element 2k low, 2k+1 high)."""
    b = split.view(torch.uint8).unflatten(-1, (-1, SPLIT_SPAN // 2))
    return pack_fp4(torch.cat((b & 0xF, b >> 4), dim=-1).flatten(-2))


# ----------------------------------------------------------------------------------------------- UE8M0 scales
def ue8m0_scale(amax: torch.Tensor, fmt_max: float, amax_floor: float) -> torch.Tensor:
    """Power-of-two scale 2^ceil(log2(max(amax, floor) * fl32(1/fmt_max))), computed on fp32 bits as the kernels do."""
    inv = torch.tensor(1.0 / fmt_max, dtype=torch.float32)
    y = amax.float().clamp(min=amax_floor) * inv
    bits = y.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return ((exponent + 127) << 23).view(torch.float32)


def ue8m0_codes(scales: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales -> UE8M0 bytes (uint8): the fp32 exponent field."""
    return ((scales.float().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


def ue8m0_values(codes: torch.Tensor) -> torch.Tensor:
    """UE8M0 bytes (uint8 or float8_e8m0fnu) -> fp32 scales 2^(b - 127)."""
    if codes.dtype == torch.float8_e8m0fnu:
        codes = codes.view(torch.uint8)
    return (codes.to(torch.int32) << 23).view(torch.float32)


# ----------------------------------------------------------------------------------------------- block quantizers
def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the block size {block}")
    return x.float().unflatten(-1, (-1, block))


def quantize_fp8_blocks(x: torch.Tensor, block: int = ACT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row blocks along the last dim -> (e4m3 values as fp32 [..., K], fp32 pow2 scales [..., K/block])."""
    xb = _blocks(x, block)
    scale = ue8m0_scale(xb.abs().amax(-1), FP8_MAX, FP8_AMAX_FLOOR)
    q = round_e4m3((xb / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX))
    return q.flatten(-2), scale


def quantize_fp4_blocks(x: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row blocks along the last dim -> (e2m1 values as fp32 [..., K], fp32 pow2 scales [..., K/block])."""
    xb = _blocks(x, block)
    scale = ue8m0_scale(xb.abs().amax(-1), FP4_MAX, FP4_AMAX_FLOOR)
    q = round_e2m1((xb / scale.unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX))
    return q.flatten(-2), scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of the block quantizers: q [..., K] * scale [..., K/block] broadcast per block."""
    block = q.shape[-1] // scale.shape[-1]
    return (q.float().unflatten(-1, (-1, block)) * scale.float().unsqueeze(-1)).flatten(-2)


def fake_quant_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """Quantize -> dequantize in place of the official in-place `act_quant(..., inplace=True)`; keeps x's dtype."""
    return dequantize_blocks(*quantize_fp8_blocks(x, block)).to(x.dtype)


def fake_quant_fp4(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """Quantize -> dequantize, as the official in-place `fp4_act_quant(..., inplace=True)`; keeps x's dtype."""
    return dequantize_blocks(*quantize_fp4_blocks(x, block)).to(x.dtype)


def fake_quant_kv(kv: torch.Tensor, rope_dim: int) -> torch.Tensor:
    """The FP8 KV simulation: non-rope dims quantized in 64-blocks, rope dims untouched (spec §6.2)."""
    nope = fake_quant_fp8(kv[..., :-rope_dim], KV_BLOCK)
    return torch.cat([nope, kv[..., -rope_dim:]], dim=-1)


# ----------------------------------------------------------------------------------------------- weights
def quantize_weight_fp8(w: torch.Tensor, block: int = WEIGHT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] fp32 -> (float8_e4m3fn [N, K], float8_e8m0fnu [ceil(N/128), ceil(K/128)]), as in official checkpoints."""
    n, k = w.shape
    nb, kb = -(-n // block), -(-k // block)
    padded = torch.zeros(nb * block, kb * block, dtype=torch.float32, device=w.device)
    padded[:n, :k] = w.float()
    tiles = padded.view(nb, block, kb, block)
    scale = ue8m0_scale(tiles.abs().amax(dim=(1, 3)), FP8_MAX, FP8_AMAX_FLOOR)          # [nb, kb]
    q = round_e4m3((tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)).view(nb * block, kb * block)
    return q[:n, :k].to(torch.float8_e4m3fn), ue8m0_codes(scale).view(torch.float8_e8m0fnu)


def dequantize_weight_fp8(w: torch.Tensor, scale: torch.Tensor, block: int = WEIGHT_BLOCK) -> torch.Tensor:
    """Official FP8 weight layout -> fp32: W[r, c] = e4m3(Wq[r, c]) * scale[r // 128, c // 128]."""
    s = ue8m0_values(scale) if scale.dtype in (torch.float8_e8m0fnu, torch.uint8) else scale.float()
    n, k = w.shape
    s = s.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return w.float() * s


def quantize_weight_fp4(w: torch.Tensor, block: int = FP4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] fp32 -> (int8 packed [N, K/2], float8_e8m0fnu [N, K/32]), the official FP4 expert layout."""
    q, scale = quantize_fp4_blocks(w, block)
    return pack_fp4(e2m1_codes(q)), ue8m0_codes(scale).view(torch.float8_e8m0fnu)


def dequantize_weight_fp4(packed: torch.Tensor, scale: torch.Tensor, block: int = FP4_BLOCK,
                          split: bool = False) -> torch.Tensor:
    """Official FP4 expert layout -> fp32: W[r, c] = e2m1(nibble) * scale[r, c // 32]. split: the bytes are in
    split nibble order (`split_fp4_nibbles`)."""
    values = e2m1_values(unpack_fp4(merge_fp4_nibbles(packed) if split else packed))
    s = ue8m0_values(scale) if scale.dtype in (torch.float8_e8m0fnu, torch.uint8) else scale.float()
    if s.shape[-1] * block != values.shape[-1]:
        raise ValueError(f"FP4 scale shape {tuple(scale.shape)} does not give one scale per {block} of "
                         f"{values.shape[-1]} columns")
    return dequantize_blocks(values, s)


# ----------------------------------------------------------------------------------------------- Hadamard
def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester (natural-order) Walsh-Hadamard matrix H_n, entries ±1; n a power of two."""
    if n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """y = H x / sqrt(n) over the last dim (the indexer's `rotate_activation`), accumulated in fp64; keeps x's dtype."""
    n = x.shape[-1]
    y = x.double() @ hadamard_matrix(n).to(x.device).T * n ** -0.5
    return y.float().to(x.dtype)

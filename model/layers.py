"""Building blocks: quantization-aware linear layers, RMSNorm, and the two RoPE variants (spec §2.6, §3.2, §5.3).

Parameters are registered under the checkpoint's names (`weight`, `scale`) in the checkpoint's dtypes, so a
state dict of this model *is* an official checkpoint shard. The math is the numerics' (`Numerics.linear`,
`Numerics.math`); the reference's fp32 compute copy of a quantized weight is derived once, lazily, and never
saved (the fast numerics read the stored formats instead).
"""

from __future__ import annotations

import enum
import math
from functools import lru_cache

import torch
from torch import nn

from dsv4.kernels import quant
from dsv4.kernels.ref_math import apply_rope
from dsv4.model.config import ModelConfig
from dsv4.model.numerics import Numerics


class WeightFormat(str, enum.Enum):
    FP8 = "fp8"    # float8_e4m3fn weight + float8_e8m0fnu scale per 128x128 tile
    FP4 = "fp4"    # int8 (2 x e2m1, low nibble first) weight + float8_e8m0fnu scale per 1x32
    BF16 = "bf16"  # stored bf16; the official model uses some of these in fp32 (compressor, router, head)

    @property
    def is_quantized(self) -> bool:
        return self is not WeightFormat.BF16


class Linear(nn.Module):
    """y = x W^T, with W stored as in the checkpoint.

    compute: "quantized" linears (FP8/FP4 weights) quantize x per 128 to FP8 (reference and fast numerics), as the
    official `linear()` does before `fp8_gemm`/`fp4_gemm`; "bf16" linears round x and W to bf16 (the official bf16
    `F.linear`); "fp32" linears compute in fp32 (compressor projections). The result is fp32 or already in the
    activation dtype (the numerics decide); the caller rounds to the dtype the reference produces.
    """

    def __init__(self, in_features: int, out_features: int, fmt: WeightFormat, compute: str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.compute = compute or ("quantized" if fmt.is_quantized else "bf16")
        if fmt is WeightFormat.FP8:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn))
            self.register_buffer("scale", torch.empty(-(-out_features // 128), -(-in_features // 128),
                                                      dtype=torch.float8_e8m0fnu))
        elif fmt is WeightFormat.FP4:
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.int8))
            self.register_buffer("scale", torch.empty(out_features, in_features // quant.FP4_BLOCK,
                                                      dtype=torch.float8_e8m0fnu))
        else:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.bfloat16))
        self._dense: torch.Tensor | None = None
        self.split_nibbles = False      # FP4 bytes in the fast MoE kernels' order (`quant.split_fp4_nibbles`)

    def dense_weight(self) -> torch.Tensor:
        """The weight as fp32 [out, in], dequantized exactly (every scale is a power of two)."""
        if self._dense is None or self._dense.device != self.weight.device:
            if self.fmt is WeightFormat.FP8:
                self._dense = quant.dequantize_weight_fp8(self.weight, self.scale)
            elif self.fmt is WeightFormat.FP4:
                self._dense = quant.dequantize_weight_fp4(self.weight, self.scale, split=self.split_nibbles)
            else:
                self._dense = self.weight.float()
        return self._dense

    def forward(self, x: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        return numerics.linear(self, x)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.fmt.value}, compute={self.compute}"


class RMSNorm(nn.Module):
    """y = act(w * x * rsqrt(mean(x^2) + eps)), computed in fp32 with the weight upcast (spec §2.6)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(dim, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        return numerics.math.rms_norm(x, self.weight, self.eps)


# ---------------------------------------------------------------------------------------------- RoPE
@lru_cache(maxsize=8)
def rope_inv_freq(rope_dim: int, base: float, yarn: tuple[float, int, float, float] | None) -> torch.Tensor:
    """Per-pair angular frequencies θ_i (fp32 [rope_dim/2]); YaRN-blended when `yarn` = (factor, orig_len, β_fast,
    β_slow) is given. Mirrors the official `precompute_freqs_cis` (no attention/mscale factor)."""
    # Explicit CPU: modules may be built under a meta-device context, and this result is cached.
    freqs = 1.0 / (base ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device="cpu") / rope_dim))
    if yarn is None:
        return freqs
    factor, original_len, beta_fast, beta_slow = yarn

    def correction_dim(num_rotations: float) -> float:
        return rope_dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    return freqs / factor * (1 - smooth) + freqs * smooth


def rope_for_layer(config: ModelConfig, compress_ratio: int) -> torch.Tensor:
    """Sliding-window-only layers (and MTP) use plain RoPE at rope_theta; compressor layers YaRN at
    compress_rope_theta, for queries, window keys, compressed keys and the indexer alike."""
    if compress_ratio == 0 or config.rope_scaling is None:
        base = config.rope_theta if compress_ratio == 0 else config.compress_rope_theta
        return rope_inv_freq(config.qk_rope_head_dim, float(base), None)
    rs = config.rope_scaling
    return rope_inv_freq(config.qk_rope_head_dim, float(config.compress_rope_theta),
                         (float(rs.factor), int(rs.original_max_position_embeddings), float(rs.beta_fast),
                          float(rs.beta_slow)))


__all__ = ["Linear", "RMSNorm", "WeightFormat", "apply_rope", "rope_for_layer", "rope_inv_freq"]

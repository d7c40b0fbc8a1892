"""Linears of the fast numerics (spec §5.3): FP8 block-scaled weights as stored in the checkpoint, fp32 accumulation.

Formats (`dsv4.kernels.quant`): W float8_e4m3fn [N, K] with one UE8M0 scale (float8_e8m0fnu) per 128x128 tile,
scale [ceil(N/128), K/128]; activations quantized per token per 128 of K to e4m3 with the power-of-two scale
s = 2^ceil(log2(max(amax, 1e-4) / 448)) (`act_quant_fp8`, bit-exact with `quant.quantize_fp8_blocks`).

Math of `fp8_linear` (the reference `Linear` in reference numerics): y = bf16(fake_quant_fp8(x) @ dequant(W)^T).
Both factors are e4m3 values times powers of two, so every product is exact: the kernels compute
y = bf16( sum over 128-blocks b of (x_q[:, b] . W_q[:, b]) * s_x[:, b] * s_w[:, b] ), each block's dot on tensor
cores (e4m3 x e4m3, or both widened exactly to bf16) from a zero accumulator, promoted into an fp32 accumulator
with the scales. Only the summation order differs from the reference's float64 sums: relative error ~1e-6 of the
fp32 result for the bf16 MMA (fp32 accumulation), up to ~1e-4 for Hopper's FP8 MMA (~14-bit accumulation inside
one 128-deep block), both far below the bf16 output rounding (2^-9).

Paths by M (tokens): M <= 64 a swap-AB Triton kernel (weight rows on the MMA's M side, tokens on N) with the
activation quantization fused into the operand load and split-K when N alone gives too few programs; larger M
quantizes the activation once and runs the same kernel with 128x128 tiles; M >= `prefill_threshold` (and N a
multiple of 128) cuBLAS's blockwise FP8 `scaled_mm` (1x128 activation scales, 128x128 weight scales, fp32). CPU
tensors run PyTorch twins of the same block structure in fp32 (no float64). M = 0 gives an empty result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.kernels import quant

QBLOCK = 128
PREFILL_THRESHOLD = 512      # M from which fp8_linear uses cuBLAS's blockwise FP8 GEMM (when eligible)


# ---------------------------------------------------------------------------------------------- prepared weights
@dataclass(frozen=True)
class Fp8Weight:
    """An FP8 linear's weight in its checkpoint format plus what cuBLAS needs, derived once (`prepare_fp8`).

    weight: float8_e4m3fn [N, K]; scale: float8_e8m0fnu [ceil(N/128), K/128] (the checkpoint's tensors, not
    copies); mm_scale: fp32 [N/128, round_up(K/128, 4)], the scales as cuBLAS's 128x128 blockwise recipe reads
    them (`mm_scale.t()` is scale_b of mat_b = W^T), or None (not CUDA, or N not a multiple of 128);
    semaphores: the Triton kernel's split-K arrival counters for this weight (CUDA; zero between launches)."""
    weight: torch.Tensor
    scale: torch.Tensor
    mm_scale: torch.Tensor | None = None
    semaphores: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]


def prepare_fp8(weight: torch.Tensor, scale: torch.Tensor) -> Fp8Weight:
    """Checks the pair's shapes and derives the fp32 cuBLAS scale layout (a few KB) for CUDA weights. fp32
    power-of-two scales (as -Base checkpoints store them) are re-encoded as UE8M0 bytes (exact)."""
    scale = e8m0_scale(scale)
    n, k = weight.shape
    if weight.dtype != torch.float8_e4m3fn or k % QBLOCK:
        raise ValueError(f"FP8 weight must be float8_e4m3fn [N, K] with K % 128 == 0, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if tuple(scale.shape) != (-(-n // QBLOCK), k // QBLOCK) or scale.dtype not in (torch.float8_e8m0fnu,
                                                                                    torch.uint8):
        raise ValueError(f"FP8 scale must be e8m0 [{-(-n // QBLOCK)}, {k // QBLOCK}], got {scale.dtype} "
                         f"{tuple(scale.shape)}")
    if not weight.is_cuda:
        return Fp8Weight(weight, scale)
    return Fp8Weight(weight, scale, _mm_scale(scale) if n % QBLOCK == 0 else None,
                     split_k_semaphores(weight.device))


def split_k_semaphores(device: torch.device) -> torch.Tensor:
    """One weight's split-K arrival counters for the Triton GEMMs (int32 zeros, left at zero by every launch)."""
    from dsv4.kernels.fast import _linear_triton

    return _linear_triton.semaphores_for(device)


def e8m0_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales as float8_e8m0fnu: as stored, or fp32 powers of two re-encoded exactly."""
    if scale.dtype == torch.float32:
        return quant.ue8m0_codes(scale).view(torch.float8_e8m0fnu)
    return scale


def _mm_scale(scale: torch.Tensor) -> torch.Tensor:
    nb, kb = scale.shape
    padded = torch.ones(nb, -(-kb // 4) * 4, dtype=torch.float32, device=scale.device)
    padded[:, :kb] = quant.ue8m0_values(scale)
    return padded


def _as_weight(weight: torch.Tensor | Fp8Weight, scale: torch.Tensor | None) -> Fp8Weight:
    if isinstance(weight, Fp8Weight):
        return weight
    if scale is None:
        raise ValueError("fp8_linear needs the scale with a raw weight tensor (or an Fp8Weight)")
    return Fp8Weight(weight, e8m0_scale(scale))   # raw pair: cuBLAS scales are made per call if that path runs


# ---------------------------------------------------------------------------------------------- public API
def act_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16 (K % 128 == 0) -> (q float8_e4m3fn [M, K], s fp32 [M, K/128]) with x ≈ q * s per 128-block:
    bit-exact with `quant.quantize_fp8_blocks(x, 128)` (values and scales)."""
    if x.is_cuda:
        from dsv4.kernels.fast import _linear_triton

        return _linear_triton.act_quant_fp8(x.contiguous())
    q, s = quant.quantize_fp8_blocks(x.float(), QBLOCK)
    return q.to(torch.float8_e4m3fn), s


def fp8_linear(x: torch.Tensor, weight: torch.Tensor | Fp8Weight, scale: torch.Tensor | None = None,
               quant_act: bool = True, *, out_dtype: torch.dtype = torch.bfloat16,
               prefill_threshold: int = PREFILL_THRESHOLD, use_cublas: bool = True, mma_fp8: bool = True,
               acc_depth: int | None = None) -> torch.Tensor:
    """y = x W^T for an FP8 weight: x [..., K] bf16, weight float8_e4m3fn [N, K] + scale e8m0 [ceil(N/128), K/128]
    (or an `Fp8Weight`) -> [..., N] out_dtype (bf16; fp32 for callers that round later).

    quant_act: x is fake-quantized to FP8 per 128 first (the reference); False = W8A16, x used as is. fp32
    accumulation; see the module docstring for paths and error. prefill_threshold / use_cublas select the
    large-M path: M >= prefill_threshold uses cuBLAS (quant_act, bf16 output, N % 128 == 0) when use_cublas.
    mma_fp8 False: the Triton path widens both e4m3 operands to bf16 (exact) for a bf16 MMA, whose fp32
    accumulation is closer to the reference's exact sums than Hopper's FP8 MMA (~14 bits inside each 128-block).
    acc_depth: the Triton path's FP8 MMA promotion depth (`_linear_triton.fp8_gemm`; None: 32 at decode sizes)."""
    w = _as_weight(weight, scale)
    n, k = w.weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {k}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0:
        return x.new_empty(*lead, n, dtype=out_dtype)
    if not x2.is_cuda:
        return _twin_fp8_linear(x2, w.weight, w.scale, quant_act, out_dtype).view(*lead, n)
    x2 = x2.to(torch.bfloat16).contiguous()
    if use_cublas and quant_act and x2.shape[0] >= prefill_threshold and _cublas_eligible(w, out_dtype):
        return _cublas_fp8_linear(x2, w).view(*lead, n)
    from dsv4.kernels.fast import _linear_triton

    return _linear_triton.fp8_gemm(x2, w.weight, w.scale, 1, quant_act, out_dtype, mma_fp8=mma_fp8,
                                   acc_depth=acc_depth, semaphores=w.semaphores).view(*lead, n)


def grouped_fp8_linear(x: torch.Tensor, weight: torch.Tensor | Fp8Weight, scale: torch.Tensor | None = None,
                       quant_act: bool = False, *, out_dtype: torch.dtype = torch.bfloat16,
                       prefill_threshold: int = PREFILL_THRESHOLD, use_cublas: bool = True) -> torch.Tensor:
    """V4's wo_a: x [M, G, K] bf16, weight float8_e4m3fn [G*R, K], scale e8m0 [ceil(G*R/128), K/128] ->
    [M, G, R] out_dtype with y[:, g] = x[:, g] @ W[g*R:(g+1)*R]^T (R need not be a multiple of 128).

    quant_act False is the reference (the official code dequantizes wo_a to bf16 and runs an einsum): exact
    products of bf16 x and the bf16-exact dequantized weight, fp32 accumulation, bf16 output. The weight stays FP8
    in memory; for M >= prefill_threshold (use_cublas, quant_act False) one transient bf16 copy of W is made per
    call (G*R*K*2 bytes, 64 MiB for Flash) for cuBLAS's batched bf16 GEMM, which outruns the Triton bf16 path."""
    prepared = _as_weight(weight, scale)
    weight, scale = prepared.weight, prepared.scale
    m, g, k = x.shape
    rows = weight.shape[0]
    if rows % g or weight.shape[1] != k:
        raise ValueError(f"grouped weight {tuple(weight.shape)} does not fit x {tuple(x.shape)}")
    r = rows // g
    if m == 0:
        return x.new_empty(0, g, r, dtype=out_dtype)
    if not x.is_cuda:
        return torch.stack([_twin_fp8_linear(x[:, i], weight[i * r:(i + 1) * r], _group_scale(scale, i, r),
                                             quant_act, out_dtype) for i in range(g)], dim=1)
    x = x.to(torch.bfloat16).contiguous()
    from dsv4.kernels.fast import _linear_triton

    if use_cublas and not quant_act and m >= prefill_threshold and out_dtype == torch.bfloat16:
        w16 = _linear_triton.dequant_fp8(weight, scale).view(g, r, k)
        out = torch.empty(m, g, r, dtype=out_dtype, device=x.device)
        torch.bmm(x.transpose(0, 1), w16.transpose(1, 2), out=out.transpose(0, 1))
        return out
    return _linear_triton.fp8_gemm(x.view(m, g * k), weight, scale, g, quant_act, out_dtype,
                                   semaphores=prepared.semaphores).view(m, g, r)


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] bf16 @ w [N, K] bf16 ^T -> [..., N] bf16 (exact products, fp32 accumulation: cuBLAS on CUDA)."""
    if x.is_cuda:
        return torch.nn.functional.linear(x.to(torch.bfloat16), w)
    return (x.float() @ w.float().t()).to(torch.bfloat16)


def fp32_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] bf16 @ w [N, K] bf16 ^T -> [..., N] fp32 (bf16 products are exact in fp32; fp32 accumulation).
    cuBLAS on CUDA: at decode sizes its split-K GEMM + reduce beat the swap-AB Triton kernel on bf16 weights
    (H200, 1024 x 4096 at M = 1: 6.1 vs 7.4 us; at M = 64: 6.9 vs 26.9 us, `benchmarks/results/fast-linear-*`)."""
    if not x.is_cuda:
        return x.float() @ w.float().t()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if w.dtype == torch.bfloat16:
        try:            # torch >= 2.9: bf16 operands, fp32 output straight from cuBLAS
            return torch.mm(x2, w.t(), out_dtype=torch.float32).view(*lead, w.shape[0])
        except (TypeError, RuntimeError):
            pass
    return (x2.float() @ w.float().t()).view(*lead, w.shape[0])


# ---------------------------------------------------------------------------------------------- cuBLAS path
def _cublas_eligible(w: Fp8Weight, out_dtype: torch.dtype) -> bool:
    """cuBLASLt's blockwise FP8 takes N % 128 == 0 and K / 128 a multiple of 4 (its 128x128 scale rows are
    padded to 4; with K = 256 it answered CUBLAS_STATUS_NOT_SUPPORTED on the H200); the Triton path takes the rest."""
    return (out_dtype == torch.bfloat16 and w.out_features % QBLOCK == 0
            and (w.in_features // QBLOCK) % 4 == 0)


def _cublas_fp8_linear(x: torch.Tensor, w: Fp8Weight) -> torch.Tensor:
    """cuBLASLt blockwise FP8: scale_a fp32 [M, K/128] stored K-block-major, scale_b = mm_scale^T (torch's own
    BlockWise1x128 x BlockWise128x128 sample layout)."""
    from dsv4.kernels.fast import _linear_triton

    m, k = x.shape
    # The K-block-major scales' leading dimension must be 16-byte aligned (M % 4 == 0; M = 381 answered
    # CUBLAS_STATUS_NOT_SUPPORTED on the H200): pad M with zero rows of unit scale and drop their outputs.
    mp = -(-m // 4) * 4
    q = torch.empty(mp, k, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(k // QBLOCK, mp, dtype=torch.float32, device=x.device).t()
    if mp != m:
        q[m:].zero_()
        s[m:].fill_(1.0)
    _linear_triton.act_quant_fp8(x, q[:m], s[:m])
    mm_scale = w.mm_scale if w.mm_scale is not None else _mm_scale(w.scale)
    functional = torch.nn.functional
    if hasattr(functional, "scaled_mm"):
        y = functional.scaled_mm(q, w.weight.t(), s, functional.ScalingType.BlockWise1x128, mm_scale.t(),
                                 functional.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
    else:
        y = torch._scaled_mm(q, w.weight.t(), s, mm_scale.t(), out_dtype=torch.bfloat16)
    return y[:m]


# ---------------------------------------------------------------------------------------------- CPU twins
def _group_scale(scale: torch.Tensor, group: int, rows: int) -> torch.Tensor:
    """The scale rows of weight rows group*rows .. (group+1)*rows - 1, one per weight row (R may be < 128)."""
    idx = (torch.arange(rows, device=scale.device) + group * rows) // QBLOCK
    return scale.view(torch.uint8)[idx]


def _twin_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, quant_act: bool,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """The kernels' block structure in fp32: per 128-block of K, exact e4m3 (or bf16) products summed by an fp32
    GEMM, times s_x * s_w, accumulated in fp32. scale: [ceil(N/128), K/128] or one row per weight row [N, K/128]."""
    m, k = x.shape
    n = weight.shape[0]
    num_kb = k // QBLOCK
    sw = quant.ue8m0_values(scale.view(torch.uint8))
    if sw.shape[0] != n:
        sw = sw[torch.arange(n, device=sw.device) // QBLOCK]                 # [N, K/128]
    if quant_act:
        xv, sx = quant.quantize_fp8_blocks(x.float(), QBLOCK)                # e4m3 values, pow2 scales [M, K/128]
    else:
        xv, sx = x.to(torch.bfloat16).float(), torch.ones(m, num_kb, device=x.device)
    wv = weight.float()
    acc = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    for kb in range(num_kb):
        cols = slice(kb * QBLOCK, (kb + 1) * QBLOCK)
        acc += (xv[:, cols] @ wv[:, cols].t()) * sx[:, kb, None] * sw[None, :, kb]
    return acc.to(out_dtype)

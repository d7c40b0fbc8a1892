"""The decode path of `dsv4.kernels.fast.moe` on FP4 experts: CUDA grouped GEMMs over expert blocks of 8 or 16 rows
(kernels/csrc/moe_decode.cu; the math is documented in `moe`, the kernel designs in the source).

Pipeline: the Triton dispatch (`_moe_triton.dispatch`, blocks of `block_m` rows), x quantized once to FP8 per 128,
GEMM 1 (w13 with the clamped SwiGLU and the routing weight) -> h bf16 [block rows, I], GEMM 2 (h quantized per 128
as each CTA stages it, exactly as `act_quant_fp8`) -> y bf16 [P, D] in pair order, zero rows for off-rank pairs.
Every launch's grid follows from (P, E, block_m) and the weight shapes: graph-capturable, no host sync.

Kernels: "wgmma" (warpgroup MMAs, A = the FP4 weights unpacked to e4m3 in registers, the weights prefetched into
registers one step ahead), "wgmma-ring" (the same with a 6-stage cp.async ring in shared memory: more bytes in
flight per thread, fewer CTAs per SM), "mma" (mma.sync e4m3, 8-row blocks only).
"""

from __future__ import annotations

import torch

from dsv4.kernels.fast._linear_triton import act_quant_fp8
from dsv4.kernels.fast._moe_triton import dispatch

KERNELS = {"wgmma": (True, 0), "wgmma-ring": (True, 6), "mma": (False, 0)}   # name -> (wgmma, ring stages)
BLOCK_MS = {"wgmma": (8, 16), "wgmma-ring": (8, 16), "mma": (8,)}         # rows per expert block, per kernel
K_MULTIPLE = 1024              # K columns per two pipeline steps of the mma kernel (the wgmma kernels need 512)


def supports(experts, block_m: int, kernel: str = "wgmma") -> bool:
    """FP4 experts whose widths fit the kernels' steps (D and I multiples of 1024) and a block size the kernel is
    built for."""
    return (experts.fmt == "fp4" and block_m in BLOCK_MS[kernel] and experts.hidden_size % K_MULTIPLE == 0
            and experts.inter_size % K_MULTIPLE == 0)


def expert_forward(x: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor, pair_weight: torch.Tensor,
                   experts, swiglu_limit: float, block_m: int, kernel: str = "wgmma") -> torch.Tensor:
    """x [R, D] bf16 contiguous; pair_row int [P]; pair_expert int32 [P]; pair_weight fp32 [P]; FP4 `ExpertWeights`
    (`supports`) -> y bf16 [P, D] in pair order."""
    from dsv4.kernels.build import load

    ext = load()
    wgmma, stages = KERNELS[kernel]
    num_pairs = pair_expert.shape[0]
    y = torch.empty(num_pairs, experts.hidden_size, dtype=torch.bfloat16, device=x.device)
    if num_pairs == 0:
        return y
    sorted_pair, block_bucket, bucket_start, bucket_count = dispatch(pair_expert, experts.num_experts, block_m)
    xq, xs = act_quant_fp8(x)
    h = torch.empty(block_bucket.shape[0] * block_m, experts.inter_size, dtype=torch.bfloat16, device=x.device)
    pair_row = pair_row.to(torch.int32)
    common = (pair_row, pair_weight, sorted_pair, block_bucket, bucket_start, bucket_count)
    limit = float(swiglu_limit)
    w13, s13 = experts.w13.view(torch.uint8), experts.s13.view(torch.uint8)
    w2, s2 = experts.w2.view(torch.uint8), experts.s2.view(torch.uint8)
    ext.moe_decode_gemm(xq, xs, *common, w13, s13, h, block_m, True, limit, wgmma, stages)
    ext.moe_decode_gemm(h, xs, *common, w2, s2, y, block_m, False, limit, wgmma, stages)
    return y

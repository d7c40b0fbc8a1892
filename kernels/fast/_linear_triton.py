"""Triton kernels of `dsv4.kernels.fast.linear` (imported on first use; the math is documented there).

- `act_quant_fp8`: per-token 1x128 FP8 quantization (bit-exact with `quant.quantize_fp8_blocks`).
- `fp8_gemm`: y = sum over 128-blocks of K of (x_q . W_q) * s_x * s_w with fp32 accumulation, for plain and grouped
  (wo_a) FP8 weights. One kernel for every M: the weight tile is the MMA's M side and the tokens its N side
  (swap-AB), so decode batches of 1..64 tokens fill a tensor-core tile with weight rows; split-K when the output
  tiles alone are too few for the SMs: fp32 partials summed in split order (deterministic), by each tile's last
  program to arrive (a self-resetting arrival counter: no reduce launch) for token tiles up to 16, else by
  `_splitk_reduce_kernel`. Decode quantizes the activation tile in registers (fused); larger M quantizes once up
  front (`act_quant_fp8`) and reads FP8.
- `dequant_fp8`: a transient bf16 copy of an FP8 weight (the grouped linear's large-M cuBLAS path).

Launch geometry comes from shapes only and nothing syncs with the host: CUDA-graph capturable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

QBLOCK = 128          # activation quantization block = weight scale block = the K step of every kernel here
QB = tl.constexpr(QBLOCK)   # the same, as kernels see globals
DECODE_MAX_M = 64     # up to this many tokens: activation quantization fused into the GEMM's operand load
DECODE_ACC_DEPTH = 32  # FP8 MMA sums promoted into fp32 every 32 of K at decode sizes (H200: no slower there)
FUSED_REDUCE_MAX_T = 16  # token tiles up to this wide reduce their split-K partials in the GEMM's last program
#                          (at 64 tokens one program summing [64, 64] x splits partials is slower than a launch)


# ---------------------------------------------------------------------------------------------- shared helpers
@triton.jit
def e8m0_to_fp32(b):
    """UE8M0 bytes (uint8) -> fp32 2^(b - 127), as `quant.ue8m0_values` (byte 0 reads as 0.0)."""
    return (b.to(tl.int32) << 23).to(tl.float32, bitcast=True)


@triton.jit
def act_scale(amax):
    """fp32 block amax -> (scale, 1/scale): 2^ceil(log2(max(amax, 1e-4) * fl32(1/448))), read off the fp32 bits as
    `quant.ue8m0_scale` does; both are exact powers of two, so x * (1/scale) is exactly x / scale."""
    y = tl.maximum(amax, 1e-4) * (1.0 / 448.0)
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return (e << 23).to(tl.float32, bitcast=True), ((254 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def to_e4m3(v):
    """fp32 -> e4m3, round to nearest even, saturated to ±448 (the reference clamps before rounding)."""
    return tl.clamp(v, -448.0, 448.0).to(tl.float8e4nv)


@triton.jit
def quant_tile(xf):
    """A [rows, 128] fp32 tile -> (e4m3 [rows, 128], fp32 scale [rows]): one FP8 block per row."""
    scale, inv = act_scale(tl.max(tl.abs(xf), axis=1))
    return to_e4m3(xf * inv[:, None]), scale


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit(do_not_specialize=["M"])
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, M, stride_xm, stride_qm, stride_sm, stride_sk,
                      BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    kb = tl.program_id(1)
    cols = kb * QB + tl.arange(0, QB)
    ok = rows < M
    rows64 = rows.to(tl.int64)
    x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=ok[:, None], other=0.0)
    q, scale = quant_tile(x.to(tl.float32))
    tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q, mask=ok[:, None])
    tl.store(s_ptr + rows64 * stride_sm + kb * stride_sk, scale, mask=ok)


@triton.jit(do_not_specialize=["M"])
def _swap_ab_gemm_kernel(x_ptr, sx_ptr, w_ptr, sw_ptr, out_ptr, part_ptr, sem_ptr,
                         M, R, K, num_n_tiles, kb_per_split, num_splits,
                         stride_xm, stride_xg, stride_sxm, stride_sxk, stride_om,
                         X_FP8: tl.constexpr, QUANT_ACT: tl.constexpr, MMA_FP8: tl.constexpr,
                         ACC_DEPTH: tl.constexpr, FUSED_REDUCE: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_T: tl.constexpr):
    # Program (weight tile of group g, token tile, K split). acc[n, t] = sum_k W[g*R + n, k] x[t, g, k].
    pid_n, pid_t, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    group = pid_n // num_n_tiles
    n_local = (pid_n % num_n_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = n_local < R
    rows = group * R + n_local                                       # weight rows (and output columns)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_ok = tok < M
    tok64 = tok.to(tl.int64)
    num_kb = K // QB
    cols = tl.arange(0, QB)
    w_ptrs = w_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]               # [BN, 128] fp8
    sw_ptrs = sw_ptr + (rows // QB) * num_kb                                  # [BN] e8m0 rows
    x_ptrs = x_ptr + tok64[:, None] * stride_xm + group * stride_xg + cols[None, :]   # [BT, 128]
    sx_ptrs = sx_ptr + tok64 * stride_sxm + group * num_kb * stride_sxk
    kb_lo = pid_k * kb_per_split
    kb_hi = tl.minimum(kb_lo + kb_per_split, num_kb)
    acc = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
    for kb in range(kb_lo, kb_hi):
        w = tl.load(w_ptrs + kb * QB, mask=row_ok[:, None], other=0.0)
        sw = e8m0_to_fp32(tl.load(sw_ptrs + kb, mask=row_ok, other=0))
        if X_FP8:       # pre-quantized activation (large M)
            xq = tl.load(x_ptrs + kb * QB, mask=tok_ok[:, None], other=0.0)
            sx = tl.load(sx_ptrs + kb * stride_sxk, mask=tok_ok, other=0.0)
        elif QUANT_ACT:  # decode: quantize the [BT, 128] activation block in registers
            xq, sx = quant_tile(tl.load(x_ptrs + kb * QB, mask=tok_ok[:, None], other=0.0).to(tl.float32))
        else:           # W8A16: x as is
            xq = tl.load(x_ptrs + kb * QB, mask=tok_ok[:, None], other=0.0)
        # One 128-deep dot per block from a zero accumulator, promoted into fp32 with the scales: e4m3 x e4m3
        # products are exact, and the FP8 MMA's reduced-precision accumulation never spans more than 128 of K
        # (ACC_DEPTH > 0: no more than ACC_DEPTH, the MMA results added in fp32 inside the block).
        if MMA_FP8:
            if ACC_DEPTH > 0:
                part = tl.dot(w, tl.trans(xq), max_num_imprecise_acc=ACC_DEPTH)
            else:
                part = tl.dot(w, tl.trans(xq))
        else:           # e4m3 values are exact in bf16
            part = tl.dot(w.to(tl.bfloat16), tl.trans(xq.to(tl.bfloat16)))
        if QUANT_ACT:   # (the scales applied after the dot: no [BN, BT] scale tile live across it)
            acc += part * sw[:, None] * sx[None, :]
        else:
            acc += part * sw[:, None]
    out_ptrs = out_ptr + tok64[None, :] * stride_om + rows[:, None]
    mask = row_ok[:, None] & tok_ok[None, :]
    if num_splits == 1:     # (Triton specializes an int argument of 1: the split-K code is not compiled)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Split K: fp32 partials [S, M, G*R], summed in split order (deterministic) by `_splitk_reduce_kernel` or,
        # with FUSED_REDUCE, by the tile's last program to finish (a per-tile arrival counter, reset by that
        # program for the next launch or graph replay).
        split_stride = M * stride_om
        part_ptrs = part_ptr + tok64[None, :] * stride_om + rows[:, None]
        tl.store(part_ptrs + pid_k * split_stride, acc, mask=mask)
        if FUSED_REDUCE:
            tl.debug_barrier()                  # every thread's partial stored before the release below
            tile = pid_n * tl.num_programs(1) + pid_t
            arrived = tl.atomic_add(sem_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                total = tl.zeros((BLOCK_N, BLOCK_T), dtype=tl.float32)
                for s0 in range(0, num_splits, 4):      # 4 loads in flight per step, added in split order
                    p0 = _split_partial(part_ptrs, s0, split_stride, num_splits, mask)
                    p1 = _split_partial(part_ptrs, s0 + 1, split_stride, num_splits, mask)
                    p2 = _split_partial(part_ptrs, s0 + 2, split_stride, num_splits, mask)
                    p3 = _split_partial(part_ptrs, s0 + 3, split_stride, num_splits, mask)
                    total = (((total + p0) + p1) + p2) + p3
                tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(sem_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _split_partial(part_ptrs, s, split_stride, num_splits, mask):
    """Split s's fp32 partial tile (zeros past the last split), read from L2 (other programs wrote it)."""
    return tl.load(part_ptrs + s * split_stride, mask=mask & (s < num_splits), other=0.0, cache_modifier=".cg")


@triton.jit
def _splitk_reduce_kernel(part_ptr, out_ptr, numel, num_splits, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(num_splits):      # fixed order: deterministic
        acc += tl.load(part_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _dequant_fp8_kernel(w_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kb = tl.program_id(1)
    cols = kb * QB + tl.arange(0, QB)
    ok = rows < N
    offs = rows.to(tl.int64)[:, None] * K + cols[None, :]
    w = tl.load(w_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
    scale = e8m0_to_fp32(tl.load(s_ptr + (rows // QB) * (K // QB) + kb, mask=ok, other=0))
    tl.store(out_ptr + offs, (w * scale[:, None]).to(tl.bfloat16), mask=ok[:, None])


# ---------------------------------------------------------------------------------------------- launch plans
@functools.lru_cache(maxsize=16)
def num_sms(device: torch.device) -> int:
    """SMs of a CUDA device; a small fixed count under the CPU interpreter (so the tests exercise split-K)."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True, slots=True)
class GemmPlan:
    block_n: int
    block_t: int
    num_splits: int
    kb_per_split: int
    num_warps: int
    num_stages: int


def plan_gemm(m: int, num_groups: int, rows: int, k: int, device: torch.device, num_splits: int | None = None
              ) -> GemmPlan:
    """Tiles from the shapes: decode (M <= 64) 64 weight rows x next_pow2(M) tokens; larger M 128 x 128. Split K
    when the output tiles give fewer than 2 programs per SM, aiming at ~3, bounded so the fp32 partials (L2
    resident at these sizes) stay below the weight's bytes (or 4 MiB)."""
    num_kb = k // QBLOCK
    if m <= DECODE_MAX_M:
        block_n, block_t, warps, stages = 64, max(16, triton.next_power_of_2(m)), 4, 4
    else:
        block_n, block_t, warps, stages = 128, 128, 8, 3
    tiles = num_groups * triton.cdiv(rows, block_n) * triton.cdiv(m, block_t)
    if num_splits is None:
        sms = num_sms(device)
        num_splits = 1
        if tiles < 2 * sms:
            cap = max(1, max(num_groups * rows * k, 1 << 22) // (m * num_groups * rows * 4))
            num_splits = max(1, min(num_kb, triton.cdiv(3 * sms, tiles), cap))
    kb_per_split = triton.cdiv(num_kb, max(1, min(num_splits, num_kb)))
    return GemmPlan(block_n, block_t, triton.cdiv(num_kb, kb_per_split), kb_per_split, warps, stages)


# ---------------------------------------------------------------------------------------------- launchers
def act_quant_fp8(x: torch.Tensor, q: torch.Tensor | None = None, s: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16 (row stride free, unit column stride) -> (q float8_e4m3fn [M, K], s fp32 [M, K/128]).
    q and s may be given (any row / column strides of s, e.g. K-block-major for cuBLAS)."""
    m, k = x.shape
    assert k % QBLOCK == 0 and x.stride(1) == 1, (tuple(x.shape), x.stride())
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device) if q is None else q
    s = torch.empty(m, k // QBLOCK, dtype=torch.float32, device=x.device) if s is None else s
    if m:
        block_m = 16
        _act_quant_kernel[(triton.cdiv(m, block_m), k // QBLOCK)](
            x, q, s, m, x.stride(0), q.stride(0), s.stride(0), s.stride(1), BLOCK_M=block_m, num_warps=4)
    return q, s


def fp8_gemm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, num_groups: int, quant_act: bool,
             out_dtype: torch.dtype, num_splits: int | None = None, mma_fp8: bool = True,
             acc_depth: int | None = None, semaphores: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, G*K] bf16 (group g = columns g*K..(g+1)*K) with weight float8_e4m3fn [G*R, K] and scale
    float8_e8m0fnu/uint8 [ceil(G*R/128), K/128] -> [M, G*R] out_dtype: column g*R + n is x[:, g] . W[g*R + n].

    quant_act: the reference's per-128 FP8 activation quantization (else x enters as bf16, W8A16 on a bf16 MMA).
    mma_fp8: with quant_act, e4m3 x e4m3 tensor-core products (exact; fp32 promotion per 128) instead of both
    operands widened to bf16 (also exact; bf16 MMA). acc_depth (FP8 MMA): 0 = each 128-deep block summed on the
    MMA's own accumulator; 32 = promoted into fp32 every 32 of K (Triton's max_num_imprecise_acc), 2.7x closer to
    the exact sums; None = 32 at decode sizes (as fast there, `DECODE_ACC_DEPTH`), 0 above (where it halves the
    Triton kernel's throughput). num_splits forces the split-K count (tests). semaphores: int32 zeros, one per
    output tile at least (`semaphores_for`), the fused split-K reduce's arrival counters, left at zero by every
    launch (None: allocated for the call)."""
    m, gk = x.shape
    rows, k = weight.shape
    r = rows // num_groups
    assert gk == num_groups * k and k % QBLOCK == 0 and rows == num_groups * r and x.stride(1) == 1 \
        and weight.is_contiguous(), (tuple(x.shape), tuple(weight.shape), num_groups)
    out = torch.empty(m, rows, dtype=out_dtype, device=x.device)
    if m == 0:
        return out
    plan = plan_gemm(m, num_groups, r, k, x.device, num_splits)
    prequant = quant_act and m > DECODE_MAX_M
    if acc_depth is None:
        acc_depth = 0 if prequant else DECODE_ACC_DEPTH
    if prequant:
        xq, sx = act_quant_fp8(x)
        x_arg, sx_arg, stride_xm, stride_sxm, stride_sxk = xq, sx, xq.stride(0), sx.stride(0), sx.stride(1)
    else:
        x_arg, sx_arg, stride_xm, stride_sxm, stride_sxk = x, x, x.stride(0), 0, 0
    num_n_tiles = triton.cdiv(r, plan.block_n)
    grid = (num_groups * num_n_tiles, triton.cdiv(m, plan.block_t), plan.num_splits)
    part, sems = out, out
    fused = plan.block_t <= FUSED_REDUCE_MAX_T and plan.num_splits > 1
    if plan.num_splits > 1:
        part = torch.empty(plan.num_splits, m, rows, dtype=torch.float32, device=x.device)
        if fused:
            sems = semaphores if semaphores is not None and semaphores.numel() >= grid[0] * grid[1] else \
                torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=x.device)
    _swap_ab_gemm_kernel[grid](
        x_arg, sx_arg, weight, scale.view(torch.uint8), out, part, sems, m, r, k, num_n_tiles, plan.kb_per_split,
        plan.num_splits, stride_xm, k, stride_sxm, stride_sxk, rows,
        X_FP8=prequant, QUANT_ACT=quant_act, MMA_FP8=mma_fp8 and quant_act, ACC_DEPTH=acc_depth,
        FUSED_REDUCE=fused, BLOCK_N=plan.block_n, BLOCK_T=plan.block_t, num_warps=plan.num_warps,
        num_stages=plan.num_stages)
    if plan.num_splits > 1 and not fused:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * rows, block),)](part, out, m * rows, plan.num_splits, BLOCK=block,
                                                              num_warps=4)
    return out


def semaphores_for(device: torch.device) -> torch.Tensor:
    """Split-K arrival counters for one weight's launches: int32 zeros, enough for any automatic plan (split-K
    only runs with fewer than 2 output tiles per SM)."""
    return torch.zeros(max(2 * num_sms(device), 256), dtype=torch.int32, device=device)


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn [N, K] with e8m0 [ceil(N/128), K/128] -> bf16 [N, K] (exact: e4m3 * 2^k fits bf16)."""
    n, k = weight.shape
    out = torch.empty(n, k, dtype=torch.bfloat16, device=weight.device)
    block_n = 32
    _dequant_fp8_kernel[(triton.cdiv(n, block_n), k // QBLOCK)](weight, scale.view(torch.uint8), out, n, k,
                                                               BLOCK_N=block_n, num_warps=4)
    return out

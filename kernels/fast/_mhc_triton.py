"""Triton kernels of the fast mHC ops (public API and numerics: `dsv4.kernels.fast.mhc`).

    _mix_partials_kernel   the mixes GEMM fn . x_flat, split over K: grid (token tiles, K splits); each program
                           writes fp32 partial mixes [S, T, M] and partial sums of squares [S, T]. fn is read once
                           per token tile (not per token); x is exactly bf16 and fn is split into three bf16 terms
                           (hi + mid + lo = fn to ~2^-27), so the three bf16 tensor-core dots have exact products
                           and fp32 accumulation: the result is as accurate as an fp32 FMA loop.
    _hc_pre_finish_kernel  grid (T, D blocks), one warp each: sums the partials of its token, rsqrt, sigmoid
                           pre/post, Sinkhorn on 16 scalars (every program of a token recomputes it: cheaper than
                           another launch; scalars, not a 4x4 tile, so no normalisation is a cross-thread
                           reduction), h = bf16(sum_j pre_j x_j) for its D block; the first D block stores post
                           and comb. hc = 4 only (V4's).
    _hc_head_finish_kernel the head's collapse: sigmoid weights + eps, no Sinkhorn.
    _hc_post_kernel        grid (T, D blocks): X'_k = bf16(post_k f + sum_j comb[j, k] X_j) in fp32.
    _hc_post_mix_kernel    hc_post fused with the next site's mixes GEMM: grid (token tiles, D blocks); each
                           program writes its X' tile and the partial mixes of its K columns (all hc streams of
                           its D block) from the bf16 X' it stored, so the next hc_pre needs only its finishing
                           kernel and never re-reads X' for the GEMM.

Launch geometry comes from shapes only (CUDA-graph capturable); nothing reads device values on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_K = 64           # K columns per GEMM step (128 spills registers with the bf16x3 split)
_MAX_BLOCK_T = 64       # tokens per GEMM program
_TARGET_PROGRAMS = 128  # GEMM programs to aim for (about one per SM)
_MIN_CHUNKS = 2         # K steps per GEMM program at least (fewer partials to sum)
_BLOCK_D = 1024         # hidden columns per head-finishing / post program
_FINISH_BLOCK_D = 256   # hidden columns per pre-finishing program (one warp: its split sums are warp shuffles)


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _split_bf16x3(f):
    """fp32 -> three bf16 terms with hi + mid + lo = f to ~2^-27 relative (each residual is exact in fp32)."""
    hi = f.to(tl.bfloat16)
    r1 = f - hi.to(tl.float32)
    mid = r1.to(tl.bfloat16)
    lo = (r1 - mid.to(tl.float32)).to(tl.bfloat16)
    return hi, mid, lo


@triton.jit
def _mix_partials_kernel(x_ptr, fn_ptr, part_ptr, sq_ptr, T, K, M, chunks_per_split,
                         BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t, pid_s = tl.program_id(0), tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    m = tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    k_first = pid_s * chunks_per_split * BLOCK_K
    for c in range(chunks_per_split):
        k = k_first + c * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + t[:, None].to(tl.int64) * K + k[None, :], mask=(t[:, None] < T) & (k[None, :] < K),
                    other=0.0)                                                          # x: [BLOCK_T, BLOCK_K]
        f = tl.load(fn_ptr + m[None, :] * K + k[:, None], mask=(m[None, :] < M) & (k[:, None] < K),
                    other=0.0)                                                          # fn^T: [BLOCK_K, BLOCK_M]
        xf = x.to(tl.float32)
        sq += tl.sum(xf * xf, axis=1)
        hi, mid, lo = _split_bf16x3(f)
        acc = tl.dot(x, hi, acc)
        acc = tl.dot(x, mid, acc)
        acc = tl.dot(x, lo, acc)
    row = pid_s * T + t
    tl.store(part_ptr + row[:, None].to(tl.int64) * M + m[None, :], acc, mask=(t[:, None] < T) & (m[None, :] < M))
    tl.store(sq_ptr + row, sq, mask=t < T)


@triton.jit
def _token_rho(sq_ptr, t, T, num_splits, inv_k, norm_eps, BLOCK_S: tl.constexpr):
    """rsqrt(mean(x^2) + eps) of token t from the per-split partial sums of squares."""
    s = tl.arange(0, BLOCK_S)
    sq = tl.sum(tl.load(sq_ptr + s * T + t, mask=s < num_splits, other=0.0), axis=0)
    return tl.math.rsqrt(sq * inv_k + norm_eps)


@triton.jit
def _collapse(x_ptr, h_ptr, pre, t, pid_d, D, HC: tl.constexpr, BLOCK_D: tl.constexpr):
    """h[t, d-block] = bf16(sum_j pre_j x[t, j, d-block]), fp32 math."""
    j = tl.arange(0, HC)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + (t * HC + j[:, None]).to(tl.int64) * D + d[None, :], mask=d[None, :] < D, other=0.0)
    h = tl.sum(pre[:, None] * x.to(tl.float32), axis=0)
    tl.store(h_ptr + t.to(tl.int64) * D + d, h.to(tl.bfloat16), mask=d < D)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _mix_row4(part_ptr, rows, smask, i0):
    """Four consecutive mixes i0..i0+3 of one token, each summed over the K splits (scalars)."""
    return (tl.sum(tl.load(part_ptr + rows + i0, mask=smask, other=0.0), axis=0),
            tl.sum(tl.load(part_ptr + rows + i0 + 1, mask=smask, other=0.0), axis=0),
            tl.sum(tl.load(part_ptr + rows + i0 + 2, mask=smask, other=0.0), axis=0),
            tl.sum(tl.load(part_ptr + rows + i0 + 3, mask=smask, other=0.0), axis=0))


@triton.jit
def _softmax4(a, b, c, d, eps):
    m = tl.maximum(tl.maximum(a, b), tl.maximum(c, d))
    ea, eb, ec, ed = tl.exp(a - m), tl.exp(b - m), tl.exp(c - m), tl.exp(d - m)
    s = ea + eb + ec + ed
    return ea / s + eps, eb / s + eps, ec / s + eps, ed / s + eps


@triton.jit
def _norm4(a, b, c, d, eps):
    s = a + b + c + d + eps
    return a / s, b / s, c / s, d / s


@triton.jit
def _comb_row4(part_ptr, rows, smask, rho, scale2, base_ptr, row: tl.constexpr, eps):
    """Row `row` of comb after its softmax (+ eps), from the row's four mixes (scalars)."""
    i0 = 2 * 4 + 4 * row
    a, b, c, d = _mix_row4(part_ptr, rows, smask, i0)
    return _softmax4(a * rho * scale2 + tl.load(base_ptr + i0), b * rho * scale2 + tl.load(base_ptr + i0 + 1),
                     c * rho * scale2 + tl.load(base_ptr + i0 + 2), d * rho * scale2 + tl.load(base_ptr + i0 + 3),
                     eps)


@triton.jit
def _vec4(j, a, b, c, d):
    return tl.where(j == 0, a, tl.where(j == 1, b, tl.where(j == 2, c, d)))


@triton.jit
def _hc_pre_finish_kernel(x_ptr, part_ptr, sq_ptr, scale_ptr, base_ptr, h_ptr, post_ptr, comb_ptr,
                          T, D, num_splits, inv_k, norm_eps, hc_eps,
                          SINKHORN_ITERS: tl.constexpr, HC: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    # hc = 4 (V4's): the 4x4 Sinkhorn in scalars, the same in every thread (a 4x4 tile's row and column sums
    # would each be a cross-thread reduction, 39 of them in a serial chain).
    t, pid_d = tl.program_id(0), tl.program_id(1)
    M: tl.constexpr = (2 + HC) * HC
    rho = _token_rho(sq_ptr, t, T, num_splits, inv_k, norm_eps, BLOCK_S)
    s = tl.arange(0, BLOCK_S)
    j = tl.arange(0, HC)
    rows = (s * T + t).to(tl.int64) * M                                                   # [BLOCK_S]
    smask = s < num_splits
    scale0, scale1, scale2 = tl.load(scale_ptr), tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)
    p0, p1, p2, p3 = _mix_row4(part_ptr, rows, smask, 0)
    pre = _sigmoid(_vec4(j, p0, p1, p2, p3) * rho * scale0 + tl.load(base_ptr + j)) + hc_eps          # [HC]
    c00, c01, c02, c03 = _comb_row4(part_ptr, rows, smask, rho, scale2, base_ptr, 0, hc_eps)
    c10, c11, c12, c13 = _comb_row4(part_ptr, rows, smask, rho, scale2, base_ptr, 1, hc_eps)
    c20, c21, c22, c23 = _comb_row4(part_ptr, rows, smask, rho, scale2, base_ptr, 2, hc_eps)
    c30, c31, c32, c33 = _comb_row4(part_ptr, rows, smask, rho, scale2, base_ptr, 3, hc_eps)
    c00, c10, c20, c30 = _norm4(c00, c10, c20, c30, hc_eps)                                # columns
    c01, c11, c21, c31 = _norm4(c01, c11, c21, c31, hc_eps)
    c02, c12, c22, c32 = _norm4(c02, c12, c22, c32, hc_eps)
    c03, c13, c23, c33 = _norm4(c03, c13, c23, c33, hc_eps)
    for _ in tl.static_range(SINKHORN_ITERS - 1):
        c00, c01, c02, c03 = _norm4(c00, c01, c02, c03, hc_eps)                            # rows
        c10, c11, c12, c13 = _norm4(c10, c11, c12, c13, hc_eps)
        c20, c21, c22, c23 = _norm4(c20, c21, c22, c23, hc_eps)
        c30, c31, c32, c33 = _norm4(c30, c31, c32, c33, hc_eps)
        c00, c10, c20, c30 = _norm4(c00, c10, c20, c30, hc_eps)                            # columns
        c01, c11, c21, c31 = _norm4(c01, c11, c21, c31, hc_eps)
        c02, c12, c22, c32 = _norm4(c02, c12, c22, c32, hc_eps)
        c03, c13, c23, c33 = _norm4(c03, c13, c23, c33, hc_eps)
    _collapse(x_ptr, h_ptr, pre, t, pid_d, D, HC, BLOCK_D)
    if pid_d == 0:
        q0, q1, q2, q3 = _mix_row4(part_ptr, rows, smask, 4)
        post = 2.0 * _sigmoid(_vec4(j, q0, q1, q2, q3) * rho * scale1 + tl.load(base_ptr + HC + j))
        tl.store(post_ptr + t * HC + j, post)
        cp = comb_ptr + t * HC * HC + 4 * j
        tl.store(cp, _vec4(j, c00, c10, c20, c30))
        tl.store(cp + 1, _vec4(j, c01, c11, c21, c31))
        tl.store(cp + 2, _vec4(j, c02, c12, c22, c32))
        tl.store(cp + 3, _vec4(j, c03, c13, c23, c33))


@triton.jit
def _hc_head_finish_kernel(x_ptr, part_ptr, sq_ptr, scale_ptr, base_ptr, h_ptr, T, D, num_splits, inv_k,
                           norm_eps, hc_eps, HC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    t, pid_d = tl.program_id(0), tl.program_id(1)
    rho = _token_rho(sq_ptr, t, T, num_splits, inv_k, norm_eps, BLOCK_S)
    s = tl.arange(0, BLOCK_S)
    j = tl.arange(0, HC)
    rows = (s * T + t).to(tl.int64) * HC
    mix = tl.sum(tl.load(part_ptr + rows[:, None] + j[None, :], mask=(s < num_splits)[:, None], other=0.0), axis=0)
    pre = _sigmoid(mix * rho * tl.load(scale_ptr) + tl.load(base_ptr + j)) + hc_eps
    _collapse(x_ptr, h_ptr, pre, t, pid_d, D, HC, BLOCK_D)


@triton.jit
def _hc_post_kernel(f_ptr, res_ptr, post_ptr, comb_ptr, out_ptr, D, HC: tl.constexpr, BLOCK_D: tl.constexpr):
    t, pid_d = tl.program_id(0), tl.program_id(1)
    j = tl.arange(0, HC)
    k = tl.arange(0, HC)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d[None, :] < D
    rows = (t * HC + j).to(tl.int64) * D                                                  # stream rows of token t
    x = tl.load(res_ptr + rows[:, None] + d[None, :], mask=dmask, other=0.0).to(tl.float32)   # x: [HC(j), BLOCK_D]
    comb = tl.load(comb_ptr + t * HC * HC + j[:, None] * HC + k[None, :])                       # [HC(j), HC(k)]
    post = tl.load(post_ptr + t * HC + k)                                                       # [HC(k)]
    f = tl.load(f_ptr + t.to(tl.int64) * D + d, mask=d < D, other=0.0).to(tl.float32)
    mixed = tl.sum(comb[:, :, None] * x[:, None, :], axis=0)                                  # [HC(k), BLOCK_D]
    y = post[:, None] * f[None, :] + mixed
    tl.store(out_ptr + rows[:, None] + d[None, :], y.to(tl.bfloat16), mask=dmask)


@triton.jit
def _hc_post_mix_kernel(f_ptr, res_ptr, post_ptr, comb_ptr, out_ptr, fn_ptr, part_ptr, sq_ptr, T, D, M,
                        HC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_t, pid_d = tl.program_id(0), tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m = tl.arange(0, BLOCK_M)
    tmask = t < T
    mask = tmask[:, None] & (d[None, :] < D)
    f = tl.load(f_ptr + t[:, None].to(tl.int64) * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_M), dtype=tl.float32)
    sq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for k in range(HC):                 # not unrolled: an unrolled k loop spills registers
        y = tl.load(post_ptr + t * HC + k, mask=tmask, other=0.0)[:, None] * f              # y: [BLOCK_T, BLOCK_D]
        for j in tl.static_range(HC):   # stream j's tile is re-read per k (from L1): 2-D tiles keep registers low
            c = tl.load(comb_ptr + t * HC * HC + j * HC + k, mask=tmask, other=0.0)
            x = tl.load(res_ptr + (t[:, None] * HC + j).to(tl.int64) * D + d[None, :], mask=mask, other=0.0)
            y += c[:, None] * x.to(tl.float32)
        yb = y.to(tl.bfloat16)
        tl.store(out_ptr + (t[:, None] * HC + k).to(tl.int64) * D + d[None, :], yb, mask=mask)
        yf = yb.to(tl.float32)                          # the next site reads the stored bf16 streams
        sq += tl.sum(yf * yf, axis=1)
        fn_k = tl.load(fn_ptr + m[None, :].to(tl.int64) * (HC * D) + k * D + d[:, None],
                       mask=(m[None, :] < M) & (d[:, None] < D), other=0.0)                # fn^T: [BLOCK_D, BLOCK_M]
        hi, mid, lo = _split_bf16x3(fn_k)
        acc = tl.dot(yb, hi, acc)
        acc = tl.dot(yb, mid, acc)
        acc = tl.dot(yb, lo, acc)
    row = pid_d * T + t
    tl.store(part_ptr + row[:, None].to(tl.int64) * M + m[None, :], acc, mask=tmask[:, None] & (m[None, :] < M))
    tl.store(sq_ptr + row, sq, mask=tmask)


# ---------------------------------------------------------------------------------------------- launchers
def _gemm_geometry(num_tokens: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_T, number of K splits, K steps per split) from the shapes only."""
    block_t = min(_MAX_BLOCK_T, max(16, triton.next_power_of_2(max(num_tokens, 1))))
    num_t_tiles = triton.cdiv(max(num_tokens, 1), block_t)
    chunks = triton.cdiv(k, _BLOCK_K)
    splits = max(1, min(_TARGET_PROGRAMS // num_t_tiles, chunks // _MIN_CHUNKS))
    chunks_per_split = triton.cdiv(chunks, splits)
    return block_t, triton.cdiv(chunks, chunks_per_split), chunks_per_split


def mix_partials(x_flat: torch.Tensor, fn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x_flat [T, K] bf16, fn [M, K] fp32 -> (partial mixes fp32 [S, T, M], partial sums of x^2 fp32 [S, T])."""
    num_tokens, k = x_flat.shape
    rows = fn.shape[0]
    block_t, splits, chunks_per_split = _gemm_geometry(num_tokens, k)
    part = torch.empty(splits, num_tokens, rows, dtype=torch.float32, device=x_flat.device)
    sq = torch.empty(splits, num_tokens, dtype=torch.float32, device=x_flat.device)
    if num_tokens:
        grid = (triton.cdiv(num_tokens, block_t), splits)
        _mix_partials_kernel[grid](x_flat, fn, part, sq, num_tokens, k, rows, chunks_per_split,
                                   BLOCK_T=block_t, BLOCK_M=max(16, triton.next_power_of_2(rows)),
                                   BLOCK_K=_BLOCK_K, num_warps=4 if block_t <= 16 else 8)
    return part, sq


def _check_streams(x: torch.Tensor, hc_mult: int) -> None:
    assert x.dim() == 3 and x.shape[1] == hc_mult, f"x {tuple(x.shape)} is not [T, {hc_mult}, D]"
    assert x.dtype == torch.bfloat16 and x.is_contiguous(), f"x must be contiguous bf16, got {x.dtype}"
    assert hc_mult == 4, f"the GPU mHC kernels are written for hc_mult 4 (V4's), got {hc_mult}"


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int,
           sinkhorn_iters: int, hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dsv4.kernels.fast.mhc.hc_pre` on the GPU (or CPU tensors under the interpreter): two launches."""
    _check_streams(x, hc_mult)
    num_tokens, _, dim = x.shape
    assert fn.shape == ((2 + hc_mult) * hc_mult, hc_mult * dim) and fn.dtype == torch.float32, "fn shape/dtype"
    part, sq = mix_partials(x.view(num_tokens, hc_mult * dim), fn.contiguous())
    return _pre_finish(x, part, sq, scale, base, sinkhorn_iters, hc_eps, norm_eps)


def _pre_finish(x: torch.Tensor, part: torch.Tensor, sq: torch.Tensor, scale: torch.Tensor, base: torch.Tensor,
                sinkhorn_iters: int, hc_eps: float, norm_eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_tokens, hc_mult, dim = x.shape
    h = torch.empty(num_tokens, dim, dtype=torch.bfloat16, device=x.device)
    post = torch.empty(num_tokens, hc_mult, dtype=torch.float32, device=x.device)
    comb = torch.empty(num_tokens, hc_mult, hc_mult, dtype=torch.float32, device=x.device)
    if num_tokens:
        block_d = min(_FINISH_BLOCK_D, triton.next_power_of_2(dim))
        _hc_pre_finish_kernel[(num_tokens, triton.cdiv(dim, block_d))](
            x, part, sq, scale.float().contiguous(), base.float().contiguous(), h, post, comb, num_tokens, dim,
            part.shape[0], 1.0 / (hc_mult * dim), norm_eps, hc_eps, SINKHORN_ITERS=sinkhorn_iters, HC=hc_mult,
            BLOCK_S=triton.next_power_of_2(part.shape[0]), BLOCK_D=block_d, num_warps=1)
    return h, post, comb


def _post_mix_geometry(num_tokens: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): small tiles at decode (256 programs at T = 64, D = 4096); wider D blocks for
    large T keep the partial mixes (one [T, M] slab per D block) small. Both compile without register spills."""
    return (16, 64, 4) if num_tokens <= 64 else (16, 128, 8)


def hc_post_pre(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, fn: torch.Tensor,
                scale: torch.Tensor, base: torch.Tensor, hc_mult: int, sinkhorn_iters: int, hc_eps: float,
                norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dsv4.kernels.fast.mhc.hc_post_pre` on the GPU: two launches (post + next mixes GEMM, then finishing)."""
    num_tokens, _, dim = residual.shape
    _check_streams(residual, hc_mult)
    assert f.shape == (num_tokens, dim) and f.dtype == torch.bfloat16, f"f {tuple(f.shape)} {f.dtype}"
    rows = fn.shape[0]
    assert fn.shape == ((2 + hc_mult) * hc_mult, hc_mult * dim) and fn.dtype == torch.float32, "fn shape/dtype"
    block_t, block_d, num_warps = _post_mix_geometry(num_tokens)
    splits = triton.cdiv(dim, block_d)
    out = torch.empty_like(residual)
    part = torch.empty(splits, num_tokens, rows, dtype=torch.float32, device=f.device)
    sq = torch.empty(splits, num_tokens, dtype=torch.float32, device=f.device)
    if num_tokens:
        _hc_post_mix_kernel[(triton.cdiv(num_tokens, block_t), splits)](
            f.contiguous(), residual, post.float().contiguous(), comb.float().contiguous(), out, fn.contiguous(),
            part, sq, num_tokens, dim, rows, HC=hc_mult, BLOCK_T=block_t, BLOCK_D=block_d,
            BLOCK_M=max(16, triton.next_power_of_2(rows)), num_warps=num_warps)
    return (out,) + _pre_finish(out, part, sq, scale, base, sinkhorn_iters, hc_eps, norm_eps)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float,
            norm_eps: float) -> torch.Tensor:
    """`dsv4.kernels.fast.mhc.hc_head` on the GPU: two launches."""
    num_tokens, hc_mult, dim = x.shape
    _check_streams(x, hc_mult)
    assert fn.shape == (hc_mult, hc_mult * dim) and fn.dtype == torch.float32, "fn shape/dtype"
    part, sq = mix_partials(x.view(num_tokens, hc_mult * dim), fn.contiguous())
    h = torch.empty(num_tokens, dim, dtype=torch.bfloat16, device=x.device)
    if num_tokens:
        block_d = min(_BLOCK_D, triton.next_power_of_2(dim))
        _hc_head_finish_kernel[(num_tokens, triton.cdiv(dim, block_d))](
            x, part, sq, scale.float().contiguous(), base.float().contiguous(), h, num_tokens, dim, part.shape[0],
            1.0 / (hc_mult * dim), norm_eps, hc_eps, HC=hc_mult, BLOCK_S=triton.next_power_of_2(part.shape[0]),
            BLOCK_D=block_d, num_warps=4)
    return h


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """`dsv4.kernels.fast.mhc.hc_post` on the GPU: one launch."""
    num_tokens, hc_mult, dim = residual.shape
    _check_streams(residual, hc_mult)
    assert f.shape == (num_tokens, dim) and f.dtype == torch.bfloat16, f"f {tuple(f.shape)} {f.dtype}"
    out = torch.empty_like(residual)
    if num_tokens:
        block_d = min(512, triton.next_power_of_2(dim))
        _hc_post_kernel[(num_tokens, triton.cdiv(dim, block_d))](
            f.contiguous(), residual, post.float().contiguous(), comb.float().contiguous(), out, dim, HC=hc_mult,
            BLOCK_D=block_d, num_warps=4)
    return out

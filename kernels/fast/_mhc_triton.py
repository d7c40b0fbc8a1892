"""Triton kernels of the fast mHC ops (public API and numerics: `dsv4.kernels.fast.mhc`).

    _mix_partials_kernel   the mixes GEMM fn . x_flat, split over K: grid (token tiles, K splits); each program
                           writes fp32 partial mixes [S, T, M] and partial sums of squares [S, T]. fn is read once
                           per token tile (not per token); x is exactly bf16 and fn is split into three bf16 terms
                           (hi + mid + lo = fn to ~2^-27), so the three bf16 tensor-core dots have exact products
                           and fp32 accumulation: the result is as accurate as an fp32 FMA loop.
    _hc_pre_finish_kernel  grid (T, D blocks): sums the partials of its token, rsqrt, sigmoid pre/post, Sinkhorn
                           (every program of a token recomputes the 4x4 Sinkhorn: cheaper than another launch),
                           h = bf16(sum_j pre_j x_j) for its D block; the first D block stores post and comb.
    _hc_head_finish_kernel the head's collapse: sigmoid weights + eps, no Sinkhorn.
    _hc_post_kernel        grid (T, D blocks): X'_k = bf16(post_k f + sum_j comb[j, k] X_j) in fp32.
    _hc_post_mix_kernel    hc_post fused with the next site's mixes GEMM: grid (token tiles, D blocks); each
                           program writes its X' tile and the partial mixes of its K columns (all hc streams of
                           its D block) from the bf16 X' it stored, so the next hc_pre needs only its finishing
                           kernel and never re-reads X' for the GEMM.
    _hc_post_mix_gemv_kernel  the same for up to GEMV_MAX_TOKENS tokens: one program per (token, 64 columns),
                           fp32 FMAs instead of the bf16x3 MMA (each fn x X' product rounded once to fp32).

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
_BLOCK_D = 1024         # hidden columns per finishing / post program


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
def _hc_pre_finish_kernel(x_ptr, part_ptr, sq_ptr, scale_ptr, base_ptr, h_ptr, post_ptr, comb_ptr,
                          T, D, num_splits, inv_k, norm_eps, hc_eps,
                          SINKHORN_ITERS: tl.constexpr, HC: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    t, pid_d = tl.program_id(0), tl.program_id(1)
    M: tl.constexpr = (2 + HC) * HC
    rho = _token_rho(sq_ptr, t, T, num_splits, inv_k, norm_eps, BLOCK_S)
    s = tl.arange(0, BLOCK_S)
    j = tl.arange(0, HC)
    k = tl.arange(0, HC)
    rows = (s * T + t).to(tl.int64) * M                                                   # [BLOCK_S]
    smask = s < num_splits
    pre_mix = tl.sum(tl.load(part_ptr + rows[:, None] + j[None, :], mask=smask[:, None], other=0.0), axis=0)
    post_mix = tl.sum(tl.load(part_ptr + rows[:, None] + HC + j[None, :], mask=smask[:, None], other=0.0), axis=0)
    jk = 2 * HC + j[:, None] * HC + k[None, :]                                             # [HC, HC] row-major
    comb_mix = tl.sum(tl.load(part_ptr + rows[:, None, None] + jk[None, :, :], mask=smask[:, None, None],
                              other=0.0), axis=0)
    scale0, scale1, scale2 = tl.load(scale_ptr), tl.load(scale_ptr + 1), tl.load(scale_ptr + 2)
    pre = _sigmoid(pre_mix * rho * scale0 + tl.load(base_ptr + j)) + hc_eps
    post = 2.0 * _sigmoid(post_mix * rho * scale1 + tl.load(base_ptr + HC + j))
    logits = comb_mix * rho * scale2 + tl.load(base_ptr + jk)
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    comb = e / tl.sum(e, axis=1)[:, None] + hc_eps
    comb = comb / (tl.sum(comb, axis=0)[None, :] + hc_eps)
    for _ in tl.static_range(SINKHORN_ITERS - 1):
        comb = comb / (tl.sum(comb, axis=1)[:, None] + hc_eps)
        comb = comb / (tl.sum(comb, axis=0)[None, :] + hc_eps)
    _collapse(x_ptr, h_ptr, pre, t, pid_d, D, HC, BLOCK_D)
    first = (j + pid_d * HC) < HC           # [HC]: all true in the first D block only (a block-shaped mask)
    tl.store(post_ptr + t * HC + j, post, mask=first)
    tl.store(comb_ptr + t * HC * HC + j[:, None] * HC + k[None, :], comb, mask=first[:, None] & (k[None, :] < HC))


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


@triton.jit
def _hc_post_mix_gemv_kernel(f_ptr, res_ptr, post_ptr, comb_ptr, out_ptr, fn_ptr, part_ptr, sq_ptr, T, D, M,
                             HC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # The same outputs as `_hc_post_mix_kernel`, for a handful of tokens: grid (T, D blocks), no MMA. The program
    # works on the flat index i = k * BLOCK_D + d (output stream k, column d of its block), so the new streams,
    # their squares and the partial mixes (fn . X' over the block's HC x BLOCK_D columns) are one 1-D vector and
    # one [BLOCK_M, HC * BLOCK_D] tile, every load issued up front (the MMA kernel's per-stream K loop is a
    # chain of dependent loads; at a few tokens that chain is the kernel's time).
    t, pid_d = tl.program_id(0), tl.program_id(1)
    i = tl.arange(0, HC * BLOCK_D)
    k = i // BLOCK_D
    d = pid_d * BLOCK_D + i % BLOCK_D
    dmask = d < D
    t64 = t.to(tl.int64)
    y = tl.load(post_ptr + t * HC + k) * tl.load(f_ptr + t64 * D + d, mask=dmask, other=0.0).to(tl.float32)
    for j in tl.static_range(HC):
        c = tl.load(comb_ptr + t * HC * HC + j * HC + k)                                  # comb[j, k(i)]
        x = tl.load(res_ptr + (t64 * HC + j) * D + d, mask=dmask, other=0.0)
        y += c * x.to(tl.float32)
    yb = y.to(tl.bfloat16)
    tl.store(out_ptr + (t64 * HC + k) * D + d, yb, mask=dmask)
    yf = yb.to(tl.float32)                              # the next site reads the stored bf16 streams
    m = tl.arange(0, BLOCK_M)
    fn = tl.load(fn_ptr + m[:, None].to(tl.int64) * (HC * D) + (k * D + d)[None, :],
                 mask=(m[:, None] < M) & dmask[None, :], other=0.0)                       # [BLOCK_M, HC*BLOCK_D]
    row = pid_d * T + t
    tl.store(part_ptr + row.to(tl.int64) * M + m, tl.sum(fn * yf[None, :], axis=1), mask=m < M)
    tl.store(sq_ptr + row, tl.sum(yf * yf, axis=0))


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
    assert hc_mult & (hc_mult - 1) == 0, f"hc_mult {hc_mult} must be a power of two"


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
        block_d = min(_BLOCK_D, triton.next_power_of_2(dim))
        _hc_pre_finish_kernel[(num_tokens, triton.cdiv(dim, block_d))](
            x, part, sq, scale.float().contiguous(), base.float().contiguous(), h, post, comb, num_tokens, dim,
            part.shape[0], 1.0 / (hc_mult * dim), norm_eps, hc_eps, SINKHORN_ITERS=sinkhorn_iters, HC=hc_mult,
            BLOCK_S=triton.next_power_of_2(part.shape[0]), BLOCK_D=block_d, num_warps=4)
    return h, post, comb


def _post_mix_geometry(num_tokens: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps): small tiles at decode (256 programs at T = 64, D = 4096); wider D blocks for
    large T keep the partial mixes (one [T, M] slab per D block) small. Both compile without register spills."""
    return (16, 64, 4) if num_tokens <= 64 else (16, 128, 8)


GEMV_MAX_TOKENS = 8      # up to this many tokens hc_post_pre's first kernel is `_hc_post_mix_gemv_kernel`
_GEMV_BLOCK_D = 64       # its columns per program: a [32, 4 x 64] fp32 fn tile, 64 registers a thread


def hc_post_pre(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, fn: torch.Tensor,
                scale: torch.Tensor, base: torch.Tensor, hc_mult: int, sinkhorn_iters: int, hc_eps: float,
                norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dsv4.kernels.fast.mhc.hc_post_pre` on the GPU: two launches (post + next mixes GEMM, then finishing)."""
    num_tokens, _, dim = residual.shape
    _check_streams(residual, hc_mult)
    assert f.shape == (num_tokens, dim) and f.dtype == torch.bfloat16, f"f {tuple(f.shape)} {f.dtype}"
    rows = fn.shape[0]
    assert fn.shape == ((2 + hc_mult) * hc_mult, hc_mult * dim) and fn.dtype == torch.float32, "fn shape/dtype"
    gemv = num_tokens <= GEMV_MAX_TOKENS
    block_t, block_d, num_warps = _post_mix_geometry(num_tokens)
    block_d = _GEMV_BLOCK_D if gemv else block_d
    splits = triton.cdiv(dim, block_d)
    out = torch.empty_like(residual)
    part = torch.empty(splits, num_tokens, rows, dtype=torch.float32, device=f.device)
    sq = torch.empty(splits, num_tokens, dtype=torch.float32, device=f.device)
    args = (f.contiguous(), residual, post.float().contiguous(), comb.float().contiguous(), out, fn.contiguous(),
            part, sq, num_tokens, dim, rows)
    block_m = max(16, triton.next_power_of_2(rows))
    if num_tokens and gemv:
        _hc_post_mix_gemv_kernel[(num_tokens, splits)](*args, HC=hc_mult, BLOCK_D=block_d, BLOCK_M=block_m,
                                                       num_warps=4)
    elif num_tokens:
        _hc_post_mix_kernel[(triton.cdiv(num_tokens, block_t), splits)](
            *args, HC=hc_mult, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_M=block_m, num_warps=num_warps)
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

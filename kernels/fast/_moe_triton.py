"""Triton kernels of `dsv4.kernels.fast.moe` (imported on first use; the math is documented there).

Pipeline of `expert_forward` (every launch's grid from (P, E, BLOCK_M) and the weight shapes only):
1. dispatch: pairs grouped by bucket (local expert 0..E-1, bucket E = off-rank pairs) into rows padded to BLOCK_M
   per bucket: `sorted_pair` [max_blocks * BLOCK_M] (row -> pair), `block_bucket` [max_blocks] (-1 = unused),
   `bucket_start` / `bucket_count` (first row, pairs). max_blocks = P // BLOCK_M + min(E + 1, P) bounds the
   blocks any routing can need. One program when P is small (decode), else count -> offsets -> scatter.
2. x rows quantized once to FP8 per 128 (`act_quant_fp8`; bf16 experts: x as is).
3. GEMM 1 over w13 (gate rows 0..I-1, up rows I..2I-1), 128 weight rows per program: the x rows of the block's
   pairs gathered in the operand load; FP4 weights (split nibble order, `moe`) unpacked to e4m3 in registers
   (exact: e2m1 * 2^-6 is an e4m3 value; the 2^6 goes into the scale), 32-deep FP8 dots (one FP4 scale each)
   promoted into fp32 with s_w, then s_x per 128 (FP8 weights: 32-deep dots too). Epilogue: clamped
   SwiGLU and the routing weight -> h = bf16(w * silu(min(g, L)) * clamp(v, -L, L)), stored FP8-quantized per 128
   (each program's 128 columns are one block) for GEMM 2.
4. GEMM 2 over w2 on h -> y rows scattered to the pairs' order; blocks of the off-rank bucket write zero rows.
Where the blocks x weight tiles are too few for the SMs (decode, the shared expert), either GEMM splits K: fp32
partials, then `_split_reduce_kernel` sums them in split order and runs the epilogue (`gemm_tiles`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsv4.kernels.fast._linear_triton import act_quant_fp8, act_scale, e8m0_to_fp32, num_sms, to_e4m3

FMT_CODES = {"fp4": 0, "fp8": 1, "bf16": 2}
QBLOCK = 128
QB, SUB = tl.constexpr(QBLOCK), tl.constexpr(32)   # activation quantization block; K depth of one FP4-scale dot
DISPATCH_SUBS = 8                # sub-chunks per dispatch program (one program when P fits one chunk)


# ---------------------------------------------------------------------------------------------- dispatch
@triton.jit
def _buckets(pair_expert_ptr, offs, P, E):
    """Bucket of each pair: its expert if local (0..E-1), else E; lanes past P get no bucket (a huge id)."""
    e = tl.load(pair_expert_ptr + offs, mask=offs < P, other=-1)
    bucket = tl.where((e >= 0) & (e < E), e, E)
    return tl.where(offs < P, bucket, 1 << 30)


@triton.jit
def _onehot(bucket, NB_PAD: tl.constexpr):
    return (bucket[:, None] == tl.arange(0, NB_PAD)[None, :]).to(tl.int32)       # [SUB_P, NB_PAD]


@triton.jit
def _count_range(pair_expert_ptr, lo, hi, P, E, SUB_P: tl.constexpr, NB_PAD: tl.constexpr):
    counts = tl.zeros((NB_PAD,), dtype=tl.int32)
    for s0 in range(lo, hi, SUB_P):
        counts += tl.sum(_onehot(_buckets(pair_expert_ptr, s0 + tl.arange(0, SUB_P), P, E), NB_PAD), axis=0)
    return counts


@triton.jit
def _scatter_range(pair_expert_ptr, sorted_pair_ptr, base, lo, hi, P, E, SUB_P: tl.constexpr,
                   NB_PAD: tl.constexpr):
    """Pairs lo..hi-1 to their rows: base[bucket] + their rank among the range's pairs of that bucket (stable)."""
    for s0 in range(lo, hi, SUB_P):
        offs = s0 + tl.arange(0, SUB_P)
        hot = _onehot(_buckets(pair_expert_ptr, offs, P, E), NB_PAD)
        before = tl.cumsum(hot, axis=0) - hot + base[None, :]                     # rows taken before each pair
        dest = tl.sum(hot * before, axis=1)
        tl.store(sorted_pair_ptr + dest, offs, mask=offs < P)
        base += tl.sum(hot, axis=0)


@triton.jit
def _block_table(block_bucket_ptr, start, padded, num_blocks, NB, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
                 NB_PAD: tl.constexpr):
    """Block b's bucket = the number of buckets ending at or before its first row (-1 past the last bucket)."""
    ends = start + padded
    for b0 in range(0, num_blocks, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        bucket = tl.sum((ends[None, :] <= (b * BLOCK_M)[:, None]).to(tl.int32), axis=1)
        tl.store(block_bucket_ptr + b, tl.where(bucket < NB, bucket, -1), mask=b < num_blocks)


@triton.jit
def _bucket_layout(counts, bucket_start_ptr, bucket_count_ptr, BLOCK_M: tl.constexpr, NB_PAD: tl.constexpr):
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = tl.cumsum(padded, axis=0) - padded
    idx = tl.arange(0, NB_PAD)
    tl.store(bucket_start_ptr + idx, start)
    tl.store(bucket_count_ptr + idx, counts)
    return start, padded


@triton.jit(do_not_specialize=["P", "num_blocks"])
def _dispatch_single_kernel(pair_expert_ptr, sorted_pair_ptr, block_bucket_ptr, bucket_start_ptr, bucket_count_ptr,
                            P, E, num_blocks, BLOCK_M: tl.constexpr, SUB_P: tl.constexpr, NB_PAD: tl.constexpr,
                            BLOCK_B: tl.constexpr):
    counts = _count_range(pair_expert_ptr, 0, P, P, E, SUB_P, NB_PAD)
    start, padded = _bucket_layout(counts, bucket_start_ptr, bucket_count_ptr, BLOCK_M, NB_PAD)
    _block_table(block_bucket_ptr, start, padded, num_blocks, E + 1, BLOCK_M, BLOCK_B, NB_PAD)
    _scatter_range(pair_expert_ptr, sorted_pair_ptr, start, 0, P, P, E, SUB_P, NB_PAD)


@triton.jit(do_not_specialize=["P"])
def _dispatch_count_kernel(pair_expert_ptr, chunk_counts_ptr, P, E, SUB_P: tl.constexpr, NB_PAD: tl.constexpr,
                           CHUNK: tl.constexpr):
    c = tl.program_id(0)
    counts = _count_range(pair_expert_ptr, c * CHUNK, c * CHUNK + CHUNK, P, E, SUB_P, NB_PAD)
    tl.store(chunk_counts_ptr + c * NB_PAD + tl.arange(0, NB_PAD), counts)


@triton.jit(do_not_specialize=["num_chunks", "num_blocks"])
def _dispatch_offsets_kernel(chunk_counts_ptr, chunk_base_ptr, block_bucket_ptr, bucket_start_ptr, bucket_count_ptr,
                             num_chunks, E, num_blocks, BLOCK_M: tl.constexpr, NB_PAD: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr):
    idx = tl.arange(0, NB_PAD)
    counts = tl.zeros((NB_PAD,), dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        tile = tl.load(chunk_counts_ptr + c[:, None] * NB_PAD + idx[None, :], mask=(c < num_chunks)[:, None], other=0)
        counts += tl.sum(tile, axis=0)
    start, padded = _bucket_layout(counts, bucket_start_ptr, bucket_count_ptr, BLOCK_M, NB_PAD)
    _block_table(block_bucket_ptr, start, padded, num_blocks, E + 1, BLOCK_M, BLOCK_B, NB_PAD)
    running = start
    for c0 in range(0, num_chunks, BLOCK_C):       # each chunk's first row per bucket: exclusive prefix over chunks
        c = c0 + tl.arange(0, BLOCK_C)
        ok = (c < num_chunks)[:, None]
        tile = tl.load(chunk_counts_ptr + c[:, None] * NB_PAD + idx[None, :], mask=ok, other=0)
        tl.store(chunk_base_ptr + c[:, None] * NB_PAD + idx[None, :], tl.cumsum(tile, axis=0) - tile + running[None, :],
                 mask=ok)
        running += tl.sum(tile, axis=0)


@triton.jit(do_not_specialize=["P"])
def _dispatch_scatter_kernel(pair_expert_ptr, chunk_base_ptr, sorted_pair_ptr, P, E, SUB_P: tl.constexpr,
                             NB_PAD: tl.constexpr, CHUNK: tl.constexpr):
    c = tl.program_id(0)
    base = tl.load(chunk_base_ptr + c * NB_PAD + tl.arange(0, NB_PAD))
    _scatter_range(pair_expert_ptr, sorted_pair_ptr, base, c * CHUNK, c * CHUNK + CHUNK, P, E, SUB_P, NB_PAD)


# ---------------------------------------------------------------------------------------------- grouped GEMMs
@triton.jit
def _fp4_to_e4m3(byt, USE_ASM: tl.constexpr):
    """Packed FP4 bytes (uint8, element 2k low nibble, 2k+1 high) -> (e4m3 of the low, of the high nibbles).

    e2m1 s|ee|m becomes e4m3 s|0ee|m00: value e2m1 * 2^-6 exactly (the e2m1 subnormal 0.5 lands on the e4m3
    subnormal 2^-7). On the GPU four bytes per 32-bit register in one asm block (~7 integer ops per 8 values)."""
    if USE_ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 a, b, c, d;
            shl.b32 a, $2, 4;
            and.b32 a, a, 0x80808080;
            shl.b32 b, $2, 2;
            and.b32 b, b, 0x1C1C1C1C;
            shr.b32 c, $2, 2;
            and.b32 c, c, 0x1C1C1C1C;
            and.b32 d, $2, 0x80808080;
            or.b32 $0, a, b;
            or.b32 $1, c, d;
            }
            """,
            constraints="=r,=r,r", args=[byt], dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4)
    else:
        lo = ((byt & 0x08) << 4) | ((byt & 0x07) << 2)
        hi = (byt & 0x80) | ((byt >> 2) & 0x1C)
    return lo.to(tl.float8e4nv, bitcast=True), hi.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _fp4_span_dot(blk, qa, qb, w_rows, col0, n_ok, s_lo, s_hi, MMA_FP8: tl.constexpr, USE_ASM: tl.constexpr):
    """blk [BN, BM] += the 64 columns col0..col0+63 of an FP4 weight against qa (columns 0..31 of the span) and qb
    (32..63), with the two 32-column groups' scales s_lo / s_hi (fp32 [BN], 2^6 folded in). Split nibble order:
    byte j of the span's 32 holds column j (low nibble) and 32 + j (high), so each nibble plane is a
    natural-order [BN, 32] e4m3 operand with no shuffle between registers."""
    byt = tl.load(w_rows[:, None] + (col0 // 2 + tl.arange(0, SUB))[None, :], mask=n_ok[:, None], other=0)
    lo, hi = _fp4_to_e4m3(byt, USE_ASM)
    if MMA_FP8:
        p_lo = tl.dot(lo, tl.trans(qa))
        p_hi = tl.dot(hi, tl.trans(qb))
    else:          # e4m3 values widen exactly to bf16
        p_lo = tl.dot(lo.to(tl.bfloat16), tl.trans(qa.to(tl.bfloat16)))
        p_hi = tl.dot(hi.to(tl.bfloat16), tl.trans(qb.to(tl.bfloat16)))
    return blk + p_lo * s_lo[:, None] + p_hi * s_hi[:, None]


@triton.jit
def _weight_scales(s_rows, k0, n_ok, FMT: tl.constexpr):
    """The 128-block k0's raw weight scales: FP4 [BN, 4] bytes (one 32-bit load per row), FP8 [BN] bytes. Loaded
    one K step ahead of their use, as `_act_scales`: the loop pipeline only prefetches MMA operands."""
    if FMT == 0:
        raw = tl.load(s_rows[:, None] + (k0 // SUB + tl.arange(0, 4))[None, :], mask=n_ok[:, None], other=0)
    else:
        raw = tl.load(s_rows + k0 // QB, mask=n_ok & (FMT == 1), other=0)
    return raw


@triton.jit
def _act_scales(as_ptrs, k0, m_ok, FMT: tl.constexpr, BLOCK_M: tl.constexpr):
    """The A rows' fp32 scales [BM] of the 128-block k0 (1 for bf16 experts)."""
    if FMT == 2:
        s_a = tl.full((BLOCK_M,), 1.0, tl.float32)
    else:
        s_a = tl.load(as_ptrs + k0 // QB, mask=m_ok, other=0.0)
    return s_a


@triton.jit
def _block_dot(acc, a_ptrs, k0, m_ok, w_rows, n_ok, raw, s_a, FMT: tl.constexpr, MMA_FP8: tl.constexpr,
               USE_ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc [BN, BM] += the 128-block k0 of W[rows] . A^T with the block's scales (`_weight_scales`, `_act_scales`).
    A is FP8 for FP4 / FP8 weights, bf16 for bf16 ones: four 32-deep dots, each promoted into fp32 with its weight
    scale (FP4: one per 32 columns, the unpacking's 2^6 folded in; FP8: one per 128x128 tile), then the A scale
    per 128."""
    if FMT != 2:
        cols = tl.arange(0, SUB)
        q0 = tl.load(a_ptrs + (k0 + cols)[None, :], mask=m_ok[:, None], other=0.0)
        q1 = tl.load(a_ptrs + (k0 + SUB + cols)[None, :], mask=m_ok[:, None], other=0.0)
        q2 = tl.load(a_ptrs + (k0 + 2 * SUB + cols)[None, :], mask=m_ok[:, None], other=0.0)
        q3 = tl.load(a_ptrs + (k0 + 3 * SUB + cols)[None, :], mask=m_ok[:, None], other=0.0)
    if FMT == 0:
        even, odd = tl.split(tl.reshape(raw, (BLOCK_N, 2, 2)))      # scale columns (0, 2), (1, 3)
        r0, r2 = tl.split(even)
        r1, r3 = tl.split(odd)
        blk = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        blk = _fp4_span_dot(blk, q0, q1, w_rows, k0, n_ok, e8m0_to_fp32(r0) * 64.0, e8m0_to_fp32(r1) * 64.0,
                            MMA_FP8, USE_ASM)
        blk = _fp4_span_dot(blk, q2, q3, w_rows, k0 + 2 * SUB, n_ok, e8m0_to_fp32(r2) * 64.0,
                            e8m0_to_fp32(r3) * 64.0, MMA_FP8, USE_ASM)
        acc = acc + blk * s_a[None, :]
    elif FMT == 1:      # 32-deep dots promoted into fp32: Hopper's FP8 MMA accumulates with ~14 mantissa bits
        s_w = e8m0_to_fp32(raw)
        blk = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        blk = _fp8_sub_dot(blk, q0, w_rows, k0, n_ok, s_w, MMA_FP8)
        blk = _fp8_sub_dot(blk, q1, w_rows, k0 + SUB, n_ok, s_w, MMA_FP8)
        blk = _fp8_sub_dot(blk, q2, w_rows, k0 + 2 * SUB, n_ok, s_w, MMA_FP8)
        blk = _fp8_sub_dot(blk, q3, w_rows, k0 + 3 * SUB, n_ok, s_w, MMA_FP8)
        acc = acc + blk * s_a[None, :]
    else:
        a = tl.load(a_ptrs + (k0 + tl.arange(0, QB))[None, :], mask=m_ok[:, None], other=0.0)
        w = tl.load(w_rows[:, None] + (k0 + tl.arange(0, QB))[None, :], mask=n_ok[:, None], other=0.0)
        acc = tl.dot(w, tl.trans(a), acc)
    return acc


@triton.jit
def _fp8_sub_dot(blk, q, w_rows, col0, n_ok, s_w, MMA_FP8: tl.constexpr):
    w = tl.load(w_rows[:, None] + (col0 + tl.arange(0, SUB))[None, :], mask=n_ok[:, None], other=0.0)
    if MMA_FP8:
        part = tl.dot(w, tl.trans(q))
    else:          # e4m3 values widen exactly to bf16
        part = tl.dot(w.to(tl.bfloat16), tl.trans(q.to(tl.bfloat16)))
    return blk + part * s_w[:, None]


@triton.jit
def _row_ptrs(w_ptr, s_ptr, expert, rows, stride_we, stride_wn, stride_se, stride_sn, FMT: tl.constexpr):
    w_rows = w_ptr + expert * stride_we + rows.to(tl.int64) * stride_wn
    if FMT == 1:
        s_rows = s_ptr + expert * stride_se + (rows // QB) * stride_sn
    else:
        s_rows = s_ptr + expert * stride_se + rows.to(tl.int64) * stride_sn
    return w_rows, s_rows


@triton.jit
def _block_rows(block_bucket_ptr, bucket_start_ptr, bucket_count_ptr, sorted_pair_ptr, b, BLOCK_M: tl.constexpr):
    """Block b -> (bucket (-1 = unused), row offsets m, rows holding a pair, their pairs)."""
    bucket = tl.load(block_bucket_ptr + b)
    m = tl.arange(0, BLOCK_M)
    m_ok = m < tl.load(bucket_start_ptr + tl.maximum(bucket, 0)) + tl.load(bucket_count_ptr + tl.maximum(bucket, 0)) \
        - b * BLOCK_M
    pair = tl.load(sorted_pair_ptr + b * BLOCK_M + m, mask=m_ok & (bucket >= 0), other=0)
    return bucket, m, m_ok, pair


@triton.jit
def _swiglu_store(g, v, route, h_ptr, hs_ptr, rows, n, N, mask, m_ok, n_block, limit, QUANT: tl.constexpr):
    """Reference order: bf16 GEMM outputs, clamps, silu(g) * v in fp32, the routing weight, bf16 h; QUANT: h
    stored as GEMM 2's FP8 operand, the tile [128 columns (128-block n_block), BM] being one quantization block
    per row (scales at hs_ptr [rows, N/128])."""
    g = tl.minimum(g.to(tl.bfloat16).to(tl.float32), limit)
    v = tl.clamp(v.to(tl.bfloat16).to(tl.float32), -limit, limit)
    h = (route[None, :] * (g * tl.sigmoid(g) * v)).to(tl.bfloat16).to(tl.float32)
    rows = rows.to(tl.int64)
    if QUANT:
        scale, inv = act_scale(tl.max(tl.abs(h), axis=0))
        tl.store(h_ptr + rows[None, :] * N + n[:, None], to_e4m3(h * inv[None, :]), mask=mask)
        tl.store(hs_ptr + rows * (N // QB) + n_block, scale, mask=m_ok)
    else:
        tl.store(h_ptr + rows[None, :] * N + n[:, None], h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_pair_rows(out_ptr, y, pair, n, N, mask):
    """y [BN, BM] into rows `pair` of out [P, N] (GEMM 2's output in pair order)."""
    tl.store(out_ptr + pair.to(tl.int64)[None, :] * N + n[:, None], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _epilogue(acc, acc2, pair, pair_weight_ptr, out_ptr, outs_ptr, row0, m, m_ok, n, N, mask, limit,
              GATED: tl.constexpr, QUANT: tl.constexpr):
    """GEMM 1: the clamped SwiGLU with the routing weight -> h rows of the block; GEMM 2: y rows of the pairs."""
    if GATED:
        route = tl.load(pair_weight_ptr + pair, mask=m_ok, other=0.0)
        _swiglu_store(acc, acc2, route, out_ptr, outs_ptr, row0 + m, n, N, mask, m_ok, tl.program_id(1), limit,
                      QUANT)
    else:
        _store_pair_rows(out_ptr, acc, pair, n, N, mask)


@triton.jit
def _moe_gemm_kernel(a_ptr, as_ptr, stride_a, pair_row_ptr, pair_weight_ptr, sorted_pair_ptr, block_bucket_ptr,
                     bucket_start_ptr, bucket_count_ptr, w_ptr, s_ptr, out_ptr, outs_ptr, part_ptr,
                     num_experts, K, N, stride_we, stride_wn, stride_se, stride_sn, limit,
                     GATED: tl.constexpr, FMT: tl.constexpr, MMA_FP8: tl.constexpr, USE_ASM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    # GATED (GEMM 1): A = x rows of the block's pairs, weight rows n (gate) and N + n (up) -> h rows [block rows, N]
    # (FP8 + scales outs for quantized weights). Else (GEMM 2): A = h rows of the block, weight rows n -> y rows of
    # the block's pairs [P, N]. A's scales (as_ptr): [rows, K/128] fp32, contiguous.
    # SPLIT_K > 1: program_id(2) sums its 1/SPLIT_K of K into fp32 partials part [SPLIT_K, block rows, N or 2N]
    # (rows holding a pair only); `_split_reduce_kernel` adds them in split order and runs the epilogue.
    b = tl.program_id(0)
    bucket, m, m_ok, pair = _block_rows(block_bucket_ptr, bucket_start_ptr, bucket_count_ptr, sorted_pair_ptr, b,
                                        BLOCK_M)
    if bucket < 0:
        return
    row0 = b * BLOCK_M
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    mask = n_ok[:, None] & m_ok[None, :]
    if bucket == num_experts:      # off-rank pairs: zero rows of y
        if not GATED and SPLIT_K == 1:
            _store_pair_rows(out_ptr, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), pair, n, N, mask)
        return
    if GATED:
        a_rows = tl.load(pair_row_ptr + pair, mask=m_ok, other=0).to(tl.int64)
    else:
        a_rows = (row0 + m).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a
    as_ptrs = as_ptr + a_rows * (K // QB)
    expert = bucket.to(tl.int64)
    w_rows, s_rows = _row_ptrs(w_ptr, s_ptr, expert, n, stride_we, stride_wn, stride_se, stride_sn, FMT)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if GATED:
        w_rows2, s_rows2 = _row_ptrs(w_ptr, s_ptr, expert, N + n, stride_we, stride_wn, stride_se, stride_sn, FMT)
        acc2 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    kb_per_split = K // QB // SPLIT_K
    kb_first = tl.program_id(2) * kb_per_split
    k_first = kb_first * QB
    k_last = k_first + (kb_per_split - 1) * QB
    s_a = _act_scales(as_ptrs, k_first, m_ok, FMT, BLOCK_M)
    raw = _weight_scales(s_rows, k_first, n_ok, FMT)
    if GATED:
        raw2 = _weight_scales(s_rows2, k_first, n_ok, FMT)
    for kb in range(kb_first, kb_first + kb_per_split):
        k0 = kb * QB
        k_next = tl.minimum(k0 + QB, k_last)         # the last step re-reads its own block's scales
        s_a_next = _act_scales(as_ptrs, k_next, m_ok, FMT, BLOCK_M)
        raw_next = _weight_scales(s_rows, k_next, n_ok, FMT)
        acc = _block_dot(acc, a_ptrs, k0, m_ok, w_rows, n_ok, raw, s_a, FMT, MMA_FP8, USE_ASM, BLOCK_M, BLOCK_N)
        raw = raw_next
        if GATED:
            raw2_next = _weight_scales(s_rows2, k_next, n_ok, FMT)
            acc2 = _block_dot(acc2, a_ptrs, k0, m_ok, w_rows2, n_ok, raw2, s_a, FMT, MMA_FP8, USE_ASM, BLOCK_M,
                              BLOCK_N)
            raw2 = raw2_next
        s_a = s_a_next
    if SPLIT_K > 1:
        width = 2 * N if GATED else N
        part_rows = part_ptr + (tl.program_id(2) * tl.num_programs(0) * BLOCK_M + row0 + m).to(tl.int64) * width
        tl.store(part_rows[None, :] + n[:, None], acc, mask=mask)
        if GATED:
            tl.store(part_rows[None, :] + (N + n)[:, None], acc2, mask=mask)
    elif GATED:
        _epilogue(acc, acc2, pair, pair_weight_ptr, out_ptr, outs_ptr, row0, m, m_ok, n, N, mask, limit, GATED,
                  FMT != 2)
    else:
        _epilogue(acc, acc, pair, pair_weight_ptr, out_ptr, outs_ptr, row0, m, m_ok, n, N, mask, limit, GATED,
                  FMT != 2)


@triton.jit
def _split_reduce_kernel(part_ptr, pair_weight_ptr, sorted_pair_ptr, block_bucket_ptr, bucket_start_ptr,
                         bucket_count_ptr, out_ptr, outs_ptr, num_experts, N, limit, GATED: tl.constexpr,
                         QUANT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The split-K partials of one block's rows, summed in split order, through GEMM 1's or GEMM 2's epilogue."""
    b = tl.program_id(0)
    bucket, m, m_ok, pair = _block_rows(block_bucket_ptr, bucket_start_ptr, bucket_count_ptr, sorted_pair_ptr, b,
                                        BLOCK_M)
    if bucket < 0:
        return
    row0 = b * BLOCK_M
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (n < N)[:, None] & m_ok[None, :]
    if bucket == num_experts:
        if not GATED:
            _store_pair_rows(out_ptr, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), pair, n, N, mask)
        return
    width = 2 * N if GATED else N
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):        # unrolled: the splits' loads in flight together
        rows = part_ptr + (s * tl.num_programs(0) * BLOCK_M + row0 + m).to(tl.int64) * width
        acc += tl.load(rows[None, :] + n[:, None], mask=mask, other=0.0)
        if GATED:
            acc2 += tl.load(rows[None, :] + (N + n)[:, None], mask=mask, other=0.0)
    _epilogue(acc, acc2, pair, pair_weight_ptr, out_ptr, outs_ptr, row0, m, m_ok, n, N, mask, limit, GATED, QUANT)


@triton.jit
def _swiglu_kernel(gu_ptr, h_ptr, inter, limit, BLOCK: tl.constexpr):
    """One row of gu [T, 2I] bf16 (gate, then up) -> h [T, I] bf16, `_swiglu_store`'s math with weight 1."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < inter
    g = tl.minimum(tl.load(gu_ptr + t * 2 * inter + cols, mask=ok, other=0.0).to(tl.float32), limit)
    v = tl.clamp(tl.load(gu_ptr + t * 2 * inter + inter + cols, mask=ok, other=0.0).to(tl.float32), -limit, limit)
    tl.store(h_ptr + t * inter + cols, (g * tl.sigmoid(g) * v).to(tl.bfloat16), mask=ok)


@triton.jit
def _combine_kernel(y_ptr, out_ptr, D, k, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(k):               # slot order, fp32
        acc += tl.load(y_ptr + (t * k + j) * D + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * D + d, acc, mask=ok)


# ---------------------------------------------------------------------------------------------- launchers
def dispatch(pair_expert: torch.Tensor, num_experts: int, block_m: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """pair_expert int32 [P] (P >= 1) -> (sorted_pair int32 [max_blocks * BM] (padding rows unwritten),
    block_bucket int32 [max_blocks], bucket_start int32 [NB_PAD], bucket_count int32 [NB_PAD]); see the module doc."""
    num_pairs = pair_expert.shape[0]
    dev = pair_expert.device
    nb = num_experts + 1
    nb_pad = triton.next_power_of_2(nb)
    sub = max(16, min(256, 8192 // nb_pad))
    block_b = max(16, 4096 // nb_pad)
    num_blocks = num_pairs // block_m + min(nb, num_pairs)
    sorted_pair = torch.empty(num_blocks * block_m, dtype=torch.int32, device=dev)
    block_bucket = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    bucket_start = torch.empty(nb_pad, dtype=torch.int32, device=dev)
    bucket_count = torch.empty(nb_pad, dtype=torch.int32, device=dev)
    warps = 4 if sub * nb_pad <= 4096 else 8
    chunk = sub * DISPATCH_SUBS
    if num_pairs <= chunk:
        _dispatch_single_kernel[(1,)](pair_expert, sorted_pair, block_bucket, bucket_start, bucket_count, num_pairs,
                                      num_experts, num_blocks, BLOCK_M=block_m, SUB_P=sub, NB_PAD=nb_pad,
                                      BLOCK_B=block_b, num_warps=warps)
        return sorted_pair, block_bucket, bucket_start, bucket_count
    num_chunks = triton.cdiv(num_pairs, chunk)
    chunk_counts = torch.empty(num_chunks, nb_pad, dtype=torch.int32, device=dev)
    chunk_base = torch.empty(num_chunks, nb_pad, dtype=torch.int32, device=dev)
    _dispatch_count_kernel[(num_chunks,)](pair_expert, chunk_counts, num_pairs, num_experts, SUB_P=sub,
                                          NB_PAD=nb_pad, CHUNK=chunk, num_warps=warps)
    _dispatch_offsets_kernel[(1,)](chunk_counts, chunk_base, block_bucket, bucket_start, bucket_count, num_chunks,
                                   num_experts, num_blocks, BLOCK_M=block_m, NB_PAD=nb_pad,
                                   BLOCK_C=max(1, 4096 // nb_pad), BLOCK_B=block_b, num_warps=8)
    _dispatch_scatter_kernel[(num_chunks,)](pair_expert, chunk_base, sorted_pair, num_pairs, num_experts, SUB_P=sub,
                                            NB_PAD=nb_pad, CHUNK=chunk, num_warps=warps)
    return sorted_pair, block_bucket, bucket_start, bucket_count


def _weight_args(w: torch.Tensor, s: torch.Tensor | None, fmt: str) -> tuple:
    w_arg = w.view(torch.uint8) if fmt == "fp4" else w
    s_arg = s.view(torch.uint8) if s is not None else w_arg
    s_strides = (s.stride(0), s.stride(1)) if s is not None else (0, 0)
    return w_arg, s_arg, w.stride(0), w.stride(1), *s_strides


@dataclass(frozen=True)
class GemmTiles:
    """Launch geometry of one grouped GEMM: weight rows per program, warps, K splits, pipeline stages."""
    block_n: int
    warps: int
    split_k: int = 1
    stages: int = 4


def gemm_tiles(num_blocks: int, num_pairs: int, num_experts: int, n: int, k: int, block_m: int, gated: bool,
               weight_bytes: float, device: torch.device) -> GemmTiles:
    """128 weight rows per program cost the fewest instructions per weight element (the MMA fences and the scale
    loads are per K step, whatever the rows) and let GEMM 1 quantize h per 128 in its epilogue (so always there
    for quantized weights); else 64 when 128 would leave fewer than ~2 programs per SM. Where the tiles leave the
    SMs short of work (decode: a handful of experts; the one shared expert), K is split (>= 2 K steps per split)
    until there are ~4 programs per SM, as long as the fp32 partials (written and read once) stay under half the
    weight bytes the GEMM streams (the shared expert at 128 tokens would otherwise move 4x its weights in
    partials). weight_bytes: bytes per weight element (0.5 FP4, 1 FP8, 2 bf16). 8 warps where 4 would not fit
    the accumulators in registers.

    On the H200 this reaches 2.5-4x the HBM floor at 1-256 decode tokens (benchmarks/results/fast-moe-*): the
    K loop is latency-bound (each 32-deep FP8 dot waits for its MMA before the next, two programs per SM)."""
    sms = num_sms(device)
    quantized = weight_bytes < 2
    width = 2 * n if gated else n
    streamed = min(num_experts, num_blocks) * width * k * weight_bytes
    rows = min(num_pairs, num_blocks * block_m)
    block_n = 128 if (gated and quantized) or num_blocks * triton.cdiv(n, 128) >= 2 * sms else 64
    tiles = num_blocks * triton.cdiv(n, block_n)
    split_k = 1
    while (tiles * split_k < 4 * sms and k // QBLOCK % (2 * split_k) == 0 and k // QBLOCK // (2 * split_k) >= 2
           and 2 * (2 * split_k) * rows * width * 4 <= streamed / 2):
        split_k *= 2
    if gated:          # 3 stages: ~15 % faster than 4 at 64-256 decode tokens (H200 sweep, --tilings)
        return GemmTiles(block_n, 4 if block_m <= 32 else 8, split_k, stages=3)
    return GemmTiles(block_n, 8 if block_m == 64 else 4, split_k)


def _grouped_gemm(a, a_scale, common, w, s, strides, out, out_scale, num_experts, k, n, limit, num_blocks,
                  tiles: GemmTiles, gated: bool, flags: dict) -> None:
    """One grouped GEMM launch (plus the split-K reduce when K is split)."""
    quantized = flags["FMT"] != FMT_CODES["bf16"]
    if gated and quantized and tiles.block_n != QBLOCK:
        raise ValueError(f"GEMM 1 of quantized experts quantizes h per 128 columns: block_n must be 128, "
                         f"got {tiles.block_n}")
    width = 2 * n if gated else n
    part = torch.empty(tiles.split_k, num_blocks * flags["BLOCK_M"], width, dtype=torch.float32, device=a.device) \
        if tiles.split_k > 1 else out
    _moe_gemm_kernel[(num_blocks, triton.cdiv(n, tiles.block_n), tiles.split_k)](
        a, a_scale, a.stride(0), *common, w, s, out, out_scale, part, num_experts, k, n, *strides, limit,
        GATED=gated, BLOCK_N=tiles.block_n, SPLIT_K=tiles.split_k, num_warps=tiles.warps, num_stages=tiles.stages,
        **flags)
    if tiles.split_k > 1:
        _split_reduce_kernel[(num_blocks, triton.cdiv(n, QBLOCK))](
            part, *common[1:], out, out_scale, num_experts, n, limit, GATED=gated, QUANT=quantized,
            SPLIT_K=tiles.split_k, BLOCK_M=flags["BLOCK_M"], BLOCK_N=QBLOCK, num_warps=4)


def expert_forward(x: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor, pair_weight: torch.Tensor,
                   experts, swiglu_limit: float, block_m: int, mma_fp8: bool = True,
                   tiles: tuple[GemmTiles | None, GemmTiles | None] = (None, None)) -> torch.Tensor:
    """The fused pipeline (module doc) -> y bf16 [P, D] in pair order. x [R, D] bf16 contiguous; pair_row int32
    or int64 [P]; pair_expert int32 [P]; pair_weight fp32 [P]; experts an `ExpertWeights`; block_m rows per
    expert block (`moe.block_m_for`). mma_fp8 False widens both operands to bf16 (exact too) for a bf16 MMA.
    tiles forces GEMM 1's / GEMM 2's launch geometry (tests, benchmarks; None = `gemm_tiles`)."""
    num_pairs = pair_expert.shape[0]
    d, inter, num_experts = experts.hidden_size, experts.inter_size, experts.num_experts
    y = torch.empty(num_pairs, d, dtype=torch.bfloat16, device=x.device)
    if num_pairs == 0:
        return y
    bm = block_m
    sorted_pair, block_bucket, bucket_start, bucket_count = dispatch(pair_expert, num_experts, bm)
    num_blocks = block_bucket.shape[0]
    quantized = experts.fmt != "bf16"
    if quantized:       # x once to its FP8 blocks (shared by every expert and weight tile); h written as FP8
        a1, a1_scale = act_quant_fp8(x)
        h = torch.empty(num_blocks * bm, inter, dtype=torch.float8_e4m3fn, device=x.device)
        h_scale = torch.empty(num_blocks * bm, inter // QBLOCK, dtype=torch.float32, device=x.device)
    else:
        a1, a1_scale = x, x
        h = torch.empty(num_blocks * bm, inter, dtype=torch.bfloat16, device=x.device)
        h_scale = h
    weight_bytes = {"fp4": 0.5, "fp8": 1.0, "bf16": 2.0}[experts.fmt]
    tiles1 = tiles[0] or gemm_tiles(num_blocks, num_pairs, num_experts, inter, d, bm, True, weight_bytes, x.device)
    tiles2 = tiles[1] or gemm_tiles(num_blocks, num_pairs, num_experts, d, inter, bm, False, weight_bytes, x.device)
    common = (pair_row, pair_weight, sorted_pair, block_bucket, bucket_start, bucket_count)
    flags = dict(FMT=FMT_CODES[experts.fmt], MMA_FP8=mma_fp8, USE_ASM=x.is_cuda, BLOCK_M=bm)
    w13, s13, *strides13 = _weight_args(experts.w13, experts.s13, experts.fmt)
    w2, s2, *strides2 = _weight_args(experts.w2, experts.s2, experts.fmt)
    limit = float(swiglu_limit)
    _grouped_gemm(a1, a1_scale, common, w13, s13, strides13, h, h_scale, num_experts, d, inter, limit, num_blocks,
                  tiles1, True, flags)
    _grouped_gemm(h, h_scale, common, w2, s2, strides2, y, y, num_experts, inter, d, limit, num_blocks, tiles2,
                  False, flags)
    return y


def swiglu(gu: torch.Tensor, limit: float) -> torch.Tensor:
    """gu [T, 2I] bf16 contiguous -> h = bf16(silu(min(g, L)) * clamp(v, -L, L)) [T, I]."""
    num_rows, inter = gu.shape[0], gu.shape[1] // 2
    h = torch.empty(num_rows, inter, dtype=torch.bfloat16, device=gu.device)
    if num_rows:
        block = min(1024, triton.next_power_of_2(inter))
        _swiglu_kernel[(num_rows, triton.cdiv(inter, block))](gu, h, inter, float(limit), BLOCK=block, num_warps=4)
    return h


def combine_pairs(y: torch.Tensor, k: int) -> torch.Tensor:
    """y [T*k, D] bf16 -> [T, D] fp32: per token the sum of its k slots in slot order."""
    num_tokens, d = y.shape[0] // k, y.shape[1]
    out = torch.empty(num_tokens, d, dtype=torch.float32, device=y.device)
    if num_tokens:
        block_d = min(1024, triton.next_power_of_2(d))
        _combine_kernel[(num_tokens, triton.cdiv(d, block_d))](y, out, d, k, BLOCK_D=block_d, num_warps=4)
    return out

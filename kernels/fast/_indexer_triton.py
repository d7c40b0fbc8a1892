"""Triton kernels of the fast lightning indexer (`dsv4.kernels.fast.indexer` documents the math).

  _query_kernel    grid (T, ceil(H / 16)): RoPE -> bf16 -> Hadamard as 32-column tensor-core dots against a
                   +-1 matrix generated in registers -> bf16 -> MXFP4 fake quant, 16 heads per program.
  _score_kernel    grid (T, key chunks): q rounded once per program to e4m3 with a power-of-two scale per head
                   (folded into the head weights: ReLU commutes with a positive scale); keys streamed from the
                   paged pool as int32 words, each 32-block's e2m1 codes turned into e4m3 bytes four at a time
                   (e4m3 bits (c & 7) << 2 | (c & 8) << 4 are exactly e2m1(c) * 2^-6, subnormals included), one
                   FP8 dot per block with its scale relative to the key's largest applied to the fp32 partial;
                   ReLU, weighted head sum, bf16, 16-bit order-preserving key into the workspace (0 = not
                   selectable).
  select           grid (T, segments of >= 1024 keys, <= 32 per row): _hist_kernel level 0 (high-byte
                   histogram, merged over segments with atomics), level 1 (low-byte histogram inside the
                   threshold's bucket, merged, plus per-segment suffix counts), then _compact_kernel: the exact
                   k-th key, each segment's output offset from the earlier segments' counts, its chosen indices in
                   index order (ties at the threshold to the lower index), and the -1 padding.
Five graph nodes per call (a memset of the merged histograms, score, two histogram passes, compaction), four
for T <= 16, where the score kernel builds the level-0 histogram itself (it is latency-bound there). Grids
come from T, H and the block-table width; visible lengths are read on the device (no host synchronisation).
No float64 anywhere (`_triton_math.sincos` replaces tl.sin / tl.cos).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.fast._triton_math import (
    FP4_FLOOR,
    FP8_FLOOR,
    INV_FP4_MAX,
    INV_FP8_MAX,
    exp2_int,
    round_e2m1,
    sincos,
    ue8m0_scale,
)

QUERY_HEADS = 16          # heads per query program (the tensor-core M dim)
SCORE_KEYS = 128          # keys per score-kernel iteration (the tensor-core M dim)
MIN_SEGMENT, MAX_SEGMENTS = 1024, 32   # select programs: segments of >= 1024 keys, <= 32 segments per row
HIST_STRIDE: tl.constexpr = tl.constexpr(260)   # histogram rows: 256 bins, a count, pad
TARGET_PROGRAMS = 1024    # score kernel: enough programs to fill an H200 a few times over
FUSE_HIST_TOKENS = 16     # up to this many tokens the score kernel also builds the select's level-0 histogram


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------------------------------------- query
@triton.jit
def _query_kernel(q_ptr, pos_ptr, freq_ptr, out_ptr, num_heads, inv_sqrt_d,
                  D: tl.constexpr, ROPE_HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, D)
    hmask = (h < num_heads)[:, None]
    base = t.to(tl.int64) * num_heads * D
    offs = base + h[:, None] * D + i[None, :]
    # RoPE (interleaved pairs of the last 2 * ROPE_HALF dims): x' = x cos -+ partner sin, partner = x[i ^ 1].
    x = tl.load(q_ptr + offs, mask=hmask, other=0.0).to(tl.float32)                 # [BH, D]
    rope_idx = i - (D - 2 * ROPE_HALF)
    is_rope = rope_idx >= 0
    partner = tl.load(q_ptr + base + h[:, None] * D + (i ^ 1)[None, :], mask=hmask & is_rope[None, :],
                      other=0.0).to(tl.float32)
    freq = tl.load(freq_ptr + rope_idx // 2, mask=is_rope, other=0.0)
    sin, cos = sincos(tl.load(pos_ptr + t).to(tl.float32) * freq)                # fp32 angle, as the reference
    sign = tl.where(i % 2 == 0, -1.0, 1.0)
    roped = x * cos[None, :] + partner * (sign * sin)[None, :]
    x = tl.where(is_rope[None, :], roped, x).to(tl.bfloat16)
    # Hadamard, 32 output columns at a time: H[i, j] = (-1)^popcount(i & j) (Sylvester order).
    c = tl.arange(0, 32)
    for b in tl.static_range(D // 32):
        parity = i[:, None] & (b * 32 + c)[None, :]
        parity ^= parity >> 4
        parity ^= parity >> 2
        parity ^= parity >> 1
        had = tl.where((parity & 1) == 0, 1.0, -1.0).to(tl.bfloat16)                 # [D, 32]
        y = tl.dot(x, had) * inv_sqrt_d                                               # [BH, 32] fp32
        y = y.to(tl.bfloat16).to(tl.float32)
        # MXFP4: this 32-column slice is one block per head.
        scale, exponent = ue8m0_scale(tl.max(tl.abs(y), axis=1), INV_FP4_MAX, FP4_FLOOR)
        inv_scale = exp2_int(127 - exponent)
        v = round_e2m1(y * inv_scale[:, None]) * scale[:, None]
        tl.store(out_ptr + base + h[:, None] * D + (b * 32 + c)[None, :], v.to(tl.bfloat16), mask=hmask)


def indexer_query(q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Launcher of `_query_kernel`; contract: `dsv4.kernels.fast.indexer.indexer_query`."""
    num_tokens, num_heads, d = q.shape
    if d & (d - 1) or not 32 <= d <= 256 or 2 * inv_freq.shape[0] > d:
        raise ValueError(f"indexer_query: head dim {d} must be a power of two in [32, 256] holding the rope dims")
    q = q.contiguous()
    out = torch.empty_like(q)
    if num_tokens and num_heads:
        grid = (num_tokens, triton.cdiv(num_heads, QUERY_HEADS))
        _query_kernel[grid](q, positions.contiguous(), inv_freq.contiguous().float(), out, num_heads,
                            float(torch.tensor(d ** -0.5, dtype=torch.float32)), D=d, ROPE_HALF=inv_freq.shape[0],
                            BLOCK_H=QUERY_HEADS, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------- score
@triton.jit
def _bytes_of(w, k: tl.constexpr):
    return ((w >> (8 * k)) & 0xFF).to(tl.uint8)


@triton.jit
def _key_block_e4m3(pool32_ptr, row32, present, b: tl.constexpr, BLOCK_E: tl.constexpr):
    """32-block b of BLOCK_E keys (bytes 16b .. 16b+15 = int32 words 4b .. 4b+3) as an e4m3 [BLOCK_E, 32] tile in
    element order. Four bytes at a time: e4m3 bits ((c & 7) << 2) | ((c & 8) << 4) are exactly e2m1(c) * 2^-6
    (subnormals included), for the low nibbles (elements 2i) and the high ones (2i + 1)."""
    # Four separate [E] loads, not one [E, 4] load: the 68-byte rows start at any 4-byte boundary, and the
    # compiler's alignment analysis once turned the [E, 4] load into misaligned 16-byte vector loads on the GPU.
    w0 = tl.load(pool32_ptr + row32 + b * 4, mask=present, other=0)
    w1 = tl.load(pool32_ptr + row32 + (b * 4 + 1), mask=present, other=0)
    w2 = tl.load(pool32_ptr + row32 + (b * 4 + 2), mask=present, other=0)
    w3 = tl.load(pool32_ptr + row32 + (b * 4 + 3), mask=present, other=0)
    word = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_E, 4])       # [E, 4] int32, in order
    lo = ((word << 2) & 0x1C1C1C1C) | ((word << 4) & -2139062144)                   # -2139062144 = 0x80808080
    hi = ((word >> 2) & 0x1C1C1C1C) | (word & -2139062144)
    # Element 8w + 2i + h (byte i = 2 i1 + i0 of word w, nibble h): the last joined axis is the fastest.
    lo_i = tl.join(tl.join(_bytes_of(lo, 0), _bytes_of(lo, 2)), tl.join(_bytes_of(lo, 1), _bytes_of(lo, 3)))
    hi_i = tl.join(tl.join(_bytes_of(hi, 0), _bytes_of(hi, 2)), tl.join(_bytes_of(hi, 1), _bytes_of(hi, 3)))
    return tl.reshape(tl.join(lo_i, hi_i), [BLOCK_E, 32]).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _q_block(q_base, h, hmask, b: tl.constexpr):
    """q columns 32b .. 32b+31 of every head, fp32 [H, 32]."""
    i = tl.arange(0, 32)
    return tl.load(q_base + h[:, None] * 128 + (b * 32 + i)[None, :], mask=hmask[:, None], other=0.0).to(tl.float32)


@triton.jit
def _q_operand(qb, inv_scale):
    """[H, 32] fp32 -> the [32, H] e4m3 dot operand (exact power-of-two scaling)."""
    return tl.trans((qb * inv_scale[:, None]).to(tl.float8e4nv))


@triton.jit
def _block_scale(exps, top, b: tl.constexpr):
    return exp2_int(((exps >> (8 * b)) & 0xFF) - top)[:, None]                      # 2^(e_b - e_max) per key


@triton.jit
def _score_kernel(q_ptr, w_ptr, pool32_ptr, pos_ptr, seq_ptr, table_ptr, keys_ptr, merged_ptr, num_heads,
                  num_blocks, table_width, epb, ratio, row_stride, H_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                  ITERS: tl.constexpr, FUSE_HIST: tl.constexpr):
    t = tl.program_id(0)
    first = tl.program_id(1) * (BLOCK_E * ITERS)
    seq = tl.load(seq_ptr + t)
    num_visible = tl.minimum((tl.load(pos_ptr + t) + 1) // ratio, table_width * epb)
    if first < num_visible:
        h = tl.arange(0, H_PAD)
        hmask = h < num_heads
        q_base = q_ptr + t.to(tl.int64) * num_heads * 128
        # One power-of-two scale per head (amax / 448) makes q an e4m3 operand; it joins the head weight
        # (ReLU commutes with a positive scale), with the 2^6 of the key encoding.
        q0, q1 = _q_block(q_base, h, hmask, 0), _q_block(q_base, h, hmask, 1)
        q2, q3 = _q_block(q_base, h, hmask, 2), _q_block(q_base, h, hmask, 3)
        amax = tl.maximum(tl.maximum(tl.max(tl.abs(q0), axis=1), tl.max(tl.abs(q1), axis=1)),
                          tl.maximum(tl.max(tl.abs(q2), axis=1), tl.max(tl.abs(q3), axis=1)))
        scale, exponent = ue8m0_scale(amax, INV_FP8_MAX, FP8_FLOOR)
        inv_scale = exp2_int(127 - exponent)
        w = tl.load(w_ptr + t * num_heads + h, mask=hmask, other=0.0).to(tl.float32) * scale * 64.0
        q0, q1 = _q_operand(q0, inv_scale), _q_operand(q1, inv_scale)
        q2, q3 = _q_operand(q2, inv_scale), _q_operand(q3, inv_scale)
        out_base = keys_ptr + t.to(tl.int64) * row_stride
        hist = tl.zeros([256], dtype=tl.int32)
        num_present = tl.zeros([], dtype=tl.int32)
        for it in range(ITERS):
            e = first + it * BLOCK_E + tl.arange(0, BLOCK_E)
            valid = e < num_visible
            block = tl.load(table_ptr + seq * table_width + e // epb, mask=valid, other=-1)
            present = valid & (block >= 0) & (block < num_blocks)
            row32 = tl.where(present, (block * epb + e % epb) * 17, 0)               # 68-byte entries, int32 units
            exps = tl.load(pool32_ptr + row32 + 16, mask=present, other=0)           # the 4 UE8M0 bytes
            top = tl.maximum(tl.maximum(exps & 0xFF, (exps >> 8) & 0xFF),
                             tl.maximum((exps >> 16) & 0xFF, (exps >> 24) & 0xFF))
            acc = tl.dot(_key_block_e4m3(pool32_ptr, row32, present, 0, BLOCK_E), q0) * _block_scale(exps, top, 0)
            acc += tl.dot(_key_block_e4m3(pool32_ptr, row32, present, 1, BLOCK_E), q1) * _block_scale(exps, top, 1)
            acc += tl.dot(_key_block_e4m3(pool32_ptr, row32, present, 2, BLOCK_E), q2) * _block_scale(exps, top, 2)
            acc += tl.dot(_key_block_e4m3(pool32_ptr, row32, present, 3, BLOCK_E), q3) * _block_scale(exps, top, 3)
            score = tl.sum(tl.maximum(acc, 0.0) * w[None, :], axis=1) * exp2_int(top - 127)
            # bf16 score -> 16-bit key with the float order (-0 == +0); 0 marks "not selectable".
            bits = score.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            bits = tl.where(bits == 0x8000, 0, bits)
            key = tl.where(bits >= 0x8000, ~bits & 0xFFFF, bits | 0x8000)
            key = tl.where(present, tl.maximum(key, 1), 0)
            tl.store(out_base + e, key.to(tl.int16), mask=valid)
            if FUSE_HIST:
                hist += tl.histogram(key >> 8, 256, mask=valid)
                num_present += tl.sum(present.to(tl.int32), axis=0)
        if FUSE_HIST:                # the select's level-0 histogram, merged over programs (small T: saves a node)
            tl.atomic_add(merged_ptr + t * HIST_STRIDE + tl.arange(0, 256), hist, mask=hist > 0, sem="relaxed")
            tl.atomic_add(merged_ptr + t * HIST_STRIDE + 256, num_present, sem="relaxed")


# ---------------------------------------------------------------------------------------------- select
# Radix select on the 16-bit keys, spread over (token, segment) programs. merged [2, T, HIST_STRIDE] int32 (zeroed
# per call): level 0 = high-byte histogram of the row + (slot 256) its selectable count, level 1 = low-byte histogram
# of the keys in the threshold's high-byte bucket; both summed over segments with atomics. Per segment, the level-1
# pass also keeps its own low-byte histogram as suffix sums (slot b: keys >= b, slot 256: 0) and (slot 257) its
# keys in higher buckets, which is all the compaction needs to place its entries after the earlier segments'.
@triton.jit
def _threshold_bin(hist, need):
    """The bin holding the need-th largest key (1-based, need >= 1) and how many keys lie in higher bins."""
    at_or_above = tl.cumsum(hist, 0, reverse=True)
    bin_idx = tl.sum((at_or_above >= need).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(tl.arange(0, 256) == bin_idx, at_or_above - hist, 0), axis=0)
    return bin_idx, above


@triton.jit
def _level_threshold(merged_ptr, level: tl.constexpr, t, num_tokens, need):
    hist = tl.load(merged_ptr + (level * num_tokens + t) * HIST_STRIDE + tl.arange(0, 256))
    return _threshold_bin(hist, tl.maximum(need, 1))


@triton.jit
def _row_k(merged_ptr, t, topk):
    """k = min(topk, selectable keys of the row)."""
    return tl.minimum(tl.load(merged_ptr + t * HIST_STRIDE + 256), topk)


@triton.jit
def _hist_kernel(keys_ptr, pos_ptr, merged_ptr, seg_ptr, num_tokens, row_stride, row_len, ratio, topk,
                 num_segments, LEVEL: tl.constexpr, SEG: tl.constexpr):
    t = tl.program_id(0)
    g = tl.program_id(1)
    num_visible = tl.minimum((tl.load(pos_ptr + t) + 1) // ratio, row_len)
    if g * SEG < num_visible:
        idx = g * SEG + tl.arange(0, SEG)
        m = idx < num_visible
        key = tl.load(keys_ptr + t.to(tl.int64) * row_stride + idx, mask=m, other=0).to(tl.int32) & 0xFFFF
        bins = tl.arange(0, 256)
        out = merged_ptr + (LEVEL * num_tokens + t) * HIST_STRIDE
        if LEVEL == 0:
            hist = tl.histogram(key >> 8, 256, mask=m)
            tl.atomic_add(out + 256, tl.sum((key != 0).to(tl.int32), axis=0), sem="relaxed")
        else:
            hi_bin, above = _level_threshold(merged_ptr, 0, t, num_tokens, _row_k(merged_ptr, t, topk))
            hist = tl.histogram(key & 0xFF, 256, mask=m & ((key >> 8) == hi_bin))
            seg_row = seg_ptr + (t.to(tl.int64) * num_segments + g) * HIST_STRIDE
            tl.store(seg_row + bins, tl.cumsum(hist, 0, reverse=True))
            tl.store(seg_row + 256, 0)
            tl.store(seg_row + 257, tl.sum((m & ((key >> 8) > hi_bin)).to(tl.int32), axis=0))
        tl.atomic_add(out + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _compact_kernel(keys_ptr, pos_ptr, merged_ptr, seg_ptr, out_ptr, num_tokens, row_stride, row_len, ratio, topk,
                    num_segments, SEG: tl.constexpr, MAX_SEGMENTS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per (token, segment): the exact threshold, this segment's offsets from the earlier segments' counts, then
    its chosen entries (keys above the threshold, and the first ties in index order) in index order. Segment 0
    also writes the -1 padding."""
    t = tl.program_id(0)
    g = tl.program_id(1)
    num_visible = tl.minimum((tl.load(pos_ptr + t) + 1) // ratio, row_len)
    k = _row_k(merged_ptr, t, topk)
    out_base = out_ptr + t.to(tl.int64) * topk
    if g == 0:
        start = k - k % BLOCK_K
        while start < topk:
            j = start + tl.arange(0, BLOCK_K)
            tl.store(out_base + j, tl.full([BLOCK_K], -1, tl.int64), mask=(j >= k) & (j < topk))
            start += BLOCK_K
    if (g * SEG < num_visible) & (k > 0):
        hi_bin, above_hi = _level_threshold(merged_ptr, 0, t, num_tokens, k)
        lo_bin, above_lo = _level_threshold(merged_ptr, 1, t, num_tokens, k - above_hi)
        threshold = hi_bin * 256 + lo_bin
        num_ties = k - above_hi - above_lo                                           # ties to take, lowest first
        seg = tl.arange(0, MAX_SEGMENTS)
        before = seg < g
        rows = seg_ptr + (t.to(tl.int64) * num_segments + seg) * HIST_STRIDE
        at_or_above = tl.load(rows + lo_bin, mask=before, other=0)
        above = tl.load(rows + lo_bin + 1, mask=before, other=0)
        higher = tl.load(rows + 257, mask=before, other=0)
        ties_before = tl.sum(at_or_above - above, axis=0)
        taken_before = tl.sum(higher + above, axis=0) + tl.minimum(ties_before, num_ties)
        idx = g * SEG + tl.arange(0, SEG)
        m = idx < num_visible
        key = tl.load(keys_ptr + t.to(tl.int64) * row_stride + idx, mask=m, other=0).to(tl.int32) & 0xFFFF
        tie = (m & (key == threshold)).to(tl.int32)
        tie_rank = ties_before + tl.cumsum(tie, 0) - tie
        chosen = (m & (key > threshold)) | ((tie != 0) & (tie_rank < num_ties))
        slot = taken_before + tl.cumsum(chosen.to(tl.int32), 0) - 1
        tl.store(out_base + slot, idx.to(tl.int64), mask=chosen)


def score_iters(num_tokens: int, num_chunks: int) -> int:
    """Key chunks per score program: amortize the q preparation once there are programs enough to fill the GPU."""
    iters = 1
    while iters < 16 and num_tokens * triton.cdiv(num_chunks, 2 * iters) >= TARGET_PROGRAMS:
        iters *= 2
    return iters


def indexer_scores(q: torch.Tensor, weights: torch.Tensor, pool: torch.Tensor, layout: BatchLayout, ratio: int,
                   fuse_hist: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The score kernel alone: [T, E_max] int16 keys (garbage past each token's visible entries), the select's
    zeroed [2, T, HIST_STRIDE] histograms, and whether the score kernel already filled level 0 (fuse_hist None:
    for T <= FUSE_HIST_TOKENS, where the score kernel is latency-bound and one node fewer pays)."""
    num_tokens, num_heads, _ = q.shape
    epb = layout.block_size // ratio
    table = layout.block_table
    e_max = table.shape[1] * epb
    keys = torch.empty((num_tokens, e_max), dtype=torch.int16, device=q.device)
    merged = torch.zeros((2, num_tokens, HIST_STRIDE.value), dtype=torch.int32, device=q.device)
    fuse = num_tokens <= FUSE_HIST_TOKENS if fuse_hist is None else fuse_hist
    if num_tokens == 0 or e_max == 0:
        return keys, merged, fuse
    num_chunks = triton.cdiv(e_max, SCORE_KEYS)
    iters = score_iters(num_tokens, num_chunks)
    _score_kernel[(num_tokens, triton.cdiv(num_chunks, iters))](
        q.contiguous(), weights.contiguous(), pool.view(torch.int32), layout.positions, layout.token_seq,
        table.contiguous(), keys, merged, num_heads, pool.shape[0], table.shape[1], epb, ratio, e_max,
        H_PAD=max(16, _pow2(num_heads)), BLOCK_E=SCORE_KEYS, ITERS=iters, FUSE_HIST=fuse, num_warps=4)
    return keys, merged, fuse


def select_topk(keys: torch.Tensor, positions: torch.Tensor, ratio: int, topk: int,
                merged: torch.Tensor | None = None, have_level0: bool = False) -> torch.Tensor:
    """The select kernels on a score workspace (keys [T, E_max] int16, 0 = not selectable): [T, topk] int64, the
    chosen entries in ascending index order, -1 padded. merged: zeroed histograms (allocated if None);
    have_level0: the score kernel already accumulated level 0 into it."""
    num_tokens, e_max = keys.shape
    out = torch.empty((num_tokens, topk), dtype=torch.int64, device=keys.device)
    if num_tokens == 0 or topk == 0:
        return out
    if e_max == 0:
        return out.fill_(-1)
    if merged is None:
        merged = torch.zeros((2, num_tokens, HIST_STRIDE.value), dtype=torch.int32, device=keys.device)
    seg = max(MIN_SEGMENT, _pow2(triton.cdiv(e_max, MAX_SEGMENTS)))
    num_segments = triton.cdiv(e_max, seg)
    per_segment = torch.empty((num_tokens, num_segments, HIST_STRIDE.value), dtype=torch.int32, device=keys.device)
    grid = (num_tokens, num_segments)
    args = (keys, positions, merged, per_segment)
    shape = (num_tokens, keys.stride(0), e_max, ratio, topk, num_segments)
    warps = 4 if seg <= 2048 else 8
    for level in (1,) if have_level0 else (0, 1):
        _hist_kernel[grid](*args, *shape, LEVEL=level, SEG=seg, num_warps=warps)
    _compact_kernel[grid](*args, out, *shape, SEG=seg, MAX_SEGMENTS=_pow2(num_segments),
                          BLOCK_K=min(1024, _pow2(topk)), num_warps=warps)
    return out


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, pool: torch.Tensor, layout: BatchLayout, ratio: int,
                 topk: int, fuse_hist: bool | None = None) -> torch.Tensor:
    """Launchers of the score and select kernels; contract: `dsv4.kernels.fast.indexer.indexer_topk`."""
    if q.shape[-1] != 128 or pool.shape[-1] != 68 or pool.dtype != torch.uint8 or not pool.is_contiguous():
        raise ValueError(f"indexer_topk: needs q [T, H, 128] and a contiguous [blocks, epb, 68] uint8 pool, got "
                         f"{tuple(q.shape)} and {tuple(pool.shape)} {pool.dtype}")
    keys, merged, fused = indexer_scores(q, weights, pool, layout, ratio, fuse_hist)
    return select_topk(keys, layout.positions, ratio, topk, merged, fused)

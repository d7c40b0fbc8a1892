"""Triton kernels of the fast compressor flush (`dsv4.kernels.fast.compressor` documents the contract and math).

  _pool_kernel           grid (T, d / BLOCK_C). A token completing window w pools its coff*ratio slots for
                         BLOCK_C channels: each slot read from this step's a/z rows (position >= chunk start)
                         or from the sequence's state (held tokens of the current window, CSA's previous window),
                         online softmax over slot chunks in fp32 -> pooled fp32 into a [T, d] workspace. Other
                         tokens exit at once. Channel blocks keep the 128-slot HCA windows spread over SMs.
  _finish_state_kernel   grid (T + S * state channel blocks). Programs < T: the completing token's entry, as a
                         [d / 64, 64] tile: bf16, RMSNorm (one fp32 sum), bf16, RoPE (the pair partner re-read
                         from the workspace and normalized the same way), bf16, then the codec's bytes: FP8 e4m3
                         per 64-block + UE8M0 + bf16 rope bytes + zero pad, or (indexer keys) through a per-token
                         scratch row, Hadamard columns as fp32 reductions against +-1 generated in registers, MXFP4
                         nibble pairs + UE8M0. Programs >= T: one (sequence, channel block) of the state: CSA's
                         previous-window slots from the last completed window, then the tail tokens.
Both launches read lengths and positions on the device; grids come from T, S and d only (graph capturable).
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
from dsv4.kernels.kv_format import IndexFp4Codec, MainFp8Codec

STATE_BLOCK = 256     # state channels per state-update program


# ---------------------------------------------------------------------------------------------- pool
@triton.jit
def _pool_kernel(a_ptr, z_ptr, skv_ptr, ssc_ptr, pos_ptr, seq_ptr, start_ptr, first_ptr, slot_ptr, ws_ptr, stride_row,
                 D: tl.constexpr, M: tl.constexpr, COFF: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_S: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pos = tl.load(pos_ptr + t)
    if (pos + 1) % M == 0:
        seq = tl.load(seq_ptr + t)
        start = tl.load(start_ptr + seq)
        first = tl.load(first_ptr + seq)
        state_base = tl.load(slot_ptr + seq) * (COFF * M * COFF * D)
        w = pos // M
        held_window = start // M                     # the window whose first tokens the state holds
        m_run = tl.full([BLOCK_C], float("-inf"), tl.float32)
        l_run = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in tl.static_range(0, COFF * M, BLOCK_S):
            i = s0 + tl.arange(0, BLOCK_S)
            if COFF == 2:                            # CSA: slots 0..M-1 = window w-1, A-half; M..2M-1 = w, B-half
                is_a = i < M
                idx = tl.where(is_a, i, i - M)
                window = w - is_a.to(tl.int64)
                half = tl.where(is_a, 0, D)
                state_slot = tl.where(window == held_window, M + idx, idx)
            else:
                idx = i
                window = w + tl.zeros([BLOCK_S], dtype=tl.int64)
                half = tl.zeros([BLOCK_S], dtype=tl.int32)
                state_slot = idx
            slot_pos = window * M + idx
            from_row = (slot_pos >= start)[:, None]
            row = tl.where(slot_pos >= start, first + slot_pos - start, 0)
            step_off = (row * stride_row + half)[:, None] + c[None, :]
            state_off = state_base + (state_slot * (COFF * D) + half)[:, None] + c[None, :]
            av = (tl.load(a_ptr + step_off, mask=from_row, other=0.0)
                  + tl.load(skv_ptr + state_off, mask=~from_row, other=0.0))
            zv = tl.where(from_row, tl.load(z_ptr + step_off, mask=from_row, other=0.0),
                          tl.load(ssc_ptr + state_off, mask=~from_row, other=0.0))
            m_new = tl.maximum(m_run, tl.max(zv, axis=0))
            alpha = tl.exp(m_run - m_new)
            p = tl.exp(zv - m_new[None, :])
            l_run = l_run * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p * av, axis=0)
            m_run = m_new
        tl.store(ws_ptr + t.to(tl.int64) * D + c, acc / l_run)


# ---------------------------------------------------------------------------------------------- finish
@triton.jit
def _store_fp8_entry(entry, v, c, r, D: tl.constexpr, NOPE: tl.constexpr, ENTRY_WIDTH: tl.constexpr):
    """MainFp8Codec bytes: e4m3 of the nope dims per 64-block, bf16 rope dims (little-endian), UE8M0 scales,
    zero pad. v [D/64, 64] fp32 (bf16 values), row r of the tile = 64-block r."""
    is_nope = r < NOPE // 64
    scale, exponent = ue8m0_scale(tl.max(tl.abs(v), axis=1), INV_FP8_MAX, FP8_FLOOR)
    q = tl.minimum(tl.maximum(v * exp2_int(127 - exponent)[:, None], -448.0), 448.0)
    tl.store(entry + c, q.to(tl.float8e4nv).to(tl.uint8, bitcast=True), mask=is_nope)
    bits = v.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32)
    rope_byte = NOPE + 2 * (c - NOPE)
    tl.store(entry + rope_byte, (bits & 0xFF).to(tl.uint8), mask=~is_nope)
    tl.store(entry + rope_byte + 1, ((bits >> 8) & 0xFF).to(tl.uint8), mask=~is_nope)
    k = tl.arange(0, D // 64)
    scales_at = NOPE + 2 * (D - NOPE)
    tl.store(entry + scales_at + k, exponent.to(tl.uint8), mask=k < NOPE // 64)
    pad = tl.arange(0, 8)
    pad_at = scales_at + NOPE // 64
    tl.store(entry + pad_at + pad, tl.zeros([8], dtype=tl.uint8), mask=pad < ENTRY_WIDTH - pad_at)


@triton.jit
def _hadamard_cols(x, i, j, inv_sqrt_d):
    """bf16((H x)[j] * d^-0.5) for columns j [16] of x [D] (indices i), fp32 sums; H[i, j] = (-1)^popcount(i&j)."""
    parity = i[:, None] & j[None, :]
    parity ^= parity >> 4
    parity ^= parity >> 2
    parity ^= parity >> 1
    y = tl.sum(tl.where((parity & 1) == 0, x[:, None], -x[:, None]), axis=0) * inv_sqrt_d
    return y.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _e2m1_code(v):
    """e2m1 grid value (fp32) -> its 4-bit code: sign << 3 | grid index; -0 keeps its sign (code 8)."""
    a = tl.abs(v)
    idx = tl.where(a < 2.0, a * 2.0, tl.where(a < 4.0, a + 2.0, a * 0.5 + 4.0)).to(tl.int32)
    return idx | (((v.to(tl.int32, bitcast=True) >> 31) & 1) << 3)


@triton.jit
def _store_fp4_entry(entry, v, c, scratch, inv_sqrt_d, D: tl.constexpr, ROTATE: tl.constexpr):
    """IndexFp4Codec bytes: e2m1 pairs (element 2k in the low nibble) then one UE8M0 byte per 32. The tile is
    written to this token's scratch row and re-read by column, optionally through the Hadamard transform."""
    tl.store(scratch + c, v)
    tl.debug_barrier()               # the whole row is read back below by other threads of this program
    i = tl.arange(0, D)
    x = tl.load(scratch + i)
    k = tl.arange(0, 16)
    for b in tl.static_range(D // 32):
        even = b * 32 + 2 * k
        if ROTATE:
            ye = _hadamard_cols(x, i, even, inv_sqrt_d)
            yo = _hadamard_cols(x, i, even + 1, inv_sqrt_d)
        else:
            ye = tl.load(scratch + even)
            yo = tl.load(scratch + even + 1)
        amax = tl.maximum(tl.max(tl.abs(ye), axis=0), tl.max(tl.abs(yo), axis=0))
        scale, exponent = ue8m0_scale(amax, INV_FP4_MAX, FP4_FLOOR)
        inv = exp2_int(127 - exponent)
        code = _e2m1_code(round_e2m1(ye * inv)) | (_e2m1_code(round_e2m1(yo * inv)) << 4)
        tl.store(entry + b * 16 + k, code.to(tl.uint8))
        tl.store(entry + D // 2 + b, exponent.to(tl.uint8))


@triton.jit
def _finish_entry(t, ws_ptr, scratch_ptr, pos_ptr, seq_ptr, table_ptr, pool_ptr, norm_ptr, freq_ptr, eps,
                  inv_sqrt_d, table_width, num_blocks, epb, D: tl.constexpr, M: tl.constexpr, NOPE: tl.constexpr,
                  ROPE_HALF: tl.constexpr, ENTRY_WIDTH: tl.constexpr, IS_FP8: tl.constexpr, ROTATE: tl.constexpr):
    pos = tl.load(pos_ptr + t)
    if (pos + 1) % M == 0:
        w = pos // M
        column = w // epb
        block = tl.load(table_ptr + tl.load(seq_ptr + t) * table_width + column, mask=column < table_width,
                        other=-1)
        if (block >= 0) & (block < num_blocks):      # a missing block: the entry is not stored
            r = tl.arange(0, D // 64)[:, None]
            c = r * 64 + tl.arange(0, 64)[None, :]                                   # [D/64, 64] channels
            base = ws_ptr + t.to(tl.int64) * D
            x = tl.load(base + c).to(tl.bfloat16).to(tl.float32)
            inv_rms = tl.rsqrt(tl.sum(x * x) / D + eps)
            y = (x * inv_rms * tl.load(norm_ptr + c).to(tl.float32)).to(tl.bfloat16).to(tl.float32)
            # RoPE partner (channel c ^ 1), normalized exactly as y.
            xp = tl.load(base + (c ^ 1)).to(tl.bfloat16).to(tl.float32)
            yp = (xp * inv_rms * tl.load(norm_ptr + (c ^ 1)).to(tl.float32)).to(tl.bfloat16).to(tl.float32)
            rope_idx = c - (D - 2 * ROPE_HALF)
            is_rope = rope_idx >= 0
            freq = tl.load(freq_ptr + rope_idx // 2, mask=is_rope, other=0.0)
            sin, cos = sincos((w * M).to(tl.float32) * freq)
            sign = tl.where(c % 2 == 0, -1.0, 1.0)
            v = tl.where(is_rope, y * cos + sign * yp * sin, y)
            v = v.to(tl.bfloat16).to(tl.float32)
            entry = pool_ptr + (block * epb + w % epb) * ENTRY_WIDTH
            if IS_FP8:
                _store_fp8_entry(entry, v, c, r, D, NOPE, ENTRY_WIDTH)
            else:
                _store_fp4_entry(entry, v, c, scratch_ptr + t.to(tl.int64) * D, inv_sqrt_d, D, ROTATE)


# ---------------------------------------------------------------------------------------------- state
@triton.jit
def _advance_state(u, a_ptr, z_ptr, skv_ptr, ssc_ptr, start_ptr, len_ptr, first_ptr, slot_ptr, num_cblocks, stride_row,
                   D: tl.constexpr, M: tl.constexpr, COFF: tl.constexpr, BLOCK_W: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    seq = u // num_cblocks
    cw = (u % num_cblocks) * BLOCK_W + tl.arange(0, BLOCK_W)
    start = tl.load(start_ptr + seq)
    end = start + tl.load(len_ptr + seq)
    first = tl.load(first_ptr + seq)
    state_base = tl.load(slot_ptr + seq) * (COFF * M * COFF * D)
    last_window = end // M
    if COFF == 2:
        if last_window > start // M:                 # a window completed: it becomes the previous window
            i = tl.arange(0, M)
            slot_pos = (last_window - 1) * M + i
            from_row = (slot_pos >= start)[:, None]
            row = tl.where(slot_pos >= start, first + slot_pos - start, 0)
            step_off = (row * stride_row)[:, None] + cw[None, :]
            held_off = state_base + ((M + i) * (COFF * D))[:, None] + cw[None, :]
            kv = (tl.load(a_ptr + step_off, mask=from_row, other=0.0)
                  + tl.load(skv_ptr + held_off, mask=~from_row, other=0.0))
            sc = tl.where(from_row, tl.load(z_ptr + step_off, mask=from_row, other=0.0),
                          tl.load(ssc_ptr + held_off, mask=~from_row, other=0.0))
            prev_off = state_base + (i * (COFF * D))[:, None] + cw[None, :]
            tl.store(skv_ptr + prev_off, kv)
            tl.store(ssc_ptr + prev_off, sc)
    tl.debug_barrier()                               # the tail overwrites current slots read just above
    p0 = tl.maximum(start, last_window * M)          # tail: tokens after the chunk's last window boundary
    while p0 < end:
        p = p0 + tl.arange(0, BLOCK_T)
        m = (p < end)[:, None]
        step_off = ((first + p - start) * stride_row)[:, None] + cw[None, :]
        cur_off = state_base + (((COFF - 1) * M + p % M) * (COFF * D))[:, None] + cw[None, :]
        tl.store(skv_ptr + cur_off, tl.load(a_ptr + step_off, mask=m, other=0.0), mask=m)
        tl.store(ssc_ptr + cur_off, tl.load(z_ptr + step_off, mask=m, other=0.0), mask=m)
        p0 += BLOCK_T


@triton.jit
def _finish_state_kernel(ws_ptr, scratch_ptr, a_ptr, z_ptr, skv_ptr, ssc_ptr, pos_ptr, seq_ptr, start_ptr, len_ptr,
                         first_ptr, slot_ptr, table_ptr, pool_ptr, norm_ptr, freq_ptr, eps, inv_sqrt_d, num_tokens,
                         table_width, num_blocks, epb, num_cblocks, stride_row, D: tl.constexpr, M: tl.constexpr,
                         COFF: tl.constexpr, NOPE: tl.constexpr, ROPE_HALF: tl.constexpr,
                         ENTRY_WIDTH: tl.constexpr, IS_FP8: tl.constexpr, ROTATE: tl.constexpr,
                         BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    if pid < num_tokens:
        _finish_entry(pid, ws_ptr, scratch_ptr, pos_ptr, seq_ptr, table_ptr, pool_ptr, norm_ptr, freq_ptr, eps,
                      inv_sqrt_d, table_width, num_blocks, epb, D, M, NOPE, ROPE_HALF, ENTRY_WIDTH, IS_FP8, ROTATE)
    else:
        _advance_state(pid - num_tokens, a_ptr, z_ptr, skv_ptr, ssc_ptr, start_ptr, len_ptr, first_ptr, slot_ptr,
                       num_cblocks, stride_row, D, M, COFF, BLOCK_W, BLOCK_T)


@triton.jit
def _position_bias_kernel(z_ptr, ape_ptr, pos_ptr, stride_row, W, M, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = c < W
    row = (tl.load(pos_ptr + t) % M).to(tl.int64)
    zp = z_ptr + t.to(tl.int64) * stride_row + c
    tl.store(zp, tl.load(zp, mask=ok, other=0.0) + tl.load(ape_ptr + row * W + c, mask=ok, other=0.0), mask=ok)


def add_position_bias(z: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor) -> None:
    """z [T, W] fp32 (unit column stride) += ape[positions % ratio] in place; ape [ratio, W] fp32."""
    num_tokens, width = z.shape
    if num_tokens:
        block = min(1024, triton.next_power_of_2(width))
        _position_bias_kernel[(num_tokens, triton.cdiv(width, block))](
            z, ape.contiguous(), positions, z.stride(0), width, ape.shape[0], BLOCK=block, num_warps=4)


def compress_flush(a: torch.Tensor, z: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                   layout: BatchLayout, ratio: int, norm_weight: torch.Tensor, eps: float, inv_freq: torch.Tensor,
                   rotate: bool, pool: torch.Tensor, codec: MainFp8Codec | IndexFp4Codec) -> None:
    """Launchers of `_pool_kernel` + `_finish_state_kernel`; contract: `dsv4.kernels.fast.compressor`."""
    num_tokens, num_seqs = layout.positions.shape[0], layout.seq_slot.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return
    d = norm_weight.shape[0]
    coff = 2 if ratio == 4 else 1
    assert state_kv.is_contiguous() and state_score.is_contiguous() and pool.is_contiguous(), "in-place outputs"
    if a.dtype != torch.float32 or z.dtype != torch.float32 or a.stride(1) != 1 or z.stride(1) != 1 \
            or a.stride(0) != z.stride(0):
        a, z = a.float().contiguous(), z.float().contiguous()
    pooled = torch.empty((num_tokens, d), dtype=torch.float32, device=a.device)
    is_fp8 = isinstance(codec, MainFp8Codec)
    scratch = pooled if is_fp8 else torch.empty_like(pooled)
    block_c = min(d, 128 if coff == 2 else 64)
    _pool_kernel[(num_tokens, d // block_c)](
        a, z, state_kv, state_score, layout.positions, layout.token_seq, layout.seq_start, layout.seq_first_row,
        layout.seq_slot, pooled, a.stride(0), D=d, M=ratio, COFF=coff, BLOCK_C=block_c, BLOCK_S=min(coff * ratio, 32),
        num_warps=4)
    width = coff * d
    block_w = min(width, STATE_BLOCK)
    table = layout.block_table.contiguous()
    _finish_state_kernel[(num_tokens + num_seqs * (width // block_w),)](
        pooled, scratch, a, z, state_kv, state_score, layout.positions, layout.token_seq, layout.seq_start,
        layout.seq_len, layout.seq_first_row, layout.seq_slot, table, pool, norm_weight.contiguous(),
        inv_freq.contiguous().float(), float(eps), float(torch.tensor(d ** -0.5, dtype=torch.float32)), num_tokens,
        table.shape[1], pool.shape[0], layout.block_size // ratio, width // block_w, a.stride(0), D=d, M=ratio,
        COFF=coff, NOPE=codec.nope_dim if is_fp8 else 0, ROPE_HALF=inv_freq.shape[0], ENTRY_WIDTH=codec.width,
        IS_FP8=is_fp8, ROTATE=bool(rotate), BLOCK_W=block_w, BLOCK_T=min(ratio, 8), num_warps=4)

"""Triton kernels of the fast norms, RoPE, KV-entry finishing and window append (API: `dsv4.kernels.fast.norm`).

    _rms_norm_kernel       BLOCK_R rows per program, the whole row in registers: fp32 sum of squares, rsqrt,
                           (x * r) * w, one bf16 rounding.
    _norm_rope_kernel      one program per (token, BLOCK_H heads): optional RMSNorm (weighted or not) rounded
                           to bf16, RoPE on the last 2 * len(inv_freq) dims (cos/sin computed once per program
                           and shared by its heads), optional FP8 KV simulation of the nope dims (64-blocks,
                           UE8M0 scale, e4m3 round trip). rope / head_norm_rope / kv_entry are its three modes.
    _window_append_kernel  one program per token: a token among its chunk's last W positions is encoded in the
                           MainFp8Codec layout ([nope e4m3][rope bf16, little-endian][nope/64 UE8M0][zero pad])
                           and stored at ring[slot, pos % W]; otherwise (or for a slot outside [0, num_slots))
                           nothing is written.

Tiles: a row's nope dims as [NB * 64] (reshaped to [NB, 64], one FP8 block per row, for the quantization), its
rope dims as interleaved pairs [R2, 2] split into the even (a) and odd (b) halves. Launch geometry from shapes
only (graph-capturable).
Interpreter note: block masks never combine a block with a scalar boolean (the interpreter mistypes scalar
comparisons); per-token conditions become integer limits instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# fp32 sin/cos shared by every fast RoPE (q, kv, indexer, compressor): exact Cody-Waite reduction, Cephes
# polynomials, no float64 (libdevice's sinf/cosf multiply in float64 for large arguments; angles reach ~1e6 rad).
from dsv4.kernels.fast._triton_math import sincos

FP8_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4
KV_BLOCK = 64


# ---------------------------------------------------------------------------------------------- math
@triton.jit
def _fp8_blocks(y, inv_fp8_max, amax_floor):
    """y [R, NB, 64] fp32 -> (e4m3 [R, NB, 64], pow2 scales [R, NB] fp32): quant.quantize_fp8_blocks bit for bit.
    scale = 2^ceil(log2(max(amax, floor) * fl32(1/448))) read off the fp32 bits; y * (1/scale) is exact (a power
    of two), the e4m3 cast rounds to nearest even (cvt.rn.satfinite)."""
    amax = tl.maximum(tl.max(tl.abs(y), axis=2), amax_floor)
    bits = (amax * inv_fp8_max).to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    scale = ((exponent + 127) << 23).to(tl.float32, bitcast=True)
    inv_scale = ((127 - exponent) << 23).to(tl.float32, bitcast=True)
    q = tl.minimum(tl.maximum(y * inv_scale[:, :, None], -448.0), 448.0)
    return q.to(tl.float8e4nv), scale


@triton.jit
def _rope_pairs(a, b, pos, freq_ptr, INVERSE: tl.constexpr, R2: tl.constexpr):
    """Rotate interleaved pairs (a, b) [BLOCK_H, R2] by angle fp32(pos) * inv_freq[i] (conjugate if INVERSE)."""
    i = tl.arange(0, R2)
    angle = pos.to(tl.int32).to(tl.float32) * tl.load(freq_ptr + i)      # via int32: no f64 conversion on the GPU
    sin, cos = sincos(angle)
    sin, cos = sin[None, :], cos[None, :]
    if INVERSE:
        sin = -sin
    return a * cos - b * sin, a * sin + b * cos


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, R, D, inv_d, eps, HAS_WEIGHT: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    offs = r[:, None].to(tl.int64) * D + d[None, :]
    mask = (r[:, None] < R) & (d[None, :] < D)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)                       # x: [BLOCK_R, BLOCK_D]
    y = x * tl.math.rsqrt(tl.sum(x * x, axis=1) * inv_d + eps)[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + d, mask=d < D, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, y.to(tl.bfloat16), mask=mask)


@triton.jit
def _norm_rope_kernel(x_ptr, w_ptr, pos_ptr, freq_ptr, out_ptr, H, d, nope, inv_d, eps, inv_fp8_max, amax_floor,
                      NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr, QUANT: tl.constexpr, INVERSE: tl.constexpr,
                      BLOCK_H: tl.constexpr, NB: tl.constexpr, R2: tl.constexpr):
    t, pid_h = tl.program_id(0), tl.program_id(1)
    h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row = (t * H + h).to(tl.int64) * d                                                     # [BLOCK_H]
    hmask = h < H
    # nope dims as [BLOCK_H, NB * 64] (2-D: a 3-D tile here made the compiler spill), reshaped for the FP8 blocks
    col = tl.arange(0, NB * 64)
    n_off = row[:, None] + col[None, :]
    n_mask = hmask[:, None] & (col < nope)[None, :]
    xn = tl.load(x_ptr + n_off, mask=n_mask, other=0.0).to(tl.float32)
    # rope dims as pairs [BLOCK_H, R2, 2] -> a (even), b (odd): [BLOCK_H, R2]
    pair = nope + tl.arange(0, R2)[:, None] * 2 + tl.arange(0, 2)[None, :]               # [R2, 2]
    r_off = row[:, None, None] + pair[None, :, :]
    r_mask = hmask[:, None, None] & (pair >= 0)[None, :, :]
    a, b = tl.split(tl.load(x_ptr + r_off, mask=r_mask, other=0.0).to(tl.float32))
    if NORM and not HAS_WEIGHT:
        # the per-head q norm as the official code computes it, op by op in bf16 (the fast path is judged against
        # that function: in fp32 it differs by a bf16 ulp, which the attention softmax amplifies): bf16 squares,
        # their mean rounded to bf16, + eps in bf16, rsqrt in bf16, the product in bf16
        sq = (tl.sum((xn * xn).to(tl.bfloat16).to(tl.float32), axis=1)
              + tl.sum((a * a).to(tl.bfloat16).to(tl.float32) + (b * b).to(tl.bfloat16).to(tl.float32), axis=1))
        mean = (sq * inv_d).to(tl.bfloat16).to(tl.float32)
        inv_rms = tl.div_rn(1.0, tl.sqrt_rn((mean + eps).to(tl.bfloat16).to(tl.float32)))
        inv_rms = inv_rms.to(tl.bfloat16).to(tl.float32)
        xn = xn * inv_rms[:, None]
        a = a * inv_rms[:, None]
        b = b * inv_rms[:, None]
        xn = xn.to(tl.bfloat16).to(tl.float32)
        a = a.to(tl.bfloat16).to(tl.float32)
        b = b.to(tl.bfloat16).to(tl.float32)
    elif NORM:
        inv_rms = tl.math.rsqrt((tl.sum(xn * xn, axis=1) + tl.sum(a * a + b * b, axis=1)) * inv_d + eps)
        xn = xn * inv_rms[:, None]
        a = a * inv_rms[:, None]
        b = b * inv_rms[:, None]
        if HAS_WEIGHT:
            xn = xn * tl.load(w_ptr + col, mask=col < nope, other=0.0).to(tl.float32)[None, :]
            w_a, w_b = tl.split(tl.load(w_ptr + pair).to(tl.float32))
            a = a * w_a[None, :]
            b = b * w_b[None, :]
        # the norm's output is a bf16 tensor in the reference, RoPE reads it back
        xn = xn.to(tl.bfloat16).to(tl.float32)
        a = a.to(tl.bfloat16).to(tl.float32)
        b = b.to(tl.bfloat16).to(tl.float32)
    ra, rb = _rope_pairs(a, b, tl.load(pos_ptr + t), freq_ptr, INVERSE, R2)
    if QUANT:
        q, scale = _fp8_blocks(tl.reshape(xn, (BLOCK_H, NB, 64)), inv_fp8_max, amax_floor)
        xn = tl.reshape(q.to(tl.float32) * scale[:, :, None], (BLOCK_H, NB * 64))   # exact: e4m3 times a 2^k
    tl.store(out_ptr + n_off, xn.to(tl.bfloat16), mask=n_mask)
    tl.store(out_ptr + r_off, tl.join(ra.to(tl.bfloat16), rb.to(tl.bfloat16)), mask=r_mask)


@triton.jit
def _window_append_kernel(ring_ptr, val_ptr, pos_ptr, seq_ptr, slot_ptr, start_ptr, len_ptr, num_seqs, num_slots,
                          window, width, nope, inv_fp8_max, amax_floor, ROPE: tl.constexpr, NB: tl.constexpr,
                          TAIL: tl.constexpr):
    t = tl.program_id(0)
    d = nope + ROPE
    # The token's sequence and whether it is stored: among its chunk's last W tokens (earlier ones would be
    # overwritten in this step, and two writers of one ring row would race) and in a valid slot.
    seq = tl.load(seq_ptr + t)
    seq_ok = (seq >= 0) & (seq < num_seqs)
    start = tl.load(start_ptr + seq, mask=seq_ok, other=0)
    length = tl.load(len_ptr + seq, mask=seq_ok, other=0)
    slot = tl.load(slot_ptr + seq, mask=seq_ok, other=-1)
    pos = tl.load(pos_ptr + t)
    store = seq_ok & (pos >= 0) & (pos >= start + length - window) & (slot >= 0) & (slot < num_slots)
    on = store.to(tl.int32)                                       # per-token condition as an integer limit
    base = ((slot * on) * window + (pos * on) % window) * width   # row 0 when not stored (never dereferenced)
    # nope dims: FP8 64-blocks
    col = (tl.arange(0, NB)[:, None] * 64 + tl.arange(0, 64)[None, :])[None, :, :]         # [1, NB, 64]
    n_mask = col < nope * on
    x = tl.load(val_ptr + t.to(tl.int64) * d + col, mask=n_mask, other=0.0).to(tl.float32)
    q, scale = _fp8_blocks(x, inv_fp8_max, amax_floor)
    tl.store(ring_ptr + base + col, q.to(tl.uint8, bitcast=True), mask=n_mask)
    # rope dims: bf16, little-endian bytes
    j = tl.arange(0, ROPE)
    rope = tl.load(val_ptr + t.to(tl.int64) * d + nope + j, mask=j < ROPE * on, other=0.0).to(tl.bfloat16)
    bits = rope.to(tl.uint16, bitcast=True).to(tl.int32)
    byte = tl.arange(0, 2)
    rope_bytes = ((bits[:, None] >> (8 * byte[None, :])) & 0xFF).to(tl.uint8)             # [ROPE, 2]
    r_off = nope + j[:, None] * 2 + byte[None, :]
    tl.store(ring_ptr + base + r_off, rope_bytes, mask=r_off < (nope + 2 * ROPE) * on)
    # UE8M0 scale bytes (the fp32 exponent field of each power-of-two scale), then the zero padding
    u = tl.arange(0, TAIL)
    blk = tl.arange(0, NB)
    codes = tl.reshape((scale.to(tl.int32, bitcast=True) >> 23) & 0xFF, (NB,))
    tail = tl.sum(tl.where((u[:, None] == blk[None, :]) & (blk[None, :] * 64 < nope), codes[None, :], 0), axis=1)
    t_off = nope + 2 * ROPE + u
    tl.store(ring_ptr + base + t_off, tail.to(tl.uint8), mask=t_off < width * on)


# ---------------------------------------------------------------------------------------------- launchers
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """`dsv4.kernels.fast.norm.rms_norm` on the GPU: one launch."""
    dim = x.shape[-1]
    x2 = x.reshape(-1, dim)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.bfloat16, device=x.device)
    rows = x2.shape[0]
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, min(16, 2048 // block_d))
    if rows:
        _rms_norm_kernel[(triton.cdiv(rows, block_r),)](
            x2, weight if weight is not None else x2, out, rows, dim, 1.0 / dim, eps, HAS_WEIGHT=weight is not None,
            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4 if block_d <= 2048 else 8)
    return out.view(x.shape)


def norm_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, norm: bool,
              weight: torch.Tensor | None = None, eps: float = 0.0, quant: bool = False,
              inverse: bool = False) -> torch.Tensor:
    """The one kernel behind rope / head_norm_rope / kv_entry: x [T, ..., d] bf16 -> bf16 of the same shape.
    One program per (token, 2048 / d rows).

    norm: RMSNorm each d-row first (weighted if weight is given), rounded to bf16; then RoPE on the last
    2 * len(inv_freq) dims; quant: the FP8 KV simulation of the nope dims (nope % 64 == 0)."""
    num_tokens, d = x.shape[0], x.shape[-1]
    rope_dim = 2 * inv_freq.shape[0]
    nope = d - rope_dim
    assert rope_dim & (rope_dim - 1) == 0 and nope >= 0, f"rope dims {rope_dim} of {d}: a power of two <= d"
    assert not quant or nope % KV_BLOCK == 0, f"FP8 KV blocks need nope dims {nope} % {KV_BLOCK} == 0"
    assert positions.shape == (num_tokens,), f"positions {tuple(positions.shape)} for {num_tokens} tokens"
    x3 = x.reshape(num_tokens, -1, d)
    if not x3.is_contiguous():
        x3 = x3.contiguous()
    heads = x3.shape[1]
    out = torch.empty(x3.shape, dtype=torch.bfloat16, device=x.device)
    block_h = min(triton.next_power_of_2(max(heads, 1)), max(1, 2048 // triton.next_power_of_2(d)))
    if num_tokens and heads:
        _norm_rope_kernel[(num_tokens, triton.cdiv(heads, block_h))](
            x3, weight if weight is not None else x3, positions, inv_freq.float().contiguous(), out, heads, d, nope,
            1.0 / d, eps, 1.0 / FP8_MAX, FP8_AMAX_FLOOR, NORM=norm, HAS_WEIGHT=weight is not None, QUANT=quant,
            INVERSE=inverse, BLOCK_H=block_h, NB=triton.next_power_of_2(max(1, triton.cdiv(nope, KV_BLOCK))),
            R2=rope_dim // 2, num_warps=4)
    return out.view(x.shape)


def window_append(ring: torch.Tensor, nope: int, rope_dim: int, values: torch.Tensor, positions: torch.Tensor,
                  token_seq: torch.Tensor, seq_slot: torch.Tensor, seq_start: torch.Tensor, seq_len: torch.Tensor
                  ) -> None:
    """`dsv4.kernels.fast.norm.window_append` on the GPU: one launch, one program per token."""
    num_slots, window, width = ring.shape
    assert ring.dtype == torch.uint8 and ring.is_contiguous(), f"ring {ring.dtype} must be contiguous uint8"
    assert nope % KV_BLOCK == 0 and rope_dim & (rope_dim - 1) == 0, f"entry geometry {nope} + {rope_dim}"
    assert values.shape[1] == nope + rope_dim and values.dtype in (torch.bfloat16, torch.float32), \
        f"values {tuple(values.shape)} {values.dtype}"
    tail = width - nope - 2 * rope_dim
    assert tail >= nope // KV_BLOCK, f"width {width} has no room for {nope // KV_BLOCK} scale bytes"
    num_tokens = values.shape[0]
    if num_tokens:
        _window_append_kernel[(num_tokens,)](
            ring, values.contiguous(), positions, token_seq, seq_slot, seq_start, seq_len, seq_slot.shape[0],
            num_slots, window, width, nope, 1.0 / FP8_MAX, FP8_AMAX_FLOOR, ROPE=rope_dim,
            NB=triton.next_power_of_2(max(1, nope // KV_BLOCK)), TAIL=triton.next_power_of_2(tail), num_warps=2)

"""Triton kernels of the fast sparse attention: window ring + paged compressed entries read in place (FP8 bytes
decoded in registers), MQA with a block of query heads as the tensor-core M dimension, per-head sink, fused
inverse RoPE of the output; flash-decoding split over the keys for small batches (see `dsv4.kernels.fast.attention`
for the semantics and numerics).

Grid of the main kernel: (token, head block, split). A token's key tiles are numbered window first (positions
p-W+1 .. p, from this step's `kv` rows or the ring), then compressed entries (a per-token list, or every visible
entry: a per-token runtime bound); each program walks its contiguous share of them in one loop, decoding each
tile once for its h_block heads (two tl.dots per tile, QK^T and PV, bf16 operands, fp32 accumulators). With one
split the program finishes the output itself; with several, each writes (max, sum, acc) partials and
`_combine_kernel` merges them with the sink. Launch geometry comes from shapes only; lengths, validity and block
ids are read on the device.

Register budget (ptxas -v, sm_90, checked by tests/cpu/test_fast_attention.py without a GPU): the default
64-head x 32-entry tile at 8 warps uses 255 registers, no spills in the key loop (<= 0.2 KB in the unsplit
epilogue's RoPE shuffle); 64-entry tiles, 16 warps, 32-head blocks (mma.sync) or two key loops spill ~1 KB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsv4.kernels.fast._triton_math import sincos
from dsv4.kernels.kv_format import MainFp8Codec

LOG2E = 1.4426950408889634
SCALE_BLOCK = 64          # nope dims per UE8M0 scale byte (quant.KV_BLOCK)
# the same for the kernels (jit functions only read constexpr globals)
_LOG2E = tl.constexpr(LOG2E)
_SCALE_BLOCK = tl.constexpr(SCALE_BLOCK)
_NEG_BIG = tl.constexpr(-1.0e30)   # initial running max: finite, so masked tiles and empty splits give p = 0, not NaN


@dataclass(frozen=True, slots=True)
class Plan:
    """Launch configuration. h_block query heads share each decoded key tile of n_block entries (tl.dot M and
    N); num_splits > 1 splits each token's key tiles over programs (flash-decoding) and adds the combine kernel.
    num_stages: Triton's software pipelining (the gathered loads feed the FP8 decode, not a dot, so Triton 3.6
    does not pipeline them: no change in the compiled kernel)."""

    h_block: int
    n_block: int
    num_splits: int
    num_warps: int
    num_stages: int = 1


def plan_for(num_tokens: int, num_heads: int, head_dim: int, window: int, max_comp: int, num_sms: int) -> Plan:
    """Shape heuristic (no autotuning). Heads: one block of 64 (FlashMLA's BLOCK_M; wgmma) when there are that
    many, else all heads padded to >= 16 rows (tl.dot's minimum M). Keys: 32 entries per tile at d = 512 (the
    [64, 512] fp32 accumulator already holds 128 registers per thread at 8 warps; 64 spills), 64 for smaller
    heads. Splits: at 255 registers one program fills an SM, so split each token's tiles until tokens x head
    blocks x splits is about one wave of SMs (decode), never more splits than tiles; none once the tokens fill
    the GPU (prefill, large decode batches)."""
    d_pad = triton.next_power_of_2(head_dim)
    h_block = 64 if num_heads >= 64 else max(16, triton.next_power_of_2(num_heads))
    n_block = 32 if d_pad >= 512 else 64
    num_warps = 8 if h_block * d_pad >= 64 * 512 else 4
    programs = num_tokens * triton.cdiv(num_heads, h_block)
    max_tiles = triton.cdiv(window, n_block) + triton.cdiv(max_comp, n_block)
    splits = 1 if programs >= num_sms else max(1, min(max_tiles, round(num_sms / programs)))
    return Plan(h_block, n_block, splits, num_warps)


# ---------------------------------------------------------------------------------------------- device helpers
@triton.jit
def _decode_entries(u8_ptr, bf16_ptr, row_off, row_ok, NOPE: tl.constexpr, HEAD_DIM: tl.constexpr,
                    D_PAD: tl.constexpr, ROPE_BYTES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Entries at byte offsets row_off [N] (rows with row_ok) -> bf16 [N, D_PAD], exactly the codec's decode:
    e4m3 code * 2^(scale byte - 127) rounded to bf16 (exact), rope dims copied; zeros elsewhere."""
    cols = tl.arange(0, D_PAD)
    is_nope = cols < NOPE
    is_rope = (cols >= NOPE) & (cols < HEAD_DIM)
    codes = tl.load(u8_ptr + row_off[:, None] + cols[None, :], mask=row_ok[:, None] & is_nope[None, :], other=0)
    # one scale byte per 64 nope dims, broadcast over its block (not gathered per element)
    groups = tl.arange(0, D_PAD // _SCALE_BLOCK)
    scale_bytes = tl.load(u8_ptr + row_off[:, None] + (NOPE + ROPE_BYTES) + groups[None, :],
                          mask=row_ok[:, None] & (groups < NOPE // _SCALE_BLOCK)[None, :], other=0)
    scale = (scale_bytes.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_N, D_PAD // _SCALE_BLOCK, _SCALE_BLOCK)),
                       (BLOCK_N, D_PAD))
    nope = (codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scale).to(tl.bfloat16)
    # rope dims: bf16 at byte NOPE of the entry, read through the bf16 view of the same storage (the offsets of
    # masked-off columns are out of the row, never dereferenced; no tl.where, so the load stays vectorized)
    rope = tl.load(bf16_ptr + (row_off // 2 + NOPE // 2)[:, None] + (cols - NOPE)[None, :],
                   mask=row_ok[:, None] & is_rope[None, :], other=0.0)
    return tl.where(is_nope[None, :], nope, rope)


@triton.jit
def _window_tile(tile, pos, slot, start, first_row, kv_ptr, ring_ptr, ring16_ptr, WINDOW: tl.constexpr,
                 WIDTH: tl.constexpr, NOPE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                 ROPE_BYTES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Window keys r = tile*N .. of the token at `pos` (position pos-W+1+r): [N, D_PAD] bf16 and validity [N].
    Positions >= the chunk start are this step's kv rows; earlier ones come from the ring (slot, j % W)."""
    r = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    j = pos - (WINDOW - 1) + r
    ok = (r < WINDOW) & (j >= 0)
    from_kv = ok & (j >= start)
    from_ring = ok & (j < start)
    j = tl.maximum(j, 0)
    keys = _decode_entries(ring_ptr, ring16_ptr, (slot * WINDOW + j % WINDOW) * WIDTH, from_ring, NOPE, HEAD_DIM,
                           D_PAD, ROPE_BYTES, BLOCK_N)
    cols = tl.arange(0, D_PAD)
    kv_row = tl.maximum(first_row + j - start, 0)
    fresh = tl.load(kv_ptr + kv_row[:, None] * HEAD_DIM + cols[None, :],
                    mask=from_kv[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
    return tl.where(from_kv[:, None], fresh, keys), ok


@triton.jit
def _compressed_tile(tile, t, seq, num_comp, list_len, entries_ptr, block_table_ptr, max_blocks, pool_ptr,
                     pool16_ptr, HAS_LIST: tl.constexpr, ENTRIES_PER_BLOCK: tl.constexpr, WIDTH: tl.constexpr,
                     NOPE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ROPE_BYTES: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Compressed keys r = tile*N .. of token t: entry w = entries[t, r] (list) or w = r (every visible one, r <
    num_comp), at pool[block_table[seq, w // entries_per_block], w % entries_per_block]. -1 entries, columns
    beyond the table and -1 blocks (missing) are masked."""
    r = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = r < num_comp
    if HAS_LIST:
        w = tl.load(entries_ptr + t * list_len + r, mask=in_range, other=-1).to(tl.int64)
    else:
        w = r.to(tl.int64)
    # clamps, not tl.where, keep masked rows' addresses in range (a select here trips Triton 3.6's layout pass)
    ok = in_range & (w >= 0)
    w = tl.maximum(w, 0)
    col = w // ENTRIES_PER_BLOCK         # = (w * ratio) // block_size, block_size a multiple of ratio
    ok = ok & (col < max_blocks)
    block = tl.load(block_table_ptr + seq * max_blocks + col, mask=ok, other=-1).to(tl.int64)
    ok = ok & (block >= 0)
    row_off = (tl.maximum(block, 0) * ENTRIES_PER_BLOCK + w % ENTRIES_PER_BLOCK) * WIDTH
    return _decode_entries(pool_ptr, pool16_ptr, row_off, ok, NOPE, HEAD_DIM, D_PAD, ROPE_BYTES, BLOCK_N), ok


@triton.jit
def _online_update(q, keys, ok, row_max, row_sum, acc, qk_scale):
    """One key tile into the running softmax. Scores in log2 units (qk_scale = d^-0.5 * log2 e), fp32 from bf16
    operands; P rounded to bf16 for the P.V product (the official kernel), the sum over unrounded P (the
    reference's denominator); K = V."""
    s = tl.dot(q, tl.trans(keys)) * qk_scale                       # [H_BLOCK, N] fp32
    s = tl.where(ok[None, :], s, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(s, axis=1))
    alpha = tl.exp2(row_max - new_max)
    p = tl.exp2(s - new_max[:, None])
    row_sum = row_sum * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(tl.bfloat16), keys, acc * alpha[:, None])
    return new_max, row_sum, acc


@triton.jit
def _inverse_rope(o, pos, freq_ptr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
                  NUM_FREQ: tl.constexpr):
    """Rotate the last 2*NUM_FREQ dims of o [ROWS, D_PAD] fp32, pairs (2i, 2i+1), by -pos*inv_freq[i] (fp32
    angle and cos/sin, as ref_math.apply_rope)."""
    a, b = tl.split(tl.reshape(o, (ROWS, D_PAD // 2, 2)))
    i = tl.arange(0, D_PAD // 2)
    k = i - (HEAD_DIM // 2 - NUM_FREQ)
    is_rope = (k >= 0) & (i < HEAD_DIM // 2)
    freq = tl.load(freq_ptr + tl.where(is_rope, k, 0), mask=is_rope, other=0.0)
    angle = pos.to(tl.float32) * freq
    sin, cos = sincos(angle)   # fp32 with an exact range reduction (angles reach 1e6 rad), no libdevice fp64
    ra = tl.where(is_rope[None, :], a * cos[None, :] + b * sin[None, :], a)
    rb = tl.where(is_rope[None, :], b * cos[None, :] - a * sin[None, :], b)
    return tl.reshape(tl.join(ra, rb), (ROWS, D_PAD))


@triton.jit
def _finish_and_store(acc, row_max, row_sum, t, pos, heads, head_ok, num_heads, sink_ptr, freq_ptr, o_ptr,
                      ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_FREQ: tl.constexpr):
    """o = acc / (row_sum + exp(sink - max)), inverse RoPE, one bf16 rounding, store rows `heads` of token t."""
    sink = tl.load(sink_ptr + heads, mask=head_ok, other=0.0)
    o = acc / (row_sum + tl.exp2(sink * _LOG2E - row_max))[:, None]
    if NUM_FREQ > 0:   # the reference rounds to bf16 before and after the rotation: so does this (see attention.py)
        o = _inverse_rope(o.to(tl.bfloat16).to(tl.float32), pos, freq_ptr, ROWS, HEAD_DIM, D_PAD, NUM_FREQ)
    cols = tl.arange(0, D_PAD)
    tl.store(o_ptr + (t * num_heads + heads)[:, None] * HEAD_DIM + cols[None, :], o.to(tl.bfloat16),
             mask=head_ok[:, None] & (cols < HEAD_DIM)[None, :])


# ---------------------------------------------------------------------------------------------- kernels
# max_blocks and max_comp vary with the batch's longest context: not specialized (== 1, % 16), so a new context
# length never recompiles the kernel
@triton.jit(do_not_specialize=["max_blocks", "max_comp"])
def _sparse_attn_kernel(
        q_ptr, kv_ptr, ring_ptr, ring16_ptr, pool_ptr, pool16_ptr, entries_ptr, sink_ptr, freq_ptr,
        positions_ptr, token_seq_ptr, seq_slot_ptr, seq_start_ptr, seq_first_row_ptr, block_table_ptr,
        o_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
        num_heads, max_blocks, max_comp, qk_scale,
        HEAD_DIM: tl.constexpr, NOPE: tl.constexpr, D_PAD: tl.constexpr, ROPE_BYTES: tl.constexpr,
        NUM_FREQ: tl.constexpr, WINDOW: tl.constexpr, WIDTH: tl.constexpr, RATIO: tl.constexpr,
        ENTRIES_PER_BLOCK: tl.constexpr, HAS_LIST: tl.constexpr, H_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    pos = tl.load(positions_ptr + t).to(tl.int64)
    seq = tl.load(token_seq_ptr + t).to(tl.int64)
    slot = tl.load(seq_slot_ptr + seq).to(tl.int64)
    start = tl.load(seq_start_ptr + seq).to(tl.int64)
    first_row = tl.load(seq_first_row_ptr + seq).to(tl.int64)

    # this token's compressed key count: the list length (CSA), the visible entries (HCA: runtime bound), or none
    if RATIO == 0:
        num_comp = pos * 0
    elif HAS_LIST:
        num_comp = pos * 0 + max_comp
    else:
        num_comp = tl.minimum((pos + 1) // RATIO, max_comp)
    NUM_WIN_TILES = (WINDOW + BLOCK_N - 1) // BLOCK_N      # constexpr
    num_tiles = (NUM_WIN_TILES + (num_comp + BLOCK_N - 1) // BLOCK_N).to(tl.int32)
    per_split = (num_tiles + NUM_SPLITS - 1) // NUM_SPLITS
    lo = split * per_split
    hi = tl.minimum(lo + per_split, num_tiles)

    heads = head_block * H_BLOCK + tl.arange(0, H_BLOCK)
    head_ok = heads < num_heads
    cols = tl.arange(0, D_PAD)
    q = tl.load(q_ptr + (t * num_heads + heads)[:, None] * HEAD_DIM + cols[None, :],
                mask=head_ok[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)     # [H_BLOCK, D_PAD] bf16
    row_max = tl.full([H_BLOCK], _NEG_BIG, tl.float32)
    row_sum = tl.zeros([H_BLOCK], tl.float32)
    acc = tl.zeros([H_BLOCK, D_PAD], tl.float32)
    # one loop with the source chosen per tile: two loops (window, then entries) double the code live around the
    # accumulator and spill ~1 KB per thread (ptxas, sm_90); this way ~0.2 KB
    for tile in range(lo, hi):
        if RATIO == 0:
            keys, ok = _window_tile(tile, pos, slot, start, first_row, kv_ptr, ring_ptr, ring16_ptr, WINDOW, WIDTH,
                                    NOPE, HEAD_DIM, D_PAD, ROPE_BYTES, BLOCK_N)
        elif tile < NUM_WIN_TILES:
            keys, ok = _window_tile(tile, pos, slot, start, first_row, kv_ptr, ring_ptr, ring16_ptr, WINDOW, WIDTH,
                                    NOPE, HEAD_DIM, D_PAD, ROPE_BYTES, BLOCK_N)
        else:
            keys, ok = _compressed_tile(tile - NUM_WIN_TILES, t, seq, num_comp, max_comp, entries_ptr,
                                        block_table_ptr, max_blocks, pool_ptr, pool16_ptr, HAS_LIST,
                                        ENTRIES_PER_BLOCK, WIDTH, NOPE, HEAD_DIM, D_PAD, ROPE_BYTES, BLOCK_N)
        row_max, row_sum, acc = _online_update(q, keys, ok, row_max, row_sum, acc, qk_scale)

    if NUM_SPLITS == 1:
        _finish_and_store(acc, row_max, row_sum, t, pos, heads, head_ok, num_heads, sink_ptr, freq_ptr, o_ptr,
                          H_BLOCK, HEAD_DIM, D_PAD, NUM_FREQ)
    else:
        row = (t * NUM_SPLITS + split) * num_heads + heads                       # [H_BLOCK] partial rows
        tl.store(part_acc_ptr + row[:, None] * D_PAD + cols[None, :], acc, mask=head_ok[:, None])
        tl.store(part_m_ptr + row, row_max, mask=head_ok)
        tl.store(part_l_ptr + row, row_sum, mask=head_ok)


@triton.jit
def _combine_kernel(part_acc_ptr, part_m_ptr, part_l_ptr, sink_ptr, freq_ptr, positions_ptr, o_ptr, num_heads,
                    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_FREQ: tl.constexpr, NUM_SPLITS: tl.constexpr,
                    S_PAD: tl.constexpr, H_BLOCK: tl.constexpr):
    """Merge the splits of token t, heads of block pid(1): global max, rescaled sums and accumulators, sink."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * H_BLOCK + tl.arange(0, H_BLOCK)
    head_ok = heads < num_heads
    pos = tl.load(positions_ptr + t).to(tl.int64)
    splits = tl.arange(0, S_PAD)
    all_m = tl.load(part_m_ptr + (t * NUM_SPLITS + splits[None, :]) * num_heads + heads[:, None],
                    mask=head_ok[:, None] & (splits < NUM_SPLITS)[None, :], other=_NEG_BIG)
    row_max = tl.max(all_m, axis=1)                                                     # [H_BLOCK]
    cols = tl.arange(0, D_PAD)
    row_sum = tl.zeros([H_BLOCK], tl.float32)
    acc = tl.zeros([H_BLOCK, D_PAD], tl.float32)
    for split in range(NUM_SPLITS):
        row = (t * NUM_SPLITS + split) * num_heads + heads
        weight = tl.exp2(tl.load(part_m_ptr + row, mask=head_ok, other=_NEG_BIG) - row_max)
        row_sum += weight * tl.load(part_l_ptr + row, mask=head_ok, other=0.0)
        acc += weight[:, None] * tl.load(part_acc_ptr + row[:, None] * D_PAD + cols[None, :],
                                         mask=head_ok[:, None], other=0.0)
    _finish_and_store(acc, row_max, row_sum, t, pos, heads, head_ok, num_heads, sink_ptr, freq_ptr, o_ptr,
                      H_BLOCK, HEAD_DIM, D_PAD, NUM_FREQ)


# ---------------------------------------------------------------------------------------------- launcher
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4                  # the interpreter: a few splits, so the CPU tests exercise the combine
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass(frozen=True)
class Launch:
    """One kernel launch: `kernel[grid](*args, **constexprs, **options)`."""

    kernel: object
    grid: tuple[int, int, int]
    args: tuple
    constexprs: dict
    options: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


def _check(q: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor, pool: torch.Tensor | None, codec: MainFp8Codec,
           block_size: int, ratio: int) -> None:
    """Shapes, dtypes and layouts the kernels address by constexpr strides (host attributes only: no sync)."""
    num_tokens, _, head_dim = q.shape
    assert isinstance(codec, MainFp8Codec) and codec.nope_dim + codec.rope_dim == head_dim, (codec, head_dim)
    assert codec.nope_dim % SCALE_BLOCK == 0 and head_dim >= SCALE_BLOCK, codec
    assert ring.dtype == torch.uint8 and ring.is_contiguous() and ring.shape[2] == codec.width, ring.shape
    assert q.dtype == kv.dtype == torch.bfloat16 and kv.shape == (num_tokens, head_dim), (q.dtype, kv.shape)
    if ratio:
        assert pool is not None and pool.dtype == torch.uint8 and pool.is_contiguous(), "pool: contiguous uint8"
        assert block_size % ratio == 0 and pool.shape[1:] == (block_size // ratio, codec.width), pool.shape


def max_compressed(layout, ratio: int, entries: torch.Tensor | None) -> int:
    """Compressed keys a token may have, from shapes: the list width (CSA), or the visible entries the block
    table can hold (HCA; each token's own count is read on the device)."""
    if not ratio:
        return 0
    if entries is not None:
        return entries.shape[1]
    return layout.block_table.shape[1] * (layout.block_size // ratio)


def launches(q: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor, pool: torch.Tensor | None, codec: MainFp8Codec,
             layout, ratio: int, entries: torch.Tensor | None, sink: torch.Tensor, inv_freq: torch.Tensor | None,
             plan: Plan | None = None) -> tuple[torch.Tensor, list[Launch]]:
    """The output tensor and the launches that fill it (main kernel, then the combine when the plan splits)."""
    _check(q, kv, ring, pool, codec, layout.block_size, ratio)
    num_tokens, num_heads, head_dim = q.shape
    o = torch.empty_like(q)
    if num_tokens == 0:
        return o, []
    max_comp = max_compressed(layout, ratio, entries)
    plan = plan or plan_for(num_tokens, num_heads, head_dim, ring.shape[1], max_comp, _num_sms(q.device))
    d_pad, splits = triton.next_power_of_2(head_dim), plan.num_splits
    pool = pool if ratio else ring
    has_list = entries is not None and ratio != 0
    entries = entries.contiguous() if has_list else layout.positions
    sink = sink.to(torch.float32).contiguous()
    num_freq = 0 if inv_freq is None else inv_freq.shape[0]
    freq = sink if inv_freq is None else inv_freq.to(device=q.device, dtype=torch.float32).contiguous()
    part_acc = part_m = part_l = sink                   # unused without splits
    if splits > 1:
        part_acc = torch.empty(num_tokens, splits, num_heads, d_pad, dtype=torch.float32, device=q.device)
        part_m = torch.empty(num_tokens, splits, num_heads, dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    main = Launch(
        _sparse_attn_kernel, (num_tokens, triton.cdiv(num_heads, plan.h_block), splits),
        (q.contiguous(), kv.contiguous(), ring, ring.view(torch.bfloat16), pool, pool.view(torch.bfloat16), entries,
         sink, freq, layout.positions, layout.token_seq, layout.seq_slot, layout.seq_start, layout.seq_first_row,
         layout.block_table, o, part_acc, part_m, part_l,
         num_heads, layout.block_table.shape[1], max_comp, head_dim ** -0.5 * LOG2E),
        dict(HEAD_DIM=head_dim, NOPE=codec.nope_dim, D_PAD=d_pad, ROPE_BYTES=2 * codec.rope_dim, NUM_FREQ=num_freq,
             WINDOW=ring.shape[1], WIDTH=codec.width, RATIO=ratio,
             ENTRIES_PER_BLOCK=layout.block_size // ratio if ratio else 1, HAS_LIST=has_list, H_BLOCK=plan.h_block,
             BLOCK_N=plan.n_block, NUM_SPLITS=splits),
        dict(num_warps=plan.num_warps, num_stages=plan.num_stages))
    if splits == 1:
        return o, [main]
    combine_heads = min(4, triton.next_power_of_2(num_heads))
    combine = Launch(
        _combine_kernel, (num_tokens, triton.cdiv(num_heads, combine_heads), 1),
        (part_acc, part_m, part_l, sink, freq, layout.positions, o, num_heads),
        dict(HEAD_DIM=head_dim, D_PAD=d_pad, NUM_FREQ=num_freq, NUM_SPLITS=splits,
             S_PAD=triton.next_power_of_2(splits), H_BLOCK=combine_heads),
        dict(num_warps=4))
    return o, [main, combine]


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor, pool: torch.Tensor | None,
                     codec: MainFp8Codec, layout, ratio: int, entries: torch.Tensor | None, sink: torch.Tensor,
                     inv_freq: torch.Tensor | None, plan: Plan | None = None) -> torch.Tensor:
    """Run the sparse attention kernels; arguments as `dsv4.kernels.fast.attention.sparse_attention`, plus an
    optional launch `plan` (default: `plan_for`). CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
    No host synchronisation: graph-capturable (warm up first: the first call compiles)."""
    o, steps = launches(q, kv, ring, pool, codec, layout, ratio, entries, sink, inv_freq, plan)
    for step in steps:
        step()
    return o

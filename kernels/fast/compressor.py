"""The fast compressor flush (spec §3.4, §3.5): gated pooling of every completed window, RMSNorm, RoPE, optional
Hadamard, quantized store into the paged pool, and the advance of the per-sequence pooling state.

Contract: `cache_ops.compress_flush` (and `pool_chunk` for the state layout) with act_dtype bf16. CSA (ratio 4,
coff 2): entry w pools 8 slots, the A-halves (first d channels) of window w-1's four tokens and the B-halves of
window w's; the state holds the previous complete window in slots 0..3 and the current partial one in 4..7. HCA
(ratio m, coff 1): entry w pools the m tokens of window w; the state holds the current partial window in slots
0..m-1. A token at position p with (p+1) % ratio == 0 completes window p // ratio; each slot it pools comes
from the state if its position lies before the sequence's chunk start, else from this step's a/z rows (so any
chunking gives the same entries as one-shot prefill, bit for bit).

`fast` numerics against the reference: softmax and weighted sum in fp32 (reference fp64); then as the reference:
bf16 round, RMSNorm in fp32 with weight (bf16 round), RoPE at position w * ratio with fp32 cos/sin (bf16 round),
optionally Hadamard with fp32 accumulation (bf16 round), then the codec's exact byte format (FP8 e4m3 nope dims
in 64-blocks with UE8M0 scales + bf16 rope dims, or MXFP4 with one UE8M0 scale per 32). States are exact copies
of a/z rows, equal to the reference's.
"""

from __future__ import annotations

import torch

from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.fast.indexer import hadamard_fp32, rope_fp32
from dsv4.kernels.kv_format import IndexFp4Codec, MainFp8Codec

CSA_RATIO = 4


def project(x: torch.Tensor, wkv_wgate: torch.Tensor, ape: torch.Tensor, positions: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """A compressor's two projections as one GEMM: x [T, D] bf16, wkv_wgate [2W, D] bf16 (wkv's rows, then
    wgate's), ape [ratio, W] fp32 -> (a, z) [T, W] fp32 views of one [T, 2W] result, z += ape[positions % ratio].
    The same values as the two fp32 linears and the indexed add (bf16 products exact, fp32 accumulation, one
    fp32 add); on CUDA three launches (cuBLAS GEMM, its reduce, the bias) instead of seven."""
    from dsv4.kernels.fast import linear

    width = wkv_wgate.shape[0] // 2
    y = linear.fp32_linear(x, wkv_wgate)                                                   # [T, 2W] fp32
    a, z = y[:, :width], y[:, width:]
    if z.is_cuda:
        from dsv4.kernels.fast import _compressor_triton

        _compressor_triton.add_position_bias(z, ape, positions)
    else:
        z += ape[positions % ape.shape[0]]
    return a, z


def compress_flush(a: torch.Tensor, z: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                   layout: BatchLayout, ratio: int, norm_weight: torch.Tensor, eps: float, inv_freq: torch.Tensor,
                   rotate: bool, pool: torch.Tensor, codec: MainFp8Codec | IndexFp4Codec) -> None:
    """One compressor over one step: every window the step completes is pooled, finished and encoded into
    pool[block_table[s, w * ratio // block_size], w % (block_size // ratio)] (not stored where that block is
    missing: -1, out of range or past the table), and each sequence's state advances in place.

    a, z [T, coff*d] fp32 (z with ape added; unit column stride, the same row stride: they may be the two halves
    of `project`'s output); state_kv, state_score [num_slots, coff*ratio, coff*d] fp32;
    ratio 4 (CSA, coff 2) or a power of two >= 2 (HCA-style, coff 1); norm_weight [d] bf16/fp32 (d a power of
    two, 64 <= d <= 512); inv_freq [rope/2] fp32; pool [num_blocks, block_size // ratio, codec.width] uint8;
    codec MainFp8Codec (nope + rope == d, rope == 2 * len(inv_freq)) or IndexFp4Codec (dim == d; Hadamard
    before MXFP4 iff rotate). Each sequence appears at most once per call.

    CUDA: two launches. (1) one program per (token, channel block): tokens completing a window pool it (online
    softmax over the slots, fp32) into a [T, d] fp32 workspace. (2) one program per token finishing its pooled
    entry (bf16, RMSNorm, RoPE, Hadamard, quantize, store) plus one per (sequence, state channel block) writing
    the tail tokens into the current slots and, for CSA, the last completed window into slots 0..3.
    """
    check_flush_args(a, state_kv, ratio, norm_weight, inv_freq, rotate, pool, codec)
    if a.is_cuda:
        from dsv4.kernels.fast import _compressor_triton

        return _compressor_triton.compress_flush(a, z, state_kv, state_score, layout, ratio, norm_weight, eps,
                                                 inv_freq, rotate, pool, codec)
    return _flush_twin(a, z, state_kv, state_score, layout, ratio, norm_weight, eps, inv_freq, rotate, pool, codec)


def check_flush_args(a: torch.Tensor, state_kv: torch.Tensor, ratio: int, norm_weight: torch.Tensor,
                     inv_freq: torch.Tensor, rotate: bool, pool: torch.Tensor, codec: MainFp8Codec | IndexFp4Codec
                     ) -> None:
    d = norm_weight.shape[0]
    coff = 2 if ratio == CSA_RATIO else 1
    if ratio < 2 or ratio & (ratio - 1):
        raise ValueError(f"compress_flush: ratio {ratio} must be a power of two >= 2")
    if d & (d - 1) or not 64 <= d <= 512:
        raise ValueError(f"compress_flush: head dim {d} must be a power of two in [64, 512]")
    if a.shape[-1] != coff * d or tuple(state_kv.shape[1:]) != (coff * ratio, coff * d):
        raise ValueError(f"compress_flush: a {tuple(a.shape)} / state {tuple(state_kv.shape)} do not match "
                         f"ratio {ratio}, d {d}")
    if pool.dtype != torch.uint8 or pool.shape[-1] != codec.width:
        raise ValueError(f"compress_flush: pool {tuple(pool.shape)} {pool.dtype} is not uint8 of width {codec.width}")
    if isinstance(codec, MainFp8Codec):
        if rotate or codec.nope_dim + codec.rope_dim != d or codec.rope_dim != 2 * inv_freq.shape[0]:
            raise ValueError(f"compress_flush: {codec} does not fit d {d}, rope {2 * inv_freq.shape[0]}, "
                             f"rotate {rotate}")
    elif not isinstance(codec, IndexFp4Codec) or codec.dim != d or 2 * inv_freq.shape[0] > d:
        raise ValueError(f"compress_flush: unsupported codec {codec} for d {d}")


# ---------------------------------------------------------------------------------------------- twin
def slot_sources(positions: torch.Tensor, start: torch.Tensor, ratio: int, coff: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For tokens completing windows w = positions // ratio: per pooled slot i (coff * ratio of them) the
    position it holds, whether it comes from this step's rows, the state slot otherwise, and its channel half.
    CSA slots 0..3: window w-1, A-half; 4..7: window w, B-half; the state keeps window start//4 in 4..7 and
    window start//4 - 1 in 0..3. Returns (position [N, S], from_row [N, S], state_slot [N, S], half [S])."""
    w = positions // ratio
    i = torch.arange(coff * ratio, device=positions.device)
    is_a = (i < ratio) & (coff == 2)
    idx = i % ratio
    window = w[:, None] - is_a.long()[None, :]
    pos = window * ratio + idx[None, :]
    from_row = pos >= start[:, None]
    held = window == (start // ratio)[:, None]
    state_slot = torch.where(held & (coff == 2), ratio + idx[None, :], idx[None, :])
    return pos, from_row, state_slot, (~is_a & (coff == 2)).long()


def pool_windows(a: torch.Tensor, z: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                 layout: BatchLayout, rows: torch.Tensor, ratio: int, d: int) -> torch.Tensor:
    """Pooled fp32 [N, d] of the windows completed by the tokens `rows`: softmax over slots per channel."""
    coff = a.shape[1] // d
    seq = layout.token_seq[rows]
    start = layout.seq_start[seq]
    pos, from_row, state_slot, half = slot_sources(layout.positions[rows], start, ratio, coff)
    row = (layout.seq_first_row[seq][:, None] + pos - start[:, None]).clamp(0, max(a.shape[0] - 1, 0))
    slot = layout.seq_slot[seq][:, None].expand_as(pos)
    chan = half[:, None] * d + torch.arange(d)[None, :]                        # [S, d]

    def gather(step: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        both = torch.where(from_row[..., None], step[row], state[slot, state_slot])   # [N, S, coff*d]
        return both.gather(2, chan[None].expand(both.shape[0], -1, -1))          # [N, S, d]

    weights = torch.softmax(gather(z, state_score), dim=1)
    return (weights * gather(a, state_kv)).sum(dim=1)


def finish(pooled: torch.Tensor, windows: torch.Tensor, ratio: int, norm_weight: torch.Tensor, eps: float,
           inv_freq: torch.Tensor, rotate: bool) -> torch.Tensor:
    """Pooled fp32 [N, d] -> bf16 entry values: bf16, RMSNorm (fp32, weighted), bf16, RoPE at w * ratio, bf16,
    optional Hadamard (fp32 accumulation), bf16."""
    x = pooled.to(torch.bfloat16).float()
    x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * norm_weight.float()
    x = rope_fp32(x.to(torch.bfloat16), windows * ratio, inv_freq)
    return hadamard_fp32(x) if rotate else x


def advance_state(a: torch.Tensor, z: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                  layout: BatchLayout, ratio: int) -> None:
    """Per sequence: CSA copies the last completed window into slots 0..3; every tail token (after the chunk's
    last window boundary) goes to its current slot. Untouched slots keep their values."""
    overlap = ratio == CSA_RATIO
    current = ratio if overlap else 0
    for s in range(layout.seq_slot.shape[0]):
        slot, start, length, first = (int(v[s]) for v in (layout.seq_slot, layout.seq_start, layout.seq_len,
                                                          layout.seq_first_row))
        end = start + length
        last_window = end // ratio
        if overlap and last_window > start // ratio:
            pos = (last_window - 1) * ratio + torch.arange(ratio)
            from_row = pos >= start
            src_rows = (first + pos - start).clamp(min=0)
            for step, state in ((a, state_kv), (z, state_score)):
                state[slot, :ratio] = torch.where(from_row[:, None], step[src_rows.clamp(max=a.shape[0] - 1)],
                                                  state[slot, ratio:2 * ratio])
        tail = torch.arange(max(start, last_window * ratio), end)
        state_kv[slot, current + tail % ratio] = a[first + tail - start]
        state_score[slot, current + tail % ratio] = z[first + tail - start]


def _flush_twin(a: torch.Tensor, z: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                layout: BatchLayout, ratio: int, norm_weight: torch.Tensor, eps: float, inv_freq: torch.Tensor,
                rotate: bool, pool: torch.Tensor, codec: MainFp8Codec | IndexFp4Codec) -> None:
    d = norm_weight.shape[0]
    rows = ((layout.positions + 1) % ratio == 0).nonzero().flatten()
    if rows.numel():
        pooled = pool_windows(a.float(), z.float(), state_kv, state_score, layout, rows, ratio, d)
        windows = layout.positions[rows] // ratio
        values = finish(pooled, windows, ratio, norm_weight, eps, inv_freq, rotate)
        epb = layout.block_size // ratio
        table = layout.block_table
        column = windows // epb
        block = table[layout.token_seq[rows], column.clamp(max=max(table.shape[1] - 1, 0))]
        stored = (column < table.shape[1]) & (block >= 0) & (block < pool.shape[0])
        pool[block[stored], (windows % epb)[stored]] = codec.encode(values[stored])
    advance_state(a, z, state_kv, state_score, layout, ratio)

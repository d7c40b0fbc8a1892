"""The fast lightning indexer (spec §4): query preparation, and score + top-k over the paged MXFP4 keys.

`fast` numerics, judged against the reference (`cache_ops.indexer_topk`, `quant.hadamard_rotate`,
`quant.fake_quant_fp4`, `ref_math.apply_rope`) by tolerance:
- `indexer_query`: RoPE in fp32 with fp32 cos/sin (the reference takes cos/sin of the fp32 angle in fp64),
  bf16 round; Hadamard with fp32 accumulation (reference fp64), times dI^-0.5, bf16 round; MXFP4 fake quant
  (the reference's rule exactly: UE8M0 scale from amax / 6, e2m1 round-to-nearest-even, bf16 values).
- `indexer_topk`: the dots run on FP8 tensor cores. Keys enter as exact e4m3 images of their e2m1 codes (one
  dot per 32-block, the block's UE8M0 scale applied to the fp32 partial sum); q is rounded to e4m3 with one
  power-of-two scale per head (exact for MXFP4 queries whose block scales lie within 2^8 of the head's largest,
  i.e. every `indexer_query` output in practice; otherwise 3 mantissa bits). The head sum
  I = sum_h w_h ReLU(q_h . k) is fp32, then rounded to bf16 like the reference's final score, and the
  selection works on those bf16 scores. Where the reference rounds each intermediate to bf16 this is fp32, so
  near-tied entries (within a few bf16 ulps) may swap in and out of the selected set.

Selection rule: the min(topk, #selectable) entries with the highest bf16 score, where an entry is selectable
if it is visible (w < (p+1) // ratio) and its block exists; among equal scores the lower entry index wins.
Output order: the selected entry indices in ASCENDING index order (not by score), then -1 padding.
"""

from __future__ import annotations

import torch

from dsv4.kernels import quant
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.kv_format import IndexFp4Codec

FP8_MAX = quant.FP8_MAX
KEY_SHIFT = 6   # an e2m1 code c maps to the e4m3 byte of value e2m1(c) * 2^-6 (see _indexer_triton)


# ---------------------------------------------------------------------------------------------- query
def indexer_query(q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Indexer query preparation, fused: RoPE -> Hadamard -> MXFP4 fake quant.

    q [T, H, dI] bf16 (dI a power of two <= 256, 2 * len(inv_freq) <= dI), positions [T] int64, inv_freq [rope/2]
    fp32 -> [T, H, dI] bf16. Math per head vector x:
      x = bf16(rope(x)): pairs (2i, 2i+1) of the last 2*len(inv_freq) dims rotated by angle fp32(p * inv_freq[i]),
          fp32 cos/sin and products;
      y = bf16(fp32(H_dI x) * dI^-0.5), H the Sylvester Hadamard matrix (entries +-1), fp32 accumulation;
      out = bf16(e2m1(y / s) * s) per 32-block, s = 2^ceil(log2(max(amax, 6 * 2^-126) * fl32(1/6))).
    """
    if q.is_cuda:
        from dsv4.kernels.fast import _indexer_triton

        return _indexer_triton.indexer_query(q, positions, inv_freq)
    return _query_twin(q, positions, inv_freq)


def rope_fp32(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """RoPE on the last 2*len(inv_freq) dims of x [T, ..., d], interleaved pairs, fp32 angle/cos/sin/products,
    result in x's dtype (the reference's `apply_rope` without its fp64 cos/sin)."""
    rope_dim = 2 * inv_freq.shape[0]
    angle = positions.to(torch.float32)[:, None] * inv_freq.to(x.device, torch.float32)[None, :]
    shape = (angle.shape[0],) + (1,) * (x.dim() - 2) + (angle.shape[1],)
    cos, sin = angle.cos().view(shape), angle.sin().view(shape)
    pairs = x[..., -rope_dim:].float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat([x[..., :-rope_dim], rotated.to(x.dtype)], dim=-1)


def hadamard_fp32(x: torch.Tensor) -> torch.Tensor:
    """y = H x / sqrt(n) over the last dim with fp32 accumulation; keeps x's dtype."""
    n = x.shape[-1]
    h = quant.hadamard_matrix(n, torch.float32).to(x.device)
    return (x.float() @ h.T * torch.tensor(n ** -0.5, dtype=torch.float32)).to(x.dtype)


def _query_twin(q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    x = rope_fp32(q, positions, inv_freq)
    return quant.fake_quant_fp4(hadamard_fp32(x))


# ---------------------------------------------------------------------------------------------- score + top-k
def indexer_topk(q: torch.Tensor, weights: torch.Tensor, pool: torch.Tensor, codec: IndexFp4Codec,
                 layout: BatchLayout, ratio: int, topk: int) -> torch.Tensor:
    """Per token, the `topk` best indexer keys of its own sequence: [T, topk] int64 entry indices.

    q [T, H, 128] bf16 (normally `indexer_query`'s output); weights [T, H] bf16 (the head weights, already
    scaled); pool [num_blocks, block_size // ratio, 68] uint8 MXFP4 keys (64 bytes of e2m1 code pairs, element
    2k in the low nibble, then 4 UE8M0 scale bytes, one per 32 elements). Token t at position p of sequence s sees
    entries w < (p+1) // ratio; entry w lives at pool[block_table[s, w // (block_size // ratio)],
    w % (block_size // ratio)]; a missing block (-1, out of range, past the table) is never selected.
    Scores and the selection rule: see the module docstring (bf16 scores, ties to the lower index). Returns the
    min(topk, #selectable) chosen entries in ascending index order, -1 padded.

    CUDA: a score kernel (FP8 tensor cores) writes 16-bit order-preserving keys of the bf16 scores into a
    [T, E_max] int16 workspace (E_max = block_table.shape[1] * block_size // ratio: 2 bytes per token and table
    entry), then a radix select spread over (token, segment of >= 1024 keys) programs: high-byte histogram, low-byte
    histogram of the threshold's bucket, compaction (see `_indexer_triton`). 4-5 graph nodes, no host sync.
    """
    if codec.dim != 128 or q.shape[-1] != 128:
        raise ValueError(f"the fast indexer supports index_head_dim 128, got codec {codec.dim}, q {tuple(q.shape)}")
    if layout.block_size % ratio:
        raise ValueError(f"block_size {layout.block_size} is not a multiple of ratio {ratio}")
    if q.is_cuda:
        from dsv4.kernels.fast import _indexer_triton

        return _indexer_triton.indexer_topk(q, weights, pool, layout, ratio, topk)
    return _topk_twin(q, weights, pool, layout, ratio, topk)


def quantize_q_fp8(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, d] -> (e4m3 values as fp32 [T, H, d], fp32 power-of-two scale per head [T, H]): the score
    kernel's FP8 operand, one UE8M0 scale per head from amax / 448."""
    scale = quant.ue8m0_scale(q.float().abs().amax(-1), FP8_MAX, quant.FP8_AMAX_FLOOR)
    q8 = (q.float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return q8, scale


def decode_keys(stored: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 keys [..., 68] uint8 -> (e2m1 values fp32 [..., 4, 32], UE8M0 exponent bytes int32 [..., 4])."""
    codes = quant.unpack_fp4(stored[..., :64].contiguous())
    values = quant.e2m1_values(codes).unflatten(-1, (4, 32))
    return values, stored[..., 64:68].to(torch.int32)


def score_keys(q8: torch.Tensor, w_eff: torch.Tensor, values: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    """Scores [n, E] fp32 as the kernel forms them: per 32-block fp32 dots of the e4m3 q with the e2m1 key
    values, block scale relative to the key's largest, ReLU, weighted head sum, times the largest scale.
    q8 [n, H, 128], w_eff [n, H] (weights times the q scales), values [E, 4, 32], exps [E, 4]."""
    n, h, _ = q8.shape
    top = exps.amax(-1)                                                      # [E]
    rel = ((exps - top[:, None] + 127).clamp(min=0) << 23).view(torch.float32)   # 2^(e_b - e_max) [E, 4]
    qb = q8.view(n, h, 4, 32)
    acc = torch.zeros(n, h, values.shape[0])
    for b in range(4):
        acc += (qb[:, :, b] @ values[:, b].T) * rel[:, b]
    row_scale = (top << 23).view(torch.float32)                              # 2^(e_max - 127)
    return (torch.relu(acc) * w_eff[:, :, None]).sum(1) * row_scale


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """fp32 scores -> int32 keys in [1, 65535] whose order is the order of the bf16-rounded scores (-0 == +0)."""
    bits = scores.to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    bits = torch.where(bits == 0x8000, 0, bits)
    keys = torch.where(bits >= 0x8000, ~bits & 0xFFFF, bits | 0x8000)
    return keys.clamp(min=1)


def select_rows(keys: torch.Tensor, topk: int) -> torch.Tensor:
    """keys [n, E] int32 (0 = not selectable) -> the min(topk, #nonzero) highest, ties to the lower index, in
    ascending index order, -1 padded: [n, topk] int64."""
    n, e = keys.shape
    out = torch.full((n, topk), -1, dtype=torch.int64)
    if e == 0:
        return out
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices[:, :topk]
    chosen = torch.where(keys.gather(1, order) > 0, order, e)            # e sorts after every real index
    chosen = torch.sort(chosen, dim=1).values
    out[:, :chosen.shape[1]] = torch.where(chosen < e, chosen, -1)
    return out


def _topk_twin(q: torch.Tensor, weights: torch.Tensor, pool: torch.Tensor, layout: BatchLayout, ratio: int,
               topk: int) -> torch.Tensor:
    epb = layout.block_size // ratio
    table = layout.block_table
    e_max = table.shape[1] * epb
    out = torch.full((q.shape[0], topk), -1, dtype=torch.int64)
    q8, q_scale = quantize_q_fp8(q)
    w_eff = weights.float() * q_scale * 2.0 ** KEY_SHIFT
    entries = torch.arange(e_max)
    for s in range(table.shape[0]):
        rows = (layout.token_seq == s).nonzero().flatten()
        if rows.numel() == 0 or e_max == 0:
            continue
        block = table[s, entries // epb]
        present = (block >= 0) & (block < pool.shape[0])
        values, exps = decode_keys(pool[block.clamp(0, pool.shape[0] - 1), entries % epb])
        values = values * 2.0 ** -KEY_SHIFT                                  # the kernel's e4m3 key images
        for part in rows.split(max(1, (1 << 25) // (q.shape[1] * e_max))):      # [part, H, E] fp32 <= 128 MB
            keys = order_keys(score_keys(q8[part], w_eff[part], values, exps))
            visible = entries[None, :] < ((layout.positions[part] + 1) // ratio)[:, None]
            out[part] = select_rows(torch.where(visible & present[None, :], keys, 0), topk)
    return out

"""Fast sparse attention: the window ring and the paged compressed entries read in place (FP8 bytes decoded on
the fly), per-head sink, inverse RoPE of the output fused (spec §3.2, §3.3, §6.3).

It replaces, in `fast` numerics, this sequence of Attention.forward (the `reference` oracle):

    keys, valid = cache_ops.window_gather(ring, codec, kv, layout)
    if ratio: keys/valid += cache_ops.gather_entries(pool, codec, layout, entries or visible_entries(...), ratio)
    o = cache_ops.sparse_attention(q, keys, valid, sink, torch.bfloat16)
    if inv_freq is not None: o = apply_rope(o, layout.positions, inv_freq, inverse=True)

CUDA tensors run the Triton kernels of `_attention_triton` (graph-capturable: launch geometry from shapes, lengths
and validity read on the device); CPU tensors run the PyTorch twin below (same math, fp32/bf16, no float64).
"""

from __future__ import annotations

import torch

from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.kv_format import MainFp8Codec

_TWIN_CHUNK_BYTES = 256 << 20     # the twin gathers keys of this many bytes (fp32) at a time


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor, pool: torch.Tensor | None,
                     codec: MainFp8Codec, layout: BatchLayout, ratio: int, entries: torch.Tensor | None,
                     sink: torch.Tensor, inv_freq: torch.Tensor | None) -> torch.Tensor:
    """Sparse attention of one layer over each token's window and compressed entries, K = V.

    q: [T, H, d] bf16 (d = codec.nope_dim + codec.rope_dim); kv: [T, d] bf16, this step's entries (already what
    their FP8 storage will give back); ring: uint8 [num_slots, W, width], position j of the sequence in slot s
    at [s, j % W] (before this step's append); pool: uint8 [num_blocks, block_size // ratio, width] or None
    (ratio 0); entry bytes (codec.width = 584 for V4): e4m3 codes of the nope dims | rope dims as bf16 | one
    UE8M0 scale byte per 64 nope dims | pad. layout: the step's BatchLayout (positions, token_seq, seq_* and
    block_table on q's device). ratio: 0 (window only), 4 (CSA) or >= 8 (HCA). entries: int32/int64 [T, K]
    entry indices of the token's own sequence, -1 = none, any order (CSA), or None: every visible entry
    w < (p + 1) // ratio (HCA). sink: fp32 [H]. inv_freq: fp32 [rope / 2] or None (no output rotation).
    Returns o: [T, H, d] bf16.

    Keys of the token at position p of sequence s: window positions j in [p - W + 1, p], j >= 0, taken from
    kv[seq_first_row[s] + j - seq_start[s]] when j >= seq_start[s], else decoded from the ring; then compressed
    entry w at pool[block_table[s, w // (block_size // ratio)], w % (block_size // ratio)]; a -1 block (missing)
    masks the entry. Numerics: decoded keys are exactly the codec's bf16 values; scores (q . k) * d^-0.5 in fp32
    from bf16 operands (fp32 accumulation); softmax with the sink only in the denominator,
    o = sum_j exp(s_j - M) k_j / (sum_j exp(s_j - M) + exp(sink_h - M)); probabilities rounded to bf16 before
    the P.V product, fp32 accumulation; then the last 2 * len(inv_freq) dims, pairs (2i, 2i+1), rotated by
    -p * inv_freq[i] (fp32 angle, cos, sin); one bf16 rounding at the end (the reference rounds before and after
    its rotation). The kernel's softmax is online (flash-style, per key tile and split): its bf16 probabilities
    are relative to a running max, the twin's to the global one, as the reference; both are within bf16
    rounding of it. Listed (CSA) entries are trusted to be visible, as by the reference.

    CUDA path: no host synchronisation, graph-capturable once warmed up (the first call per configuration
    compiles); sink and inv_freq must already be on the GPU (else each call copies them from the host).
    """
    if q.is_cuda:
        from dsv4.kernels.fast import _attention_triton

        return _attention_triton.sparse_attention(q, kv, ring, pool, codec, layout, ratio, entries, sink, inv_freq)
    return _sparse_attention_twin(q, kv, ring, pool, codec, layout, ratio, entries, sink, inv_freq)


# ---------------------------------------------------------------------------------------------- PyTorch twin
def _sparse_attention_twin(q: torch.Tensor, kv: torch.Tensor, ring: torch.Tensor, pool: torch.Tensor | None,
                           codec: MainFp8Codec, layout: BatchLayout, ratio: int, entries: torch.Tensor | None,
                           sink: torch.Tensor, inv_freq: torch.Tensor | None) -> torch.Tensor:
    """The kernel's math in torch ops, a chunk of tokens at a time: gather and decode the keys, attend, rotate."""
    num_tokens, _, head_dim = q.shape
    max_comp = 0 if not ratio else (entries.shape[1] if entries is not None
                                    else layout.block_table.shape[1] * (layout.block_size // ratio))
    chunk = max(1, _TWIN_CHUNK_BYTES // ((ring.shape[1] + max_comp) * head_dim * 4))
    o = torch.empty_like(q)
    for begin in range(0, num_tokens, chunk):
        rows = torch.arange(begin, min(num_tokens, begin + chunk), device=q.device)
        keys, valid = _window_keys(ring, codec, kv, layout, rows)
        if ratio:
            extra, extra_valid = _compressed_keys(pool, codec, layout, ratio, entries, rows)
            keys, valid = torch.cat([keys, extra], dim=1), torch.cat([valid, extra_valid], dim=1)
        out = _attend(q[rows], keys, valid, sink)
        if inv_freq is not None:   # rounded to bf16 before and after the rotation, as the reference
            out = _inverse_rope(out.to(torch.bfloat16).float(), layout.positions[rows], inv_freq)
        o[rows] = out.to(torch.bfloat16)
    return o


def _window_keys(ring: torch.Tensor, codec: MainFp8Codec, kv: torch.Tensor, layout: BatchLayout,
                 rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Window of tokens `rows`, oldest first: keys [n, W, d] bf16 (zeros where invalid), validity [n, W]."""
    width = ring.shape[1]
    seq = layout.token_seq[rows]
    pos = layout.positions[rows][:, None] - (width - 1) + torch.arange(width, device=ring.device)[None, :]
    start = layout.seq_start[seq][:, None]
    valid = pos >= 0
    from_kv = valid & (pos >= start)
    stored = ring[layout.seq_slot[seq][:, None], pos.clamp(min=0) % width]           # [n, W, width] bytes
    fresh_row = (layout.seq_first_row[seq][:, None] + pos - start).clamp(0, kv.shape[0] - 1)
    keys = torch.where(from_kv[..., None], kv[fresh_row], codec.decode(stored))
    return keys.masked_fill(~valid[..., None], 0), valid


def _compressed_keys(pool: torch.Tensor, codec: MainFp8Codec, layout: BatchLayout, ratio: int,
                     entries: torch.Tensor | None, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed keys of tokens `rows`: the listed entries, or every visible one; [n, E, d] bf16, [n, E]."""
    per_block = layout.block_size // ratio
    max_blocks = layout.block_table.shape[1]
    seq = layout.token_seq[rows]
    if entries is not None:
        w = entries[rows].long()
        valid = w >= 0
    else:
        w = torch.arange(max_blocks * per_block, device=pool.device)[None, :].expand(rows.shape[0], -1)
        valid = w < ((layout.positions[rows] + 1) // ratio)[:, None]
    w = torch.where(valid, w, 0)
    col = w // per_block                           # = (w * ratio) // block_size
    valid = valid & (col < max_blocks)
    block = layout.block_table[seq[:, None], col.clamp(max=max_blocks - 1)]
    valid = valid & (block >= 0)                   # a missing block: skipped, not an error
    keys = codec.decode(pool[block.clamp(min=0), w % per_block])
    return keys.masked_fill(~valid[..., None], 0), valid


def _attend(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor) -> torch.Tensor:
    """q [n, H, d] bf16, keys [n, K, d] bf16, valid [n, K] -> fp32 [n, H, d]: the kernel's softmax with sink."""
    scores = torch.matmul(q.float(), keys.float().transpose(1, 2)) * q.shape[-1] ** -0.5     # [n, H, K]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True)                 # finite: every token sees its own position
    probs = torch.exp(scores - peak)
    denom = probs.sum(dim=-1, keepdim=True) + torch.exp(sink.float()[None, :, None] - peak)
    return torch.matmul(probs.to(torch.bfloat16).float(), keys.float()) / denom


def _inverse_rope(o: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate the last 2*len(inv_freq) dims of fp32 o [n, H, d] by -position * inv_freq (pairs (2i, 2i+1))."""
    rope_dim = 2 * inv_freq.shape[0]
    angle = positions.float()[:, None] * inv_freq.float().to(o.device)[None, :]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    pairs = o[..., -rope_dim:].unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((a * cos + b * sin, b * cos - a * sin), dim=-1).flatten(-2)
    return torch.cat([o[..., :-rope_dim], rotated], dim=-1)

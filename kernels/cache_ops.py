"""Reference (PyTorch) cache ops: window append and gather, compressor flush, indexer top-k over paged keys, paged
entry gather, and sparse attention with a sink. They are the CPU path and the oracles of the CUDA kernels.

Storage the ops work on (allocated by `dsv4.model.kv_cache.KVStorage`):
- window ring:   [num_slots, W, width]  entry of position p of the sequence in slot s at [s, p % W]
- entry pool:    [num_blocks, block_size // ratio, width]  compressed entry w of a sequence at
                 [block_table[(w * ratio) // block_size], w % (block_size // ratio)]
- compressor state: kv, score [num_slots, coff * ratio, coff * d] fp32 (see `pool_chunk`)
`width` and the byte layout come from the entry codec (`dsv4.kernels.kv_format`).

Every op takes the step's `BatchLayout`: which sequence (slot, block table, chunk start) each token belongs to.
Tie rule of the indexer top-k: among equal scores the lower entry index wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dsv4.kernels import quant
from dsv4.kernels.kv_format import EntryCodec
from dsv4.kernels.ref_math import apply_rope, exp, matmul, rms_norm, softmax


@dataclass(frozen=True)
class BatchLayout:
    """Where each token of one forward step belongs. Built once per step and shared by every layer."""

    positions: torch.Tensor       # [T] int64 absolute position of each token
    token_seq: torch.Tensor       # [T] int64 row of the token's sequence in the per-sequence arrays below
    seq_slot: torch.Tensor        # [S] int64 window/state slot of each sequence
    seq_start: torch.Tensor       # [S] int64 position of the chunk's first token
    seq_len: torch.Tensor         # [S] int64 number of tokens of the sequence in this step
    seq_first_row: torch.Tensor   # [S] int64 flat row of the chunk's first token
    block_table: torch.Tensor     # [S, max_blocks] int64 physical block of each block_size-token span; -1 = none
    block_size: int               # tokens per block
    spans: tuple[tuple[int, int, int, int], ...] = field(default=())   # host copy: (slot, start, len, first_row)

    @classmethod
    def from_chunks(cls, chunks: Sequence[tuple[int, int, int, Sequence[int]]], block_size: int,
                    device: torch.device | str = "cpu") -> BatchLayout:
        """chunks: (slot, start position, number of tokens, block table) per sequence, in flat-batch order."""
        positions, token_seq, spans, row = [], [], [], 0
        table = torch.full((len(chunks), max([len(c[3]) for c in chunks] + [1])), -1, dtype=torch.int64)
        for s, (slot, start, length, blocks) in enumerate(chunks):
            positions.append(torch.arange(start, start + length))
            token_seq.append(torch.full((length,), s, dtype=torch.int64))
            table[s, :len(blocks)] = torch.as_tensor(list(blocks), dtype=torch.int64)
            spans.append((slot, start, length, row))
            row += length

        def column(i: int) -> torch.Tensor:
            return torch.tensor([span[i] for span in spans], dtype=torch.int64, device=device)

        def flat(parts: list[torch.Tensor]) -> torch.Tensor:
            return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)).to(device)

        return cls(flat(positions), flat(token_seq), column(0), column(1), column(2), column(3), table.to(device),
                   block_size, tuple(spans))

    def to(self, device: torch.device | str) -> BatchLayout:
        return BatchLayout(self.positions.to(device), self.token_seq.to(device), self.seq_slot.to(device),
                           self.seq_start.to(device), self.seq_len.to(device), self.seq_first_row.to(device),
                           self.block_table.to(device), self.block_size, self.spans)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


# ---------------------------------------------------------------------------------------------- sliding window
def window_append(ring: torch.Tensor, codec: EntryCodec, values: torch.Tensor, layout: BatchLayout) -> None:
    """Store each token's entry (values [T, d], quantized by the codec) in its sequence's ring at position % W.
    Only a chunk's last W tokens are stored: earlier ones would be overwritten within the same step."""
    width = ring.shape[1]
    seq = layout.token_seq
    chunk_end = layout.seq_start[seq] + layout.seq_len[seq]
    rows = (layout.positions >= chunk_end - width).nonzero().flatten()
    ring[layout.seq_slot[seq[rows]], layout.positions[rows] % width] = codec.encode(values[rows])


def window_gather(ring: torch.Tensor, codec: EntryCodec, chunk_values: torch.Tensor, layout: BatchLayout
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's window, positions t-W+1 .. t oldest first: [T, W, d] in chunk_values' dtype, and validity
    [T, W]. Positions before the chunk come from the ring (call before `window_append`), the rest from
    chunk_values (this step's entries, already quantization-simulated)."""
    width = ring.shape[1]
    seq = layout.token_seq
    pos = layout.positions[:, None] - (width - 1) + torch.arange(width, device=ring.device)[None, :]
    start = layout.seq_start[seq][:, None]
    valid = pos >= 0
    from_chunk = pos >= start
    from_ring = valid & ~from_chunk
    keys = torch.zeros(*pos.shape, chunk_values.shape[-1], dtype=chunk_values.dtype, device=ring.device)
    if from_ring.any():
        slots = layout.seq_slot[seq][:, None].expand_as(pos)
        keys[from_ring] = codec.decode(ring[slots[from_ring], (pos % width)[from_ring]]).to(keys.dtype)
    rows = layout.seq_first_row[seq][:, None] + (pos - start)
    keys[from_chunk] = chunk_values[rows[from_chunk]]
    return keys, valid


# ---------------------------------------------------------------------------------------------- compressor
def pool_chunk(state_kv: torch.Tensor, state_score: torch.Tensor, a: torch.Tensor, z: torch.Tensor, start: int,
               ratio: int, head_dim: int) -> tuple[torch.Tensor, int]:
    """Feed one sequence's tokens at positions start.. into its compressor state (spec §3.4, §3.5).

    a, z: [n, coff*d] fp32 projections and gate scores (ape added). CSA (ratio 4) keeps the previous window in
    slots 0..3 and the current one in 4..7 and pools 8 slots: the A-halves (first d channels) of window w-1 and
    the B-halves of window w; HCA keeps the current window in slots 0..m-1. Returns the pooled fp32 entries of
    every window these tokens complete, [W, d] (softmax over slots per channel), and the first one's index;
    updates the state in place. Any chunk length works, so chunked prefill equals token-by-token decode.
    """
    m, d, overlap = ratio, head_dim, ratio == 4
    held = start % m                                       # tokens of the current window already in the state
    current = m if overlap else 0
    cur_a = torch.cat([state_kv[current:current + held], a])
    cur_z = torch.cat([state_score[current:current + held], z])
    num_windows = cur_a.shape[0] // m
    pooled = a.new_zeros(0, d)
    if num_windows:
        win_a = cur_a[:num_windows * m].view(num_windows, m, -1)
        win_z = cur_z[:num_windows * m].view(num_windows, m, -1)
        if overlap:
            prev_a = torch.cat([state_kv[None, :m], win_a[:-1]])    # window w-1 of each w (the state for the first)
            prev_z = torch.cat([state_score[None, :m], win_z[:-1]])
            slots_a = torch.cat([prev_a[..., :d], win_a[..., d:]], dim=1)
            slots_z = torch.cat([prev_z[..., :d], win_z[..., d:]], dim=1)
            state_kv[:m], state_score[:m] = win_a[-1], win_z[-1]
        else:
            slots_a, slots_z = win_a, win_z
        pooled = (slots_a.double() * softmax(slots_z, dim=1).double()).sum(dim=1).float()
    tail = cur_a.shape[0] - num_windows * m
    state_kv[current:current + tail] = cur_a[num_windows * m:]
    state_score[current:current + tail] = cur_z[num_windows * m:]
    return pooled, (start - held) // m


def finish_entries(pooled: torch.Tensor, first: int, ratio: int, norm_weight: torch.Tensor, eps: float,
                   inv_freq: torch.Tensor, rotate: bool, act_dtype: torch.dtype) -> torch.Tensor:
    """Pooled fp32 [W, d] -> entry values: round, RMSNorm, RoPE at position w*ratio, Hadamard (indexer keys in
    reference numerics). Quantization happens when the codec encodes them."""
    x = rms_norm(pooled.to(act_dtype), norm_weight, eps).to(act_dtype)
    positions = (torch.arange(pooled.shape[0], device=pooled.device) + first) * ratio
    x = apply_rope(x, positions, inv_freq)
    return quant.hadamard_rotate(x) if rotate else x


def entry_address(layout: BatchLayout, seq: torch.Tensor, entry: torch.Tensor, ratio: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(block, offset) of compressed entries `entry` of sequences `seq` (same shapes) in a ratio's pool."""
    block = layout.block_table[seq, (entry * ratio) // layout.block_size]
    return block, entry % (layout.block_size // ratio)


def compress_flush(a: torch.Tensor, z: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                   layout: BatchLayout, ratio: int, norm_weight: torch.Tensor, eps: float, inv_freq: torch.Tensor,
                   rotate: bool, pool: torch.Tensor, codec: EntryCodec, act_dtype: torch.dtype) -> None:
    """One compressor over one step: pool every completed window, finish and encode the entries into the paged
    pool, and advance each sequence's state (states [num_slots, ...] are updated in place)."""
    head_dim = norm_weight.shape[0]
    for s, (slot, start, length, first_row) in enumerate(layout.spans):
        rows = slice(first_row, first_row + length)
        pooled, first = pool_chunk(state_kv[slot], state_score[slot], a[rows], z[rows], start, ratio, head_dim)
        if pooled.shape[0]:
            values = finish_entries(pooled, first, ratio, norm_weight, eps, inv_freq, rotate, act_dtype)
            entries = torch.arange(first, first + pooled.shape[0], device=pool.device)
            block, offset = entry_address(layout, torch.full_like(entries, s), entries, ratio)
            pool[block, offset] = codec.encode(values)


def read_entries(pool: torch.Tensor, codec: EntryCodec, layout: BatchLayout, seq: int, count: int, ratio: int
                 ) -> torch.Tensor:
    """Entries 0 .. count-1 of sequence row `seq`, decoded: [count, d]."""
    entries = torch.arange(count, device=pool.device)
    block, offset = entry_address(layout, torch.full_like(entries, seq), entries, ratio)
    return codec.decode(pool[block, offset])


# ---------------------------------------------------------------------------------------------- indexer
def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, act_dtype: torch.dtype
                 ) -> torch.Tensor:
    """I = sum_h w_h ReLU(q_h . k): q [n, H, d], weights [n, H], keys [E, d] -> [n, E] fp32. In reference
    numerics every intermediate is bf16, as the official einsum/relu/multiply/sum on bf16 tensors."""
    n, h, d = q.shape
    dots = matmul(q.reshape(n * h, d), keys).view(n, h, -1).to(act_dtype)
    weighted = (torch.relu(dots).float() * weights.float().unsqueeze(-1)).to(act_dtype)
    return weighted.double().sum(dim=1).float().to(act_dtype).float()


def select_topk(scores: torch.Tensor, visible: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k visible entries per row, ties to the lower index; fewer than k visible -> -1 padding. [n, k]."""
    masked = scores.masked_fill(~visible, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.where(visible.gather(1, order), order, -1)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, pool: torch.Tensor, codec: EntryCodec,
                 layout: BatchLayout, ratio: int, topk: int, act_dtype: torch.dtype) -> torch.Tensor:
    """Per token, the `topk` best visible indexer keys of its sequence (visible: entry < (t+1)/ratio):
    [T, topk] int64 entry indices, best first, -1 padded."""
    out = torch.full((layout.num_tokens, topk), -1, dtype=torch.int64, device=q.device)
    for s, (_, start, length, first_row) in enumerate(layout.spans):
        count = (start + length) // ratio
        if count == 0:
            continue
        rows = slice(first_row, first_row + length)
        keys = read_entries(pool, codec, layout, s, count, ratio)
        scores = index_scores(q[rows], weights[rows], keys, act_dtype)
        visible = torch.arange(count, device=q.device)[None, :] < ((layout.positions[rows] + 1) // ratio)[:, None]
        chosen = select_topk(scores, visible, min(topk, count))
        out[rows, :chosen.shape[1]] = chosen
    return out


# ---------------------------------------------------------------------------------------------- gather, attention
def gather_entries(pool: torch.Tensor, codec: EntryCodec, layout: BatchLayout, entries: torch.Tensor, ratio: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected compressed entries (entries [T, K] of each token's own sequence, -1 = none) decoded into a dense
    tile [T, K, d] (zeros where invalid) and validity [T, K]."""
    valid = entries >= 0
    seq = layout.token_seq[:, None].expand_as(entries)
    tile = torch.zeros(*entries.shape, codec.decode(pool[:1, 0]).shape[-1], dtype=codec.value_dtype,
                       device=pool.device)
    if valid.any():
        block, offset = entry_address(layout, seq[valid], entries[valid], ratio)
        tile[valid] = codec.decode(pool[block, offset])
    return tile, valid


def sparse_attention(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, sink: torch.Tensor,
                     act_dtype: torch.dtype) -> torch.Tensor:
    """Attention with a per-head sink over per-token key sets, K = V (the official `sparse_attn` kernel).

    q [T, H, d], keys [T, K, d], valid [T, K] -> o [T, H, d] in act_dtype. Scores fp32 with scale d^-0.5;
    probabilities rounded to act_dtype before P·V (the kernel's bf16 P); exp(sink - max) joins the denominator.
    """
    d = q.shape[-1]
    scores = torch.bmm(q.double(), keys.double().transpose(1, 2)).float() * d ** -0.5      # [T, H, K]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True)                               # every token sees itself: finite
    probs = exp(scores - peak)
    denom = probs.double().sum(dim=-1, keepdim=True) + torch.exp(sink.double()[None, :, None] - peak.double())
    out = torch.bmm(probs.to(act_dtype).double(), keys.double()) / denom
    return out.float().to(act_dtype)

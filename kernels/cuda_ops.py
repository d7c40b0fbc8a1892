"""Typed wrappers of the CUDA kernels (kernels/csrc). Each matches its PyTorch reference bit for bit where the
docstring says so, takes the same arguments, and allocates its outputs on the current stream (graph-capture safe:
fixed launch geometry from shapes, no host synchronisation, lengths and masks read on the device).

Validation. Shapes, dtypes and devices are checked on the host by `TORCH_CHECK` (no sync). Data-dependent checks
(token ids inside the vocabulary, tid2eid entries inside [0, E), slots and blocks present for every position an
op touches) need a device sync: they run here, before the launch, when `validate` is true, which by default means
`DSV4_KERNEL_CHECKS=1` (the default) and no CUDA graph is being captured; they raise ValueError like the
references. Without them the kernels apply documented mask rules and never read or write out of bounds:
- routers: a bad token id gives ids -1 and NaN weights for its row; a bad tid2eid entry id -1 and NaN weights;
- window ops: a slot outside the ring is neither written nor read (gathered rows invalid and zero);
- flush: an entry whose block is missing is not stored; indexer: such entries are never selected;
- gather: such entries come back invalid and zero.
"""

from __future__ import annotations

import torch

from dsv4.kernels import quant
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.knobs import knobs
from dsv4.kernels.kv_format import EntryCodec, IndexFp4Codec, MainFp8Codec

# Constants as the references' fp32 arithmetic sees them.
INV_FP8_MAX = float(torch.tensor(1.0 / quant.FP8_MAX, dtype=torch.float32))
INV_FP4_MAX = float(torch.tensor(1.0 / quant.FP4_MAX, dtype=torch.float32))
FP8_FLOOR = float(torch.tensor(quant.FP8_AMAX_FLOOR, dtype=torch.float32))
FP4_FLOOR = float(torch.tensor(quant.FP4_AMAX_FLOOR, dtype=torch.float32))
MAX_EXPERTS, MAX_ROUTE_TOPK, MAX_INDEX_TOPK = 512, 16, 1024
INDEX_DIM, INDEX_HEADS = 128, (16, 32, 64)


def _ext():
    from dsv4.kernels.build import load

    return load()


def _validate(validate: bool | None) -> bool:
    if validate is not None:
        return validate
    return knobs().checks and not torch.cuda.is_current_stream_capturing()


def enabled(*tensors: torch.Tensor) -> bool:
    """Kernels are used for CUDA tensors unless DSV4_KERNELS=0."""
    return all(t.is_cuda for t in tensors) and knobs().kernels


# ---------------------------------------------------------------------------------------------- routing
def supports_route(x: torch.Tensor, gate_weight: torch.Tensor, topk: int) -> bool:
    return (x.dim() == 2 and x.dtype in (torch.float32, torch.bfloat16) and gate_weight.dtype == torch.bfloat16
            and x.shape[1] % 8 == 0 and gate_weight.shape[0] <= MAX_EXPERTS
            and 1 <= topk <= min(MAX_ROUTE_TOPK, gate_weight.shape[0]))


def check_hash_ids(tid2eid: torch.Tensor, token_ids: torch.Tensor, num_experts: int) -> None:
    """The reference's checks (one sync): ids inside the vocabulary, looked-up experts inside [0, E)."""
    vocab = tid2eid.shape[0]
    if token_ids.numel() == 0:
        return
    bad_tok = (token_ids < 0) | (token_ids >= vocab)
    if bool(bad_tok.any()):
        bad = token_ids[bad_tok][0].item()
        raise ValueError(f"hash router: token id {bad} is outside the vocabulary [0, {vocab})")
    ids = tid2eid[token_ids]
    bad_ids = ids[(ids < 0) | (ids >= num_experts)]
    if bad_ids.numel():
        raise ValueError(f"hash router: tid2eid holds expert id {bad_ids[0].item()} outside [0, {num_experts})")


def hash_route(x: torch.Tensor, gate_weight: torch.Tensor, tid2eid: torch.Tensor, token_ids: torch.Tensor,
               route_scale: float, validate: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash routing (`routing.hash_route`): experts tid2eid[token], weights from those k experts' scores only.

    x [T, D] fp32 or bf16 (D % 8 == 0, 16-byte aligned); gate_weight [E, D] bf16 (E <= 512); tid2eid [V, k]
    int64/int32 (k <= 16); token_ids [T] int64 -> weights [T, k] fp32, ids [T, k] int64. k <= 8: a cluster of k
    CTAs per token, one chosen expert each. The k dot products accumulate in fp64 (x and
    bf16 weights multiply exactly), are rounded once to fp32 as the reference's; ids are exact, weights equal
    the reference's to the last bit except when an fp64 sum lies within ~1e-16 of an fp32 rounding boundary.
    """
    if _validate(validate):
        check_hash_ids(tid2eid, token_ids, gate_weight.shape[0])
    w, ids = _ext().hash_route(x.contiguous(), gate_weight.contiguous(), tid2eid.contiguous(),
                               token_ids.contiguous().long(), float(route_scale))
    return w, ids


ROUTER_WORKSPACE_INTS = 1   # the decode kernel's completion ticket (routing.cu)


def router_workspace(device: torch.device | str) -> torch.Tensor:
    """The dense router's workspace: zeroed int32 that every call leaves at zero again (the decode kernel's
    completion ticket). Keep one per concurrently running stream; reuse it across calls and graph replays."""
    return torch.zeros(ROUTER_WORKSPACE_INTS, dtype=torch.int32, device=device)


def dense_route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, topk: int, route_scale: float,
                workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Score routing (`routing.dense_route`): fp64-accumulated gate GEMM, sqrt-softplus (fp64), + bias for the
    selection only, top-k with ties to the lower expert id, renormalised over the chosen unbiased scores, scaled.

    x [T, D] fp32 or bf16 (D % 8 == 0, 16-byte aligned); gate_weight [E, D] bf16 (E <= 512); bias [E] fp32;
    topk <= 16 -> weights [T, k] fp32, ids [T, k] int64, best first. bf16 x with 4 < T <= 64 (D % 128 == 0,
    D <= 8192): the certified path, two launches: a bf16 tensor-core estimate of every logit with a proven error
    bound, then per token the experts that could be in the top-k (usually exactly k) get exact fp64 logits and the
    selection. Otherwise T <= 8 (bf16: T <= 4): one launch (CTAs of two experts score every token in fp64; the last
    CTA to finish selects), using `workspace` (`router_workspace`; None makes a fresh one per call, which costs a
    memset). fp32 x, 8 < T <= 64: fp64 GEMM partials over K slices, then a warp-per-token epilogue; larger T:
    cuBLAS's fp64 GEMM, then the same epilogue. Same exactness as `hash_route` on every path.
    """
    return tuple(_ext().dense_route(x.contiguous(), gate_weight.contiguous(), bias.contiguous().float(), int(topk),
                                    float(route_scale), workspace))


def router_gate_estimate(x: torch.Tensor, gate_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The certified router's tensor-core estimate (routing.cu / router_certified.cu), for testing its bound.

    x [T, D] bf16 (T <= 64, D % 128 == 0, D <= 8192), gate_weight [E, D] bf16 -> (logits [T, E] fp32, scale
    [T, E] fp32 ~ sum_d |x_d w_d|, gamma): |logits - exact| <= gamma * scale / (1 - gamma) must hold everywhere."""
    logits, scale, gamma = _ext().router_gate_estimate(x.contiguous(), gate_weight.contiguous())
    return logits, scale, float(gamma)


def router_topk(logits: torch.Tensor, bias: torch.Tensor, topk: int, route_scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The router epilogue alone on fp32 logits [T, E]: sqrt-softplus + bias + top-k + renormalise + scale."""
    return tuple(_ext().router_topk(logits.contiguous().float(), bias.contiguous().float(), int(topk),
                                    float(route_scale)))


# ---------------------------------------------------------------------------------------------- window
def supports_main_codec(codec: EntryCodec, storage: torch.Tensor) -> bool:
    return (isinstance(codec, MainFp8Codec) and storage.dtype == torch.uint8 and codec.nope_dim % 64 == 0
            and codec.rope_dim % 8 == 0 and storage.shape[-1] == codec.width)


def check_slots(layout: BatchLayout, num_slots: int) -> None:
    if layout.seq_slot.numel() and bool(((layout.seq_slot < 0) | (layout.seq_slot >= num_slots)).any()):
        raise ValueError(f"slots {layout.seq_slot.tolist()} outside [0, {num_slots})")


def window_append(ring: torch.Tensor, codec: MainFp8Codec, values: torch.Tensor, layout: BatchLayout,
                  validate: bool | None = None) -> None:
    """`cache_ops.window_append` for FP8 entries: each token among its chunk's last W is quantized and stored at
    ring[slot, pos % W]. ring [num_slots, W, width] uint8 (width = 584 for V4: 448 e4m3 | 64 bf16 rope | 7 UE8M0 |
    pad); values [T, nope + rope] bf16 or fp32. Bytes equal `MainFp8Codec.encode` exactly."""
    if _validate(validate):
        check_slots(layout, ring.shape[0])
    _ext().window_append(ring, values.contiguous(), layout.positions, layout.token_seq, layout.seq_slot,
                         layout.seq_start, layout.seq_len, codec.nope_dim, codec.rope_dim, INV_FP8_MAX, FP8_FLOOR)


def window_gather(ring: torch.Tensor, codec: MainFp8Codec, chunk_values: torch.Tensor, layout: BatchLayout,
                  validate: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache_ops.window_gather` for FP8 rings and bf16 chunk values: each token's window, positions
    t-W+1 .. t oldest first, as keys [T, W, d] bf16 (ring entries decoded exactly, this step's rows copied, zeros
    before position 0) and validity [T, W] bool. Exact."""
    if _validate(validate):
        check_slots(layout, ring.shape[0])
    keys, valid = _ext().window_gather(ring, chunk_values.contiguous(), layout.positions, layout.token_seq,
                                       layout.seq_slot, layout.seq_start, layout.seq_first_row, codec.nope_dim,
                                       codec.rope_dim)
    return keys, valid


# ---------------------------------------------------------------------------------------------- flush
def supports_flush(a: torch.Tensor, ratio: int, norm_weight: torch.Tensor, inv_freq: torch.Tensor, rotate: bool,
                   pool: torch.Tensor, codec: EntryCodec, act_dtype: torch.dtype) -> bool:
    d = norm_weight.shape[0]
    if act_dtype != torch.bfloat16 or a.dtype != torch.float32 or ratio not in (4, 128) or pool.dtype != torch.uint8:
        return False
    if d % 64 or d > 512 or 2 * inv_freq.shape[0] % 64 or norm_weight.dtype not in (torch.bfloat16, torch.float32):
        return False
    if rotate:
        return isinstance(codec, IndexFp4Codec) and ratio == 4 and codec.dim == d and d & (d - 1) == 0
    return isinstance(codec, MainFp8Codec) and codec.nope_dim + codec.rope_dim == d and codec.nope_dim % 64 == 0


def _entry_blocks_ok(layout: BatchLayout, first_entry: torch.Tensor, end_entry: torch.Tensor, ratio: int,
                     num_blocks: int) -> bool:
    """Every block holding entries [first, end) of each sequence exists in the table and the pool."""
    table = layout.block_table
    cols = torch.arange(table.shape[1], device=table.device)[None, :]
    has = end_entry > first_entry
    first_lb = (first_entry * ratio) // layout.block_size
    last_lb = ((end_entry - 1).clamp(min=0) * ratio) // layout.block_size
    if bool((has & (last_lb >= table.shape[1])).any()):
        return False
    needed = has[:, None] & (cols >= first_lb[:, None]) & (cols <= last_lb[:, None])
    return not bool((needed & ((table < 0) | (table >= num_blocks))).any())


def check_flush(layout: BatchLayout, ratio: int, num_slots: int, num_blocks: int) -> None:
    check_slots(layout, num_slots)
    end = layout.seq_start + layout.seq_len
    if not _entry_blocks_ok(layout, layout.seq_start // ratio, end // ratio, ratio, num_blocks):
        raise ValueError("compress_flush: the block table misses a block for an entry this step completes")


def compress_flush(a: torch.Tensor, z: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                   layout: BatchLayout, ratio: int, norm_weight: torch.Tensor, eps: float, inv_freq: torch.Tensor,
                   rotate: bool, pool: torch.Tensor, codec: EntryCodec, act_dtype: torch.dtype,
                   validate: bool | None = None) -> None:
    """`cache_ops.compress_flush` in one launch: for every window the step completes (decode tokens or prefill
    chunks of any length at any start), gated softmax pooling over the state and this step's rows, bf16 round,
    RMSNorm, RoPE at w * ratio, then FP8 main entries (584 B) or Hadamard + MXFP4 indexer keys (68 B) into
    pool[block, w % (block_size / ratio)]; the states [num_slots, coff * ratio, coff * d] fp32 advance in place.

    a, z [T, coff * d] fp32 (z with ape); ratio 4 (CSA, coff 2) or 128 (HCA); d <= 512, a multiple of 64;
    norm_weight [d] bf16/fp32; inv_freq [rope / 2] fp32 on the device. Stored bytes and states equal the
    reference's (fp64 softmax and sums, as the reference; see compress.cu for the rounding points).
    """
    if _validate(validate):
        check_flush(layout, ratio, state_kv.shape[0], pool.shape[0])
    nope = codec.nope_dim if isinstance(codec, MainFp8Codec) else 0
    rope = 2 * inv_freq.shape[0]
    _ext().compress_flush(a.contiguous(), z.contiguous(), state_kv, state_score, layout.seq_slot, layout.seq_start,
                          layout.seq_len, layout.seq_first_row, layout.block_table, layout.block_size, ratio,
                          norm_weight.contiguous(), float(eps), inv_freq.contiguous().float(), pool, nope, rope,
                          bool(rotate), INV_FP8_MAX, FP8_FLOOR, INV_FP4_MAX, FP4_FLOOR,
                          float(norm_weight.shape[0] ** -0.5))


# ---------------------------------------------------------------------------------------------- indexer
def supports_indexer(q: torch.Tensor, weights: torch.Tensor, pool: torch.Tensor, codec: EntryCodec,
                     layout: BatchLayout, ratio: int, topk: int, act_dtype: torch.dtype) -> bool:
    return (isinstance(codec, IndexFp4Codec) and codec.dim == INDEX_DIM and act_dtype == torch.bfloat16
            and q.dtype == torch.bfloat16 and weights.dtype == torch.bfloat16 and q.dim() == 3
            and q.shape[1] in INDEX_HEADS and q.shape[2] == INDEX_DIM and pool.dtype == torch.uint8
            and pool.shape[-1] == codec.width and 1 <= topk <= MAX_INDEX_TOPK
            and layout.block_size % ratio == 0 and (layout.block_size // ratio) % 16 == 0)


def check_indexer(layout: BatchLayout, ratio: int, num_blocks: int) -> None:
    count = (layout.seq_start + layout.seq_len) // ratio
    if not _entry_blocks_ok(layout, torch.zeros_like(count), count, ratio, num_blocks):
        raise ValueError("indexer_topk: the block table misses a block holding a visible indexer key")


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, pool: torch.Tensor, codec: IndexFp4Codec,
                 layout: BatchLayout, ratio: int, topk: int, act_dtype: torch.dtype,
                 validate: bool | None = None) -> torch.Tensor:
    """`cache_ops.indexer_topk` on MXFP4 keys: per token, the `topk` visible entries of its sequence with the
    highest I = sum_h w_h ReLU(q_h . k) (bf16 score, as the reference), ties to the lower entry index, best
    first, -1 padded -> [T, topk] int64. q [T, H, 128] bf16 (MXFP4 values after Hadamard), H in {16, 32, 64};
    weights [T, H] bf16; pool [num_blocks, block_size / ratio, 68] uint8. Selections are exact (see indexer.cu:
    exact int8 tensor-core dots of the MXFP4 integers, the reference's bf16 roundings, an fp64 head sum, and a
    per-key fp64 path for inputs outside the int8 fold). Workspace: 2 bytes per (token, table entry)."""
    if _validate(validate):
        check_indexer(layout, ratio, pool.shape[0])
    return _ext().indexer_topk(q.contiguous(), weights.contiguous(), pool, layout.positions, layout.token_seq,
                               layout.block_table, layout.block_size, ratio, int(topk))


# ---------------------------------------------------------------------------------------------- gather
def check_gather(layout: BatchLayout, entries: torch.Tensor, ratio: int, num_blocks: int) -> None:
    valid = entries >= 0
    if not bool(valid.any()):
        return
    table = layout.block_table
    seq = layout.token_seq[:, None].expand_as(entries)[valid]
    logical = (entries[valid] * ratio) // layout.block_size
    if bool((logical >= table.shape[1]).any()):
        raise ValueError("gather_entries: an entry lies past its sequence's block table")
    block = table[seq, logical]
    if bool(((block < 0) | (block >= num_blocks)).any()):
        raise ValueError("gather_entries: an entry lies in a block the sequence does not hold")


def gather_entries(pool: torch.Tensor, codec: MainFp8Codec, layout: BatchLayout, entries: torch.Tensor, ratio: int,
                   validate: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache_ops.gather_entries` for FP8 entries: entries [T, K] int64 of each token's own sequence (-1 = none)
    -> tile [T, K, d] bf16 (FP8 dequantized exactly, zeros where invalid) and validity [T, K] bool. Exact."""
    if _validate(validate):
        check_gather(layout, entries, ratio, pool.shape[0])
    tile, valid = _ext().gather_entries(pool, entries.contiguous().long(), layout.token_seq, layout.block_table,
                                        layout.block_size, ratio, codec.nope_dim, codec.rope_dim)
    return tile, valid

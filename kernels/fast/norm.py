"""Fast RMSNorm, RoPE, the q / KV-entry finishing and the window append (spec §2.6, §3.1, §3.2, §6.2, §6.3).

Same function as the reference (`dsv4.kernels.ref_math`, `dsv4.kernels.quant`, `cache_ops.window_append`) in
fp32 without float64:

- RMSNorm: y = bf16((x * rsqrt(mean(x^2) + eps)) * w), fp32 sum of squares (the reference: float64).
- RoPE: interleaved pairs (2i, 2i+1) of the last 2 * len(inv_freq) dims, angle = fp32(p) * inv_freq[i] in fp32,
  fp32 cos/sin of that angle (on the GPU an fp32 Cody-Waite reduction + polynomials, ~1e-7 absolute error up to
  1M positions; the reference rounds float64 cos/sin to fp32), fp32 rotation, bf16 result.
- head_norm_rope: unweighted per-head RMSNorm in fp32 (the official code does it in bf16 op by op; the fp32
  result is within a bf16 ulp or two of it), rounded to bf16, then RoPE.
- kv_entry: weighted RMSNorm -> bf16 -> RoPE -> bf16, then the FP8 KV simulation of the nope dims (64-blocks,
  UE8M0 scale, e4m3 round trip, `quant.fake_quant_kv`): bit-exact given the same bf16 values after norm + RoPE,
  since the quantization is exact arithmetic (power-of-two scales).
- window_append: byte-exact with `cache_ops.window_append` (the MainFp8Codec 584-byte layout).

CUDA tensors run one Triton kernel each (`_norm_triton`); CPU tensors the PyTorch twins below.
"""

from __future__ import annotations

import torch

from dsv4.kernels import quant
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.kv_format import MainFp8Codec


# ---------------------------------------------------------------------------------------------- twins
def _rms_norm_twin(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    x = x.float()
    y = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    return (y if weight is None else y * weight.float()).to(torch.bfloat16)


def _rope_twin(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool) -> torch.Tensor:
    rope_dim = 2 * inv_freq.shape[0]
    angle = positions.to(torch.float32)[:, None] * inv_freq.float().to(x.device)[None, :]   # [T, r/2] fp32
    shape = (angle.shape[0],) + (1,) * (x.dim() - 2) + (angle.shape[1],)
    cos, sin = angle.cos().view(shape), angle.sin().view(shape)
    if inverse:
        sin = -sin
    pairs = x[..., -rope_dim:].float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat([x[..., :-rope_dim].to(torch.bfloat16), rotated.to(torch.bfloat16)], dim=-1)


def _window_append_twin(ring: torch.Tensor, codec: MainFp8Codec, values: torch.Tensor, layout: BatchLayout
                        ) -> None:
    window = ring.shape[1]
    seq = layout.token_seq
    slot = layout.seq_slot[seq]
    chunk_end = layout.seq_start[seq] + layout.seq_len[seq]
    store = (layout.positions >= chunk_end - window) & (slot >= 0) & (slot < ring.shape[0])
    rows = store.nonzero().flatten()
    ring[slot[rows], layout.positions[rows] % window] = codec.encode(values[rows])


# ---------------------------------------------------------------------------------------------- public API
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = bf16((x * rsqrt(mean(x^2) + eps)) * weight) over the last dim, fp32 math.

    x: [..., D] bf16 (or fp32); weight: [D] bf16/fp32 or None (unweighted). Returns bf16, x's shape.
    GPU: one launch; whole rows in registers (D <= 16384), up to 16 rows per program for short rows.
    """
    if x.is_cuda:
        from dsv4.kernels.fast import _norm_triton

        return _norm_triton.rms_norm(x, weight, eps)
    return _rms_norm_twin(x, weight, eps)


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate the last r = 2 * len(inv_freq) dims of x on interleaved pairs (2i, 2i+1) by fp32(p) * inv_freq[i].

    x: [T, ..., d] bf16; positions: [T] int64; inv_freq: [r/2] fp32 (r a power of two). inverse=True rotates by
    the conjugate (the attention output). Returns bf16, x's shape (the other dims copied). GPU: one launch, one
    program per (token, up to 2048 / d rows), cos/sin once per program.
    """
    if x.is_cuda:
        from dsv4.kernels.fast import _norm_triton

        return _norm_triton.norm_rope(x, positions, inv_freq, norm=False, inverse=inverse)
    return _rope_twin(x, positions, inv_freq, inverse)


def head_norm_rope(q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head unweighted RMSNorm then RoPE: q [T, H, d] bf16 -> [T, H, d] bf16. The norm rounds where the
    official code does (it runs in bf16 op by op: squares, their mean, + eps, rsqrt, the product; the sums in
    fp32), because a bf16-ulp difference in q is amplified by the attention softmax."""
    if q.is_cuda:
        from dsv4.kernels.fast import _norm_triton

        return _norm_triton.norm_rope(q, positions, inv_freq, norm=True, eps=eps)
    return _rope_twin(_head_norm_twin(q, eps), positions, inv_freq, False)


def _head_norm_twin(q: torch.Tensor, eps: float) -> torch.Tensor:
    bf = torch.bfloat16
    sq = q.bfloat16().square().float()                                           # bf16 squares
    mean = sq.mean(-1, keepdim=True).to(bf).float()
    inv = torch.rsqrt((mean + eps).to(bf).float()).to(bf).float()
    return (q.float() * inv).to(bf)


def kv_entry(kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
             inv_freq: torch.Tensor, nope_dim: int) -> torch.Tensor:
    """The attention's KV entry as its FP8 storage gives it back: RMSNorm (`kv_norm`) -> bf16 -> RoPE -> bf16 ->
    FP8 simulation of the first nope_dim dims (64-blocks, UE8M0, e4m3; rope dims untouched).

    kv: [T, d] bf16 (the wkv output); norm_weight: [d] bf16; positions: [T] int64; inv_freq: [(d - nope_dim)/2]
    fp32. Returns [T, d] bf16. GPU: one launch, one program per token.
    """
    assert kv.shape[-1] - nope_dim == 2 * inv_freq.shape[0], \
        f"nope_dim {nope_dim} + 2 * {inv_freq.shape[0]} rope pairs != d {kv.shape[-1]}"
    if kv.is_cuda:
        from dsv4.kernels.fast import _norm_triton

        return _norm_triton.norm_rope(kv, positions, inv_freq, norm=True, weight=norm_weight, eps=eps, quant=True)
    entry = _rope_twin(_rms_norm_twin(kv, norm_weight, eps), positions, inv_freq, False)
    return quant.fake_quant_kv(entry, kv.shape[-1] - nope_dim)


def window_append(ring: torch.Tensor, codec: MainFp8Codec, values: torch.Tensor, layout: BatchLayout) -> None:
    """Store each token among its chunk's last W tokens at ring[slot, position % W], encoded as `codec`.

    ring: [num_slots, W, codec.width] uint8 (584 bytes for V4: 448 e4m3 | 64 bf16 rope | 7 UE8M0 | 1 zero);
    values: [T, nope + rope] bf16 or fp32 (the kv entries, as `kv_entry` gives them).
    Byte-exact with `cache_ops.window_append`. A slot outside [0, num_slots) is not written (no validation, no
    host sync). GPU: one launch, one program per token.
    """
    assert isinstance(codec, MainFp8Codec) and ring.shape[-1] == codec.width, \
        f"ring {tuple(ring.shape)} is not made of {codec} entries"
    if ring.is_cuda:
        from dsv4.kernels.fast import _norm_triton

        _norm_triton.window_append(ring, codec.nope_dim, codec.rope_dim, values, layout.positions, layout.token_seq,
                                   layout.seq_slot, layout.seq_start, layout.seq_len)
        return
    _window_append_twin(ring, codec, values, layout)


__all__ = ["head_norm_rope", "kv_entry", "rms_norm", "rope", "window_append"]

"""Fast mHC: the hyper-connection mixes, Sinkhorn split, collapse and expand (spec §2.2-§2.4).

Same function as `dsv4.model.mhc` (the reference), in fp32 without float64:

- mixes = rsqrt(mean(x_flat^2) + norm_eps) * (fn . x_flat), x_flat = concat of the hc streams [hc*D] (the
  official order: linear first, then the norm factor). fp32 accumulation of exact products: x is bf16, and the
  GPU kernel splits fn into three bf16 terms (hi + mid + lo, exact to ~2^-27) for bf16 tensor-core dots, so the
  only error is fp32 accumulation (measured against the float64 reference: see tests/cpu/test_fast_mhc.py).
- pre = sigmoid(mix * scale[0] + base) + hc_eps; post = 2 sigmoid(...); comb = softmax rows + hc_eps, then
  column normalisation and (sinkhorn_iters - 1) x (row, column) normalisations, all fp32.
- h = bf16(sum_j pre_j X_j) and X'_k = bf16(post_k f + sum_j comb[j, k] X_j), fp32 math, one bf16 rounding.

CUDA tensors run the Triton kernels of `_mhc_triton` (hc_pre: 2 launches, hc_post: 1, hc_post_pre: 2, hc_head:
2); CPU tensors the PyTorch twins below (same math in fp32 torch ops). Neither is batch-invariant (fp32 GEMM
blocking). `hc_post_pre` fuses one site's post with the next site's pre: a block's mHC is then 4 launches
(hc_post_pre twice, chaining FFN -> next attention) instead of 6.
"""

from __future__ import annotations

import torch


# ---------------------------------------------------------------------------------------------- twins
def _mixes_twin(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """x [T, hc, D] -> fp32 [T, rows(fn)] = rsqrt(mean(x_flat^2) + eps) * (x_flat . fn^T)."""
    x_flat = x.flatten(1).float()                                                     # x_flat: [T, hc*D]
    rho = torch.rsqrt(x_flat.square().sum(-1, keepdim=True) / x_flat.shape[1] + norm_eps)
    return (x_flat @ fn.float().t()) * rho


def _sinkhorn_twin(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc: int, iters: int, eps: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pre = torch.sigmoid(mixes[:, :hc] * scale[0] + base[:hc]) + eps
    post = 2 * torch.sigmoid(mixes[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = torch.softmax((mixes[:, 2 * hc:] * scale[2] + base[2 * hc:]).view(-1, hc, hc), dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def _collapse_twin(pre: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (pre.unsqueeze(-1) * x.float()).sum(dim=1).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- public API
def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_mult: int,
           sinkhorn_iters: int, hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collapse the residual streams for a sub-layer and compute its write-back coefficients.

    x: [T, hc, D] bf16 residual streams; fn: [(2+hc)*hc, hc*D] fp32 (`hc_attn_fn` / `hc_ffn_fn`); scale: [3]
    fp32; base: [(2+hc)*hc] fp32. Returns h [T, D] bf16 (the sub-layer input before its RMSNorm), post [T, hc]
    fp32 and comb [T, hc, hc] fp32 (doubly stochastic; row j = input stream, column k = output stream).
    GPU: the mixes GEMM reads fn once per 64-token tile with K split across ~128 programs, then one program per
    (token, 1024 columns) finishes (Sinkhorn in registers, collapse). hc must be a power of two on the GPU.
    """
    if x.is_cuda:
        from dsv4.kernels.fast import _mhc_triton

        return _mhc_triton.hc_pre(x, fn, scale, base, hc_mult, sinkhorn_iters, hc_eps, norm_eps)
    pre, post, comb = _sinkhorn_twin(_mixes_twin(x, fn, norm_eps), scale.float(), base.float(), hc_mult,
                                     sinkhorn_iters, hc_eps)
    return _collapse_twin(pre, x), post, comb


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
    """Write a sub-layer's output back into the streams: X'_k = bf16(post_k * f + sum_j comb[j, k] * X_j).

    f: [T, D] bf16 sub-layer output; residual: [T, hc, D] bf16 (the streams hc_pre read); post: [T, hc] fp32;
    comb: [T, hc, hc] fp32 (note the transpose: output stream k mixes input streams j with weight comb[j, k]).
    Returns [T, hc, D] bf16; fp32 math, one rounding. GPU: one program per (token, 512 columns).
    """
    if f.is_cuda:
        from dsv4.kernels.fast import _mhc_triton

        return _mhc_triton.hc_post(f, residual, post, comb)
    mixed = torch.einsum("tjk,tjd->tkd", comb.float(), residual.float())                 # [T, hc(k), D]
    return (post.float().unsqueeze(-1) * f.float().unsqueeze(1) + mixed).to(torch.bfloat16)


def hc_post_pre(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, fn: torch.Tensor,
                scale: torch.Tensor, base: torch.Tensor, hc_mult: int, sinkhorn_iters: int, hc_eps: float,
                norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hc_post of one site followed by hc_pre of the next (attention -> FFN inside a block, or FFN -> the next
    block's attention), fused: returns (the new streams [T, hc, D] bf16, h, post, comb of the next site).

    Same results as `hc_post` then `hc_pre` (the next site's mixes are computed from the stored bf16 streams).
    GPU: two launches instead of three, and the new streams are not re-read for the mixes GEMM: the post kernel
    computes each D block's partial mixes from the tile it just wrote.
    """
    if f.is_cuda:
        from dsv4.kernels.fast import _mhc_triton

        return _mhc_triton.hc_post_pre(f, residual, post, comb, fn, scale, base, hc_mult, sinkhorn_iters, hc_eps,
                                       norm_eps)
    streams = hc_post(f, residual, post, comb)
    return (streams,) + hc_pre(streams, fn, scale, base, hc_mult, sinkhorn_iters, hc_eps, norm_eps)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, hc_eps: float,
            norm_eps: float) -> torch.Tensor:
    """The final hc -> 1 collapse before the output norm (spec §2.4): sigmoid weights + eps, no Sinkhorn.

    x: [T, hc, D] bf16; fn: [hc, hc*D] fp32 (`hc_head_fn`); scale: [1] fp32; base: [hc] fp32.
    Returns [T, D] bf16 = bf16(sum_j (sigmoid(mix_j * scale + base_j) + eps) X_j), fp32 math.
    """
    if x.is_cuda:
        from dsv4.kernels.fast import _mhc_triton

        return _mhc_triton.hc_head(x, fn, scale, base, hc_eps, norm_eps)
    pre = torch.sigmoid(_mixes_twin(x, fn, norm_eps) * scale.float() + base.float()) + hc_eps
    return _collapse_twin(pre, x)


__all__ = ["hc_head", "hc_post", "hc_post_pre", "hc_pre"]

"""Manifold-constrained hyper-connections (mHC, spec §2.2-§2.4).

The residual is `hc_mult` parallel streams X [T, hc, D]. Each sub-layer collapses them with `pre` weights,
runs, then writes back `X'_k = post_k * f + sum_j comb[j, k] * X_j` (comb is doubly stochastic after Sinkhorn;
note the transpose: output stream k mixes input streams j with weight comb[j][k]).

The parameters (`hc_attn_fn`, `hc_attn_base`, `hc_attn_scale`, ... and the head's `hc_head_*`) belong to the
owning module under their checkpoint names; these functions take them explicitly. They are the reference math
(float64 accumulation); the `fast` numerics have their own kernels (`dsv4.kernels.fast.mhc`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dsv4.kernels.ref_math import matmul, rms_norm, sigmoid, softmax

Rounding = Callable[[torch.Tensor], torch.Tensor]   # fp32 -> the activation dtype


@dataclass(frozen=True, slots=True)
class HcParams:
    hc_mult: int
    sinkhorn_iters: int
    hc_eps: float
    norm_eps: float


def _mixes(x: torch.Tensor, fn: torch.Tensor, p: HcParams) -> torch.Tensor:
    """x [T, hc, D] -> fn · rmsnorm(concat streams), fp32 [T, rows(fn)]."""
    return matmul(rms_norm(x.flatten(1), None, p.norm_eps), fn)


def _weighted_streams(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_j weights[:, j] * x[:, j] in fp32 (float64 accumulation)."""
    return (weights.double().unsqueeze(-1) * x.double()).sum(dim=1).float()


def sinkhorn_split(mixes: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, p: HcParams
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mixes [T, (2+hc)*hc] -> pre [T, hc], post [T, hc], comb [T, hc, hc] (official `hc_split_sinkhorn`)."""
    hc, eps = p.hc_mult, p.hc_eps
    pre = sigmoid(mixes[:, :hc] * scale[0] + base[:hc]) + eps
    post = 2 * sigmoid(mixes[:, hc:2 * hc] * scale[1] + base[hc:2 * hc])
    comb = (mixes[:, 2 * hc:] * scale[2] + base[2 * hc:]).view(-1, hc, hc)
    comb = softmax(comb, dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(p.sinkhorn_iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return pre, post, comb


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, p: HcParams,
           act: Rounding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, hc, D] -> (collapsed sub-layer input [T, D], post [T, hc], comb [T, hc, hc])."""
    pre, post, comb = sinkhorn_split(_mixes(x, fn, p), scale, base, p)
    return act(_weighted_streams(pre, x)), post, comb


def hc_post(f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor, act: Rounding
            ) -> torch.Tensor:
    """f [T, D] sub-layer output, residual [T, hc, D] -> new streams [T, hc, D] (fp32 math, one rounding)."""
    mixed = (comb.double().unsqueeze(-1) * residual.double().unsqueeze(-2)).sum(dim=1)         # [T, hc, D]
    y = post.double().unsqueeze(-1) * f.double().unsqueeze(-2) + mixed
    return act(y.float())


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, p: HcParams,
            act: Rounding) -> torch.Tensor:
    """Final hc -> 1 collapse before the output norm: sigmoid weights only, no Sinkhorn (spec §2.4)."""
    pre = sigmoid(_mixes(x, fn, p) * scale + base) + p.hc_eps
    return act(_weighted_streams(pre, x))

"""Batch-invariant math for the PyTorch reference path (the CPU path and the test oracle of every kernel).

Every reduction (matmul, softmax sum, norm mean) accumulates in float64, and every transcendental function
(exp, rsqrt, sigmoid, softplus, silu, cos, sin) is evaluated in float64, rounding to fp32 where the reference
has an fp32 result. That makes each token's result independent of how tokens are batched: CPU fp32 GEMMs block
by batch size, and CPU elementwise kernels take vectorized or scalar paths (with different last-ulp results)
depending on tensor size. Batch invariance is what lets the batched engine reproduce single-sequence results
token for token.
"""

from __future__ import annotations

import torch


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T -> fp32 [..., N], accumulated in float64."""
    return torch.matmul(x.double(), w.double().transpose(-1, -2)).float()


def mean_sq(x: torch.Tensor) -> torch.Tensor:
    """mean(x^2) over the last dim, fp32 result, float64 accumulation; keepdim."""
    return x.double().square().mean(-1, keepdim=True).float()


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    return torch.softmax(x.double(), dim=dim).float()


def exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.double()).float()


def rsqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(x.double()).float()


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x.double()).float()


def silu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x.double()).float()


def sqrt_softplus(x: torch.Tensor) -> torch.Tensor:
    """sqrt(softplus(x)) with torch's softplus (beta 1, threshold 20): the router's score function."""
    return torch.nn.functional.softplus(x.double()).sqrt().float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """fp32 RMSNorm over the last dim: weight * x * rsqrt(mean(x^2) + eps) (weight None = unweighted)."""
    x = x.float()
    y = x * rsqrt(mean_sq(x) + eps)
    return y if weight is None else weight.float() * y


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False
               ) -> torch.Tensor:
    """Rotate the last 2*len(inv_freq) dims of x by angle position*θ_i on interleaved pairs (2i, 2i+1).

    x: [T, ..., d]; positions: [T]. fp32 math (cos/sin of the fp32 angle, as the official polar table), result
    in x's dtype. inverse=True rotates by the conjugate (-angle), used on the attention output.
    """
    rope_dim = 2 * inv_freq.shape[0]
    angle = (positions.to(torch.float32)[:, None] * inv_freq.to(x.device)[None, :]).double()   # fp32 angle
    shape = (angle.shape[0],) + (1,) * (x.dim() - 2) + (angle.shape[1],)
    cos, sin = angle.cos().float().view(shape), angle.sin().float().view(shape)
    if inverse:
        sin = -sin
    pairs = x[..., -rope_dim:].float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat([x[..., :-rope_dim], rotated.to(x.dtype)], dim=-1)

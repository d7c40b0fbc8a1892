"""Inputs shared by the CPU and GPU tests of the fast kernels, built on the CPU from a seed (a GPU test moves
them to the device, so the reference on the CPU copy sees the same values)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.kv_format import MainFp8Codec


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scaled(shape: tuple[int, ...], g: torch.Generator, spread: int = 8) -> torch.Tensor:
    """bf16 normals times a random power of two per row (exercises the per-block FP8 scales)."""
    x = torch.randn(*shape, generator=g)
    return (x * torch.exp2(torch.randint(-spread, spread + 1, (*shape[:-1], 1), generator=g).float())).bfloat16()


def norm_weight(dim: int, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(dim, generator=g) * 0.1 + 1.0).bfloat16()


def positions(num_tokens: int, g: torch.Generator) -> torch.Tensor:
    """Small and large positions (up to 1M: angles ~1e6 rad need full range reduction)."""
    return torch.cat([torch.arange(min(num_tokens, 3)),
                      torch.randint(0, 1 << 20, (max(num_tokens - 3, 0),), generator=g)])


def mhc_site(num_tokens: int, dim: int, seed: int, hc: int = 4, rows: int | None = None, num_scales: int = 3):
    """Streams and one mHC site's parameters at the synthetic checkpoint's scales (O(0.5) mixes)."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or (2 + hc) * hc
    x = torch.randn(num_tokens, hc, dim, generator=g).bfloat16()
    fn = torch.randn(rows, hc * dim, generator=g) * 0.5 / math.sqrt(hc * dim)
    scale = torch.randn(num_scales, generator=g) * 0.1 + 1.0
    base = torch.randn(rows, generator=g) * 0.5
    return x, fn, scale, base


@dataclass
class Scene:
    """One layer's inputs for one step: queries, this step's kv, the ring, the pool and the layout."""

    q: torch.Tensor
    kv: torch.Tensor
    ring: torch.Tensor
    pool: torch.Tensor | None
    codec: MainFp8Codec
    layout: BatchLayout
    ratio: int
    entries: torch.Tensor | None
    sink: torch.Tensor
    inv_freq: torch.Tensor | None

    def args(self) -> tuple:
        return (self.q, self.kv, self.ring, self.pool, self.codec, self.layout, self.ratio, self.entries,
                self.sink, self.inv_freq)

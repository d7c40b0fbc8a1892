"""Inputs and checks shared by the CPU and GPU tests of the fast kernels. Inputs are built on the CPU from a seed
(a GPU test moves them to the device, so the reference on the CPU copy sees the same values)."""

from __future__ import annotations

import math
from collections.abc import Callable
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


INDEXER_TIE_TOL = 2.0 ** -6   # selections may differ only between scores this close (fraction of the row max)


def assert_near_tie_swaps(got: torch.Tensor, ref: torch.Tensor, row_scores: Callable[[int], torch.Tensor]) -> int:
    """Indexer selections [T, k] (-1 padded): the same count per row, and every entry chosen by one side only
    within INDEXER_TIE_TOL of the row's largest score from the reference's k-th score (`row_scores(t)`: the
    reference scores of row t's entries). Returns how many entries were swapped."""
    swaps = 0
    for t in range(got.shape[0]):
        mine, theirs = set(got[t][got[t] >= 0].tolist()), set(ref[t][ref[t] >= 0].tolist())
        assert len(mine) == len(theirs) == int((got[t] >= 0).sum()), f"row {t}: {len(mine)} vs {len(theirs)}"
        differ = sorted(mine ^ theirs)
        if differ:
            row = row_scores(t)
            kth = row[sorted(theirs)].min()
            gap = float((row[differ] - kth).abs().max() / row.abs().max())
            assert gap <= INDEXER_TIE_TOL, f"row {t}: entries {differ[:8]} swapped at {gap:.4f} of the row max"
        swaps += len(differ)
    return swaps

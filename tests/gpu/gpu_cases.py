"""Inputs shared by the GPU kernel tests and `benchmarks/kernels.py`: batch layouts, paged pools, MXFP4 indexer
queries and keys, compressor projections. Everything is built on the CPU from a seed and moved to the device,
so the reference (run on the CPU copy) and the kernel (on the GPU copy) see identical bytes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsv4.kernels import quant
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.kv_format import IndexFp4Codec, MainFp8Codec
from dsv4.model.layers import rope_inv_freq

FLUSH_CASES = {   # compressor flush cases, name: (ratio, d, rotate, codec)
    "csa-main-512": (4, 512, False, MainFp8Codec(448, 64)),
    "csa-index-128": (4, 128, True, IndexFp4Codec(128)),
    "hca-main-512": (128, 512, False, MainFp8Codec(448, 64)),
    "csa-main-tiny-128": (4, 128, False, MainFp8Codec(64, 64)),
    "hca-main-tiny-128": (128, 128, False, MainFp8Codec(64, 64)),
}


def yarn_freq() -> torch.Tensor:
    """V4's YaRN RoPE frequencies for the 64 rope dims."""
    return rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0))


def make_layout(chunks: Sequence[tuple[int, int, int]], block_size: int, max_blocks: int, num_blocks: int,
                gen: torch.Generator, device: str = "cpu") -> BatchLayout:
    """chunks: (slot, start, length) per sequence; each sequence gets max_blocks distinct random blocks."""
    if len(chunks) * max_blocks > num_blocks:
        raise ValueError("not enough blocks")
    table = torch.randperm(num_blocks, generator=gen)[:len(chunks) * max_blocks].view(len(chunks), max_blocks)
    return BatchLayout.from_chunks([(slot, start, length, table[s].tolist())
                                    for s, (slot, start, length) in enumerate(chunks)], block_size, device)


def layout_to(layout: BatchLayout, device: str) -> BatchLayout:
    return layout.to(device)


def scaled_normal(shape: Sequence[int], gen: torch.Generator, spread: int = 6) -> torch.Tensor:
    """Normal values times a random power of two per row (exercises the per-block scales)."""
    x = torch.randn(*shape, generator=gen)
    exps = torch.randint(-spread, spread + 1, (*shape[:-1], 1), generator=gen).float()
    return x * torch.exp2(exps)


def mxfp4_queries(num_tokens: int, heads: int, gen: torch.Generator, dim: int = 128) -> torch.Tensor:
    """Indexer queries as the model makes them: Hadamard-rotated, MXFP4 fake-quantized, bf16 [T, H, dim]."""
    q = torch.randn(num_tokens, heads, dim, generator=gen).bfloat16()
    return quant.fake_quant_fp4(quant.hadamard_rotate(q))


def mxfp4_key_pool(num_blocks: int, entries_per_block: int, gen: torch.Generator, dim: int = 128,
                   duplicate_every: int = 0) -> torch.Tensor:
    """A pool of random MXFP4 indexer keys [num_blocks, epb, 68] uint8; with duplicate_every > 0 some entries
    repeat an earlier one (tied scores, to pin the tie rule)."""
    codec = IndexFp4Codec(dim)
    keys = quant.hadamard_rotate(torch.randn(num_blocks * entries_per_block, dim, generator=gen).bfloat16())
    stored = codec.encode(keys)
    if duplicate_every:
        src = torch.arange(0, stored.shape[0] - 1, duplicate_every)
        stored[src + 1] = stored[src]
    return stored.view(num_blocks, entries_per_block, codec.width)


# indexer cases of both indexer GPU tests: name: (chunks (slot, start, length), heads, topk, num_blocks, max_blocks)
COMMON_INDEXER_CASES = {
    "decode-mixed-flash": ([(0, 4000, 1), (1, 3, 1), (2, 20, 1), (3, 9000, 1), (4, 2047, 1)], 64, 512, 200, 40),
    "prefill-chunk": ([(0, 100, 300), (1, 0, 40)], 64, 512, 8, 4),
    "tiny-heads": ([(0, 300, 5), (1, 0, 64)], 16, 8, 8, 2),
    "heads-32-topk-1024": ([(0, 16000, 2)], 32, 1024, 64, 63),
    "b1-32k-top512": ([(0, (1 << 17) - 1, 1)], 64, 512, 520, 512),
    "b1-fewer-than-k": ([(0, 1000, 1)], 64, 512, 8, 8),            # 250 visible < 512
    "b1-exactly-k": ([(0, 2047, 1)], 64, 512, 40, 33),             # 512 visible
    "b1-one-entry": ([(0, 3, 1)], 16, 8, 2, 1),
    "b3-mixed": ([(0, 0, 1), (1, 9000, 1), (2, 30000, 1)], 64, 512, 400, 120),   # 0, 2250, 7500 visible
    "b64-prefill-chunk": ([(0, 16000, 64)], 64, 512, 64, 63),
}

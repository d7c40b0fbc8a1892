"""Benchmark cases of the fast compressor flush (`dsv4.kernels.fast.compressor`) at V4-Flash shapes, each against the
reference on the same GPU (`cache_ops.compress_flush`): CSA main (d 512, 584-byte FP8 entries), CSA indexer (d 128,
Hadamard + 68-byte MXFP4 keys), HCA main (d 512), at decode batch 128 and for a 4096-token prefill chunk.

    python benchmarks/fast_cases_compressor.py [--out benchmarks/results] [--only decode]

Target (H200): <= 4 us per compressor flush as graph nodes at decode batch 128 (two launches).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from harness import DEV, Case, decode_flush_steps, gen, run_cases

from dsv4.kernels import cache_ops
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.fast import compressor
from dsv4.kernels.kv_format import IndexFp4Codec, MainFp8Codec
from dsv4.model.layers import rope_inv_freq

BLOCK = 256
MAIN, INDEX = MainFp8Codec(448, 64), IndexFp4Codec(128)


def layout(chunks: list[tuple[int, int, int]], max_blocks: int) -> BatchLayout:
    """chunks: (slot, start, length); sequence s owns blocks s*max_blocks .. (s+1)*max_blocks-1."""
    return BatchLayout.from_chunks(
        [(slot, start, n, range(s * max_blocks, (s + 1) * max_blocks)) for s, (slot, start, n) in enumerate(chunks)],
        BLOCK, DEV)


def stateful(kernel_fn: Callable, ref_fn: Callable, tensors: list[torch.Tensor]) -> tuple[Callable, Callable, Callable]:
    """Kernel and reference write into caches: they run on separate copies, compared after one call each."""
    ref_tensors = [t.clone() for t in tensors]
    snapshot = [t.clone() for t in tensors]

    def check() -> str:
        for t, s in zip(tensors, snapshot, strict=True):
            t.copy_(s)
        for t, s in zip(ref_tensors, snapshot, strict=True):
            t.copy_(s)
        kernel_fn(tensors)
        ref_fn(ref_tensors)
        states = all(torch.equal(x, y) for x, y in zip(tensors[:2], ref_tensors[:2], strict=True))
        equal = (tensors[2] == ref_tensors[2]).float().mean().item()
        return f"states {'exact' if states else 'DIFFER'}, {100 * equal:.3f}% pool bytes equal"

    return (lambda: kernel_fn(tensors)), (lambda: ref_fn([t.clone() for t in snapshot])), check


def flush_case(name: str, ratio: int, d: int, rotate: bool, codec, chunks, state_rows: int) -> Case:
    """state_rows: state rows (of coff * d fp32, in each of kv and score) read or written per sequence."""
    g = gen(12)
    coff = 2 if ratio == 4 else 1
    max_blocks = max(-(-(c[1] + c[2]) // BLOCK) for c in chunks)
    lay = layout(chunks, max_blocks)
    t, slots = lay.num_tokens, len(chunks)
    a = torch.randn(t, coff * d, generator=g, device=DEV)
    z = torch.randn(t, coff * d, generator=g, device=DEV)
    state = torch.randn(slots, coff * ratio, coff * d, generator=g, device=DEV)
    score = torch.randn(slots, coff * ratio, coff * d, generator=g, device=DEV)
    pool = torch.zeros(slots * max_blocks, BLOCK // ratio, codec.width, dtype=torch.uint8, device=DEV)
    nw = (1 + 0.3 * torch.randn(d, generator=g, device=DEV)).bfloat16()
    freq = rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0)).to(DEV)
    kfn = lambda ts: compressor.compress_flush(a, z, ts[0], ts[1], lay, ratio, nw, 1e-6, freq, rotate,  # noqa: E731
                                               ts[2], codec)
    rfn = lambda ts: cache_ops.compress_flush(a, z, ts[0], ts[1], lay, ratio, nw, 1e-6, freq, rotate,  # noqa: E731
                                              ts[2], codec, torch.bfloat16)
    run, ref, check = stateful(kfn, rfn, [state, score, pool])
    windows = sum((c[1] % ratio + c[2]) // ratio for c in chunks)
    moved = 4 * coff * d * 2 * (t + slots * state_rows) + windows * codec.width
    decode = all(c[2] == 1 for c in chunks)
    return Case(f"fast compress_flush {name}", f"{'decode' if decode else 'prefill'} B={len(chunks)}, T={t}, "
                f"{windows} windows", run, ref, check, moved, "<= 4 us graph (2 nodes)" if decode else "-", None,
                4.0 if decode else None, ref_reps=3)


def cases() -> list[Case]:
    steps = decode_flush_steps(128)
    csa_all, csa_quarter, hca_one, hca_all = steps["csa_all"], steps["csa_quarter"], steps["hca_one"], steps["hca_all"]
    return [
        flush_case("CSA main (d=512, 584 B)", 4, 512, False, MAIN, csa_all, 12),
        flush_case("CSA main (d=512, 584 B), 1 in 4 completing", 4, 512, False, MAIN, csa_quarter, 3),
        flush_case("CSA indexer (d=128, Hadamard + MXFP4 68 B)", 4, 128, True, INDEX, csa_all, 12),
        flush_case("CSA indexer (d=128), 1 in 4 completing", 4, 128, True, INDEX, csa_quarter, 3),
        flush_case("HCA main (d=512)", 128, 512, False, MAIN, hca_one, 2),
        flush_case("HCA main (d=512), all completing", 128, 512, False, MAIN, hca_all, 128),
        flush_case("CSA main (d=512, 584 B)", 4, 512, False, MAIN, [(0, 0, 4096)], 4),
        flush_case("CSA indexer (d=128)", 4, 128, True, INDEX, [(0, 0, 4096)], 4),
        flush_case("HCA main (d=512)", 128, 512, False, MAIN, [(0, 0, 4096)], 0),
    ]


def main(argv: list[str] | None = None) -> int:
    return run_cases("fast-compressor", [cases], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())

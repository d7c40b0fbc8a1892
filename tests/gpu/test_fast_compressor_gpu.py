"""The fast compressor flush's Triton kernels on the GPU (`dsv4.kernels.fast.compressor`), at V4-Flash shapes,
against the reference (`cache_ops.compress_flush`, run on a CPU copy) and the CPU twin.

Tolerances (see tests/cpu/test_fast_compressor.py): states exact; pool bytes >= 99% equal to the reference's,
decoded entries within 1% relative (Frobenius); chunked prefill + decode equals one-shot prefill bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from gpu_cases import FLUSH_CASES, layout_to, make_layout, scaled_normal, yarn_freq

from dsv4.kernels import cache_ops
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.fast import compressor

pytestmark = pytest.mark.gpu
DEV = "cuda"
# Steps of (slot, length) per sequence; starts follow from the previous steps. Decode tokens, prefill chunks of
# every residue, a long chunk, sequences joining late.
STEPS = [
    [(0, 1), (1, 3), (2, 5), (3, 300)],
    [(0, 1), (1, 1), (2, 2), (3, 1), (4, 7)],
    [(0, 6), (1, 1), (2, 1), (3, 1), (4, 1), (5, 130)],
    [(0, 1), (1, 129), (2, 1), (3, 4), (4, 1), (5, 1)],
    [(0, 1), (1, 1), (2, 256), (3, 1), (4, 1), (5, 1)],
]


class Store:
    def __init__(self, ratio, d, codec, num_slots=6, num_blocks=32, device="cpu"):
        coff = 2 if ratio == 4 else 1
        self.kv = torch.zeros(num_slots, coff * ratio, coff * d, device=device)
        self.score = torch.full_like(self.kv, float("-inf"))
        self.pool = torch.zeros(num_blocks, 256 // ratio, codec.width, dtype=torch.uint8, device=device)


def assert_pool_close(got, ref, codec, min_equal=0.99):
    equal = (got == ref).float().mean().item()
    dg, dr = codec.decode(got).float(), codec.decode(ref).float()
    rel = ((dg - dr).norm() / dr.norm().clamp(min=1e-30)).item()
    print(f"pool: {equal:.6f} of bytes equal, decoded relative difference {rel:.2e}")
    assert equal >= min_equal and rel <= 0.01


def steps(ratio, d, seed, schedule=STEPS, num_slots=6, max_blocks=4, num_blocks=32):
    """Yields (layout, a, z) per step; each slot keeps one random block table."""
    coff = 2 if ratio == 4 else 1
    g = torch.Generator().manual_seed(seed)
    ape = torch.randn(ratio, coff * d, generator=g)
    table = torch.randperm(num_blocks, generator=g)[:num_slots * max_blocks].view(num_slots, max_blocks)
    fed = [0] * num_slots
    for step in schedule:
        layout = BatchLayout.from_chunks([(slot, fed[slot], n, table[slot].tolist()) for slot, n in step], 256)
        a = scaled_normal((layout.num_tokens, coff * d), g, spread=3)
        z = 2 * torch.randn(layout.num_tokens, coff * d, generator=g) + ape[layout.positions % ratio]
        for slot, n in step:
            fed[slot] += n
        yield layout, a, z


def norm_weight(d):
    return (1 + 0.3 * torch.randn(d, generator=torch.Generator().manual_seed(5))).bfloat16()


@pytest.mark.parametrize("case", list(FLUSH_CASES))
def test_flush_matches_reference_and_twin(case):
    ratio, d, rotate, codec = FLUSH_CASES[case]
    ref, twin, gpu = Store(ratio, d, codec), Store(ratio, d, codec), Store(ratio, d, codec, device=DEV)
    nw, freq = norm_weight(d), yarn_freq()
    for layout, a, z in steps(ratio, d, seed=5):
        cache_ops.compress_flush(a, z, ref.kv, ref.score, layout, ratio, nw, 1e-6, freq, rotate, ref.pool, codec,
                                 torch.bfloat16)
        compressor.compress_flush(a, z, twin.kv, twin.score, layout, ratio, nw, 1e-6, freq, rotate, twin.pool, codec)
        compressor.compress_flush(a.to(DEV), z.to(DEV), gpu.kv, gpu.score, layout_to(layout, DEV), ratio,
                                  nw.to(DEV), 1e-6, freq.to(DEV), rotate, gpu.pool, codec)
        assert torch.equal(gpu.kv.cpu(), ref.kv) and torch.equal(gpu.score.cpu(), ref.score), "state differs"
    assert ref.pool.any()
    assert_pool_close(gpu.pool.cpu(), ref.pool, codec)
    assert_pool_close(gpu.pool.cpu(), twin.pool, codec)


@pytest.mark.parametrize("case", ["csa-main-512", "csa-index-128", "hca-main-512"])
def test_v4_flash_decode_batch_128(case):
    """Decode at batch 128 with staggered positions (some sequences complete a window, most do not)."""
    ratio, d, rotate, codec = FLUSH_CASES[case]
    coff = 2 if ratio == 4 else 1
    g = torch.Generator().manual_seed(6)
    chunks = [(s, 1000 + 7 * s, 1) for s in range(128)]
    layout = make_layout(chunks, 256, 8, 128 * 8, g)
    state = scaled_normal((128, coff * ratio, coff * d), g)
    score = torch.randn(128, coff * ratio, coff * d, generator=g)
    pool = torch.zeros(128 * 8, 256 // ratio, codec.width, dtype=torch.uint8)
    a, z = scaled_normal((128, coff * d), g), torch.randn(128, coff * d, generator=g)
    nw, freq = norm_weight(d), yarn_freq()
    ref = [state.clone(), score.clone(), pool.clone()]
    gpu = [t.to(DEV) for t in (state, score, pool)]
    cache_ops.compress_flush(a, z, *ref[:2], layout, ratio, nw, 1e-6, freq, rotate, ref[2], codec, torch.bfloat16)
    compressor.compress_flush(a.to(DEV), z.to(DEV), *gpu[:2], layout_to(layout, DEV), ratio, nw.to(DEV), 1e-6,
                              freq.to(DEV), rotate, gpu[2], codec)
    assert torch.equal(gpu[0].cpu(), ref[0]) and torch.equal(gpu[1].cpu(), ref[1])
    assert ref[2].any()
    assert_pool_close(gpu[2].cpu(), ref[2], codec)


@pytest.mark.parametrize("case", ["csa-main-512", "csa-index-128", "hca-main-512"])
def test_chunked_prefill_then_decode_equals_one_shot(case):
    ratio, d, rotate, codec = FLUSH_CASES[case]
    coff = 2 if ratio == 4 else 1
    g = torch.Generator().manual_seed(7)
    n = 700
    a_all, z_all = scaled_normal((n, coff * d), g).to(DEV), torch.randn(n, coff * d, generator=g).to(DEV)
    nw, freq, table = norm_weight(d).to(DEV), yarn_freq().to(DEV), [3, 1, 0]
    stores = []
    for pieces in ([n], [5, 1, 2, 250, 1, 1, 129, 3, 300, 1, 1, 1, 5]):
        store, start = Store(ratio, d, codec, num_slots=1, num_blocks=4, device=DEV), 0
        for length in pieces:
            layout = layout_to(BatchLayout.from_chunks([(0, start, length, table)], 256), DEV)
            compressor.compress_flush(a_all[start:start + length], z_all[start:start + length], store.kv,
                                      store.score, layout, ratio, nw, 1e-6, freq, rotate, store.pool, codec)
            start += length
        stores.append(store)
    one_shot, chunked = stores
    assert one_shot.pool.any() and torch.equal(one_shot.pool, chunked.pool)
    held = n % ratio                                                  # live state slots must agree
    live = ([*range(4)] if ratio == 4 else []) + [(ratio if ratio == 4 else 0) + i for i in range(held)]
    assert torch.equal(one_shot.kv[0, live], chunked.kv[0, live])
    assert torch.equal(one_shot.score[0, live], chunked.score[0, live])


def test_missing_blocks_are_skipped_and_the_state_still_advances():
    ratio, d, rotate, codec = FLUSH_CASES["csa-main-512"]
    g = torch.Generator().manual_seed(8)
    layout = BatchLayout.from_chunks([(0, 0, 264, [-1, 2]), (1, 0, 8, [77])], 256)   # -1, and out of range
    a, z = torch.randn(272, 1024, generator=g), torch.randn(272, 1024, generator=g)
    store = Store(ratio, d, codec, num_slots=2, num_blocks=4, device=DEV)
    compressor.compress_flush(a.to(DEV), z.to(DEV), store.kv, store.score, layout_to(layout, DEV), ratio,
                              torch.ones(d, device=DEV), 1e-6, yarn_freq().to(DEV), rotate, store.pool, codec)
    written = store.pool.view(4, -1).any(dim=1).cpu()
    assert written.tolist() == [False, False, True, False]           # only entries 64, 65 (block 2)
    assert store.pool[2, 2:].eq(0).all() and torch.isfinite(store.score[:, :4]).all()


def test_empty_step_is_a_no_op():
    ratio, d, rotate, codec = FLUSH_CASES["hca-main-512"]
    store = Store(ratio, d, codec, num_slots=1, num_blocks=2, device=DEV)
    empty = layout_to(BatchLayout.from_chunks([], 256), DEV)
    compressor.compress_flush(torch.zeros(0, d, device=DEV), torch.zeros(0, d, device=DEV), store.kv, store.score,
                              empty, ratio, torch.ones(d, device=DEV), 1e-6, yarn_freq().to(DEV), rotate, store.pool,
                              codec)
    assert not store.pool.any() and torch.isinf(store.score).all()


def test_cuda_graph_capture_and_replay():
    """One decode step (CSA main + indexer compressors, HCA) captured, replayed over positions that complete
    windows and not: every replay equals the same step run eagerly on copies."""
    g = torch.Generator().manual_seed(9)
    layout = layout_to(make_layout([(s, 1016 + s, 1) for s in range(8)], 256, 8, 64, g), DEV)   # 1023: HCA
    stores, inputs = [], []
    for case in ("csa-main-512", "csa-index-128", "hca-main-512"):
        ratio, d, rotate, codec = FLUSH_CASES[case]
        coff = 2 if ratio == 4 else 1
        store = Store(ratio, d, codec, num_slots=8, num_blocks=64, device=DEV)
        store.kv.copy_(torch.randn(store.kv.shape, generator=g))
        store.score.copy_(torch.randn(store.score.shape, generator=g))
        stores.append((case, store))
        inputs.append((torch.randn(8, coff * d, generator=g).to(DEV), torch.randn(8, coff * d, generator=g).to(DEV)))
    nw = {512: norm_weight(512).to(DEV), 128: norm_weight(128).to(DEV)}
    freq = yarn_freq().to(DEV)

    def step(targets):
        for (case, store), (a, z) in zip(targets, inputs, strict=True):
            ratio, d, rotate, codec = FLUSH_CASES[case]
            compressor.compress_flush(a, z, store.kv, store.score, layout, ratio, nw[d], 1e-6, freq, rotate,
                                      store.pool, codec)

    def copies():
        out = []
        for case, store in stores:
            twin = Store.__new__(Store)
            twin.kv, twin.score, twin.pool = store.kv.clone(), store.score.clone(), store.pool.clone()
            out.append((case, twin))
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(copies())                                               # warm-up: compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    saved = copies()
    with torch.cuda.graph(graph):
        step(stores)
    for (_, store), (_, s) in zip(stores, saved, strict=True):       # capture does not run the kernels; be safe
        store.kv.copy_(s.kv)
        store.score.copy_(s.score)
        store.pool.copy_(s.pool)
    for replay in range(6):
        for a, z in inputs:
            a.copy_(torch.randn(a.shape, generator=g).to(DEV))
            z.copy_(torch.randn(z.shape, generator=g).to(DEV))
        layout.positions.add_(1)                                      # the next decode step of every sequence
        layout.seq_start.add_(1)
        eager = copies()
        step(eager)
        graph.replay()
        torch.cuda.synchronize()
        for (case, store), (_, want) in zip(stores, eager, strict=True):
            assert torch.equal(store.pool, want.pool), f"{case}: pool differs at replay {replay}"
            assert torch.equal(store.kv, want.kv) and torch.equal(store.score, want.score), f"{case}: state"

"""The fast compressor flush (`dsv4.kernels.fast.compressor`): the PyTorch twin against the reference
(`cache_ops.compress_flush`), and the Triton kernels (under Triton's interpreter on CPU tensors) against the twin.

Tolerances. States: exact (they are copies of a/z rows). Pool bytes: >= 99% equal to the reference's, and the
decoded entries within 1% relative (Frobenius) of the reference's decoded entries (fp32 vs fp64 pooling can move
a value across a bf16, e4m3 or e2m1 rounding boundary; measured: 100% of bytes equal at these shapes). Triton vs
twin: the same function in a different fp32 summation order: >= 99% bytes equal, states exact. Chunked prefill
followed by decode must reproduce one-shot prefill bit for bit (every slot's source is its position's row or the
state copy of that row, and the pooling order is fixed).
"""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels import cache_ops
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.fast import compressor
from dsv4.kernels.kv_format import IndexFp4Codec, MainFp8Codec
from dsv4.model.layers import rope_inv_freq

CASES = {   # name: (ratio, d, rotate, codec)
    "csa-main-tiny": (4, 128, False, MainFp8Codec(64, 64)),
    "csa-index": (4, 128, True, IndexFp4Codec(128)),
    "hca-8-tiny": (8, 128, False, MainFp8Codec(64, 64)),
    "csa-main-v4": (4, 512, False, MainFp8Codec(448, 64)),
    "hca-128-v4": (128, 512, False, MainFp8Codec(448, 64)),
}
# Steps of (slot, length); starts follow from the earlier steps: decode tokens, chunks of every residue, late joins.
STEPS = [[(0, 1), (1, 3), (2, 5), (3, 21)], [(0, 1), (1, 1), (2, 2), (3, 1), (4, 7)],
         [(0, 6), (1, 1), (4, 9), (3, 3)], [(0, 1), (1, 130), (2, 1), (3, 1), (4, 1)]]
BLOCK_SIZE = 256


def yarn_freq() -> torch.Tensor:
    return rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0))


class Store:
    """One compressor's storage: fresh states (score -inf, as KVStorage.reset_slot) and a zeroed pool."""

    def __init__(self, ratio: int, d: int, codec, num_slots: int = 5, num_blocks: int = 12):
        coff = 2 if ratio == 4 else 1
        self.kv = torch.zeros(num_slots, coff * ratio, coff * d)
        self.score = torch.full_like(self.kv, float("-inf"))
        self.pool = torch.zeros(num_blocks, BLOCK_SIZE // ratio, codec.width, dtype=torch.uint8)

    def clone(self) -> Store:
        other = object.__new__(Store)
        other.kv, other.score, other.pool = self.kv.clone(), self.score.clone(), self.pool.clone()
        return other


def schedule(ratio: int, d: int, steps, seed: int, tables: torch.Tensor):
    """Yields (layout, a, z) per step; tables[slot] is each slot's block table."""
    coff = 2 if ratio == 4 else 1
    g = torch.Generator().manual_seed(seed)
    ape = torch.randn(ratio, coff * d, generator=g)
    fed = [0] * tables.shape[0]
    for step in steps:
        layout = BatchLayout.from_chunks([(s, fed[s], n, tables[s].tolist()) for s, n in step], BLOCK_SIZE)
        a = torch.randn(layout.num_tokens, coff * d, generator=g) * 2
        z = 2 * torch.randn(layout.num_tokens, coff * d, generator=g) + ape[layout.positions % ratio]
        for s, n in step:
            fed[s] += n
        yield layout, a, z


def block_tables(num_slots: int = 5, max_blocks: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(12, generator=g)[:num_slots * max_blocks].view(num_slots, max_blocks)


def norm_weight(d: int) -> torch.Tensor:
    return (1 + 0.3 * torch.randn(d, generator=torch.Generator().manual_seed(9))).bfloat16()


def assert_pool_close(got: torch.Tensor, ref: torch.Tensor, codec, min_equal: float = 0.99) -> float:
    equal = (got == ref).float().mean().item()
    assert equal >= min_equal, f"only {equal:.4f} of the pool bytes equal"
    dg, dr = codec.decode(got).float(), codec.decode(ref).float()
    rel = ((dg - dr).norm() / dr.norm().clamp(min=1e-30)).item()
    assert rel <= 0.01, f"decoded entries differ by {rel:.4f} relative"
    return equal


def run(flush, store: Store, case: str, steps=STEPS, seed: int = 0, tables=None) -> Store:
    ratio, d, rotate, codec = CASES[case]
    tables = block_tables() if tables is None else tables
    for layout, a, z in schedule(ratio, d, steps, seed, tables):
        flush(a, z, store.kv, store.score, layout, ratio, norm_weight(d), 1e-6, yarn_freq(), rotate, store.pool,
              codec)
    return store


def reference_flush(a, z, kv, score, layout, ratio, nw, eps, freq, rotate, pool, codec):
    cache_ops.compress_flush(a, z, kv, score, layout, ratio, nw, eps, freq, rotate, pool, codec, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- twin
@pytest.mark.parametrize("case", list(CASES))
def test_twin_matches_reference(case):
    ratio, d, _, codec = CASES[case]
    ref = run(reference_flush, Store(ratio, d, codec), case)
    got = run(compressor.compress_flush, Store(ratio, d, codec), case)
    assert torch.equal(got.kv, ref.kv) and torch.equal(got.score, ref.score)
    assert ref.pool.any()
    equal = assert_pool_close(got.pool, ref.pool, codec)
    print(f"{case}: {equal:.5f} of pool bytes equal")


def live_slots(ratio: int, fed: int) -> list[int]:
    """State slots a sequence fed `fed` tokens will read again: CSA's previous window (once one completed) and the
    held tokens of the current window. Other slots may hold stale rows (one-shot and chunked differ there)."""
    held = list(range(fed % ratio))
    if ratio != 4:
        return held
    return (list(range(4)) if fed >= 4 else []) + [4 + i for i in held]


def assert_same_live_state(x: Store, y: Store, ratio: int, fed: int, slot: int = 0) -> None:
    live = live_slots(ratio, fed)
    assert torch.equal(x.kv[slot, live], y.kv[slot, live]) and torch.equal(x.score[slot, live], y.score[slot, live])


def flush_pieces(flush, case: str, a_all: torch.Tensor, z_all: torch.Tensor, pieces: list[int], table: list[int],
                 store: Store, slot: int = 0) -> Store:
    """Feed one sequence's rows in chunks of the given lengths."""
    ratio, d, rotate, codec = CASES[case]
    start = 0
    for n in pieces:
        layout = BatchLayout.from_chunks([(slot, start, n, table)], BLOCK_SIZE)
        flush(a_all[start:start + n], z_all[start:start + n], store.kv, store.score, layout, ratio, norm_weight(d),
              1e-6, yarn_freq(), rotate, store.pool, codec)
        start += n
    return store


@pytest.mark.parametrize("case", ["csa-main-tiny", "csa-index", "hca-8-tiny"])
def test_twin_chunked_prefill_then_decode_equals_one_shot(case):
    ratio, d, _, codec = CASES[case]
    coff = 2 if ratio == 4 else 1
    g = torch.Generator().manual_seed(3)
    a_all, z_all = torch.randn(45, coff * d, generator=g), torch.randn(45, coff * d, generator=g)
    one_shot = flush_pieces(compressor.compress_flush, case, a_all, z_all, [45], [4, 1],
                            Store(ratio, d, codec, num_slots=1))
    chunked = flush_pieces(compressor.compress_flush, case, a_all, z_all, [5, 1, 2, 17, 1, 1, 7, 11], [4, 1],
                           Store(ratio, d, codec, num_slots=1))
    assert one_shot.pool.any() and torch.equal(chunked.pool, one_shot.pool)
    assert_same_live_state(chunked, one_shot, ratio, 45)


def test_twin_skips_entries_without_a_block():
    ratio, d, rotate, codec = CASES["csa-main-tiny"]
    tables = torch.tensor([[-1, 3], [40, 2]])                     # slot 0: first block missing; 40: out of range
    store = Store(ratio, d, codec, num_slots=2)
    ref = store.clone()
    layout = BatchLayout.from_chunks([(0, 0, 260, tables[0].tolist()), (1, 0, 8, tables[1].tolist())], BLOCK_SIZE)
    g = torch.Generator().manual_seed(4)
    a, z = torch.randn(268, 2 * d, generator=g), torch.randn(268, 2 * d, generator=g)
    compressor.compress_flush(a, z, store.kv, store.score, layout, ratio, norm_weight(d), 1e-6, yarn_freq(), rotate,
                              store.pool, codec)
    written = store.pool.view(store.pool.shape[0], -1).any(dim=1)
    assert written.tolist() == [i == 3 for i in range(store.pool.shape[0])]   # only entry 64 (block 3, offset 0)
    # The reference cannot take missing blocks (it would index pool[-1]): give it a full table, same entry 64.
    full = BatchLayout.from_chunks([(0, 0, 260, [0, 3]), (1, 0, 8, [1, 2])], BLOCK_SIZE)
    reference_flush(a, z, ref.kv, ref.score, full, ratio, norm_weight(d), 1e-6, yarn_freq(), rotate, ref.pool, codec)
    assert torch.equal(store.kv, ref.kv) and torch.equal(store.score, ref.score)   # states advance regardless
    assert_pool_close(store.pool[3, :1], ref.pool[3, :1], codec)


# ---------------------------------------------------------------------------------------------- Triton kernels
TRITON_STEPS = [[(0, 1), (1, 3), (2, 5), (3, 13)], [(0, 1), (1, 1), (2, 2), (3, 1), (4, 7)],
                [(0, 6), (1, 1), (4, 9), (3, 3)]]


@pytest.mark.triton
@pytest.mark.parametrize("case", ["csa-main-tiny", "csa-index", "hca-8-tiny"])
def test_kernels_equal_the_twin(case):
    from dsv4.kernels.fast import _compressor_triton

    ratio, d, _, codec = CASES[case]
    tables = block_tables()
    tables[2, 0] = -1                                             # one sequence's first block is missing
    want = run(compressor.compress_flush, Store(ratio, d, codec), case, TRITON_STEPS, 5, tables)
    got = run(_compressor_triton.compress_flush, Store(ratio, d, codec), case, TRITON_STEPS, 5, tables)
    assert torch.equal(got.kv, want.kv) and torch.equal(got.score, want.score)
    assert want.pool.any()
    assert_pool_close(got.pool, want.pool, codec)


@pytest.mark.triton
@pytest.mark.parametrize("case", ["csa-main-tiny", "hca-8-tiny"])
def test_kernels_chunked_equals_one_shot_and_untouched_slots_stay(case):
    from dsv4.kernels.fast import _compressor_triton

    ratio, d, _, codec = CASES[case]
    coff = 2 if ratio == 4 else 1
    g = torch.Generator().manual_seed(6)
    a_all, z_all = torch.randn(23, coff * d, generator=g), torch.randn(23, coff * d, generator=g)
    stores = [Store(ratio, d, codec, num_slots=3) for _ in range(2)]
    other = torch.randn(stores[0].kv.shape[1:], generator=g)
    for store in stores:
        store.kv[2] = other                                       # another sequence's state: must stay untouched
    flush = _compressor_triton.compress_flush
    one_shot = flush_pieces(flush, case, a_all, z_all, [23], [5, 2], stores[0], slot=1)
    chunked = flush_pieces(flush, case, a_all, z_all, [6, 1, 2, 13, 1], [5, 2], stores[1], slot=1)
    assert one_shot.pool.any() and torch.equal(chunked.pool, one_shot.pool)
    assert_same_live_state(chunked, one_shot, ratio, 23, slot=1)
    assert torch.equal(chunked.kv[2], other) and torch.isinf(chunked.score[0]).all()


@pytest.mark.triton
@pytest.mark.parametrize("case", ["csa-main-tiny", "hca-8-tiny"])
def test_kernels_read_the_halves_of_one_projection(case):
    """a and z as the two column halves of one [T, 2W] GEMM result (`compressor.project`'s views, row stride 2W):
    the same pools and states as contiguous copies."""
    from dsv4.kernels.fast import _compressor_triton

    def halves(a, z, *rest):
        both = torch.cat([a, z], dim=1)
        width = a.shape[1]
        _compressor_triton.compress_flush(both[:, :width], both[:, width:], *rest)

    ratio, d, _, codec = CASES[case]
    want = run(_compressor_triton.compress_flush, Store(ratio, d, codec), case, TRITON_STEPS, 6)
    got = run(halves, Store(ratio, d, codec), case, TRITON_STEPS, 6)
    assert torch.equal(got.kv, want.kv) and torch.equal(got.score, want.score) and torch.equal(got.pool, want.pool)


@pytest.mark.triton
def test_position_bias_kernel_and_project():
    """z += ape[positions % ratio] in place on a strided half (the kernel), and `project` (one GEMM on the stacked
    weight + the bias) equal to the two fp32 linears and the indexed add."""
    from dsv4.kernels.fast import _compressor_triton

    g = torch.Generator().manual_seed(4)
    y = torch.randn(6, 2 * 96, generator=g)
    ape = torch.randn(4, 96, generator=g)
    positions = torch.tensor([0, 5, 2, 7, 3, 9])
    want = y[:, 96:] + ape[positions % 4]
    _compressor_triton.add_position_bias(y[:, 96:], ape, positions)
    assert torch.equal(y[:, 96:], want)
    x = torch.randn(6, 128, generator=g).bfloat16()
    wkv, wgate = (torch.randn(96, 128, generator=g).bfloat16() for _ in range(2))
    a, z = compressor.project(x, torch.cat([wkv, wgate]), ape, positions)
    assert torch.allclose(a, x.float() @ wkv.float().t(), rtol=0, atol=1e-5)
    assert torch.allclose(z, x.float() @ wgate.float().t() + ape[positions % 4], rtol=0, atol=1e-5)

"""The fast lightning indexer (`dsv4.kernels.fast.indexer`): the PyTorch twin against the reference, and the
Triton kernels (under Triton's interpreter on CPU tensors) against the twin.

Tolerances. indexer_query: the twin must equal the reference on >= 99.9% of elements (fp32 vs fp64 RoPE and
Hadamard sums can move a value across a bf16 or e2m1 rounding boundary; measured: 100%). indexer_topk: the same
number of entries chosen per row, and every entry chosen by one side only must be a near tie of the reference's
k-th best: |score - kth| <= 2^-6 * max|score of the row| (reference bf16 scores; the fast path sums in fp32, the
reference rounds every intermediate to bf16: measured differences <= 0.6% of the row maximum, swaps <= 0.3%).
The Triton kernels compute the twin's function; their selections must equal the twin's (ties are resolved on the
same bf16 keys), the query output must equal the twin's bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from fast_inputs import assert_near_tie_swaps

from dsv4.kernels import cache_ops, quant
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.fast import indexer
from dsv4.kernels.kv_format import IndexFp4Codec
from dsv4.kernels.ref_math import apply_rope
from dsv4.model.layers import rope_inv_freq

CODEC = IndexFp4Codec(128)


def yarn_freq() -> torch.Tensor:
    return rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0))


def key_pool(num_blocks: int, epb: int, g: torch.Generator) -> torch.Tensor:
    keys = quant.hadamard_rotate(torch.randn(num_blocks * epb, 128, generator=g).bfloat16())
    return CODEC.encode(keys).view(num_blocks, epb, CODEC.width)


def queries(num_tokens: int, heads: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q = quant.fake_quant_fp4(quant.hadamard_rotate(torch.randn(num_tokens, heads, 128, generator=g).bfloat16()))
    w = (torch.randn(num_tokens, heads, generator=g) * heads ** -0.5).bfloat16()
    return q, w


def layout_of(chunks, block_size: int = 256) -> BatchLayout:
    """chunks: (slot, start, length, block table)."""
    return BatchLayout.from_chunks(chunks, block_size)


def reference_scores(q, w, pool, layout, ratio=4) -> list[torch.Tensor]:
    """Per token: the reference's bf16 scores of its sequence's entries 0 .. visible-1 (every block present)."""
    out = []
    for t in range(layout.num_tokens):
        s, p = int(layout.token_seq[t]), int(layout.positions[t])
        count = (p + 1) // ratio
        if count == 0:
            out.append(torch.zeros(0))
            continue
        keys = cache_ops.read_entries(pool, CODEC, layout, s, count, ratio)
        out.append(cache_ops.index_scores(q[t:t + 1], w[t:t + 1], keys, torch.bfloat16)[0])
    return out


# ---------------------------------------------------------------------------------------------- query twin
@pytest.mark.parametrize("shape", [(5, 16, 128), (64, 64, 128), (7, 4, 64)])
def test_query_twin_matches_reference(shape):
    t, h, d = shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(t, h, d, generator=g).bfloat16() * 3
    positions = torch.randint(0, 1 << 20, (t,), generator=g)
    positions[0] = 0
    freq = yarn_freq()[: min(32, d // 2)]
    ref = quant.fake_quant_fp4(quant.hadamard_rotate(apply_rope(q, positions, freq)))
    got = indexer.indexer_query(q, positions, freq)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert (got == ref).float().mean() >= 0.999


# ---------------------------------------------------------------------------------------------- top-k twin
TOPK_CASES = {   # name: (chunks (slot, start, length, blocks), heads, topk, num_blocks)
    "decode-mixed": ([(0, 3000, 1, list(range(0, 12))), (1, 40, 1, [12]), (2, 700, 1, [13, 14, 15]),
                      (3, 2, 1, [16])], 64, 128, 20),
    "prefill-chunk": ([(0, 900, 24, list(range(4))), (1, 0, 9, [4])], 64, 64, 6),
    "medium-16k": ([(0, 16000, 3, list(range(63)))], 64, 512, 64),
    "tiny-heads": ([(0, 300, 5, [0, 1]), (1, 0, 12, [2])], 16, 8, 3),
}


@pytest.mark.parametrize("case", list(TOPK_CASES))
def test_topk_twin_selects_the_reference_set_up_to_near_ties(case):
    chunks, heads, topk, num_blocks = TOPK_CASES[case]
    g = torch.Generator().manual_seed(2)
    layout = layout_of(chunks)
    pool = key_pool(num_blocks, 64, g)
    q, w = queries(layout.num_tokens, heads, g)
    ref = cache_ops.indexer_topk(q, w, pool, CODEC, layout, 4, topk, torch.bfloat16)
    got = indexer.indexer_topk(q, w, pool, CODEC, layout, 4, topk)
    assert got.shape == (layout.num_tokens, topk) and got.dtype == torch.int64
    chosen = got[got >= 0]
    visible = ((layout.positions + 1) // 4)[:, None].expand_as(got)[got >= 0]
    assert (chosen < visible).all()
    ascending = torch.where(got >= 0, got, 1 << 40)
    assert (ascending[:, 1:] >= ascending[:, :-1]).all()            # ascending index order, -1 at the end
    scores = reference_scores(q, w, pool, layout)
    swaps = assert_near_tie_swaps(got, ref, scores.__getitem__)
    print(f"{case}: {swaps} near-tie swaps in {int((got >= 0).sum())} chosen")


def test_topk_fewer_visible_than_k_and_position_zero():
    g = torch.Generator().manual_seed(3)
    layout = layout_of([(0, 0, 3, [0]), (1, 5, 2, [1]), (2, 30, 1, [2])])   # visible 0,0,0 | 1,1 | 7
    pool = key_pool(3, 64, g)
    q, w = queries(layout.num_tokens, 64, g)
    got = indexer.indexer_topk(q, w, pool, CODEC, layout, 4, 16)
    assert (got[:3] == -1).all()                                            # positions 0..2: nothing visible
    assert got[3].tolist() == got[4].tolist() == [0] + [-1] * 15
    assert got[5, :7].tolist() == list(range(7)) and (got[5, 7:] == -1).all()


def test_topk_missing_blocks_are_never_selected():
    g = torch.Generator().manual_seed(4)
    layout = layout_of([(0, 600, 2, [3, -1, 1]), (1, 200, 1, [7])])         # seq 0: entries 64..127 missing
    pool = key_pool(4, 64, g)                                                # block 7 is out of range too
    q, w = queries(layout.num_tokens, 64, g)
    got = indexer.indexer_topk(q, w, pool, CODEC, layout, 4, 512)
    for t in range(2):
        chosen = got[t][got[t] >= 0]
        assert chosen.numel() == 150 - 64 and not ((chosen >= 64) & (chosen < 128)).any()
    assert (got[2] == -1).all()
    # The rest equals the selection over the present entries only (the reference's scores, present-masked).
    keys = cache_ops.read_entries(pool, CODEC, layout_of([(0, 600, 2, [3, 3, 1])]), 0, 150, 4)
    scores = cache_ops.index_scores(q[:2], w[:2], keys, torch.bfloat16)
    present = (torch.arange(150) < 64) | (torch.arange(150) >= 128)
    ref = cache_ops.select_topk(scores, present[None, :].expand(2, -1), 512)
    assert_near_tie_swaps(got[:2], ref, list(scores).__getitem__)


def test_topk_ties_go_to_the_lower_entry():
    g = torch.Generator().manual_seed(5)
    layout = layout_of([(0, 4000, 2, list(range(16)))])
    pool = key_pool(16, 64, g)
    q, w = queries(2, 64, g)
    w[1] = 0                                                                  # every score 0: one tie
    flat = pool.view(-1, CODEC.width)
    flat[1::2] = flat[0::2]                                                   # entry 2k+1 duplicates 2k
    got = indexer.indexer_topk(q, w, pool, CODEC, layout, 4, 100)
    assert got[1].tolist() == list(range(100))
    chosen = set(got[0].tolist())
    for k in range(0, 1000, 2):                                               # a pair ties exactly: the odd
        assert not (k + 1 in chosen and k not in chosen), f"entry {k + 1} chosen over its equal {k}"


def test_order_keys_and_select_rows():
    scores = torch.tensor([[0.0, -0.0, 1.5, -2.0, float("-inf"), 3.0, 1.5]])
    keys = indexer.order_keys(scores)
    assert keys[0, 0] == keys[0, 1] and keys[0, 4] >= 1 and (keys[0, 5] > keys[0, 2] > keys[0, 0] > keys[0, 3])
    keys[0, 6] = 0                                                            # not selectable
    assert indexer.select_rows(keys, 4).tolist() == [[0, 1, 2, 5]]
    assert indexer.select_rows(keys, 8).tolist() == [[0, 1, 2, 3, 4, 5, -1, -1]]


# ---------------------------------------------------------------------------------------------- Triton kernels
@pytest.mark.triton
def test_query_kernel_equals_the_twin():
    from dsv4.kernels.fast import _indexer_triton

    g = torch.Generator().manual_seed(6)
    q = torch.randn(3, 20, 128, generator=g).bfloat16() * 2
    positions = torch.tensor([0, 77, 900001])
    freq = yarn_freq()
    got = _indexer_triton.indexer_query(q, positions, freq)
    # Same math; the kernel's fp32 sincos may differ from torch's by an ulp and move a bf16 rounding.
    twin = indexer.indexer_query(q, positions, freq)
    assert (got.view(torch.int16) == twin.view(torch.int16)).float().mean() >= 0.999


TRITON_CASES = {   # name: (chunks, heads, topk, num_blocks)
    "mixed": ([(0, 700, 3, [3, 7, 1]), (1, 0, 5, [2]), (2, 30, 1, [5, -1, 9]), (3, 250, 2, [4, 6])], 64, 40, 12),
    "missing-and-short": ([(0, 600, 2, [3, -1, 1]), (1, 5, 2, [0])], 16, 100, 4),
    "ties": ([(0, 1000, 1, [0, 1, 2, 3])], 64, 64, 4),
}


@pytest.mark.triton
@pytest.mark.parametrize("fuse_hist", [True, False], ids=["hist-in-score-kernel", "hist-kernel"])
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_topk_kernels_equal_the_twin(case, fuse_hist):
    from dsv4.kernels.fast import _indexer_triton

    chunks, heads, topk, num_blocks = TRITON_CASES[case]
    g = torch.Generator().manual_seed(7)
    layout = layout_of(chunks)
    pool = key_pool(num_blocks, 64, g)
    q, w = queries(layout.num_tokens, heads, g)
    if case == "ties":                                                       # entry 3k+1 duplicates 3k
        flat = pool.view(-1, CODEC.width)
        flat[1::3] = flat[0::3][:flat[1::3].shape[0]]
    got = _indexer_triton.indexer_topk(q, w, pool, layout, 4, topk, fuse_hist=fuse_hist)
    assert torch.equal(got, indexer.indexer_topk(q, w, pool, CODEC, layout, 4, topk))


@pytest.mark.triton
@pytest.mark.parametrize("n", [700, 5000])
def test_select_kernels_on_crafted_keys(n):
    """Radix select corner cases: every key equal, keys straddling high-byte buckets, k == visible, several
    segments (n = 5000: five 1024-key segments), unselectable keys."""
    from dsv4.kernels.fast import _indexer_triton

    g = torch.Generator().manual_seed(8)
    keys = torch.stack([torch.full((n,), 0x8123), torch.randint(1, 1 << 16, (n,), generator=g),
                        torch.randint(0x80FE, 0x8102, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)])
    positions = torch.tensor([4 * n - 1, 4 * n - 1, 4 * 300 - 1, 4 * n - 1])
    visible = torch.arange(n)[None, :] < ((positions + 1) // 4)[:, None]
    for topk in (1, 37, 300, 512):
        got = _indexer_triton.select_topk(keys.to(torch.int16), positions, 4, topk)
        want = indexer.select_rows(torch.where(visible, keys, 0), topk)
        assert torch.equal(got, want), f"topk {topk}"

"""Reference cache ops on their own: ring semantics, paged addressing, pooling, the indexer's tie rule, attention.
These are the oracles of the CUDA kernels, so their contracts are pinned here."""

import torch

from dsv4.kernels import cache_ops
from dsv4.kernels.kv_format import Fp32Codec, MainFp8Codec
from dsv4.kernels.ref_math import softmax


def layout(chunks, block_size=16):
    """chunks: (slot, start, length, block_table) per sequence."""
    return cache_ops.BatchLayout.from_chunks(chunks, block_size)


def test_window_keeps_the_last_w_positions_per_slot():
    codec = Fp32Codec(2)
    ring = torch.zeros(3, 4, 2)
    values = torch.arange(20.0).view(10, 2)
    cache_ops.window_append(ring, codec, values, layout([(2, 5, 7, []), (0, 0, 3, [])]))
    # slot 2: positions 5..11, only 8..11 kept, at p % 4; slot 0: positions 0..2
    assert ring[2, :, 0].tolist() == [6.0, 8.0, 10.0, 12.0]      # rows of positions 8, 9, 10, 11
    assert ring[0, :3, 0].tolist() == [14.0, 16.0, 18.0] and ring[1].abs().sum() == 0


def test_window_gather_reads_the_ring_before_the_chunk():
    codec = Fp32Codec(1)
    ring = torch.zeros(1, 4, 1)
    cache_ops.window_append(ring, codec, torch.tensor([[10.0], [11.0], [12.0]]), layout([(0, 0, 3, [])]))
    chunk = torch.tensor([[13.0], [14.0]])
    keys, valid = cache_ops.window_gather(ring, codec, chunk, layout([(0, 3, 2, [])]))
    assert keys[:, :, 0].tolist() == [[10.0, 11.0, 12.0, 13.0], [11.0, 12.0, 13.0, 14.0]]
    assert valid.all()
    keys, valid = cache_ops.window_gather(ring, codec, chunk, layout([(0, 0, 2, [])]))   # a fresh sequence
    assert valid.tolist() == [[False, False, False, True], [False, False, True, True]]


def test_entries_are_addressed_through_the_block_table():
    codec = Fp32Codec(1)
    pool = torch.arange(4 * 4.0).view(4, 4, 1)          # block_size 16, ratio 4 -> 4 entries per block
    lay = layout([(0, 40, 1, [3, 1, 0])], block_size=16)   # entries 0-3 in block 3, 4-7 in block 1, 8-11 in 0
    tile, valid = cache_ops.gather_entries(pool, codec, lay, torch.tensor([[0, 5, 9, -1]]), ratio=4)
    assert tile[0, :, 0].tolist() == [12.0, 5.0, 1.0, 0.0] and valid.tolist() == [[True, True, True, False]]


def test_pooling_in_chunks_equals_one_pass_and_the_first_window_has_no_past():
    g = torch.Generator().manual_seed(0)
    d, m = 8, 4
    a, z = torch.randn(23, 2 * d, generator=g), torch.randn(23, 2 * d, generator=g)

    def fresh():
        return torch.zeros(2 * m, 2 * d), torch.full((2 * m, 2 * d), float("-inf"))

    kv, score = fresh()
    whole, first = cache_ops.pool_chunk(kv, score, a, z, 0, m, d)
    assert first == 0 and whole.shape == (5, d)
    kv2, score2 = fresh()
    parts, start = [], 0
    for n in (3, 1, 6, 2, 11):
        got, _ = cache_ops.pool_chunk(kv2, score2, a[start:start + n], z[start:start + n], start, m, d)
        parts.append(got)
        start += n
    assert torch.equal(torch.cat(parts), whole) and torch.equal(kv2, kv) and torch.equal(score2, score)
    # entry 0 pools only the B-halves of tokens 0..3; entry 1 the A-halves of 0..3 and B-halves of 4..7
    w0 = softmax(z[:4, d:], dim=0)
    assert torch.allclose(whole[0], (a[:4, d:] * w0).sum(0), atol=1e-6)
    slots_z, slots_a = torch.cat([z[:4, :d], z[4:8, d:]]), torch.cat([a[:4, :d], a[4:8, d:]])
    assert torch.allclose(whole[1], (slots_a * softmax(slots_z, dim=0)).sum(0), atol=1e-6)


def test_indexer_ties_go_to_the_lower_index_and_short_rows_pad():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    visible = torch.tensor([[True, True, True, True, False]])
    assert cache_ops.select_topk(scores, visible, 3).tolist() == [[1, 2, 3]]
    few = torch.tensor([[True, False, False, False, False]])
    assert cache_ops.select_topk(scores, few, 3).tolist() == [[0, -1, -1]]


def test_indexer_topk_sees_only_visible_entries_of_its_own_sequence():
    codec = Fp32Codec(2)
    pool = torch.zeros(2, 4, 2)
    pool[0, :, 0] = torch.tensor([1.0, 4.0, 2.0, 3.0])   # sequence 0's entries 0..3 (block 0)
    pool[1, :, 0] = torch.tensor([9.0, 9.0, 9.0, 9.0])   # another sequence's block
    q = torch.ones(4, 1, 2)
    w = torch.ones(4, 1)
    lay = layout([(0, 12, 4, [0])], block_size=16)        # positions 12..15: 3, 3, 3, 4 visible entries
    got = cache_ops.indexer_topk(q, w, pool, codec, lay, ratio=4, topk=2, act_dtype=torch.float32)
    assert got.tolist() == [[1, 2], [1, 2], [1, 2], [1, 3]]


def test_sparse_attention_matches_the_formula():
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    valid = torch.tensor([[True, True, False, True, True], [True] * 5])
    sink = torch.tensor([0.5, -1.0, 2.0])
    out = cache_ops.sparse_attention(q, keys, valid, sink, torch.float32)
    for t in range(2):
        k = keys[t][valid[t]].double()
        s = q[t].double() @ k.T / 8 ** 0.5                              # [H, K]
        e = torch.exp(s)
        expected = (e @ k) / (e.sum(-1, keepdim=True) + torch.exp(sink.double())[:, None])
        assert torch.allclose(out[t].double(), expected, atol=1e-6)


def test_fp8_window_entries_come_back_as_the_simulated_values():
    from dsv4.kernels import quant

    codec = MainFp8Codec(448, 64)
    ring = torch.zeros(1, 128, codec.width, dtype=torch.uint8)
    kv = torch.randn(5, 512).bfloat16()
    cache_ops.window_append(ring, codec, kv, layout([(0, 0, 5, [])]))
    keys, valid = cache_ops.window_gather(ring, codec, kv[:1], layout([(0, 5, 1, [])]))
    assert torch.equal(keys[0, -6:-1], quant.fake_quant_kv(kv, 64)) and valid[0, -6:].all()

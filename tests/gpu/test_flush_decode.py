"""compress_flush decode batches (T == S, the append / pool kernel of compress.cu) against the reference:
batches where no, some or every sequence completes a window, CSA and HCA, main and indexer codecs, a masked
slot and a missing block, fresh CSA states (-inf scores), more windows than HCA clusters, and CUDA-graph replay.
Stored bytes and states must be identical."""

from __future__ import annotations

import zlib

import pytest
import torch
from gpu_cases import FLUSH_CASES, layout_to, make_layout, scaled_normal, yarn_freq

from dsv4.kernels import cache_ops, cuda_ops

pytestmark = pytest.mark.gpu
DEV = "cuda"
BLOCK = 256



def starts_for(mode: str, ratio: int, b: int, g: torch.Generator) -> list[int]:
    base = torch.randint(1, 30, (b,), generator=g) * ratio
    if mode == "none":
        off = torch.randint(0, ratio - 1, (b,), generator=g)
    elif mode == "all":
        off = torch.full((b,), ratio - 1)
    elif mode == "fresh":   # CSA: the first window (state rows 0..3 still hold -inf scores)
        return [ratio - 1 if s % 2 == 0 else s % (ratio - 1) for s in range(b)]
    else:                   # "some": every third sequence, the rest at random non-completing offsets
        off = torch.randint(0, ratio - 1, (b,), generator=g)
        off[::3] = ratio - 1
    return (base + off).tolist()


def build(case: str, mode: str, b: int, seed: int):
    ratio, d, rotate, codec = FLUSH_CASES[case]
    coff = 2 if ratio == 4 else 1
    g = torch.Generator().manual_seed(seed)
    starts = starts_for(mode, ratio, b, g)
    max_blocks = max(s // BLOCK for s in starts) + 1
    num_slots = b + 2
    slots = torch.randperm(num_slots, generator=g)[:b].tolist()
    chunks = [(slot, start, 1) for slot, start in zip(slots, starts, strict=True)]
    layout = make_layout(chunks, BLOCK, max_blocks, b * max_blocks + 3, g)
    seq_slot, table = layout.seq_slot.clone(), layout.block_table.clone()
    if b > 3:
        seq_slot[1] = -1                                   # masked: no state, nothing stored
        table[2, starts[2] // BLOCK] = -1                  # no block: nothing stored, the state still advances
    layout = type(layout)(layout.positions, layout.token_seq, seq_slot, layout.seq_start, layout.seq_len,
                          layout.seq_first_row, table, BLOCK, tuple(
                              (int(seq_slot[i]), *layout.spans[i][1:]) for i in range(b)))
    state_kv = scaled_normal((num_slots, coff * ratio, coff * d), g, spread=3)
    state_score = 2 * torch.randn(num_slots, coff * ratio, coff * d, generator=g)
    if mode == "fresh":
        state_kv[:, :ratio] = 0
        state_score[:, :ratio] = float("-inf")
    pool = torch.zeros(b * max_blocks + 3, BLOCK // ratio, codec.width, dtype=torch.uint8)
    a = scaled_normal((b, coff * d), g, spread=3)
    z = 2 * torch.randn(b, coff * d, generator=g)
    norm_weight = (1 + 0.3 * torch.randn(d, generator=g)).bfloat16()
    return ratio, rotate, codec, layout, state_kv, state_score, pool, a, z, norm_weight


def reference(ratio, rotate, codec, layout, state_kv, state_score, pool, a, z, norm_weight):
    ref = [t.clone() for t in (state_kv, state_score, pool)]
    masked = [i for i, span in enumerate(layout.spans) if span[0] < 0]
    keep = type(layout)(*[getattr(layout, f) for f in ("positions", "token_seq", "seq_slot", "seq_start", "seq_len",
                                                       "seq_first_row", "block_table")], layout.block_size,
                        tuple(span for i, span in enumerate(layout.spans) if i not in masked))
    if masked:   # the reference has no mask rule for slots: run it on the unmasked sequences only
        rows = [i for i in range(len(layout.spans)) if i not in masked]
        keep = type(layout)(layout.positions[rows], torch.arange(len(rows)), layout.seq_slot[rows],
                            layout.seq_start[rows], layout.seq_len[rows], torch.arange(len(rows)),
                            layout.block_table[rows], layout.block_size,
                            tuple((layout.spans[r][0], layout.spans[r][1], 1, i) for i, r in enumerate(rows)))
        a, z = a[rows], z[rows]
    table_ok = keep.block_table.clone()
    spill = torch.zeros(1, *pool.shape[1:], dtype=pool.dtype)   # entries without a block land here, then dropped
    big = torch.cat([ref[2], spill])
    keep = type(keep)(*[getattr(keep, f) for f in ("positions", "token_seq", "seq_slot", "seq_start", "seq_len",
                                                   "seq_first_row")], torch.where(table_ok < 0, pool.shape[0],
                                                                                  table_ok), keep.block_size,
                      keep.spans)
    cache_ops.compress_flush(a, z, ref[0], ref[1], keep, ratio, norm_weight, 1e-6, yarn_freq(), rotate, big, codec,
                             torch.bfloat16)
    ref[2] = big[:-1]
    return ref


def run_kernel(ratio, rotate, codec, layout, state_kv, state_score, pool, a, z, norm_weight):
    gpu = [t.to(DEV) for t in (state_kv, state_score, pool)]
    cuda_ops.compress_flush(a.to(DEV), z.to(DEV), gpu[0], gpu[1], layout_to(layout, DEV), ratio, norm_weight.to(DEV),
                            1e-6, yarn_freq().to(DEV), rotate, gpu[2], codec, torch.bfloat16, validate=False)
    return [t.cpu() for t in gpu]


def assert_same(got, ref):
    assert torch.equal(got[2], ref[2]), f"pool bytes differ in {int((got[2] != ref[2]).sum())} bytes"
    assert torch.equal(got[0], ref[0]), "state_kv differs"
    assert torch.equal(got[1].view(torch.int32), ref[1].view(torch.int32)), "state_score differs"


@pytest.mark.parametrize("b", [1, 7, 128, 300])
@pytest.mark.parametrize("mode", ["none", "some", "all", "fresh"])
@pytest.mark.parametrize("case", list(FLUSH_CASES))
def test_decode_flush_equals_the_reference(case, mode, b):
    if mode == "fresh" and FLUSH_CASES[case][0] != 4:
        pytest.skip("fresh states matter for CSA's previous-window half")
    args = build(case, mode, b, seed=zlib.crc32(f"{case}/{mode}/{b}".encode()) % 1000)
    assert_same(run_kernel(*args), reference(*args))


@pytest.mark.parametrize("case", ["csa-main-512", "csa-index-128", "hca-main-512"])
def test_decode_flush_graph_replay(case):
    ratio, rotate, codec, layout, state_kv, state_score, pool, a, z, norm_weight = build(case, "some", 128, seed=11)
    dev_layout = layout_to(layout, DEV)
    static = [t.to(DEV) for t in (a, z, state_kv, state_score, pool)]
    nw, freq = norm_weight.to(DEV), yarn_freq().to(DEV)

    def call():
        cuda_ops.compress_flush(static[0], static[1], static[2], static[3], dev_layout, ratio, nw, 1e-6, freq, rotate,
                                static[4], codec, torch.bfloat16, validate=False)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        call()   # warm up (loads the extension) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for seed in (1, 2):   # new inputs and states in the captured buffers, replay, compare
        g = torch.Generator().manual_seed(seed)
        new_a = scaled_normal(tuple(a.shape), g, spread=3)
        new_z = 2 * torch.randn(*z.shape, generator=g)
        new_kv = scaled_normal(tuple(state_kv.shape), g, spread=3)
        new_sc = 2 * torch.randn(*state_score.shape, generator=g)
        for dst, src in zip(static, (new_a, new_z, new_kv, new_sc, torch.zeros_like(pool)), strict=True):
            dst.copy_(src.to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference(ratio, rotate, codec, layout, new_kv, new_sc, torch.zeros_like(pool), new_a, new_z,
                        norm_weight)
        assert_same([t.cpu() for t in static[2:]], ref)

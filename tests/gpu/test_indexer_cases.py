"""The indexer top-k kernel (kernels/csrc/indexer.cu) against the reference `cache_ops.indexer_topk`: exact
selections for 1, 3 and 64 tokens, short and long rows (fewer entries than k included), heavy ties, and
CUDA-graph capture + replay with new inputs."""

from __future__ import annotations

import pytest
import torch
from gpu_cases import layout_to, make_layout, mxfp4_key_pool, mxfp4_queries

from dsv4.kernels import cache_ops, cuda_ops
from dsv4.kernels.kv_format import IndexFp4Codec

pytestmark = pytest.mark.gpu
DEV = "cuda"
CODEC = IndexFp4Codec(128)
RATIO, BLOCK = 4, 256   # 64 entries per block


def build(chunks, heads, num_blocks, max_blocks, seed, duplicate_every=0, zero_weights=False):
    g = torch.Generator().manual_seed(seed)
    layout = make_layout(chunks, BLOCK, max_blocks, num_blocks, g)
    pool = mxfp4_key_pool(num_blocks, BLOCK // RATIO, g, duplicate_every=duplicate_every)
    q = mxfp4_queries(layout.num_tokens, heads, g)
    weights = (torch.randn(layout.num_tokens, heads, generator=g) * heads ** -0.5).bfloat16()
    if zero_weights:   # every score 0: one giant tie, the choice is purely by entry index
        weights.zero_()
    return q, weights, pool, layout


def run_both(q, weights, pool, layout, topk):
    ref = cache_ops.indexer_topk(q, weights, pool, CODEC, layout, RATIO, topk, torch.bfloat16)
    got = cuda_ops.indexer_topk(q.to(DEV), weights.to(DEV), pool.to(DEV), CODEC, layout_to(layout, DEV), RATIO,
                                topk, torch.bfloat16)
    return got.cpu(), ref


CASES = {   # name: (chunks (slot, start, length), heads, topk, num_blocks, max_blocks)
    "b1-32k-top512": ([(0, (1 << 17) - 1, 1)], 64, 512, 520, 512),
    "b1-fewer-than-k": ([(0, 1000, 1)], 64, 512, 8, 8),            # 250 visible < 512
    "b1-exactly-k": ([(0, 2047, 1)], 64, 512, 40, 33),             # 512 visible
    "b1-one-entry": ([(0, 3, 1)], 16, 8, 2, 1),
    "b1-heads32-top1024": ([(0, 40000, 1)], 32, 1024, 160, 157),
    "b3-mixed": ([(0, 0, 1), (1, 9000, 1), (2, 30000, 1)], 64, 512, 400, 120),   # 0, 2250, 7500 visible
    "b64-prefill-chunk": ([(0, 16000, 64)], 64, 512, 64, 63),
    "b64-decode": ([(s, 500 * s + 7, 1) for s in range(64)], 64, 512, 64 * 126, 126),
}


@pytest.mark.parametrize("case", list(CASES))
def test_indexer_equals_reference(case):
    chunks, heads, topk, num_blocks, max_blocks = CASES[case]
    got, ref = run_both(*build(chunks, heads, num_blocks, max_blocks, seed=21), topk)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dup", [2, 3])
def test_indexer_ties_go_to_the_lower_entry(dup):
    got, ref = run_both(*build([(0, 20000, 3)], 64, 80, 80, seed=22, duplicate_every=dup), 512)
    assert torch.equal(got, ref)


def test_indexer_all_scores_equal():
    """One tie over every entry: the k lowest entries, in order."""
    got, ref = run_both(*build([(0, 30000, 2), (1, 1500, 1)], 64, 240, 118, seed=23, zero_weights=True), 512)
    assert torch.equal(got, ref)
    assert torch.equal(got[0], torch.arange(512))


def test_cuda_graph_capture_and_replay():
    chunks, heads, topk, num_blocks, max_blocks = CASES["b3-mixed"]
    q, weights, pool, layout = build(chunks, heads, num_blocks, max_blocks, seed=25)
    dl = layout_to(layout, DEV)
    sq, sw, sp = q.to(DEV), weights.to(DEV), pool.to(DEV)
    args = (CODEC, dl, RATIO, topk, torch.bfloat16)
    cuda_ops.indexer_topk(sq, sw, sp, *args, validate=False)   # warm-up (build, lazy init)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_ops.indexer_topk(sq, sw, sp, *args, validate=False)
    g = torch.Generator().manual_seed(26)
    for replay in range(4):
        q_new = mxfp4_queries(layout.num_tokens, heads, g)
        w_new = (torch.randn(layout.num_tokens, heads, generator=g) * heads ** -0.5).bfloat16()
        sq.copy_(q_new)
        sw.copy_(w_new)
        graph.replay()
        torch.cuda.synchronize()
        ref = cache_ops.indexer_topk(q_new, w_new, pool, CODEC, layout, RATIO, topk, torch.bfloat16)
        assert torch.equal(out.cpu(), ref), f"replay {replay}"

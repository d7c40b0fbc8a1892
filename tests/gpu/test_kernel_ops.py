"""Each CUDA kernel against its PyTorch reference (run on a CPU copy of the same inputs).

Exact (byte or bit equality): stored FP8/MXFP4 bytes and compressor states, window/entry gathers, indexer
selections, router expert ids. Router weights: within 2 fp32 ulp (the fp64 gate sums of kernel and reference can
round differently when they sit within ~1e-16 of an fp32 boundary; the tests report how many differ at all).
"""

from __future__ import annotations

import pytest
import torch
from gpu_cases import (
    COMMON_INDEXER_CASES,
    FLUSH_CASES,
    layout_to,
    make_layout,
    mxfp4_key_pool,
    mxfp4_queries,
    scaled_normal,
    yarn_freq,
)

from dsv4.kernels import cache_ops, cuda_ops, ops, quant, routing
from dsv4.kernels.kv_format import IndexFp4Codec, MainFp8Codec

pytestmark = pytest.mark.gpu
DEV = "cuda"


# ---------------------------------------------------------------------------------------------- routing
ROUTER_SHAPES = [   # (T, D, E, k, V)
    (7, 128, 16, 6, 1024),        # tiny preset
    (1, 4096, 256, 6, 129280),    # V4-Flash decode
    (64, 4096, 256, 6, 129280),
    (4096, 4096, 256, 6, 129280),  # V4-Flash prefill chunk
    (64, 7168, 384, 6, 129280),   # V4-Pro
    (33, 256, 512, 16, 4096),     # the limits: 512 experts, top-16
]


def router_inputs(t, d, e, k, v, seed=0, x_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g).to(x_dtype)
    w = (torch.randn(e, d, generator=g) * d ** -0.5 * 4).bfloat16()
    bias = torch.randn(e, generator=g) * 0.1
    if v * e <= 2 ** 22:   # distinct experts per token, as in checkpoints
        tid2eid = torch.rand(v, e, generator=g).argsort(dim=1)[:, :k]
    else:                  # large tables: repeats allowed (cheap to make; the router does not care)
        tid2eid = torch.randint(0, e, (v, k), generator=g)
    tokens = torch.randint(0, v, (t,), generator=g)
    return x, w, bias, tid2eid, tokens


def assert_weights_close(got: torch.Tensor, ref: torch.Tensor) -> None:
    differ = int((got.cpu() != ref).sum())
    torch.testing.assert_close(got.cpu(), ref, rtol=2.5e-7, atol=0)
    print(f"router weights: {differ} of {ref.numel()} not bit-identical")


@pytest.mark.parametrize("shape", ROUTER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dense_route_matches_reference(shape):
    t, d, e, k, v = shape
    x, w, bias, _, _ = router_inputs(t, d, e, k, v)
    ref_w, ref_ids = routing.dense_route(x, w, bias, k, 1.5)
    got_w, got_ids = cuda_ops.dense_route(x.to(DEV), w.to(DEV), bias.to(DEV), k, 1.5)
    assert torch.equal(got_ids.cpu(), ref_ids)
    assert_weights_close(got_w, ref_w)


@pytest.mark.parametrize("shape", ROUTER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_hash_route_matches_reference(shape):
    t, d, e, k, v = shape
    x, w, _, tid2eid, tokens = router_inputs(t, d, e, k, v, seed=1)
    ref_w, ref_ids = routing.hash_route(x, w, tid2eid, tokens, 2.5)
    got_w, got_ids = cuda_ops.hash_route(x.to(DEV), w.to(DEV), tid2eid.to(DEV), tokens.to(DEV), 2.5)
    assert torch.equal(got_ids.cpu(), ref_ids)
    assert_weights_close(got_w, ref_w)


def test_routers_take_bf16_x_and_the_fp32_logits_epilogue():
    x, w, bias, tid2eid, tokens = router_inputs(64, 4096, 256, 6, 129280, seed=2, x_dtype=torch.bfloat16)
    ref_w, ref_ids = routing.dense_route(x.float(), w, bias, 6, 1.5)
    got_w, got_ids = cuda_ops.dense_route(x.to(DEV), w.to(DEV), bias.to(DEV), 6, 1.5)
    assert torch.equal(got_ids.cpu(), ref_ids)
    assert_weights_close(got_w, ref_w)
    logits = (x.double() @ w.double().T).float()
    got_w, got_ids = cuda_ops.router_topk(logits.to(DEV), bias.to(DEV), 6, 1.5)
    assert torch.equal(got_ids.cpu(), ref_ids)
    assert_weights_close(got_w, ref_w)


def hard_gate(kind: str, t: int, d: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 x [t, d], gate [e, d] and bias [e] that stress the certified router's bound and its k-th boundary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g)
    w = torch.randn(e, d, generator=g) * d ** -0.5 * 4
    bias = torch.randn(e, generator=g) * 0.1
    if kind == "cancel":          # two huge products per logit that cancel: the bound is wide, many candidates
        x[:, 0], x[:, 1] = 3e4, -3e4
        w[:, 0] = w[:, 1] = torch.randn(e, generator=g)
    elif kind == "range":         # elements spread over 2^-30 .. 2^30
        x = x * torch.exp2(torch.randint(-30, 31, (t, d), generator=g).float())
        w = w * torch.exp2(torch.randint(-30, 31, (e, d), generator=g).float())
    elif kind == "ties":          # duplicated rows and biases: exact ties, decided by the lower expert id
        w[1::2] = w[0::2]
        bias[1::2] = bias[0::2]
    elif kind == "near":          # rows one bf16 ulp apart in one element: near ties
        w = w.bfloat16().float()
        w[1::2] = w[0::2]
        w[1::2, 5] = (w[0::2, 5].bfloat16().view(torch.int16) + 1).view(torch.bfloat16).float()
        bias[1::2] = bias[0::2]
    elif kind == "padding":       # all-zero rows (graph padding) beside real ones
        x[::2] = 0
    return x.bfloat16(), w.bfloat16(), bias


HARD_KINDS = ["random", "cancel", "range", "ties", "near", "padding"]


@pytest.mark.parametrize("kind", HARD_KINDS)
@pytest.mark.parametrize("shape", [(1, 4096, 256), (9, 4096, 256), (64, 4096, 256), (33, 7168, 384), (5, 128, 512)],
                         ids=lambda s: "x".join(map(str, s)))
def test_certified_router_estimate_is_within_its_bound(kind, shape):
    """The certificate rests on |L~ - L| <= gamma * A / (1 - gamma) for the tensor-core estimate L~: check it
    against the exact (fp64) logits, with the slack it leaves reported."""
    t, d, e = shape
    x, w, _ = hard_gate(kind, t, d, e, seed=t + e)
    logits, scale, gamma = cuda_ops.router_gate_estimate(x.to(DEV), w.to(DEV))
    exact = x.double() @ w.double().T
    err = (logits.cpu().double() - exact).abs()
    bound = gamma * scale.cpu().double() / (1 - gamma) + 2.0 ** -100
    assert bool((err <= bound).all()), f"worst err/bound {float((err / bound).max()):.3f}"
    print(f"{kind} {shape}: gamma {gamma:.2e}, worst err/bound {float((err / bound).max()):.4f}")


@pytest.mark.parametrize("kind", HARD_KINDS)
@pytest.mark.parametrize("shape", [(1, 4096, 256, 6), (8, 4096, 256, 6), (9, 4096, 256, 6), (64, 4096, 256, 6),
                                   (33, 7168, 384, 6), (5, 128, 512, 16), (17, 256, 16, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_certified_router_matches_reference_on_hard_inputs(kind, shape):
    t, d, e, k = shape
    x, w, bias = hard_gate(kind, t, d, e, seed=7 * t + e)
    ref_w, ref_ids = routing.dense_route(x.float(), w, bias, k, 1.5)
    got_w, got_ids = cuda_ops.dense_route(x.to(DEV), w.to(DEV), bias.to(DEV), k, 1.5)
    assert torch.equal(got_ids.cpu(), ref_ids)
    assert_weights_close(got_w, ref_w)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts", [16, 256, 512])
def test_decode_router_is_one_launch_that_leaves_its_workspace_zeroed(experts, x_dtype):
    """T <= 8 (bf16 x: T <= 4, then the certified path) takes the fused kernel (last CTA selects); one workspace
    serves every call."""
    ws = cuda_ops.router_workspace(DEV)
    for t in range(1, 9):
        x, w, bias, _, _ = router_inputs(t, 4096, experts, 6, 1024, seed=20 + t, x_dtype=x_dtype)
        ref_w, ref_ids = routing.dense_route(x.float(), w, bias, 6, 1.5)
        got_w, got_ids = cuda_ops.dense_route(x.to(DEV), w.to(DEV), bias.to(DEV), 6, 1.5, ws)
        assert torch.equal(got_ids.cpu(), ref_ids)
        assert_weights_close(got_w, ref_w)
        assert int(ws.item()) == 0


def test_router_ties_go_to_the_lower_expert_and_empty_batches_work():
    _, w, _, tid2eid, _ = router_inputs(1, 128, 16, 6, 1024)
    got_w, got_ids = cuda_ops.dense_route(torch.zeros(3, 128, device=DEV), w.to(DEV), torch.zeros(16, device=DEV),
                                          6, 1.0)
    assert got_ids.tolist() == [[0, 1, 2, 3, 4, 5]] * 3
    assert torch.allclose(got_w, torch.full_like(got_w, 1 / 6))
    for fn in (lambda x: cuda_ops.dense_route(x, w.to(DEV), torch.zeros(16, device=DEV), 6, 1.0),
               lambda x: cuda_ops.hash_route(x, w.to(DEV), tid2eid.to(DEV), torch.zeros(0, dtype=torch.long,
                                                                                       device=DEV), 1.0)):
        weights, ids = fn(torch.zeros(0, 128, device=DEV))
        assert weights.shape == (0, 6) and ids.shape == (0, 6)


def test_hash_route_bad_ids_raise_when_validated_and_are_masked_otherwise():
    x, w, _, tid2eid, _ = router_inputs(2, 128, 16, 6, 1024)
    x, w, table = x.to(DEV), w.to(DEV), tid2eid.to(DEV)
    with pytest.raises(ValueError, match="token id 1024 is outside the vocabulary"):
        cuda_ops.hash_route(x, w, table, torch.tensor([1024, 3], device=DEV), 1.5, validate=True)
    weights, ids = cuda_ops.hash_route(x, w, table, torch.tensor([1024, 3], device=DEV), 1.5, validate=False)
    assert (ids[0] == -1).all() and weights[0].isnan().all() and not weights[1].isnan().any()
    table[3, 2] = 16
    with pytest.raises(ValueError, match="expert id 16 outside"):
        cuda_ops.hash_route(x, w, table, torch.tensor([5, 3], device=DEV), 1.5, validate=True)
    weights, ids = cuda_ops.hash_route(x, w, table, torch.tensor([5, 3], device=DEV), 1.5, validate=False)
    assert ids[1, 2] == -1 and weights[1].isnan().all() and (ids[0] >= 0).all()
    with pytest.raises(ValueError, match="token id 1024"):   # through the dispatch layer, as the model calls it
        ops.hash_route(x, w, table, torch.tensor([1024, 3], device=DEV), 1.5)


# ---------------------------------------------------------------------------------------------- window
WINDOW_CHUNKS = [(3, 0, 5), (0, 130, 1), (5, 7, 300), (2, 127, 2), (6, 250, 129), (1, 0, 1)]


@pytest.mark.parametrize("geometry", [(448, 64), (64, 64)], ids=["v4-584B", "tiny-200B"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_window_append_bytes_equal_the_reference(geometry, dtype):
    g = torch.Generator().manual_seed(3)
    codec = MainFp8Codec(*geometry)
    layout = make_layout(WINDOW_CHUNKS, 256, 2, 64, g)
    ring = torch.randint(0, 256, (8, 128, codec.width), generator=g, dtype=torch.uint8)
    values = scaled_normal((layout.num_tokens, sum(geometry)), g).to(dtype)
    values[0, :64] = 0.0                             # an all-zero block: the amax floor
    values[1, 5] = 1e6                               # saturation
    ref = ring.clone()
    cache_ops.window_append(ref, codec, values, layout)
    got = ring.to(DEV)
    cuda_ops.window_append(got, codec, values.to(DEV), layout_to(layout, DEV))
    assert torch.equal(got.cpu(), ref)


@pytest.mark.parametrize("geometry", [(448, 64), (64, 64)], ids=["v4-584B", "tiny-200B"])
def test_window_gather_equals_the_reference(geometry):
    g = torch.Generator().manual_seed(4)
    codec = MainFp8Codec(*geometry)
    ring = codec.encode(scaled_normal((8 * 128, sum(geometry)), g).bfloat16()).view(8, 128, codec.width)
    layout = make_layout(WINDOW_CHUNKS, 256, 2, 64, g)
    chunk = quant.fake_quant_kv(scaled_normal((layout.num_tokens, sum(geometry)), g).bfloat16(), geometry[1])
    ref_keys, ref_valid = cache_ops.window_gather(ring, codec, chunk, layout)
    keys, valid = cuda_ops.window_gather(ring.to(DEV), codec, chunk.to(DEV), layout_to(layout, DEV))
    assert torch.equal(valid.cpu(), ref_valid)
    assert torch.equal(keys.cpu().view(torch.int16), ref_keys.view(torch.int16))


# ---------------------------------------------------------------------------------------------- flush
# Steps of (slot, length) per sequence; starts follow from the previous steps. Decode tokens, prefill chunks of
# every residue, a long chunk, sequences joining late.
FLUSH_STEPS = [
    [(0, 1), (1, 3), (2, 5), (3, 300)],
    [(0, 1), (1, 1), (2, 2), (3, 1), (4, 7)],
    [(0, 6), (1, 1), (2, 1), (3, 1), (4, 1), (5, 130)],
    [(0, 1), (1, 129), (2, 1), (3, 4), (4, 1), (5, 1)],
    [(0, 1), (1, 1), (2, 256), (3, 1), (4, 1), (5, 1)],
]


@pytest.mark.parametrize("case", list(FLUSH_CASES))
def test_compress_flush_bytes_and_state_equal_the_reference(case):
    ratio, d, rotate, codec = FLUSH_CASES[case]
    coff = 2 if ratio == 4 else 1
    g = torch.Generator().manual_seed(5)
    num_slots, block_size, max_blocks, num_blocks = 6, 256, 4, 32
    state_kv = torch.zeros(num_slots, coff * ratio, coff * d)
    state_score = torch.full_like(state_kv, float("-inf"))
    pool = torch.zeros(num_blocks, block_size // ratio, codec.width, dtype=torch.uint8)
    norm_weight = (1 + 0.3 * torch.randn(d, generator=g)).bfloat16()
    ape = torch.randn(ratio, coff * d, generator=g)
    gpu = [t.to(DEV) for t in (state_kv, state_score, pool)]
    fed = [0] * num_slots
    table = torch.randperm(num_blocks, generator=g)[:num_slots * max_blocks].view(num_slots, max_blocks)
    for step in FLUSH_STEPS:
        chunks = [(slot, fed[slot], n) for slot, n in step]
        layout = make_layout(chunks, block_size, max_blocks, num_blocks, g)
        layout = type(layout)(*[getattr(layout, f) for f in ("positions", "token_seq", "seq_slot", "seq_start",
                                                             "seq_len", "seq_first_row")],
                              table[[c[0] for c in chunks]].clone(), block_size, layout.spans)
        a = scaled_normal((layout.num_tokens, coff * d), g, spread=3)
        z = 2 * torch.randn(layout.num_tokens, coff * d, generator=g) + ape[layout.positions % ratio]
        cache_ops.compress_flush(a, z, state_kv, state_score, layout, ratio, norm_weight, 1e-6, yarn_freq(), rotate,
                                 pool, codec, torch.bfloat16)
        cuda_ops.compress_flush(a.to(DEV), z.to(DEV), gpu[0], gpu[1], layout_to(layout, DEV), ratio,
                                norm_weight.to(DEV), 1e-6, yarn_freq().to(DEV), rotate, gpu[2], codec, torch.bfloat16)
        for slot, n in step:
            fed[slot] += n
        assert torch.equal(gpu[2].cpu(), pool), f"pool bytes differ after step {step}"
        assert torch.equal(gpu[0].cpu(), state_kv) and torch.equal(gpu[1].cpu(), state_score), "state differs"
    assert pool.any()   # entries were written


def test_compress_flush_skips_entries_without_a_block():
    ratio, d, rotate, codec = FLUSH_CASES["csa-main-512"]
    g = torch.Generator().manual_seed(6)
    layout = make_layout([(0, 0, 8)], 256, 1, 4, g)
    table = torch.full_like(layout.block_table, -1)
    layout = type(layout)(layout.positions, layout.token_seq, layout.seq_slot, layout.seq_start, layout.seq_len,
                          layout.seq_first_row, table, 256, layout.spans)
    state = torch.zeros(1, 8, 1024, device=DEV)
    score = torch.full_like(state, float("-inf"))
    pool = torch.zeros(4, 64, codec.width, dtype=torch.uint8, device=DEV)
    args = (torch.randn(8, 1024, device=DEV), torch.randn(8, 1024, device=DEV), state, score,
            layout_to(layout, DEV), ratio, torch.ones(d, device=DEV), 1e-6, yarn_freq().to(DEV), rotate, pool, codec,
            torch.bfloat16)
    with pytest.raises(ValueError, match="misses a block"):
        cuda_ops.compress_flush(*args, validate=True)
    cuda_ops.compress_flush(*args, validate=False)
    assert not pool.any() and torch.isfinite(score[0, :4]).all()   # nothing stored; the state still advanced


# ---------------------------------------------------------------------------------------------- indexer
def indexer_inputs(chunks, heads, num_blocks, max_blocks, g, duplicate_every=0, zero_weights=False):
    """q [T, H, 128], weights [T, H], pool [num_blocks, 64, 68], layout; zero_weights: every score 0 (one tie)."""
    layout = make_layout(chunks, 256, max_blocks, num_blocks, g)
    pool = mxfp4_key_pool(num_blocks, 64, g, duplicate_every=duplicate_every)
    q = mxfp4_queries(layout.num_tokens, heads, g)
    weights = (torch.randn(layout.num_tokens, heads, generator=g) * heads ** -0.5).bfloat16()
    if zero_weights:
        weights.zero_()
    return q, weights, pool, layout


def indexer_case(chunks, heads, topk, num_blocks, max_blocks, seed, duplicate_every=0, tweak=None,
                 zero_weights=False):
    g = torch.Generator().manual_seed(seed)
    q, weights, pool, layout = indexer_inputs(chunks, heads, num_blocks, max_blocks, g, duplicate_every, zero_weights)
    if tweak:
        q, pool = tweak(q, pool, g)
    codec = IndexFp4Codec(128)
    ref = cache_ops.indexer_topk(q, weights, pool, codec, layout, 4, topk, torch.bfloat16)
    got = cuda_ops.indexer_topk(q.to(DEV), weights.to(DEV), pool.to(DEV), codec, layout_to(layout, DEV), 4, topk,
                                torch.bfloat16)
    return got.cpu(), ref


INDEXER_CASES = {**COMMON_INDEXER_CASES,   # and this test's own
    "b1-heads32-top1024": ([(0, 40000, 1)], 32, 1024, 160, 157),
    "b64-decode": ([(s, 500 * s + 7, 1) for s in range(64)], 64, 512, 64 * 126, 126),
}


@pytest.mark.parametrize("case", list(INDEXER_CASES))
def test_indexer_topk_selects_exactly_what_the_reference_does(case):
    chunks, heads, topk, num_blocks, max_blocks = INDEXER_CASES[case]
    got, ref = indexer_case(chunks, heads, topk, num_blocks, max_blocks, seed=7)
    assert torch.equal(got, ref)


def test_indexer_ties_go_to_the_lower_entry():
    got, ref = indexer_case([(0, 1200, 3)], 64, 64, 8, 5, seed=8, duplicate_every=3)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dup", [2, 3])
def test_indexer_ties_over_a_long_row_go_to_the_lower_entry(dup):
    got, ref = indexer_case([(0, 20000, 3)], 64, 512, 80, 80, seed=22, duplicate_every=dup)
    assert torch.equal(got, ref)


def test_indexer_all_scores_equal():
    """One tie over every entry: the k lowest entries, in order."""
    got, ref = indexer_case([(0, 30000, 2), (1, 1500, 1)], 64, 512, 240, 118, seed=23, zero_weights=True)
    assert torch.equal(got, ref)
    assert torch.equal(got[0], torch.arange(512))


def test_indexer_cuda_graph_capture_and_replay():
    chunks, heads, topk, num_blocks, max_blocks = INDEXER_CASES["b3-mixed"]
    g = torch.Generator().manual_seed(25)
    q, weights, pool, layout = indexer_inputs(chunks, heads, num_blocks, max_blocks, g)
    sq, sw, sp = q.to(DEV), weights.to(DEV), pool.to(DEV)
    codec = IndexFp4Codec(128)
    args = (codec, layout_to(layout, DEV), 4, topk, torch.bfloat16)
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
        ref = cache_ops.indexer_topk(q_new, w_new, pool, codec, layout, 4, topk, torch.bfloat16)
        assert torch.equal(out.cpu(), ref), f"replay {replay}"


def test_indexer_fallbacks_wide_keys_and_off_grid_queries_stay_exact():
    def widen(q, pool, g):
        flat = pool.view(-1, 68).clone()
        flat[::5, 64] = (flat[::5, 64].int() + 9).clamp(max=250).to(torch.uint8)   # one block 2^9 larger
        q = q.clone()
        q[1] = (torch.randn(q.shape[1:], generator=g) * 3).bfloat16()             # not on the MXFP4 grid
        q[2, 5, :32] *= 64                                                          # a head 64x wide
        return q, flat.view_as(pool)

    got, ref = indexer_case([(0, 700, 4)], 64, 128, 4, 3, seed=9, tweak=widen)
    assert torch.equal(got, ref)


def test_indexer_v4_pro_largest_shape():
    """1M context: 256K entries per sequence, top-1024, 64 heads."""
    got, ref = indexer_case([(0, (1 << 20) - 2, 2)], 64, 1024, 4096, 4096, seed=10)
    assert torch.equal(got, ref)


def test_indexer_edge_cases_fewer_entries_than_k_and_missing_blocks():
    got, ref = indexer_case([(0, 0, 3), (1, 5, 2), (2, 30, 1)], 64, 512, 4, 1, seed=11)   # 0..7 visible
    assert torch.equal(got, ref) and (got[:3] == -1).all()
    g = torch.Generator().manual_seed(12)
    layout = make_layout([(0, 600, 1)], 256, 3, 8, g)
    layout.block_table[0, 1] = -1                                         # entries 64..127 have no block
    pool = mxfp4_key_pool(8, 64, g)
    q, w = mxfp4_queries(1, 64, g), torch.ones(1, 64).bfloat16()
    args = (q.to(DEV), w.to(DEV), pool.to(DEV), IndexFp4Codec(128), layout_to(layout, DEV), 4, 512, torch.bfloat16)
    with pytest.raises(ValueError, match="misses a block"):
        cuda_ops.indexer_topk(*args, validate=True)
    got = cuda_ops.indexer_topk(*args, validate=False).cpu()[0]
    chosen = got[got >= 0]
    assert chosen.numel() == 150 - 64 and not ((chosen >= 64) & (chosen < 128)).any()


# ---------------------------------------------------------------------------------------------- gather
@pytest.mark.parametrize("geometry", [(448, 64), (64, 64)], ids=["v4-584B", "tiny-200B"])
def test_gather_entries_equals_the_reference(geometry):
    g = torch.Generator().manual_seed(13)
    codec = MainFp8Codec(*geometry)
    num_blocks, ratio = 16, 4
    pool = codec.encode(scaled_normal((num_blocks * 64, sum(geometry)), g).bfloat16()).view(num_blocks, 64, -1)
    layout = make_layout([(0, 700, 3), (1, 20, 1)], 256, 3, num_blocks, g)
    entries = torch.randint(-1, 175, (4, 96), generator=g)
    entries[3] = torch.where(entries[3] > 5, -1, entries[3])   # the second sequence has 5 entries
    ref_tile, ref_valid = cache_ops.gather_entries(pool, codec, layout, entries, ratio)
    tile, valid = cuda_ops.gather_entries(pool.to(DEV), codec, layout_to(layout, DEV), entries.to(DEV), ratio)
    assert torch.equal(valid.cpu(), ref_valid)
    assert torch.equal(tile.cpu().view(torch.int16), ref_tile.view(torch.int16))
    empty = layout_to(make_layout([], 256, 1, num_blocks, g), DEV)
    empty_tile, empty_valid = cuda_ops.gather_entries(pool.to(DEV), codec, empty,
                                                      torch.zeros(0, 96, dtype=torch.long, device=DEV), ratio)
    assert empty_tile.shape == (0, 96, sum(geometry)) and empty_valid.shape == (0, 96)


# ---------------------------------------------------------------------------------------------- graphs
def test_kernels_replay_inside_a_cuda_graph():
    """Capture every kernel once (checks switch off by themselves while capturing) and replay with new data."""
    g = torch.Generator().manual_seed(14)
    x, w, bias, tid2eid, tokens = (t.to(DEV) for t in router_inputs(8, 4096, 256, 6, 129280))
    codec, icodec = MainFp8Codec(448, 64), IndexFp4Codec(128)
    layout = layout_to(make_layout([(s, 100 + 37 * s, 1) for s in range(8)], 256, 4, 64, g), DEV)
    ring = torch.zeros(8, 128, 584, dtype=torch.uint8, device=DEV)
    kv = quant.fake_quant_kv(torch.randn(8, 512, generator=g).bfloat16(), 64).to(DEV)
    pool = torch.zeros(64, 64, 584, dtype=torch.uint8, device=DEV)
    ipool = mxfp4_key_pool(64, 64, g).to(DEV)
    q, qw = mxfp4_queries(8, 64, g).to(DEV), torch.randn(8, 64, generator=g).bfloat16().to(DEV)
    state, score = torch.zeros(8, 8, 1024, device=DEV), torch.zeros(8, 8, 1024, device=DEV)
    a, z = torch.randn(8, 1024, device=DEV), torch.randn(8, 1024, device=DEV)
    nw, freq = torch.ones(512, device=DEV), yarn_freq().to(DEV)

    rws = cuda_ops.router_workspace(DEV)   # self-cleaning, reused

    def step():
        outs = [*cuda_ops.dense_route(x, w, bias, 6, 1.5, rws), *cuda_ops.hash_route(x, w, tid2eid, tokens, 1.5)]
        outs += [*cuda_ops.window_gather(ring, codec, kv, layout)]
        cuda_ops.window_append(ring, codec, kv, layout)
        cuda_ops.compress_flush(a, z, state, score, layout, 4, nw, 1e-6, freq, False, pool, codec, torch.bfloat16)
        chosen = cuda_ops.indexer_topk(q, qw, ipool, icodec, layout, 4, 512, torch.bfloat16)
        outs += [chosen, *cuda_ops.gather_entries(pool, codec, layout, chosen, 4)]
        return outs

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                   # warm-up (builds, first-use setup) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(torch.randn(x.shape, generator=g).to(DEV))
    q.copy_(mxfp4_queries(8, 64, g).to(DEV))
    saved = [t.clone() for t in (ring, state, score, pool)]
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.clone() for t in captured]
    after = [t.clone() for t in (ring, state, score, pool)]
    for t, s in zip((ring, state, score, pool), saved, strict=True):
        t.copy_(s)
    eager = step()
    for r, e in zip(replayed, eager, strict=True):
        assert torch.equal(r, e)
    for t, s in zip((ring, state, score, pool), after, strict=True):
        assert torch.equal(t, s)
    assert not rws.any()   # the decode router leaves its ticket at zero

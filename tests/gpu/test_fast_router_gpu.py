"""Fast router Triton kernels (`dsv4.kernels.fast.router` on CUDA tensors) against the float64 reference.

Selections: compared as sets per token, a swap allowed only between experts whose reference biased scores are
within 1e-5 (relative) of the k-th largest (fp32 tensor-core logits vs float64). Weights of the tokens whose sets
agree: max relative error <= 5e-5 (printed). Hash routing: ids exactly tid2eid[token]; bad token ids and table
entries give id -1 / weight 0 without any out-of-bounds read. Shapes: tiny, V4-Flash (E = 256, D = 4096) at
decode and prefill, V4-Pro (E = 384, D = 7168); both the fused small-T path and the cuBLAS path; one CUDA-graph
capture + replay of each router.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels import routing
from dsv4.kernels.fast import router
from dsv4.kernels.ref_math import sqrt_softplus

pytestmark = pytest.mark.gpu
DEV = "cuda"
SHAPES = [   # (T, D, E, k, V)
    (7, 128, 16, 6, 1024),         # tiny preset
    (1, 4096, 256, 6, 129280),     # V4-Flash decode
    (16, 4096, 256, 6, 129280),
    (64, 4096, 256, 6, 129280),
    (65, 4096, 256, 6, 129280),    # first cuBLAS dense / still gathered hash
    (300, 4096, 256, 6, 129280),   # cuBLAS for both
    (4096, 4096, 256, 6, 129280),  # V4-Flash prefill chunk
    (1, 7168, 384, 6, 129280),     # V4-Pro
    (64, 7168, 384, 6, 129280),
]


def gate(t, d, e, k, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d, generator=g).bfloat16()
    w = (torch.randn(e, d, generator=g) * d ** -0.5 * 4).bfloat16()
    bias = torch.randn(e, generator=g) * 0.1
    tid2eid = torch.randint(0, e, (v, k), generator=g)
    tokens = torch.randint(0, v, (t,), generator=g)
    return x, w, bias, tid2eid, tokens


def to_dev(*tensors):
    return tuple(t.to(DEV) for t in tensors)


def check_dense(got, x, w, bias, k, scale, near=1e-5) -> None:
    weights, ids = (t.cpu() for t in got)
    want_w, want_ids = routing.dense_route(x, w, bias, k, scale)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == want_ids.shape
    keys = sqrt_softplus((x.double() @ w.double().T).float()).double() + bias.double()
    kth = keys.sort(dim=-1, descending=True).values[:, k - 1:k]
    mismatch = ids.sort(-1).values != want_ids.sort(-1).values
    for t in mismatch.any(-1).nonzero().flatten().tolist():
        for e in set(ids[t].tolist()) ^ set(want_ids[t].tolist()):
            assert abs(float(keys[t, e] - kth[t])) <= near * abs(float(kth[t])), f"token {t}: expert {e} swapped"
    same = ~mismatch.any(-1)
    print(f"dense: {int((~same).sum())} of {len(same)} tokens chose a near-tied expert differently")
    assert float(same.float().mean()) >= 0.99 or len(same) < 100
    mine = weights[same].gather(1, ids[same].argsort(-1))
    want = want_w[same].gather(1, want_ids[same].argsort(-1))
    err = float(((mine - want).abs() / want).max()) if len(mine) else 0.0
    print(f"dense weights max rel err {err:.2e}")
    assert err <= 5e-5      # libdevice exp/log and approximate division on the GPU: 3.7e-5 seen


def check_hash(got, x, w, tid2eid, tokens, scale) -> None:
    weights, ids = (t.cpu() for t in got)
    want_w, want_ids = routing.hash_route(x, w, tid2eid, tokens, scale)
    assert torch.equal(ids, want_ids)
    err = float(((weights - want_w).abs() / want_w).max()) if len(want_w) else 0.0
    print(f"hash weights max rel err {err:.2e}")
    assert err <= 5e-5      # libdevice exp/log and approximate division on the GPU: 3.7e-5 seen


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dense_route_matches_reference(shape):
    t, d, e, k, v = shape
    x, w, bias, _, _ = gate(t, d, e, k, v)
    check_dense(router.dense_route(*to_dev(x, w, bias), k, 1.5), x, w, bias, k, 1.5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_hash_route_matches_reference(shape):
    t, d, e, k, v = shape
    x, w, _, tid2eid, tokens = gate(t, d, e, k, v, seed=1)
    check_hash(router.hash_route(*to_dev(x, w, tid2eid, tokens), 2.5), x, w, tid2eid, tokens, 2.5)


def test_dense_ties_go_to_the_lower_id_and_bias_selects_only():
    _, w, _, _, _ = gate(1, 4096, 256, 6, 10)
    for t in (3, 100):   # fused and cuBLAS paths
        weights, ids = router.dense_route(torch.zeros(t, 4096, device=DEV).bfloat16(), w.to(DEV),
                                          torch.zeros(256, device=DEV), 6, 1.0)
        assert ids.tolist() == [[0, 1, 2, 3, 4, 5]] * t
        assert torch.allclose(weights.cpu(), torch.full((t, 6), 1 / 6))
    x, w, bias, _, _ = gate(8, 4096, 256, 6, 10, seed=2)
    bias[200] = 100.0
    weights, ids = router.dense_route(*to_dev(x, w, bias), 6, 1.5)
    assert (ids.cpu() == 200).any(-1).all()
    check_dense((weights, ids), x, w, bias, 6, 1.5)


@pytest.mark.parametrize("num_tokens", [4, 300])
def test_hash_bad_ids_are_masked(num_tokens):
    x, w, _, tid2eid, tokens = gate(num_tokens, 4096, 256, 6, 129280, seed=3)
    tokens = tokens % 129278                           # tokens 129278 and 129279 only in rows 2 and 3
    tokens[0], tokens[1], tokens[2], tokens[3] = -1, 129280, 129278, 129279   # two outside the vocabulary
    tid2eid[129278, 1], tid2eid[129279, 4] = 256, -7                          # two entries outside [0, E)
    weights, ids = (t.cpu() for t in router.hash_route(*to_dev(x, w, tid2eid, tokens), 1.5))
    assert (ids[:2] == -1).all() and (weights[:2] == 0).all()
    assert ids[2, 1] == -1 and weights[2, 1] == 0 and ids[3, 4] == -1 and weights[3, 4] == 0
    assert torch.allclose(weights[2:4].sum(-1), torch.full((2,), 1.5))
    check_hash((weights[4:], ids[4:]), x[4:], w, tid2eid, tokens[4:], 1.5)


def test_cuda_graph_capture_and_replay():
    x, w, bias, tid2eid, tokens = to_dev(*gate(8, 4096, 256, 6, 129280, seed=4))
    router.dense_route(x, w, bias, 6, 1.5)          # warm-up: compiles outside the capture
    router.hash_route(x, w, tid2eid, tokens, 1.5)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dense = router.dense_route(x, w, bias, 6, 1.5)
        hashed = router.hash_route(x, w, tid2eid, tokens, 1.5)
    g = torch.Generator().manual_seed(5)
    for replay in range(3):
        x.copy_(torch.randn(8, 4096, generator=g).bfloat16())
        tokens.copy_(torch.randint(0, 129280, (8,), generator=g))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(dense + hashed, router.dense_route(x, w, bias, 6, 1.5)
                             + router.hash_route(x, w, tid2eid, tokens, 1.5), strict=True):
            assert torch.equal(got, want), replay

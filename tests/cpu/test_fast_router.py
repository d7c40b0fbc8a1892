"""Fast routers (`dsv4.kernels.fast.router`) against the float64 reference (`dsv4.kernels.routing`).

Selections are compared as sets per token, allowing a swap only between experts whose reference biased scores
are within 1e-5 (relative) of the k-th largest: the fast logits carry fp32 accumulation error (~1e-6). Weights of
the tokens whose sets agree: max relative error <= 2e-6 (observed ~5e-7 for the twin and the Triton kernels).
Hash routing: ids exactly tid2eid[token]; bad token ids / table entries give id -1 and weight 0.

The Triton kernels run under Triton's interpreter at the tiny preset (D = 128, E = 16, k = 6), plus a Pro-like
expert count that is not a power of two, and the large-T (full GEMM + epilogue) paths with lowered thresholds.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv4.kernels import routing
from dsv4.kernels.fast import router
from dsv4.kernels.ref_math import sqrt_softplus

TOPK, SCALE = 6, 1.5


@pytest.fixture(scope="module")
def router_triton():
    pytest.importorskip("triton")
    from dsv4.kernels.fast import _router_triton

    return _router_triton


def gate(num_tokens: int, num_experts: int, dim: int, seed: int, vocab: int = 50):
    """x, gate weight (logits O(1)), bias, tid2eid (distinct experts per token) and token ids."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, dim, generator=g).bfloat16()
    w = (torch.randn(num_experts, dim, generator=g) / math.sqrt(dim)).bfloat16()
    bias = torch.randn(num_experts, generator=g) * 0.1
    tid2eid = torch.rand(vocab, num_experts, generator=g).argsort(dim=1)[:, :TOPK]
    tokens = torch.randint(0, vocab, (num_tokens,), generator=g)
    return x, w, bias, tid2eid, tokens


def check_dense(got, x, w, bias, topk=TOPK, scale=SCALE, near=1e-5) -> None:
    weights, ids = got
    want_w, want_ids = routing.dense_route(x, w, bias, topk, scale)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == want_ids.shape
    keys = sqrt_softplus((x.double() @ w.double().T).float()).double() + bias.double()     # reference keys
    kth = keys.sort(dim=-1, descending=True).values[:, topk - 1:topk]
    for t in range(x.shape[0]):
        mine, theirs = set(ids[t].tolist()), set(want_ids[t].tolist())
        for e in mine ^ theirs:
            assert abs(float(keys[t, e] - kth[t])) <= near * abs(float(kth[t])), f"token {t}: expert {e} swapped"
    same = (ids.sort(-1).values == want_ids.sort(-1).values).all(-1)
    assert float(same.float().mean()) >= 0.9
    mine_w = weights[same].gather(1, ids[same].argsort(-1))
    want = want_w[same].gather(1, want_ids[same].argsort(-1))
    assert float(((mine_w - want).abs() / want).max()) <= 2e-6


def check_hash(got, x, w, tid2eid, tokens) -> None:
    weights, ids = got
    want_w, want_ids = routing.hash_route(x, w, tid2eid, tokens, SCALE)
    assert torch.equal(ids, want_ids)
    assert float(((weights - want_w).abs() / want_w).max()) <= 2e-6


def bad_ids_case():
    x, w, _, tid2eid, _ = gate(4, 16, 128, seed=9)
    tid2eid = tid2eid.clone()
    tid2eid[3, 2], tid2eid[4, 0] = 16, -5
    return x, w, tid2eid, torch.tensor([-1, 50, 3, 4])


def check_bad_ids(weights, ids, x, w, tid2eid) -> None:
    assert (ids[:2] == -1).all() and (weights[:2] == 0).all()             # token ids outside [0, 50)
    assert ids[2, 2] == -1 and weights[2, 2] == 0 and ids[3, 0] == -1 and weights[3, 0] == 0
    assert torch.allclose(weights[2:].sum(-1), torch.full((2,), SCALE))    # renormalised over the valid slots
    good = [s for s in range(TOPK) if s != 2]
    scores = sqrt_softplus((x[2:3].double() @ w.double()[tid2eid[3, good]].T).float())[0]
    assert torch.allclose(weights[2, good], SCALE * scores / scores.sum(), rtol=2e-6)


# ---------------------------------------------------------------------------------------------- twins
@pytest.mark.parametrize("num_tokens, num_experts, dim", [(7, 16, 128), (64, 256, 4096), (9, 384, 1024)])
def test_twin_dense(num_tokens, num_experts, dim):
    x, w, bias, _, _ = gate(num_tokens, num_experts, dim, seed=num_experts)
    check_dense(router.dense_route(x, w, bias, TOPK, SCALE), x, w, bias)


def test_twin_dense_ties_go_to_the_lower_expert_and_bias_only_selects():
    _, w, _, _, _ = gate(1, 16, 128, seed=1)
    weights, ids = router.dense_route(torch.zeros(2, 128).bfloat16(), w, torch.zeros(16), TOPK, 1.0)
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5]] * 2 and torch.allclose(weights, torch.full((2, 6), 1 / 6))
    bias = torch.zeros(16)
    bias[15] = 100.0
    x, w, _, _, _ = gate(5, 16, 128, seed=2)
    check_dense(router.dense_route(x, w, bias, TOPK, 2.5), x, w, bias, scale=2.5)


@pytest.mark.parametrize("num_tokens, num_experts, dim", [(7, 16, 128), (64, 256, 4096)])
def test_twin_hash(num_tokens, num_experts, dim):
    x, w, _, tid2eid, tokens = gate(num_tokens, num_experts, dim, seed=num_tokens)
    check_hash(router.hash_route(x, w, tid2eid, tokens, SCALE), x, w, tid2eid, tokens)


def test_twin_hash_bad_ids_are_masked_not_raised():
    x, w, tid2eid, tokens = bad_ids_case()
    check_bad_ids(*router.hash_route(x, w, tid2eid, tokens, SCALE), x, w, tid2eid)


# ---------------------------------------------------------------------------------------------- Triton
@pytest.mark.triton
@pytest.mark.parametrize("num_tokens, num_experts, dim", [(1, 16, 128), (5, 16, 128), (20, 24, 256)])
def test_triton_dense(router_triton, num_tokens, num_experts, dim):
    x, w, bias, _, _ = gate(num_tokens, num_experts, dim, seed=num_tokens)
    check_dense(router_triton.dense_route(x, w, bias, TOPK, SCALE), x, w, bias)


@pytest.mark.triton
def test_triton_dense_full_gemm_path_and_ties(router_triton):
    x, w, bias, _, _ = gate(6, 16, 128, seed=3)
    check_dense(router_triton.dense_route(x, w, bias, TOPK, SCALE, max_fused_tokens=2), x, w, bias)
    weights, ids = router_triton.dense_route(torch.zeros(2, 128).bfloat16(), w, torch.zeros(16), TOPK, 1.0)
    assert ids.tolist() == [[0, 1, 2, 3, 4, 5]] * 2 and torch.allclose(weights, torch.full((2, 6), 1 / 6))


@pytest.mark.triton
@pytest.mark.parametrize("max_gather_tokens", [256, 2])
def test_triton_hash(router_triton, max_gather_tokens):
    x, w, _, tid2eid, tokens = gate(5, 16, 128, seed=4)
    check_hash(router_triton.hash_route(x, w, tid2eid, tokens, SCALE, max_gather_tokens=max_gather_tokens),
               x, w, tid2eid, tokens)


@pytest.mark.triton
@pytest.mark.parametrize("max_gather_tokens", [256, 2])
def test_triton_hash_bad_ids(router_triton, max_gather_tokens):
    x, w, tid2eid, tokens = bad_ids_case()
    got = router_triton.hash_route(x, w, tid2eid, tokens, SCALE, max_gather_tokens=max_gather_tokens)
    check_bad_ids(*got, x, w, tid2eid)


@pytest.mark.triton
def test_triton_empty_batch(router_triton):
    x, w, bias, tid2eid, _ = gate(0, 16, 128, seed=5)
    assert router_triton.dense_route(x, w, bias, TOPK, SCALE)[1].shape == (0, TOPK)
    assert router_triton.hash_route(x, w, tid2eid, torch.zeros(0, dtype=torch.int64), SCALE)[0].shape == (0, TOPK)

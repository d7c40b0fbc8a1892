"""Reference routers: hash routing computes just the chosen experts' scores, dense routing's bias selects only,
ties go to the lower expert id, and bad ids are errors, never a default expert."""

import pytest
import torch

from dsv4.kernels import routing
from dsv4.kernels.ref_math import sqrt_softplus


def setup(num_experts=16, dim=32, vocab=50, k=6):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, dim, generator=g)
    w = torch.randn(num_experts, dim, generator=g).bfloat16()
    tid2eid = torch.rand(vocab, num_experts, generator=g).argsort(dim=1)[:, :k]
    return x, w, tid2eid


def test_hash_weights_are_the_chosen_experts_renormalised_scores():
    x, w, tid2eid = setup()
    tokens = torch.tensor([0, 3, 49, 3, 7, 8, 9])
    weights, ids = routing.hash_route(x, w, tid2eid, tokens, 1.5)
    assert torch.equal(ids, tid2eid[tokens])
    full = sqrt_softplus((x.double() @ w.double().T).float())          # every expert's score
    chosen = full.gather(1, ids)
    assert torch.allclose(weights, 1.5 * chosen / chosen.sum(-1, keepdim=True), atol=1e-6)


def test_dense_bias_selects_but_does_not_weigh_and_ties_go_low():
    x, w, _ = setup()
    bias = torch.zeros(16)
    bias[15] = 100.0                                                  # always selected ...
    weights, ids = routing.dense_route(x, w, bias, 6, 2.5)
    assert (ids == 15).any(dim=1).all()
    scores = sqrt_softplus((x.double() @ w.double().T).float())
    assert torch.allclose(weights, 2.5 * scores.gather(1, ids) / scores.gather(1, ids).sum(-1, keepdim=True))
    flat = routing.dense_route(torch.zeros(1, 32), w, torch.zeros(16), 6, 1.0)[1]   # all scores equal
    assert flat.tolist() == [[0, 1, 2, 3, 4, 5]]


def test_bad_ids_are_errors():
    x, w, tid2eid = setup()
    with pytest.raises(ValueError, match="token id 50 is outside the vocabulary"):
        routing.hash_route(x[:1], w, tid2eid, torch.tensor([50]), 1.5)
    tid2eid[3, 2] = 16
    with pytest.raises(ValueError, match="expert id 16 outside"):
        routing.hash_route(x[:1], w, tid2eid, torch.tensor([3]), 1.5)

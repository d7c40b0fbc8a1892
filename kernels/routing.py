"""Reference MoE routers (spec §5.1): sqrt-softplus scores in fp32, hash routing through `tid2eid`, score routing
with a selection-only bias; weights renormalised over the chosen experts and scaled.

Both routers return (weights [T, k] fp32, expert ids [T, k] int64). Ties in score routing go to the lower expert
id. Invalid inputs raise ValueError naming the value (a token id outside the vocabulary, an expert id outside
[0, E) in the hash table); they are never mapped to a default expert.
"""

from __future__ import annotations

import torch

from dsv4.kernels.ref_math import sqrt_softplus


def _normalize(chosen_scores: torch.Tensor, route_scale: float) -> torch.Tensor:
    total = chosen_scores.double().sum(dim=-1, keepdim=True)
    return (chosen_scores.double() / total).float() * route_scale


def hash_route(x: torch.Tensor, gate_weight: torch.Tensor, tid2eid: torch.Tensor, token_ids: torch.Tensor,
               route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts from tid2eid[token]; weights from the sqrt-softplus scores of just those experts (only k dot
    products per token are needed). x [T, D], gate_weight [E, D], tid2eid [V, k]."""
    vocab, num_experts = tid2eid.shape[0], gate_weight.shape[0]
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab):
        bad = token_ids[(token_ids < 0) | (token_ids >= vocab)][0].item()
        raise ValueError(f"hash router: token id {bad} is outside the vocabulary [0, {vocab})")
    ids = tid2eid[token_ids].long()
    bad_ids = ids[(ids < 0) | (ids >= num_experts)]
    if bad_ids.numel():
        raise ValueError(f"hash router: tid2eid holds expert id {bad_ids[0].item()} outside [0, {num_experts})")
    logits = torch.einsum("td,tkd->tk", x.double(), gate_weight.double()[ids]).float()   # fp32, wide accumulation
    return _normalize(sqrt_softplus(logits), route_scale), ids


def dense_route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, topk: int, route_scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of (score + bias) over all experts; weights from the unbiased scores."""
    scores = sqrt_softplus(torch.matmul(x.double(), gate_weight.double().T).float())
    ids = torch.sort(scores + bias.float(), dim=-1, descending=True, stable=True).indices[:, :topk]
    return _normalize(scores.gather(1, ids), route_scale), ids

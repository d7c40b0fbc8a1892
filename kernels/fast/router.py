"""Fast MoE routers (spec §5.1): the same function as `dsv4.kernels.routing`, in fp32 without float64.

- logits = x . W^T with bf16 x and W: every product is exact in fp32, accumulation is fp32 (tensor cores on the
  GPU), not the reference's float64, so logits differ by fp32 accumulation error (~1e-6 relative).
- scores = sqrt(softplus(logits)) in fp32 (torch's softplus: beta 1, threshold 20).
- dense: the top-k of score + bias (fp32 add; ties to the lower expert id); hash: ids = tid2eid[token].
- weights = route_scale * s_e / sum of the chosen s (unbiased scores), fp32.

Near-ties of the biased scores can therefore pick a different expert than the reference (a swap between experts
whose keys are within ~1e-6 of each other); weights agree to ~1e-6 relative.

No host-side validation (the API rejects bad token ids before the engine, and checks would sync): in hash
routing a token id outside [0, V) gives ids -1 and weights 0 for its whole row, a tid2eid entry outside [0, E)
gives id -1 and weight 0 for that slot (the row's other weights are renormalised over its valid slots); nothing
is read out of bounds. CUDA tensors run `_router_triton`; CPU tensors the PyTorch twins below (same rules).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------- twins
def _sqrt_softplus(logits: torch.Tensor) -> torch.Tensor:
    return F.softplus(logits.float()).sqrt()


def _weights(chosen: torch.Tensor, valid: torch.Tensor, route_scale: float) -> torch.Tensor:
    """route_scale * s / sum(s) over the valid slots of each row; 0 for invalid slots."""
    chosen = torch.where(valid, chosen, 0.0)
    total = chosen.sum(dim=-1, keepdim=True)
    return torch.where(valid & (total > 0), chosen / total * route_scale, 0.0)


def _dense_twin(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, topk: int, route_scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    scores = _sqrt_softplus(x.float() @ weight.float().t())                               # [T, E]
    ids = torch.sort(scores + bias.float(), dim=-1, descending=True, stable=True).indices[:, :topk]
    return _weights(scores.gather(1, ids), torch.ones_like(ids, dtype=torch.bool), route_scale), ids


def _hash_twin(x: torch.Tensor, weight: torch.Tensor, tid2eid: torch.Tensor, token_ids: torch.Tensor,
               route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    vocab, num_experts = tid2eid.shape[0], weight.shape[0]
    token_ok = (token_ids >= 0) & (token_ids < vocab)
    ids = tid2eid[torch.where(token_ok, token_ids, 0)].long()                              # [T, k]
    valid = token_ok[:, None] & (ids >= 0) & (ids < num_experts)
    logits = (x.float() @ weight.float().t()).gather(1, torch.where(valid, ids, 0))       # [T, k]
    return _weights(_sqrt_softplus(logits), valid, route_scale), torch.where(valid, ids, -1)


# ---------------------------------------------------------------------------------------------- public API
def dense_route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, topk: int, route_scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score routing: top-k experts of sqrt(softplus(x . W^T)) + bias, weights from the unbiased scores.

    x: [T, D] bf16 (the ffn_norm output); gate_weight: [E, D] bf16 (`ffn.gate.weight`); bias: [E] fp32
    (`ffn.gate.bias`, selection only). Returns (weights [T, k] fp32, ids [T, k] int64), slot order = descending
    biased score. GPU: T <= 64: a split-K tensor-core GEMM writing fp32 partial logits + one program per token for
    the epilogue (2 launches); larger T: cuBLAS fp32-output GEMM + the same epilogue. E <= 1024 or so (one
    program holds a token's E scores).
    """
    if x.is_cuda:
        from dsv4.kernels.fast import _router_triton

        return _router_triton.dense_route(x, gate_weight, bias, topk, route_scale)
    return _dense_twin(x, gate_weight, bias, topk, route_scale)


def hash_route(x: torch.Tensor, gate_weight: torch.Tensor, tid2eid: torch.Tensor, token_ids: torch.Tensor,
               route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash routing (layers 0..2): ids = tid2eid[token_ids], weights from just those experts' scores.

    x: [T, D] bf16; gate_weight: [E, D] bf16; tid2eid: [V, k] int64 (`ffn.gate.tid2eid`); token_ids: [T] int64.
    Returns (weights [T, k] fp32, ids [T, k] int64). Bad ids: see the module docstring (id -1, weight 0).
    GPU: T <= 256: one program per token computing only its k dot products (one launch); larger T: cuBLAS
    logits + the epilogue.
    """
    if x.is_cuda:
        from dsv4.kernels.fast import _router_triton

        return _router_triton.hash_route(x, gate_weight, tid2eid, token_ids, route_scale)
    return _hash_twin(x, gate_weight, tid2eid, token_ids, route_scale)


__all__ = ["dense_route", "hash_route"]

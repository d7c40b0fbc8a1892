"""Mixture of experts: sqrt-softplus router (hash-routed in the first layers), clamped SwiGLU experts (spec §5).

Routing: scores s = sqrt(softplus(W_g u)) in fp32; hash layers take experts tid2eid[token], the others the top-k
of s + bias (bias for selection only); weights = scale * s_e / sum over the chosen s. Each chosen expert computes
W2 · (w_e * silu(min(W1 u, L)) * clamp(W3 u, -L, L)); outputs are summed in fp32 in ascending expert id (the
official loop order), the shared expert is added, and the sum is rounded once.

Where experts run is pluggable: `MoE.expert_runner` maps (x, weights, indices) to per-slot outputs. The default
runs the experts this module holds; an expert-parallel worker installs one that exchanges tokens between ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsv4.kernels import ops
from dsv4.kernels.ref_math import silu
from dsv4.model.config import ModelConfig
from dsv4.model.layers import Linear, WeightFormat
from dsv4.model.numerics import Numerics

ExpertRunner = Callable[["MoE", torch.Tensor, torch.Tensor, torch.Tensor, Numerics], torch.Tensor]


class Gate(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.topk, self.route_scale = config.num_experts_per_tok, config.routed_scaling_factor
        self.is_hash = config.is_hash_layer(layer_id)
        self.register_buffer("weight", torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.bfloat16))
        if self.is_hash:
            self.register_buffer("tid2eid", torch.empty(config.vocab_size, self.topk, dtype=torch.int64))
        else:
            self.register_buffer("bias", torch.empty(config.n_routed_experts, dtype=torch.float32))
        self.workspace = ops.Workspace()   # the GPU router's completion ticket

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> routing weights [T, k] fp32, expert indices [T, k] int64. The gate runs in fp32 (the routers upcast
        x exactly, so it is passed in its activation dtype: half the bytes in reference numerics)."""
        if self.is_hash:
            return ops.hash_route(x, self.weight, self.tid2eid, token_ids, self.route_scale)
        return ops.dense_route(x, self.weight, self.bias, self.topk, self.route_scale, self.workspace)


class Expert(nn.Module):
    """Clamped SwiGLU FFN; routed experts are FP4 (instruct) or FP8, the shared expert FP8."""

    def __init__(self, dim: int, inter_dim: int, fmt: WeightFormat, swiglu_limit: float):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, fmt)
        self.w2 = Linear(inter_dim, dim, fmt)
        self.w3 = Linear(dim, inter_dim, fmt)
        self.limit = swiglu_limit

    def forward(self, x: torch.Tensor, numerics: Numerics, route_weight: torch.Tensor | None = None
                ) -> torch.Tensor:
        gate = numerics.act(self.w1(x, numerics)).float().clamp(max=self.limit)
        up = numerics.act(self.w3(x, numerics)).float().clamp(-self.limit, self.limit)
        h = silu(gate) * up
        if route_weight is not None:           # the routing weight scales the activation, before w2
            h = route_weight * h
        return numerics.act(self.w2(numerics.act(h), numerics))


def run_local_experts(moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                      numerics: Numerics) -> torch.Tensor:
    """Per-slot outputs [T, k, D] fp32 of the experts this module holds (zeros for slots routed elsewhere)."""
    out = torch.zeros(*indices.shape, x.shape[-1], dtype=torch.float32, device=x.device)
    for expert_id in indices.unique().tolist():
        expert = moe.experts[str(expert_id)] if str(expert_id) in moe.experts else None
        if expert is None:
            continue
        token_idx, slot = torch.where(indices == expert_id)
        out[token_idx, slot] = expert(x[token_idx], numerics, weights[token_idx, slot, None]).float()
    return out


def combine_slots(slot_out: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[T, k, D] per-slot outputs -> [T, D] fp32, summed one by one in ascending expert id."""
    order = indices.argsort(dim=1, stable=True)
    ordered = slot_out.gather(1, order[..., None].expand_as(slot_out))
    total = torch.zeros_like(ordered[:, 0])
    for j in range(ordered.shape[1]):
        total = total + ordered[:, j]
    return total


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, expert_ids: list[int] | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.gate = Gate(config, layer_id)
        fmt = WeightFormat(config.experts_format)
        ids = range(config.n_routed_experts) if expert_ids is None else expert_ids
        self.experts = nn.ModuleDict({str(e): Expert(config.hidden_size, config.moe_intermediate_size, fmt,
                                                     config.swiglu_limit) for e in ids})
        shared_fmt = WeightFormat.FP8 if config.weights_quantized else WeightFormat.BF16
        self.shared_experts = Expert(config.hidden_size, config.moe_intermediate_size, shared_fmt, config.swiglu_limit)
        self.expert_runner: ExpertRunner = run_local_experts

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        """x [T, D] (ffn_norm output) -> [T, D]."""
        weights, indices = self.gate(x, token_ids)
        routed = combine_slots(self.expert_runner(self, x, weights, indices, numerics), indices)
        return numerics.act(routed + self.shared_experts(x, numerics).float())

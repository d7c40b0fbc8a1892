"""Mixture of experts: sqrt-softplus router (hash-routed in the first layers), clamped SwiGLU experts (spec §5).

Routing: scores s = sqrt(softplus(W_g u)) in fp32; hash layers take experts tid2eid[token], the others the top-k
of s + bias (bias for selection only); weights = scale * s_e / sum over the chosen s. Each chosen expert computes
W2 · (w_e * silu(min(W1 u, L)) * clamp(W3 u, -L, L)); outputs are summed in fp32 (the reference: in ascending
expert id, the official loop order), the shared expert is added, and the sum is rounded once.

The routed work is expressed on (token, expert) *pairs*: pair t*k + j is token t's j-th choice. The numerics'
expert family runs pairs on the experts this module holds (`Numerics.experts.run_pairs`) and sums each token's
pairs (`combine`). Where pairs run is pluggable: `MoE.expert_runner` maps (x, weights, ids) to the routed sum
[T, D]. The default runs every pair here; an expert-parallel worker installs one that sends pairs to the workers
holding their experts and back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dsv4.kernels import ops
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
        self.workspace = ops.Workspace()   # the GPU router's completion ticket (reference numerics)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, numerics: Numerics
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> routing weights [T, k] fp32, expert indices [T, k] int64. The gate runs in fp32 (the routers upcast
        x exactly, so it is passed in its activation dtype: half the bytes in reference numerics)."""
        if self.is_hash:
            return numerics.router.hash(x, self.weight, self.tid2eid, token_ids, self.route_scale)
        return numerics.router.dense(x, self.weight, self.bias, self.topk, self.route_scale, self.workspace)


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
        h = numerics.math.swiglu(self.w1(x, numerics), self.w3(x, numerics), self.limit, route_weight)
        return numerics.act(self.w2(h, numerics))


def run_local_experts(moe: MoE, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                      numerics: Numerics) -> torch.Tensor:
    """The routed sum [T, D] fp32 over the experts this module holds (pairs routed elsewhere contribute 0)."""
    num_pairs = ids.numel()
    pair_row = torch.arange(num_pairs, device=x.device) // ids.shape[1]
    pair_out = numerics.experts.run_pairs(moe, x, pair_row, moe.local_ids(ids.flatten()), weights.flatten().float(),
                                          numerics)
    return numerics.experts.combine(pair_out, ids)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, expert_ids: list[int] | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.gate = Gate(config, layer_id)
        fmt = WeightFormat(config.experts_format)
        self.held = sorted(range(config.n_routed_experts) if expert_ids is None else expert_ids)
        self.experts = nn.ModuleDict({str(e): Expert(config.hidden_size, config.moe_intermediate_size, fmt,
                                                     config.swiglu_limit) for e in self.held})
        # global expert id -> index among the held experts (-1: held elsewhere); explicit CPU: the module may be
        # built on the meta device
        local = torch.full((config.n_routed_experts,), -1, dtype=torch.int64, device="cpu")
        local[torch.tensor(self.held, dtype=torch.int64, device="cpu")] = torch.arange(len(self.held), device="cpu")
        self.register_buffer("local_index", local, persistent=False)
        shared_fmt = WeightFormat.FP8 if config.weights_quantized else WeightFormat.BF16
        self.shared_experts = Expert(config.hidden_size, config.moe_intermediate_size, shared_fmt, config.swiglu_limit)
        self.expert_runner: ExpertRunner = run_local_experts

    def local_expert(self, local_idx: int) -> Expert:
        return self.experts[str(self.held[local_idx])]

    def local_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids (any shape; -1 = none) -> indices among the held experts, -1 where not held."""
        return torch.where(ids >= 0, self.local_index[ids.clamp(min=0)], -1)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        """x [T, D] (ffn_norm output) -> [T, D]."""
        weights, ids = self.gate(x, token_ids, numerics)
        routed = self.expert_runner(self, x, weights, ids, numerics)
        return numerics.act(routed + numerics.experts.shared(self, x, numerics).float())

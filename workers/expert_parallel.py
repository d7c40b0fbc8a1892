"""Expert parallelism: routed experts are sharded over the workers; each MoE layer sends every (token, expert)
pair to the expert's owner and the output back, by all-to-all over torch.distributed (NCCL on GPU, gloo on CPU).

Every worker calls every MoE layer's exchange in the same order every step, with zero pairs if it has no tokens
(`idle_pass`): an all-to-all needs all ranks. Outputs come back to the token's own worker, which combines them
as the single-process model does (`Numerics.experts.combine`); with the batch-invariant reference expert math
the result is bit-identical to running all experts locally.

Payloads travel as raw bytes (a bf16 tensor viewed as uint8): gloo has no bf16 all-to-all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from dsv4.model.moe import MoE, run_local_experts
from dsv4.model.numerics import Numerics
from dsv4.model.transformer import Transformer


def _exchange(rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """All-to-all of rows: `rows` [sum(send_counts), ...] grouped by destination rank -> the rows received."""
    row_shape = rows.shape[1:]
    row_bytes = math.prod(row_shape) * rows.element_size()
    out = torch.empty(sum(recv_counts) * row_bytes, dtype=torch.uint8, device=rows.device)
    dist.all_to_all_single(out, rows.contiguous().view(torch.uint8).reshape(-1),
                           [c * row_bytes for c in recv_counts], [c * row_bytes for c in send_counts], group=group)
    return out.view(rows.dtype).view(-1, *row_shape)


class ExpertParallel:
    """Installs itself as the `expert_runner` of every MoE layer of `model`."""

    def __init__(self, model: Transformer, owner: Sequence[int], rank: int, world_size: int, group=None):
        self.owner = torch.tensor(list(owner), dtype=torch.int64)
        self.rank, self.world_size, self.group = rank, world_size, group
        self.model = model
        # pairs routed by this worker's tokens, counted on the device
        self.expert_counts = torch.zeros(len(owner), dtype=torch.int64, device=model.embed.weight.device)
        for layer in self._moe_layers():
            layer.expert_runner = self

    def _moe_layers(self) -> list[MoE]:
        return [block.ffn for block in self.model.layers]

    def __call__(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 numerics: Numerics) -> torch.Tensor:
        """The routed sum [T, D] fp32 for this worker's tokens; serves the pairs other workers send here."""
        num_tokens, k = indices.shape
        experts = indices.flatten()
        count_pairs(self.expert_counts, indices)
        dest = self.owner.to(experts.device)[experts]
        order = torch.sort(dest, stable=True).indices                       # pairs grouped by destination rank
        # the counts travel on the payload's device (NCCL moves device tensors only)
        send_counts = torch.bincount(dest, minlength=self.world_size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        token_of_pair = order // k
        rows = _exchange(x[token_of_pair], send, recv, self.group)
        pair_expert = _exchange(experts[order], send, recv, self.group)
        pair_weight = _exchange(weights.flatten()[order].float(), send, recv, self.group)
        out = numerics.experts.run_pairs(moe, rows, torch.arange(rows.shape[0], device=rows.device),
                                         moe.local_ids(pair_expert), pair_weight, numerics)
        back = _exchange(out, recv, send, self.group)                       # outputs return to their tokens
        result = torch.empty(num_tokens * k, x.shape[-1], dtype=back.dtype, device=x.device)
        result[order] = back
        return numerics.experts.combine(result, indices)

    def idle_pass(self, numerics: Numerics) -> None:
        """A step with no tokens on this worker: serve the other workers' pairs in every MoE layer."""
        device = self.model.embed.weight.device
        d = self.model.config.hidden_size
        k = self.model.config.num_experts_per_tok
        for layer in self._moe_layers():
            self(layer, torch.empty(0, d, dtype=numerics.act_dtype, device=device),
                 torch.empty(0, k, device=device), torch.empty(0, k, dtype=torch.int64, device=device), numerics)

    def take_counts(self) -> tuple[int, ...]:
        counts = tuple(self.expert_counts.tolist())
        self.expert_counts.zero_()
        return counts


def count_pairs(counts: torch.Tensor, ids: torch.Tensor) -> None:
    """counts[e] += pairs routed to expert e, on the device (no host synchronisation; -1 ids are not counted)."""
    flat = ids.flatten()
    counts.index_add_(0, flat.clamp(min=0), (flat >= 0).to(counts.dtype))


class LocalExperts:
    """The single-worker counterpart of `ExpertParallel`: every expert is local; counts routed pairs."""

    def __init__(self, model: Transformer):
        self.expert_counts = torch.zeros(model.config.n_routed_experts, dtype=torch.int64,
                                         device=model.embed.weight.device)
        for block in model.layers:
            block.ffn.expert_runner = self

    def __call__(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 numerics: Numerics) -> torch.Tensor:
        count_pairs(self.expert_counts, indices)
        return run_local_experts(moe, x, weights, indices, numerics)

    def idle_pass(self, numerics: Numerics) -> None:
        """Nothing to serve: no other worker sends pairs."""

    def take_counts(self) -> tuple[int, ...]:
        counts = tuple(self.expert_counts.tolist())
        self.expert_counts.zero_()
        return counts

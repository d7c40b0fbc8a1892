"""Expert parallelism: routed experts are sharded over the workers; each MoE layer sends every (token, expert)
pair to the expert's owner and the output back, by all-to-all over torch.distributed (NCCL on GPU, gloo on CPU).

Every worker calls every MoE layer's exchange in the same order every step, with zero pairs if it has no tokens
(`idle_pass`): an all-to-all needs all ranks. Outputs come back to the token's own worker, which combines them
as the single-process model does (`Numerics.experts.combine`); with the batch-invariant reference expert math
the result is bit-identical to running all experts locally.

Two exchanges:
- `ExpertParallel` sizes the all-to-all by the exact pair counts, which it first exchanges and reads on the host:
  no padding, one host synchronisation per layer (the reference numerics' path, exact and batch-invariant).
- `FixedCapacityExpertParallel` sends a fixed number of rows to every rank (DeepEP low-latency style): each rank
  may send up to `capacity` = the step's largest per-worker token count x top-k pairs to each other rank, which
  is the worst case, so nothing is ever dropped, and the buffer sizes come from the plan (a host value the
  coordinator sends every worker alike), never from device data: no host synchronisation, graph-capturable.
  Empty rows carry expert -1, which the grouped expert kernels skip. The price is padding on the wire.

Payloads travel as raw bytes (a bf16 tensor viewed as uint8): gloo has no bf16 all-to-all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

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


class _Exchange:
    """What both exchanges share: the expert -> rank map on the device, installation as every MoE layer's
    `expert_runner`, the idle pass, and the per-expert pair counts."""

    def __init__(self, model: Transformer, owner: Sequence[int], rank: int, world_size: int, group=None):
        self.device = model.embed.weight.device
        self.owner = torch.tensor(list(owner), dtype=torch.int64, device=self.device)
        self.rank, self.world_size, self.group = rank, world_size, group
        self.model, self.top_k = model, model.config.num_experts_per_tok
        # pairs routed by this worker's tokens, counted on the device
        self.expert_counts = torch.zeros(len(owner), dtype=torch.int64, device=self.device)
        for block in (*model.layers, *model.mtp):
            block.ffn.expert_runner = self

    def idle_pass(self, numerics: Numerics, blocks: Sequence[nn.Module] | None = None) -> None:
        """A pass with no tokens on this worker: serve the other workers' pairs in every MoE layer of `blocks`
        (default: the main layers; the MTP block's passes of speculative decoding name it)."""
        d, k = self.model.config.hidden_size, self.top_k
        for block in self.model.layers if blocks is None else blocks:
            self(block.ffn, torch.empty(0, d, dtype=numerics.act_dtype, device=self.device),
                 torch.empty(0, k, device=self.device), torch.empty(0, k, dtype=torch.int64, device=self.device),
                 numerics)

    def take_counts(self) -> tuple[int, ...]:
        counts = tuple(self.expert_counts.tolist())
        self.expert_counts.zero_()
        return counts


class ExpertParallel(_Exchange):
    """The exchange sized by the exact pair counts (read on the host once per layer)."""

    def __call__(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 numerics: Numerics) -> torch.Tensor:
        """The routed sum [T, D] fp32 for this worker's tokens; serves the pairs other workers send here."""
        num_tokens, k = indices.shape
        experts = indices.flatten()
        count_pairs(self.expert_counts, indices)
        dest = self.owner[experts]
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


def _exchange_fixed(rows: torch.Tensor, group) -> torch.Tensor:
    """All-to-all with equal splits: rows [world * C, ...] (C rows per destination) -> the [world * C, ...] rows
    received (C from each source), through a byte view."""
    out = torch.empty_like(rows.contiguous().view(torch.uint8))
    dist.all_to_all_single(out, rows.contiguous().view(torch.uint8), group=group)
    return out.view(rows.dtype)


class FixedCapacityExpertParallel(_Exchange):
    """The exchange without host synchronisation. `set_capacity(num_tokens)` before each step: the largest token
    count of any worker in this step, the same number on every rank."""

    capacity = 0

    def set_capacity(self, max_worker_tokens: int) -> None:
        self.capacity = max(max_worker_tokens, 1) * self.top_k

    def __call__(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 numerics: Numerics) -> torch.Tensor:
        num_tokens, k = indices.shape
        cap, world, dim = self.capacity, self.world_size, x.shape[-1]
        if num_tokens * k > cap:
            raise AssertionError(f"{num_tokens} tokens x top-{k} exceed the exchange capacity {cap}")
        count_pairs(self.expert_counts, indices)
        experts = indices.flatten()                                          # [P] global ids
        dest = self.owner[experts.clamp(min=0)]
        # each pair's place in its destination's segment: how many earlier pairs go to the same rank
        onehot = F.one_hot(dest, world)                                      # [P, world]
        place = (onehot.cumsum(0) - onehot).gather(1, dest[:, None]).squeeze(1)
        slot = dest * cap + place                                            # [P] < world * cap
        rows = torch.zeros(world * cap, dim, dtype=x.dtype, device=x.device)
        meta = torch.full((world * cap, 2), -1.0, dtype=torch.float32, device=x.device)   # (expert id, weight)
        rows[slot] = x[torch.arange(experts.numel(), device=x.device) // k]
        meta[slot] = torch.stack([experts.float(), weights.flatten().float()], dim=1)
        got_rows, got_meta = _exchange_fixed(rows, self.group), _exchange_fixed(meta, self.group)
        out = numerics.experts.run_pairs(moe, got_rows, torch.arange(world * cap, device=x.device),
                                         moe.local_ids(got_meta[:, 0].long()), got_meta[:, 1], numerics)
        back = _exchange_fixed(out, self.group)                              # outputs return to their pairs
        return numerics.experts.combine(back[slot], indices)


def count_pairs(counts: torch.Tensor, ids: torch.Tensor) -> None:
    """counts[e] += pairs routed to expert e, on the device (no host synchronisation; -1 ids are not counted)."""
    flat = ids.flatten()
    counts.index_add_(0, flat.clamp(min=0), (flat >= 0).to(counts.dtype))


class LocalExperts(_Exchange):
    """The single-worker counterpart: every expert is local; counts routed pairs."""

    def __init__(self, model: Transformer):
        super().__init__(model, [0] * model.config.n_routed_experts, 0, 1)

    def __call__(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 numerics: Numerics) -> torch.Tensor:
        count_pairs(self.expert_counts, indices)
        return run_local_experts(moe, x, weights, indices, numerics)

    def idle_pass(self, numerics: Numerics, blocks: Sequence[nn.Module] | None = None) -> None:
        """Nothing to serve: no other worker sends pairs."""

"""Where experts live. The expert map is a first-class object (default: contiguous shards) so it can change
(redundant hot experts, EPLB) without touching the workers' exchange code. The launcher makes it, each worker
loads the experts it owns, and the coordinator places requests by it (`dsv4.cluster.placement.HashAffinity`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertPlacement:
    owner: tuple[int, ...]          # owner[e] = rank that holds expert e
    num_workers: int

    @classmethod
    def contiguous(cls, num_experts: int, num_workers: int) -> ExpertPlacement:
        """Experts split into `num_workers` contiguous shards, sizes differing by at most one."""
        if num_workers < 1 or num_workers > num_experts:
            raise ValueError(f"cannot shard {num_experts} experts over {num_workers} workers")
        bounds = [num_experts * r // num_workers for r in range(num_workers + 1)]
        return cls(tuple(r for r in range(num_workers) for _ in range(bounds[r], bounds[r + 1])), num_workers)

    def experts_of(self, rank: int) -> tuple[int, ...]:
        return tuple(e for e, r in enumerate(self.owner) if r == rank)

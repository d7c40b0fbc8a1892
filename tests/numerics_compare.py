"""How close one numerics' logits are to another's: the three numbers the fast path is judged by (relative L2
error of the logits, mean KL divergence, top-1 agreement), shared by the CPU and GPU tolerance tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Distance:
    rel_l2: float      # ||other - ref|| / ||ref|| over all positions and the vocabulary
    kl: float          # mean over positions of KL(softmax(ref) || softmax(other))
    top1: float        # fraction of positions whose argmax agrees

    def __str__(self) -> str:
        return f"rel L2 {self.rel_l2:.2e}, KL {self.kl:.2e}, top-1 {100 * self.top1:.2f} %"


def logit_distance(ref: torch.Tensor, other: torch.Tensor) -> Distance:
    """ref, other: [N, vocab] logits of the same N positions."""
    ref, other = ref.double(), other.double()
    rel = float((other - ref).norm() / ref.norm())
    log_p, log_q = ref.log_softmax(-1), other.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == other.argmax(-1)).double().mean())
    return Distance(rel, kl, top1)

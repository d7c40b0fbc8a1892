"""Next-token sampling: greedy, temperature, top-k, top-p; reproducible with a seed.

Each request's i-th output token is drawn with a uniform number that depends only on (seed, i), and the
distribution is computed per row in float64, so the same seed, prompt and parameters give the same tokens no
matter which other requests share the batch, which worker runs it, or whether it was preempted and resumed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from dsv4.cluster.request import SamplingParams


@dataclass(frozen=True, slots=True)
class SampleSpec:
    sampling: SamplingParams
    seed: int
    output_index: int      # which output token of the request this is (0 = the first)


def uniform(seed: int, output_index: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, output_index)."""
    digest = hashlib.blake2b(f"{seed}:{output_index}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0 ** -53


def sample_row(logits: torch.Tensor, spec: SampleSpec) -> int:
    p = spec.sampling
    if p.is_greedy:
        return int(torch.argmax(logits))              # ties: the lowest token id
    probs = torch.softmax(logits.double() / p.temperature, dim=-1)
    order = torch.sort(probs, descending=True, stable=True)
    sorted_probs, sorted_ids = order.values, order.indices
    keep = sorted_probs.shape[0] if p.top_k == 0 else p.top_k
    if p.top_p < 1.0:   # the smallest prefix whose mass reaches top_p (always at least one token)
        before = torch.cumsum(sorted_probs, 0) - sorted_probs
        keep = min(keep, max(1, int((before < p.top_p).sum())))
    kept = sorted_probs[:keep] / sorted_probs[:keep].sum()
    choice = int(torch.searchsorted(torch.cumsum(kept, 0), torch.tensor([uniform(spec.seed, spec.output_index)],
                                                                          dtype=torch.float64)))
    return int(sorted_ids[min(choice, keep - 1)])


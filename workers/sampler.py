"""Next-token sampling on the logits' device, for a whole step at once: greedy, temperature, top-k, top-p;
reproducible with a seed. Only the chosen token ids (int64 [S]) leave the device.

Gumbel-max: the token is argmax over the kept tokens of logits / temperature + g, with g = -log(-log(u)) and u a
uniform number from a counter-based hash of (request seed, output index, token id). A request's i-th output
token therefore depends only on its own logits and (seed, i): the same seed, prompt and parameters give the same
tokens whichever requests share the batch, whichever worker runs it, and after preemption. Top-k keeps the k
largest logits; top-p the smallest prefix of the sorted distribution whose mass reaches p (always at least one
token). Greedy rows (temperature 0) take the argmax, ties to the lowest token id. The same code runs on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.cluster.request import SamplingParams

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SampleSpec:
    sampling: SamplingParams
    seed: int
    output_index: int      # which output token of the request this is (0 = the first)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values < 2^32 (products wrap, masked back to 32 bits)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def uniform(seed: torch.Tensor, output_index: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """u in (0, 1), fp32, for every (row, token): seed, output_index [S] int64, token_ids [V] int64 -> [S, V]."""
    row = _fmix32((seed & _MASK32) ^ _fmix32((seed >> 32) & _MASK32) ^ _fmix32(output_index & _MASK32) * 3)
    h = _fmix32(row[:, None] ^ _fmix32(token_ids[None, :] + 0x9E3779B9))
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


class SamplingBatch:
    """One step's sampling parameters as device tensors, and what the host already knows about them."""

    def __init__(self, specs: Sequence[SampleSpec], device: torch.device | str):
        self.num_rows = len(specs)
        temps = [s.sampling.temperature for s in specs]
        self.all_greedy = all(t == 0 for t in temps)
        self.needs_sort = any(s.sampling.top_k > 0 or s.sampling.top_p < 1.0 for s in specs)
        self.temperature = torch.tensor(temps, dtype=torch.float32).to(device, non_blocking=True)
        self.top_k = torch.tensor([s.sampling.top_k for s in specs], dtype=torch.int64).to(device, non_blocking=True)
        self.top_p = torch.tensor([s.sampling.top_p for s in specs], dtype=torch.float32).to(device,
                                                                                            non_blocking=True)
        self.seed = torch.tensor([s.seed for s in specs], dtype=torch.int64).to(device, non_blocking=True)
        self.output_index = torch.tensor([s.output_index for s in specs], dtype=torch.int64).to(device,
                                                                                                non_blocking=True)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [S, V] (fp32) -> token ids [S] int64, on the logits' device."""
    greedy = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy
    vocab = logits.shape[-1]
    scaled = logits.float() / batch.temperature.clamp(min=1e-6)[:, None]
    if batch.needs_sort:
        values, order = scaled.sort(dim=-1, descending=True, stable=True)
        rank = torch.arange(vocab, device=logits.device)[None, :]
        keep = (batch.top_k[:, None] == 0) | (rank < batch.top_k[:, None])
        probs = values.softmax(dim=-1)
        keep &= (probs.cumsum(dim=-1) - probs) < batch.top_p[:, None]      # mass before this token < top_p
        keep[:, 0] = True
        noise = -torch.log(-torch.log(_noise_sorted(batch, order)))
        pick = torch.where(keep, values + noise, float("-inf")).argmax(dim=-1)
        sampled = order.gather(1, pick[:, None]).squeeze(1)
    else:
        noise = -torch.log(-torch.log(uniform(batch.seed, batch.output_index,
                                              torch.arange(vocab, device=logits.device))))
        sampled = (scaled + noise).argmax(dim=-1)
    return torch.where(batch.temperature == 0, greedy, sampled)


def _noise_sorted(batch: SamplingBatch, order: torch.Tensor) -> torch.Tensor:
    """The uniforms of each row's tokens in sorted order (keyed by token id, so the sort order cannot matter)."""
    vocab = order.shape[-1]
    u = uniform(batch.seed, batch.output_index, torch.arange(vocab, device=order.device))
    return u.gather(1, order)

"""Next-token sampling on the logits' device, for a whole step at once: greedy, temperature, top-k, top-p;
reproducible with a seed; repetition, frequency and presence penalties, logit bias and min-p; structured output
(each constrained row's allowed tokens, `workers/grammar.py`); log-probabilities for the rows that ask. Only the
chosen token ids (int64 [S]) and those log-probabilities leave the device, in one copy (`sample_to_host`).

Gumbel-max: the token is argmax over the kept tokens of logits / temperature + g, with g = -log(-log(u)) and u a
uniform number from a counter-based hash of (request seed, output index, token id). A request's i-th output
token therefore depends only on its own logits and (seed, i): the same seed, prompt and parameters give the same
tokens whichever requests share the batch, whichever worker runs it, and after preemption. Top-k keeps the k
largest logits; top-p the smallest prefix of the sorted distribution whose mass reaches p (always at least one
token); min-p the tokens at least min_p times as likely as the most likely one. Greedy rows (temperature 0) take
the argmax, ties to the lowest token id. Penalties and bias adjust the logits first (`SamplingParams` defines
them); the rows that have none cost nothing, and a step where no row has any runs none of it. The penalties read
each row's history (prompt and outputs), copied to the device with the step's parameters. The same code runs on
the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dsv4.wire.request import SamplingParams, TokenLogprobs
from dsv4.workers.grammar import unpack_bitmask

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class SampleSpec:
    sampling: SamplingParams
    seed: int
    output_index: int      # which output token of the request this is (0 = the first)
    # The request's tokens before this one (prompt, then outputs), for the penalties; empty when it has none.
    history: Sequence[int] = ()
    num_prompt: int = 0    # how many of `history` are the prompt
    # Structured output: the tokens that may come next, as `GrammarState.allowed`'s bitmask; None: any.
    allowed: torch.Tensor | None = None


class LogitAdjustments:
    """The rows' penalties and biases as device tensors: `apply` turns the raw logits into the adjusted ones."""

    def __init__(self, specs: Sequence[SampleSpec], device: torch.device | str):
        def put(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        rows = [i for i, s in enumerate(specs) if s.sampling.penalizes_history]
        self.penalty_rows = put(rows, torch.int64) if rows else None
        # (penalty row, token) for every output token (a token's count is how often it appears) and for every
        # prompt token (seen by the repetition penalty only)
        output_pairs = [(r, t) for r, i in enumerate(rows) for t in specs[i].history[specs[i].num_prompt:]]
        prompt_pairs = [(r, t) for r, i in enumerate(rows) for t in specs[i].history[:specs[i].num_prompt]]
        self.output_pairs = put(output_pairs, torch.int64).view(-1, 2).t()
        self.prompt_pairs = put(prompt_pairs, torch.int64).view(-1, 2).t()
        self.repetition = put([specs[i].sampling.repetition_penalty for i in rows], torch.float32)[:, None]
        self.frequency = put([specs[i].sampling.frequency_penalty for i in rows], torch.float32)[:, None]
        self.presence = put([specs[i].sampling.presence_penalty for i in rows], torch.float32)[:, None]
        bias = [(i, t, b) for i, s in enumerate(specs) for t, b in s.sampling.logit_bias]
        self.bias = ((put([i for i, _, _ in bias], torch.int64), put([t for _, t, _ in bias], torch.int64),
                      put([b for _, _, b in bias], torch.float32)) if bias else None)   # (rows, tokens, values)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [S, V] -> adjusted fp32 copy [S, V]."""
        out = logits.float().clone()
        if self.penalty_rows is not None:
            x = out.index_select(0, self.penalty_rows)                                       # [P, V]
            counts = torch.zeros_like(x).index_put_(tuple(self.output_pairs), x.new_ones(()), accumulate=True)
            seen = (counts > 0).index_put_(tuple(self.prompt_pairs), x.new_ones((), dtype=torch.bool))
            x = torch.where(seen, torch.where(x > 0, x / self.repetition, x * self.repetition), x)
            x = x - self.frequency * counts - self.presence * (counts > 0).float()
            out.index_copy_(0, self.penalty_rows, x)
        if self.bias is not None:
            rows, tokens, values = self.bias
            out.index_put_((rows, tokens), values, accumulate=True)
        return out


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
        self.needs_sort = any(s.sampling.top_k > 0 or s.sampling.top_p < 1.0 or s.sampling.min_p > 0
                              for s in specs)
        self.adjustments = (LogitAdjustments(specs, device) if any(s.sampling.adjusts_logits for s in specs)
                            else None)
        self.min_p = (torch.tensor([s.sampling.min_p for s in specs], dtype=torch.float32).to(device, non_blocking=True)
                      if any(s.sampling.min_p > 0 for s in specs) else None)
        constrained = [i for i, s in enumerate(specs) if s.allowed is not None]
        self.constrained_rows = (torch.tensor(constrained, dtype=torch.int64).to(device, non_blocking=True)
                                 if constrained else None)
        self.allowed_bits = (torch.stack([specs[i].allowed for i in constrained]).to(device, non_blocking=True)
                             if constrained else None)
        self.temperature = torch.tensor(temps, dtype=torch.float32).to(device, non_blocking=True)
        self.top_k = torch.tensor([s.sampling.top_k for s in specs], dtype=torch.int64).to(device, non_blocking=True)
        self.top_p = torch.tensor([s.sampling.top_p for s in specs], dtype=torch.float32).to(device,
                                                                                            non_blocking=True)
        self.seed = torch.tensor([s.seed for s in specs], dtype=torch.int64).to(device, non_blocking=True)
        self.output_index = torch.tensor([s.output_index for s in specs], dtype=torch.int64).to(device,
                                                                                                non_blocking=True)
        # Log-probabilities: the host knows which rows ask and how many alternatives each wants.
        self.num_logprobs = [s.sampling.logprobs for s in specs]
        self.logprob_rows = [i for i, n in enumerate(self.num_logprobs) if n is not None]
        self.logprob_rows_device = (torch.tensor(self.logprob_rows, dtype=torch.int64).to(device, non_blocking=True)
                                    if self.logprob_rows else None)
        self.max_num_logprobs = max((self.num_logprobs[i] or 0 for i in self.logprob_rows), default=0)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """logits [S, V] (fp32, raw) -> token ids [S] int64, on the logits' device."""
    if batch.adjustments is not None:
        logits = batch.adjustments.apply(logits)
    if batch.constrained_rows is not None:      # structured output: -inf where the constraint says no
        rows = logits.index_select(0, batch.constrained_rows).float()
        allowed = unpack_bitmask(batch.allowed_bits, logits.shape[-1])
        logits = logits.float().index_copy(0, batch.constrained_rows, rows.masked_fill(~allowed, float("-inf")))
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
        if batch.min_p is not None:                                        # min-p: against the most likely
            keep &= probs >= batch.min_p[:, None] * probs[:, :1]
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


def logprobs(logits: torch.Tensor, token_ids: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The log-probabilities the rows in `batch.logprob_rows` asked for, packed for one copy to the host.

    logits [S, V], token_ids [S] (the sampled ones) -> int32 [R, 1 + 2n] with R = len(logprob_rows) and
    n = batch.max_num_logprobs: the chosen token's logprob, the top-n token ids, the top-n logprobs, most likely
    first; logprobs as their fp32 bits (no float64 on the device). Rows wanting fewer than n alternatives take a
    prefix. Rows that did not ask are not computed at all.
    """
    rows = batch.logprob_rows_device
    assert rows is not None, "no row of the batch asked for log-probabilities"
    log_probs = logits.index_select(0, rows).float().log_softmax(dim=-1)          # [R, V]
    chosen = log_probs.gather(1, token_ids.index_select(0, rows)[:, None])       # [R, 1]
    if batch.max_num_logprobs == 0:
        return chosen.view(torch.int32)
    top_logprobs, top_ids = log_probs.topk(batch.max_num_logprobs, dim=-1)        # sorted, largest first
    return torch.cat([chosen.view(torch.int32), top_ids.int(), top_logprobs.view(torch.int32)], dim=1)


def sample_to_host(logits: torch.Tensor, batch: SamplingBatch) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Sample, and copy to the host in one sync: the token ids [S] and, aligned with them, each row's
    `TokenLogprobs` (None where the row did not ask). The second list is empty when no row asked."""
    token_ids = sample(logits, batch)
    if not batch.logprob_rows:
        return token_ids.tolist(), []                      # the step's one sync: token ids only
    packed = logprobs(logits, token_ids, batch)
    words = torch.cat([token_ids.int(), packed.flatten()]).cpu().numpy()    # the step's one sync: one int32 copy
    as_float = words.view(np.float32)
    num_rows, n = batch.num_rows, batch.max_num_logprobs
    width = 1 + 2 * n
    out: list[TokenLogprobs | None] = [None] * num_rows
    for r, i in enumerate(batch.logprob_rows):
        base = num_rows + r * width
        k = batch.num_logprobs[i] or 0
        out[i] = TokenLogprobs(float(as_float[base]), tuple(int(t) for t in words[base + 1:base + 1 + k]),
                               tuple(float(v) for v in as_float[base + 1 + n:base + 1 + n + k]))
    return [int(v) for v in words[:num_rows]], out

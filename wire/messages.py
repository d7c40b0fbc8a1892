"""Messages between the coordinator and the workers. A request travels to its worker in full once
(`NewRequest`); every later step carries only deltas: how many tokens to run, new block ids, finished ids.
Workers answer with the tokens they sampled and their routing counts. No tensors: activations move between
workers over torch.distributed, never through Ray."""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.wire.request import SamplingParams, TokenLogprobs


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker reports after loading: its cache geometry, for the coordinator's block accounting."""

    rank: int
    num_slots: int
    num_blocks: int
    block_size: int
    bytes_per_token: float
    device: str
    local_expert_ids: tuple[int, ...]
    num_snapshots: int = 0          # prefix-cache snapshots (0: no prefix caching)


@dataclass(frozen=True, slots=True)
class NewRequest:
    request_id: str
    token_ids: tuple[int, ...]      # the prompt, plus outputs already streamed if resumed after preemption
    num_prior_outputs: int          # outputs already in token_ids (sampling continues at that index)
    sampling: SamplingParams
    seed: int                       # sampling seed (the request's, or one the coordinator chose)
    slot: int
    # prefix caching: the first num_cached_tokens tokens are in these shared blocks already; the slot starts from
    # the snapshot of the state at their end
    num_cached_tokens: int = 0
    prefix_block_ids: tuple[int, ...] = ()
    snapshot: int | None = None


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Run the request's next `num_tokens` tokens (prompt tokens, or 1 = its last sampled token), and with
    speculative decoding up to `max_drafts` drafts after a decode token (the step's token budget counts them)."""

    request_id: str
    num_tokens: int
    new_block_ids: tuple[int, ...]
    max_drafts: int = 0
    save_snapshot: int | None = None  # prefix caching: after the step, keep the slot's state in this snapshot


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    step_id: int
    new_requests: tuple[NewRequest, ...]
    chunks: tuple[ScheduledChunk, ...]
    finished_ids: tuple[str, ...]   # drop these requests' state (done, aborted or preempted)
    # the same on every worker of a step: what the fixed-capacity expert exchange is sized by
    max_worker_tokens: int = 0      # the most tokens any worker runs in this step

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass(frozen=True, slots=True)
class WorkerResult:
    step_id: int
    rank: int
    sampled: tuple[tuple[str, int], ...]     # (request id, token) for chunks that reached their last token,
                                             # a request's tokens in order
    expert_counts: tuple[int, ...]           # (token, expert) pairs routed by this worker's tokens, per expert
    num_tokens: int
    seconds: float
    # aligned with `sampled`: the token's log-probabilities where its request asked, else None; empty (nothing
    # computed or sent) when no request of the step asked
    logprobs: tuple[TokenLogprobs | None, ...] = ()
    num_draft_tokens: int = 0                # speculative decoding: drafts verified in this step
    num_accepted_tokens: int = 0             # of which accepted (`sampled` then holds several per request)

    def tokens_by_request(self) -> dict[str, tuple[tuple[int, ...], tuple[TokenLogprobs, ...]]]:
        """request id -> (its tokens in order, their log-probabilities where it asked, else ())."""
        grouped: dict[str, tuple[list[int], list[TokenLogprobs]]] = {}
        logprobs = self.logprobs or (None,) * len(self.sampled)     # empty: no request of the step asked
        for (request_id, token), token_logprobs in zip(self.sampled, logprobs, strict=True):
            tokens, lps = grouped.setdefault(request_id, ([], []))
            tokens.append(token)
            if token_logprobs is not None:
                lps.append(token_logprobs)
        return {rid: (tuple(tokens), tuple(lps)) for rid, (tokens, lps) in grouped.items()}

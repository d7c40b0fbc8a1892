"""Continuous batching over N workers: admission, chunked prefill, decode, preemption, stop conditions.

Each step, every worker gets a plan: its running decodes first (one token each), then prefill chunks in arrival
order within the token budget. A new request goes to the worker with the most headroom (free blocks, then
fewest running), with the hash-routed experts of its prompt as the tie-breaker, and stays there for life (its KV
lives there). Blocks for the positions a step writes are reserved before the step; when a worker runs out, its
newest running request is preempted (its blocks freed, its tokens so far re-prefilled later) and nothing
crashes.

Cost per step is bounded by the requests that run or are admitted, not by every request known: each worker keeps
its running requests in arrival order (a sorted list: admission inserts, release removes), the waiting ones sit
in one arrival-ordered heap (aborted entries are skipped lazily), and the counts are kept as they change.

The coordinator keeps up to two steps in flight, so the scheduler plans a step before it knows the tokens the
previous one sampled: it counts tokens "scheduled" (will exist once in-flight steps return) apart from tokens
"known" (returned). A request that stops on a token it did not know about yet wastes one extra token, which is
dropped; its blocks are freed only when later steps can no longer touch them (the next plan runs after every
in-flight step on the same worker).
"""

from __future__ import annotations

import bisect
import enum
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from dsv4.cache.manager import KVCacheManager
from dsv4.cache.prefix import prefix_keys
from dsv4.wire.config import SchedulerConfig
from dsv4.wire.messages import NewRequest, ScheduledChunk, WorkerPlan
from dsv4.wire.request import (
    EngineOverloaded,
    FinishReason,
    GenerateRequest,
    InvalidRequest,
    RequestOutput,
    TokenLogprobs,
)


class Status(enum.Enum):
    WAITING = "waiting"        # queued (new, or preempted and drained)
    RUNNING = "running"        # has a slot and blocks on `worker`
    PREEMPTED = "preempted"    # blocks freed, waiting for its in-flight steps to return before it requeues
    FINISHED = "finished"


@dataclass
class RequestState:
    request: GenerateRequest
    seed: int
    arrival: int
    status: Status = Status.WAITING
    worker: int | None = None
    output_ids: list[int] = field(default_factory=list)     # tokens returned by workers (and streamed)
    num_scheduled_outputs: int = 0    # outputs that will exist once every in-flight step has returned
    num_computed: int = 0             # tokens of (prompt + outputs) scheduled to run, in-flight ones included
    inflight: int = 0                 # in-flight steps that include this request
    finish_reason: FinishReason | None = None
    prefix_keys: list[int] = field(default_factory=list)   # prefix caching: the keys of its resumable blocks
    num_cached_tokens: int = 0        # prompt tokens its first admission found cached
    save_at: int = 0                  # prefix caching: the block boundary to snapshot its state at (0: none)
    admitted: bool = False            # admitted at least once (a resume after preemption is not a new query)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def scheduled_len(self) -> int:
        """Tokens that exist on the worker once in-flight steps return."""
        return self.prompt_len + self.num_scheduled_outputs


@dataclass(frozen=True, slots=True)
class PrefixSave:
    """A prefix a step writes: once it has run, worker's sequence request_id holds it in its first blocks, and
    `snapshot` the state at its end."""

    worker: int
    request_id: str
    keys: tuple[int, ...]
    snapshot: int


@dataclass(frozen=True, slots=True)
class StepPlans:
    step_id: int
    plans: tuple[WorkerPlan, ...]
    request_ids: tuple[str, ...]      # requests that run in this step
    prefix_saves: tuple[PrefixSave, ...] = ()


class Scheduler:
    def __init__(self, config: SchedulerConfig, managers: list[KVCacheManager], max_model_len: int,
                 eos_token_ids: tuple[int, ...], affinity: Callable[[tuple[int, ...]], list[float]] | None = None,
                 speculative_tokens: int = 0):
        """speculative_tokens: the drafts a worker may add to each decode token (each step of a decoding request
        may then write that many more positions and return that many more tokens)."""
        self.config, self.managers = config, managers
        self.max_model_len, self.eos_token_ids = max_model_len, eos_token_ids
        self.affinity = affinity
        self.speculative_tokens = speculative_tokens
        self.prefix_caching = all(m.prefix is not None for m in managers)
        self.prefix_queries = self.prefix_hits = 0    # prompt tokens admitted, and of those found cached
        self._prefix_saves: list[PrefixSave] = []      # prefixes the step being planned writes
        self.requests: dict[str, RequestState] = {}
        self._running: list[list[RequestState]] = [[] for _ in managers]     # per worker, by arrival
        self._waiting: list[tuple[int, str]] = []          # heap of (arrival, id); stale entries skipped
        self._num_queued = 0                               # WAITING + PREEMPTED
        self._planning = False
        self._requeue: list[RequestState] = []             # preempted while planning: queued after the pass
        self._arrivals = itertools.count()
        self._step_ids = itertools.count()
        self._pending_drops: list[list[str]] = [[] for _ in managers]
        self._finished_outputs: list[RequestOutput] = []   # requests ended while planning (context full)

    # ------------------------------------------------------------------------------------------ requests
    def add(self, request: GenerateRequest, seed: int) -> None:
        if request.request_id in self.requests:
            raise InvalidRequest("request_id", f"{request.request_id!r} is already running")
        if self._num_queued >= self.config.max_waiting:
            raise EngineOverloaded(f"{self._num_queued} requests are waiting for admission (the limit, "
                                   "scheduler.max_waiting); retry later")
        # A prompt must fit one worker's cache; outputs beyond what fits end with "length" when it is full.
        capacity = max(m.num_total_blocks for m in self.managers) * self.managers[0].block_size
        if len(request.prompt_token_ids) >= capacity:
            raise InvalidRequest("prompt", f"{len(request.prompt_token_ids)} tokens do not fit the KV cache of any "
                                           f"worker ({capacity} positions)")
        state = RequestState(request, seed, next(self._arrivals))
        if self.prefix_caching:   # resumable prefixes leave at least the last prompt token to run
            usable = (len(request.prompt_token_ids) - 1) // self.managers[0].block_size
            state.prefix_keys = prefix_keys(request.prompt_token_ids, self.managers[0].block_size)[:usable]
        self.requests[request.request_id] = state
        self._num_queued += 1
        self._enqueue(state)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel: blocks freed at once. The final output, or None if unknown or already finished."""
        state = self.requests.get(request_id)
        if state is None or state.status is Status.FINISHED:
            return None
        return self._finish(state, FinishReason.ABORT)

    def on_token(self, request_id: str, token: int, logprobs: TokenLogprobs | None = None) -> RequestOutput | None:
        """A sampled token (and its log-probabilities, if the request asked) came back from a worker."""
        return self.on_tokens(request_id, (token,), (logprobs,) if logprobs is not None else ())

    def on_tokens(self, request_id: str, tokens: tuple[int, ...], logprobs: tuple[TokenLogprobs, ...] = ()
                  ) -> RequestOutput | None:
        """The tokens one step sampled for a request, in order (several when speculative drafts were accepted),
        and their log-probabilities if it asked: record them, decide whether the request is done. One output
        delta, or None if the request had already ended."""
        state = self.requests.get(request_id)
        if state is None or state.status is Status.FINISHED:
            return None                                   # sampled after the request ended
        if len(tokens) > 1 and state.status is Status.RUNNING:
            # accepted drafts: positions the worker ran and outputs it holds beyond the one token planned
            state.num_computed += len(tokens) - 1
            state.num_scheduled_outputs += len(tokens) - 1
        params = state.request.sampling
        for i, token in enumerate(tokens):
            state.output_ids.append(token)
            n = len(state.output_ids)
            reason, matched = None, None
            if n >= params.min_tokens and (token in params.stop_token_ids or
                                           (not params.ignore_eos and token in self.eos_token_ids)):
                reason, matched = FinishReason.STOP, token
            elif n >= params.max_tokens or state.prompt_len + n >= self.max_model_len:
                reason = FinishReason.LENGTH
            if reason is not None:
                return self._finish(state, reason, tokens[:i + 1], matched, logprobs[:i + 1])
        return self._output(state, tokens, new_logprobs=logprobs)

    def take_finished_outputs(self) -> list[RequestOutput]:
        """Final outputs of requests the scheduler itself ended while planning (their context filled up)."""
        out, self._finished_outputs = self._finished_outputs, []
        return out

    def step_returned(self, plans: StepPlans, ok: bool = True) -> None:
        """A step's results have been processed: requests it ran have one fewer step in flight; the prefixes it
        wrote become resumable (or, if the step failed, their snapshots are given back)."""
        for save in plans.prefix_saves:
            manager = self.managers[save.worker]
            if ok:
                manager.cache_prefix(save.request_id, save.keys, save.snapshot)
            else:
                manager.prefix.snapshots.free([save.snapshot])
        for rid in plans.request_ids:
            state = self.requests.get(rid)
            if state is None:
                continue
            state.inflight -= 1
            if state.status is Status.PREEMPTED and state.inflight == 0:
                self._enqueue(state)
            if state.status is Status.FINISHED and state.inflight == 0:
                del self.requests[rid]

    # ------------------------------------------------------------------------------------------ planning
    def schedule(self) -> StepPlans | None:
        """Plans for every worker for one step, or None if no worker has tokens to run."""
        chunks: list[list[ScheduledChunk]] = [[] for _ in self.managers]
        new: list[list[NewRequest]] = [[] for _ in self.managers]
        budget = [self.config.max_num_batched_tokens] * len(self.managers)
        ran: list[str] = []
        self._planning = True
        for running in self._running:                     # decodes and unfinished prefills, per worker by arrival
            for state in list(running):                   # (preemption removes from the list)
                self._schedule_running(state, chunks, budget, ran)
        while self._waiting:
            arrival, request_id = self._waiting[0]
            state = self.requests.get(request_id)
            if state is None or state.status is not Status.WAITING or state.arrival != arrival:
                heapq.heappop(self._waiting)              # aborted while waiting
                continue
            if not self._admit(state, budget):
                break                                       # FIFO: later arrivals wait behind the first
            heapq.heappop(self._waiting)
            seq = self.managers[state.worker].get(state.request_id)
            new[state.worker].append(NewRequest(state.request_id, self._resume_tokens(state),
                                                len(state.output_ids), state.request.sampling, state.seed, seq.slot,
                                                state.num_computed, tuple(seq.blocks[:seq.num_cached_blocks]),
                                                seq.snapshot))
            self._schedule_running(state, chunks, budget, ran)
        self._planning = False
        for state in self._requeue:                        # victims of this pass wait for the next one
            heapq.heappush(self._waiting, (state.arrival, state.request_id))
        self._requeue.clear()
        if not ran:
            return None
        step_id = next(self._step_ids)
        max_tokens = max(self.config.max_num_batched_tokens - left for left in budget)   # drafts included
        plans = tuple(WorkerPlan(step_id, tuple(new[w]), tuple(chunks[w]), tuple(self._pending_drops[w]),
                                 max_tokens)
                      for w in range(len(self.managers)))
        self._pending_drops = [[] for _ in self.managers]
        saves, self._prefix_saves = tuple(self._prefix_saves), []
        return StepPlans(step_id, plans, tuple(ran), saves)

    def _schedule_running(self, state: RequestState, chunks, budget, ran) -> None:
        if state.status is not Status.RUNNING:       # preempted earlier in this same planning pass
            return
        w = state.worker
        remaining = state.scheduled_len - state.num_computed
        if remaining <= 0 or budget[w] <= 0:
            return
        is_decode = remaining == 1 and state.num_computed >= state.prompt_len
        if is_decode and not self._may_sample(state):
            return
        n = min(remaining, budget[w], self.config.max_prefill_chunk)
        if state.num_computed < state.save_at < state.num_computed + n:
            n = state.save_at - state.num_computed          # the chunk ends where the prefix snapshot is taken
        # a decode token takes its drafts' share of the step (the worker runs them with it): as many as fit
        drafts = min(self.speculative_tokens, budget[w] - n) if is_decode else 0
        manager = self.managers[w]
        before = len(manager.get(state.request_id).blocks)
        while not manager.reserve(state.request_id, state.num_computed + n):
            victim = self._victim(w, not_in=set(ran) | {state.request_id})     # only when out of blocks
            if victim is None:
                if self._running_count(w) == 1:             # alone and still out of blocks: the context is full
                    self._finished_outputs.append(self._finish(state, FinishReason.LENGTH))
                return                                      # else wait for a request to finish
            self._preempt(victim)
        if drafts:
            # room for the drafts, past what in-flight steps may have accepted; if blocks are short the worker
            # drafts less (it never writes past the blocks it holds), so no one is preempted for it
            manager.reserve(state.request_id, state.num_computed + n + self.speculative_tokens * state.inflight
                            + drafts)
        new_blocks = tuple(manager.get(state.request_id).blocks[before:])
        reaches_end = state.num_computed + n == state.scheduled_len
        snapshot, end = None, state.num_computed + n
        if state.save_at and end <= state.save_at and end % manager.block_size == 0:
            # a resumable prefix ends here: the prompt's last full block, or a chunk that ends on a block boundary
            snapshot = manager.prefix.new_snapshot()
            if snapshot is not None:
                keys = tuple(state.prefix_keys[:end // manager.block_size])
                self._prefix_saves.append(PrefixSave(w, state.request_id, keys, snapshot))
            if end == state.save_at:
                state.save_at = 0
        chunks[w].append(ScheduledChunk(state.request_id, n, new_blocks, drafts, snapshot))
        budget[w] -= n + drafts
        state.num_computed += n
        state.num_scheduled_outputs += 1 if reaches_end else 0
        state.inflight += 1
        ran.append(state.request_id)

    def _may_sample(self, state: RequestState) -> bool:
        """Whether one more output token is allowed (max_tokens, context length)."""
        return (state.num_scheduled_outputs < state.request.sampling.max_tokens
                and state.scheduled_len < self.max_model_len)

    def _admit(self, state: RequestState, budget: list[int]) -> bool:
        first_chunk = min(len(self._resume_tokens(state)), self.config.max_prefill_chunk)
        candidates = [w for w, m in enumerate(self.managers)
                      if budget[w] > 0 and m.slots.num_free > 0
                      and m.num_free_blocks >= m.blocks_needed(first_chunk) + self._running_count(w)]
        if not candidates:
            return False
        affinity = self.affinity(state.request.prompt_token_ids) if self.affinity else [0.0] * len(self.managers)
        cached = [self._cached_blocks(w, state) for w in range(len(self.managers))]
        w = max(candidates, key=lambda w: (cached[w], self.managers[w].num_free_blocks, -self._running_count(w),
                                           affinity[w], -w))
        seq = self.managers[w].admit(state.request_id, 0, state.prefix_keys)
        state.status, state.worker = Status.RUNNING, w
        self._num_queued -= 1
        bisect.insort(self._running[w], state, key=lambda s: s.arrival)
        state.num_computed = seq.num_cached_blocks * self.managers[w].block_size
        state.num_scheduled_outputs = len(state.output_ids)
        # snapshot the state where its resumable prefix ends (and where chunks end on block boundaries before it),
        # unless that is cached already
        state.save_at = len(state.prefix_keys) * self.managers[w].block_size if self.prefix_caching else 0
        if state.save_at <= state.num_computed:
            state.save_at = 0
        if not state.admitted:     # its first admission (not a resume after preemption)
            state.admitted, state.num_cached_tokens = True, state.num_computed
            self.prefix_queries += state.prompt_len
            self.prefix_hits += state.num_computed
        return True

    def _cached_blocks(self, worker: int, state: RequestState) -> int:
        manager = self.managers[worker]
        return len(manager.prefix.lookup(state.prefix_keys)[0]) if manager.prefix and state.prefix_keys else 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix on every worker (running requests keep their blocks)."""
        for manager in self.managers:
            manager.clear_prefix_cache()

    def _resume_tokens(self, state: RequestState) -> tuple[int, ...]:
        return state.request.prompt_token_ids + tuple(state.output_ids)

    def _preempt(self, state: RequestState) -> None:
        self._release(state)
        self._num_queued += 1
        if state.inflight:
            state.status = Status.PREEMPTED
        else:
            self._enqueue(state)

    def _enqueue(self, state: RequestState) -> None:
        state.status = Status.WAITING
        if self._planning:
            self._requeue.append(state)
        else:
            heapq.heappush(self._waiting, (state.arrival, state.request_id))

    def _victim(self, worker: int, not_in: set[str]) -> RequestState | None:
        """The newest running request of the worker that is not already part of this step."""
        return next((s for s in reversed(self._running[worker]) if s.request_id not in not_in), None)

    def _finish(self, state: RequestState, reason: FinishReason, new: tuple[int, ...] = (),
                matched: int | None = None, new_logprobs: tuple[TokenLogprobs, ...] = ()) -> RequestOutput:
        if state.status is Status.RUNNING:
            self._release(state)
        else:                                               # waiting or preempted (blocks already freed)
            self._num_queued -= 1
        state.status, state.finish_reason = Status.FINISHED, reason
        if state.inflight == 0:
            del self.requests[state.request_id]
        return self._output(state, new, reason, matched, new_logprobs)

    def _release(self, state: RequestState) -> None:
        running = self._running[state.worker]
        del running[next(i for i, s in enumerate(running) if s is state)]
        self.managers[state.worker].release(state.request_id)
        self._pending_drops[state.worker].append(state.request_id)
        state.worker = None

    def _output(self, state: RequestState, new: tuple[int, ...], reason: FinishReason | None = None,
                matched: int | None = None, new_logprobs: tuple[TokenLogprobs, ...] = ()) -> RequestOutput:
        return RequestOutput(state.request_id, new, state.prompt_len, len(state.output_ids), reason, matched,
                             new_logprobs=new_logprobs, num_cached_tokens=state.num_cached_tokens)

    # ------------------------------------------------------------------------------------------ views
    def _running_count(self, worker: int) -> int:
        return len(self._running[worker])

    @property
    def num_waiting(self) -> int:
        """Requests queued for admission: new, or preempted (their in-flight steps returned or not)."""
        return self._num_queued

    def running_on(self, worker: int) -> list[RequestState]:
        """The worker's running requests, by arrival."""
        return list(self._running[worker])

    def has_work(self) -> bool:
        return self._num_queued > 0 or any(self._running)

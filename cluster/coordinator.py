"""The coordinator: a Ray actor (CPU) that owns the request queue, the scheduler, the per-worker block
accounting, the expert placement and the load statistics, and drives the workers step by step.

It carries metadata only: plans out, sampled token ids (and log-probabilities where asked) back. The step loop
keeps up to two steps in flight — while workers execute step N, step N+1 is planned and queued behind it — so
scheduling overlaps execution.
Outputs go back per step, not per token per request: `output_batches` is one Ray streaming generator per
subscriber (the server), yielding one list of every request's new outputs per step; the server fans them out to
its streams (`engine_ray.RayEngineClient`). Requests come in by `submit`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import re
import time

from ray.exceptions import RayActorError, RayTaskError

from dsv4.cache.manager import KVCacheManager
from dsv4.cluster.engine_client import LoadReport, WorkerLoad
from dsv4.cluster.placement import HashAffinity
from dsv4.cluster.scheduler import Scheduler, StepPlans
from dsv4.wire.config import ServeConfig
from dsv4.wire.messages import WorkerInfo, WorkerResult
from dsv4.wire.model_info import ModelInfo
from dsv4.wire.placement import ExpertPlacement
from dsv4.wire.request import EngineFailed, FinishReason, GenerateRequest, RequestOutput

log = logging.getLogger(__name__)
MAX_STEPS_IN_FLIGHT = 2
# A step that raised inside a lone worker (which lives on) fails the requests it ran, and the engine serves on;
# this many failures in a row (a poisoned device) fail the engine instead.
MAX_CONSECUTIVE_STEP_FAILURES = 3
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line_error(error: BaseException, limit: int = 300) -> str:
    """What clients are told of a failure: the type and first line of the worker's own exception (not Ray's
    wrapper with its traceback, pids, addresses and colour codes), at most `limit` characters; the server log
    keeps the whole."""
    cause = getattr(error, "cause", None)          # RayTaskError: the exception raised inside the actor
    error = cause if isinstance(cause, BaseException) else error
    lines = _ANSI_ESCAPE.sub("", str(error)).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Coordinator:
    def __init__(self, config: ServeConfig, workers: list, infos: list[WorkerInfo], model_info: ModelInfo,
                 placement: ExpertPlacement, num_hash_layers: int):
        self.config, self.workers, self.infos, self.info = config, workers, infos, model_info
        self.placement = placement
        managers = [KVCacheManager(i.num_slots, i.num_blocks, i.block_size, i.num_snapshots) for i in infos]
        affinity = HashAffinity.from_checkpoint(config.model_dir, num_hash_layers, placement)
        self.scheduler = Scheduler(config.scheduler, managers, model_info.max_model_len, model_info.eos_token_ids,
                                   affinity, config.speculative_tokens)
        self._subscribers: list[asyncio.Queue[list[RequestOutput]]] = []
        self._outbox: list[RequestOutput] = []      # outputs since the last flush to the subscribers
        self.expert_token_counts = [0] * len(placement.owner)
        self.draft_tokens = self.accepted_tokens = 0          # speculative decoding, since start
        self.steps_done = 0
        # With two steps in flight, steps complete every max(worker time, Ray round trip + planning): the interval
        # between completions against the slowest worker's own time shows what the orchestration costs.
        self.step_intervals = collections.deque(maxlen=100)
        self.worker_seconds = collections.deque(maxlen=100)
        self._last_completion: float | None = None
        self._seeds = random.Random(config.seed)
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._failure: str | None = None
        self._consecutive_step_failures = 0

    # ------------------------------------------------------------------------------------------ API
    def model_info(self) -> ModelInfo:
        return self.info

    async def is_healthy(self) -> bool:
        return self._failure is None

    async def submit(self, request: GenerateRequest) -> None:
        """Queue a request (InvalidRequest names a bad field); its outputs arrive on `output_batches`."""
        request.validate(self.info.vocab_size, self.info.max_model_len)
        if self._failure is not None:
            raise EngineFailed(f"engine failed: {self._failure}")
        seed = request.sampling.seed if request.sampling.seed is not None else self._seeds.getrandbits(63)
        self.scheduler.add(request, seed)
        self._ensure_loop()
        self._wake.set()

    async def output_batches(self):
        """A Ray streaming generator of every request's outputs, one list per step (or per abort). The first item
        is an empty list: the subscription exists once it arrives, so nothing submitted afterwards is missed."""
        queue: asyncio.Queue[list[RequestOutput]] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            yield []
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    async def abort(self, request_id: str) -> bool:
        output = self.scheduler.abort(request_id)
        if output is None:
            return False
        self._deliver(output)
        self._flush()
        return True

    async def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (an operator's flush; running requests keep their blocks)."""
        self.scheduler.reset_prefix_cache()

    async def loads(self) -> LoadReport:
        workers = []
        for rank, manager in enumerate(self.scheduler.managers):
            running = self.scheduler.running_on(rank)
            workers.append(WorkerLoad(rank, len(running), sum(s.num_computed for s in running),
                                      manager.num_free_blocks, manager.num_total_blocks,
                                      self.infos[rank].local_expert_ids))
        def mean(values) -> float:
            return sum(values) / len(values) if values else 0.0

        extra = {"steps": float(self.steps_done), "mean_step_interval_seconds": mean(self.step_intervals),
                 "mean_worker_seconds": mean(self.worker_seconds),
                 "spec_decode_num_draft_tokens": float(self.draft_tokens),
                 "spec_decode_num_accepted_tokens": float(self.accepted_tokens),
                 "prefix_cache_queries": float(self.scheduler.prefix_queries),
                 "prefix_cache_hits": float(self.scheduler.prefix_hits)}
        return LoadReport(self.scheduler.num_waiting, sum(w.num_running_requests for w in workers), tuple(workers),
                          tuple(self.expert_token_counts), extra)

    # ------------------------------------------------------------------------------------------ step loop
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        in_flight: collections.deque[tuple[StepPlans, list]] = collections.deque()
        try:
            while True:
                plans = self.scheduler.schedule() if len(in_flight) < MAX_STEPS_IN_FLIGHT else None
                for output in self.scheduler.take_finished_outputs():
                    self._deliver(output)
                self._flush()
                if plans is not None:
                    futures = [w.execute.remote(p) for w, p in zip(self.workers, plans.plans, strict=True)]
                    in_flight.append((plans, futures))
                    if len(in_flight) < MAX_STEPS_IN_FLIGHT:
                        continue                      # plan the next step while this one runs
                if in_flight:
                    done, futures = in_flight.popleft()
                    try:
                        results = await asyncio.gather(*futures)
                    except RayTaskError as e:
                        if not self._contain_step_failure(done, e):
                            raise
                    else:
                        self._consecutive_step_failures = 0
                        self._process(done, results)
                    self._flush()
                elif not self.scheduler.has_work():
                    self._wake.clear()
                    await self._wake.wait()
                else:
                    await asyncio.sleep(0.001)        # requests wait for blocks held by finishing ones
        except Exception as e:                        # a worker died or a step failed: fail every stream loudly
            log.exception("step loop failed")
            self._failure = one_line_error(e)
            for request_id in list(self.scheduler.requests):
                output = self.scheduler.abort(request_id)
                if output is not None:
                    self._deliver(RequestOutput(output.request_id, (), output.num_prompt_tokens,
                                                output.num_output_tokens, FinishReason.ERROR, error=self._failure))
            self._flush()

    def _contain_step_failure(self, plans: StepPlans, error: RayTaskError) -> bool:
        """A step raised inside its worker. With one worker, which is alive (its exception came back), the
        requests the step ran end with ERROR naming the cause and the engine serves on; True if so. With several,
        the others may be blocked in the step's all-to-all: False, the engine fails."""
        self._consecutive_step_failures += 1
        if (len(self.workers) > 1 or isinstance(error, RayActorError)
                or self._consecutive_step_failures >= MAX_CONSECUTIVE_STEP_FAILURES):
            return False
        message = f"engine step failed: {one_line_error(error)}"
        log.error("step %d failed; ending its %d requests", self.steps_done, len(plans.request_ids), exc_info=error)
        for request_id in plans.request_ids:
            output = self.scheduler.abort(request_id)   # blocks freed; the worker drops it with the next plan
            if output is not None:
                self._deliver(RequestOutput(output.request_id, (), output.num_prompt_tokens,
                                            output.num_output_tokens, FinishReason.ERROR, error=message))
        self.scheduler.step_returned(plans, ok=False)
        return True

    def _process(self, plans: StepPlans, results: list[WorkerResult]) -> None:
        for result in results:
            for request_id, (tokens, logprobs) in result.tokens_by_request().items():
                output = self.scheduler.on_tokens(request_id, tokens, logprobs)
                if output is not None:
                    self._deliver(output)
            for e, n in enumerate(result.expert_counts):
                self.expert_token_counts[e] += n
            self.draft_tokens += result.num_draft_tokens
            self.accepted_tokens += result.num_accepted_tokens
        self.scheduler.step_returned(plans)
        self.steps_done += 1
        now = time.perf_counter()
        if self._last_completion is not None and now - self._last_completion < 1.0:   # skip idle gaps
            self.step_intervals.append(now - self._last_completion)
        self._last_completion = now
        self.worker_seconds.append(max(r.seconds for r in results))

    def _deliver(self, output: RequestOutput) -> None:
        self._outbox.append(output)

    def _flush(self) -> None:
        """The outputs gathered since the last flush, as one batch to every subscriber."""
        if self._outbox:
            for queue in self._subscribers:
                queue.put_nowait(self._outbox)
            self._outbox = []

"""A minimal continuous-batching loop over the engine step (shared by the CPU and GPU engine-step tests), and the
coordinator's loop over one in-process worker and the scheduler (no Ray)."""

from dataclasses import dataclass, field
from itertools import count

import torch

from dsv4.cache.manager import KVCacheManager
from dsv4.model.batch import Chunk
from dsv4.model.kv_cache import KVStorage
from dsv4.workers.model_runner import ModelRunner


@dataclass
class Seq:
    seq_id: str
    prompt: list[int]
    max_new: int
    join_step: int
    tokens: list[int] = field(default_factory=list)             # prompt + generated so far
    fed: int = 0                                                  # tokens already run through the model
    logits: list[torch.Tensor] = field(default_factory=list)     # the logits each generated token came from

    def __post_init__(self):
        self.tokens = list(self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]


def serve(model, numerics, seqs, num_slots, num_blocks, rng, device="cpu", max_chunk=None, warm_up=()):
    """A minimal continuous-batching loop: admit when a sequence's join step comes and a slot is free, feed a
    random-sized prefill chunk (at most `max_chunk` tokens) or one decode token per running sequence, sample
    greedily, release when done. `warm_up`: sizes the runner warms up with first."""
    manager = KVCacheManager(num_slots, num_blocks, block_size=256)
    runner = ModelRunner(model, KVStorage(model.config, numerics, num_slots, num_blocks, device=device), numerics)
    if warm_up:
        runner.warm_up(warm_up)
    waiting, running, step, max_running = sorted(seqs, key=lambda s: s.join_step), [], 0, 0
    while waiting or running:
        for s in [s for s in waiting if s.join_step <= step]:
            if manager.admit(s.seq_id, 1) is not None:
                waiting.remove(s)
                running.append(s)
        plan = []
        for s in running:
            remaining = len(s.tokens) - s.fed
            n = rng.randint(1, min(remaining, max_chunk or remaining))   # decode when remaining == 1
            assert manager.reserve(s.seq_id, s.fed + n)
            plan.append((s, n))
        max_running = max(max_running, len(plan))
        if plan:
            steps = [Chunk(manager.get(s.seq_id).slot, manager.get(s.seq_id).blocks, s.fed, s.tokens[s.fed:s.fed + n])
                     for s, n in plan]
            for (s, n), row in zip(plan, runner.step(steps), strict=True):
                s.fed += n
                if s.fed == len(s.tokens):                   # the chunk reached the end: sample the next token
                    s.logits.append(row.float().cpu())
                    s.tokens.append(int(row.argmax()))
                    if len(s.generated) == s.max_new:
                        manager.release(s.seq_id)
                        running.remove(s)
        step += 1
    assert manager.num_free_blocks == num_blocks and manager.slots.num_free == num_slots
    return max_running


# ---------------------------------------------------------------------------------------------- worker + scheduler
_RUNS = count()      # request ids stay distinct across runs on one engine


def inprocess_engine(checkpoint, speculative_tokens=0, **overrides):
    """One in-process worker (reference numerics unless overridden) and the scheduler over its cache: the
    coordinator's loop without Ray."""
    from dsv4.cache.manager import KVCacheManager
    from dsv4.cluster.scheduler import Scheduler
    from dsv4.wire.config import SchedulerConfig, ServeConfig
    from dsv4.workers.worker import Worker

    settings = dict(num_workers=1, max_model_len=1024, kv_cache_bytes=64 << 20, speculative_tokens=speculative_tokens,
                    scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_prefill_chunk=96))
    config = ServeConfig(model_dir=str(checkpoint), **{**settings, **overrides})
    worker = Worker(0, 1, config, (0,) * 16)
    info = worker.load()
    manager = KVCacheManager(info.num_slots, info.num_blocks, info.block_size, info.num_snapshots)
    return worker, Scheduler(config.scheduler, [manager], config.max_model_len, (1,), None, speculative_tokens)


def run_requests(checkpoint, requests, drafter=None, in_flight=1, engine=None, **overrides):
    """Run requests [(prompt, SamplingParams)] to completion: ({index: (tokens, logprobs)}, drafts verified, drafts
    accepted, {index: prompt tokens found in the prefix cache}). in_flight 2 plans each step before the previous
    one's tokens are back, as the coordinator does (the worker runs the plans in order). `engine`: an
    `inprocess_engine` to reuse (its caches as they are); request i gets seed 1000 + i whichever run it is in."""
    from collections import deque

    from dsv4.wire.request import GenerateRequest

    worker, scheduler = engine or inprocess_engine(checkpoint, **overrides)
    if drafter is not None:
        worker.speculator.drafter = drafter
    assert not scheduler.requests
    run = next(_RUNS)
    ids = [f"run{run}-{i}" for i in range(len(requests))]
    for i, (rid, (prompt, sampling)) in enumerate(zip(ids, requests, strict=True)):
        scheduler.add(GenerateRequest(rid, tuple(prompt), sampling), seed=1000 + i)
    out = {rid: ([], []) for rid in ids}
    cached = dict.fromkeys(ids, 0)
    drafts = accepted = 0
    steps = deque()
    while scheduler.has_work() or steps:
        plans = scheduler.schedule() if len(steps) < in_flight else None
        if plans is not None:
            steps.append((plans, worker.execute(plans.plans[0])))
            if len(steps) < in_flight:
                continue
        assert steps, "work left that no step can run"
        plans, result = steps.popleft()
        drafts, accepted = drafts + result.num_draft_tokens, accepted + result.num_accepted_tokens
        for rid, (tokens, logprobs) in result.tokens_by_request().items():
            output = scheduler.on_tokens(rid, tokens, logprobs)
            if output is not None:
                out[rid][0].extend(output.new_token_ids)
                out[rid][1].extend(output.new_logprobs)
                cached[rid] = output.num_cached_tokens
        scheduler.step_returned(plans)
    assert not scheduler.requests
    manager = scheduler.managers[0]
    assert manager.num_free_blocks == manager.num_total_blocks and not manager.sequence_ids
    return {i: out[rid] for i, rid in enumerate(ids)}, drafts, accepted, {i: cached[rid] for i, rid in enumerate(ids)}

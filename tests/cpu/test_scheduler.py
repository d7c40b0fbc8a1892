"""The `Scheduler` alone (no Ray, no workers): in-flight counts, the token budget and chunked prefill, decodes
before prefills, FIFO admission, preemption and resume, and a property-based state machine (random arrivals,
aborts, steps returned with up to two in flight) whose invariants tie the scheduler's queues to the block
managers and whose teardown drains everything to zero requests and zero blocks in use."""

from __future__ import annotations

import collections

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from dsv4.cache.manager import KVCacheManager
from dsv4.cluster.scheduler import Scheduler, Status
from dsv4.wire.config import SchedulerConfig
from dsv4.wire.request import EngineOverloaded, FinishReason, GenerateRequest, SamplingParams

EOS = 0
BLOCK = 16


def make(num_workers: int = 1, num_slots: int = 4, num_blocks: int = 64, max_model_len: int = 4096,
         speculative_tokens: int = 0, num_snapshots: int = 0, **config) -> Scheduler:
    managers = [KVCacheManager(num_slots, num_blocks, BLOCK, num_snapshots) for _ in range(num_workers)]
    return Scheduler(SchedulerConfig(**config), managers, max_model_len, (EOS,),
                     speculative_tokens=speculative_tokens)


def request(rid: str, prompt_len: int, max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(rid, tuple(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


class Driver:
    """Plays the workers: plans steps, keeps up to two in flight, and returns the oldest with a sampled token
    (never EOS) for every chunk that reached its request's end when it was planned; with speculative tokens, a
    decode token brings 0 .. N accepted drafts more (a pattern that varies from step to step)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.in_flight: collections.deque = collections.deque()
        self.outputs: dict[str, list] = collections.defaultdict(list)
        self.next_token = 1
        self.returned = 0

    def plan(self):
        requests = self.scheduler.requests
        before = {rid: s.num_scheduled_outputs for rid, s in requests.items()}
        plans = self.scheduler.schedule()
        if plans is None:
            return None
        admitted = {n.request_id for p in plans.plans for n in p.new_requests}
        # a chunk samples when it reaches its request's end: the scheduled outputs grew by one
        samplers = [c.request_id for p in plans.plans for c in p.chunks
                    if requests[c.request_id].num_scheduled_outputs
                    > (len(requests[c.request_id].output_ids) if c.request_id in admitted else before[c.request_id])]
        self.in_flight.append((plans, samplers))
        return plans

    def return_oldest(self) -> None:
        plans, samplers = self.in_flight.popleft()
        decodes = {c.request_id for p in plans.plans for c in p.chunks if c.num_tokens == 1}
        for rid in samplers:
            self.returned += 1
            extra = self.returned % (self.scheduler.speculative_tokens + 1) if rid in decodes else 0
            tokens = tuple(range(self.next_token + 1, self.next_token + 2 + extra))
            self.next_token += len(tokens)
            out = self.scheduler.on_tokens(rid, tokens)
            if out is not None:
                self.outputs[rid].append(out)
        self.scheduler.step_returned(plans)

    def step(self):
        plans = self.plan()
        if len(self.in_flight) == 2 or (plans is None and self.in_flight):
            self.return_oldest()
        return plans

    def drain(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if self.step() is None and not self.in_flight and not self.scheduler.has_work():
                return
        raise AssertionError("the scheduler did not drain")


def chunks_of(plans, worker: int = 0) -> list[tuple[str, int]]:
    return [(c.request_id, c.num_tokens) for c in plans.plans[worker].chunks]


# ---------------------------------------------------------------------------------------------- unit tests
def test_budget_chunked_prefill_and_decodes_first():
    sched = make(max_num_batched_tokens=64, max_prefill_chunk=32)
    for rid in ("a", "b", "c"):
        sched.add(request(rid, 50), seed=1)
    driver = Driver(sched)
    first = driver.plan()
    assert chunks_of(first) == [("a", 32), ("b", 32)]          # the budget admits two first chunks; c waits
    assert [n.request_id for n in first.plans[0].new_requests] == ["a", "b"] and sched.num_waiting == 1
    second = driver.plan()                                     # planned before the first returns
    assert chunks_of(second) == [("a", 18), ("b", 18), ("c", 28)]
    assert sched.requests["a"].inflight == 2 and sched.requests["c"].inflight == 1
    driver.return_oldest()
    assert sched.requests["a"].inflight == 1 and sched.requests["a"].output_ids == []
    driver.return_oldest()                                     # a and b finished their prompts: one token each
    assert len(sched.requests["a"].output_ids) == 1 and sched.requests["a"].inflight == 0
    third = driver.plan()
    assert chunks_of(third)[:2] == [("a", 1), ("b", 1)]        # decodes of running requests before prefill
    assert chunks_of(third)[2] == ("c", 22)


def test_decodes_run_ahead_of_returned_tokens_by_one_step():
    sched = make()
    sched.add(request("a", 5, max_tokens=4), seed=1)
    driver = Driver(sched)
    driver.plan()                                              # the prompt: samples output 1
    assert chunks_of(driver.plan()) == [("a", 1)]              # output 2 planned before output 1 is known
    assert driver.plan() is None or len(driver.in_flight) == 3
    driver.drain()
    assert len(driver.outputs["a"]) == 4 and driver.outputs["a"][-1].finish_reason is FinishReason.LENGTH
    assert sched.requests == {} and sched.managers[0].num_free_blocks == 64


def test_fifo_admission_and_slots():
    sched = make(num_slots=2)
    for rid in ("a", "b", "c"):
        sched.add(request(rid, 4), seed=1)
    plans = Driver(sched).plan()
    assert [n.request_id for n in plans.plans[0].new_requests] == ["a", "b"]     # two slots
    assert sched.num_waiting == 1 and [s.request_id for s in sched.running_on(0)] == ["a", "b"]


def test_head_of_line_request_blocks_later_ones():
    """FIFO: a first request that does not fit now keeps smaller later arrivals waiting behind it."""
    sched = make(num_blocks=8)                                 # 128 positions
    sched.add(request("big", 100, max_tokens=40), seed=1)
    driver = Driver(sched)
    driver.plan()
    sched.add(request("next", 100), seed=1)                    # needs 7 blocks; 1 free
    sched.add(request("small", 4), seed=1)
    plans = driver.plan()
    assert plans is not None and all(c.request_id == "big" for c in plans.plans[0].chunks)
    assert sched.requests["small"].status is Status.WAITING


def test_preemption_frees_blocks_and_resumes_with_the_outputs_so_far():
    """Two requests that fit at admission but not at full length: the newer is preempted (blocks freed, its state
    dropped on the worker), re-admitted later with its prompt plus the outputs it had, and completes."""
    sched = make(num_blocks=6, max_prefill_chunk=256, max_num_batched_tokens=256)   # 96 positions
    sched.add(request("old", 20, max_tokens=50), seed=1)
    sched.add(request("new", 20, max_tokens=50), seed=2)
    driver = Driver(sched)
    preempted_at = None
    for _ in range(200):
        plans = driver.step()
        new = sched.requests.get("new")
        if new is not None and new.status in (Status.PREEMPTED, Status.WAITING) and new.output_ids:
            preempted_at = len(new.output_ids)
            assert plans is not None and "new" in plans.plans[0].finished_ids
            assert "new" not in {n.request_id for n in plans.plans[0].new_requests}     # not re-admitted at once
            break
    assert preempted_at is not None, "the newest request is preempted when blocks run out"
    assert "new" not in sched.managers[0] and sched.num_waiting == 1
    assert sched.requests["old"].status is Status.RUNNING
    resumed = None
    for _ in range(400):
        plans = driver.step()
        if plans is not None:
            resumed = next((n for n in plans.plans[0].new_requests if n.request_id == "new"), None)
        if resumed is not None:
            break
    assert resumed is not None and resumed.num_prior_outputs >= preempted_at
    assert resumed.token_ids[:20] == tuple(range(1, 21)) and len(resumed.token_ids) == 20 + resumed.num_prior_outputs
    driver.drain()
    assert len([t for o in driver.outputs["new"] for t in o.new_token_ids]) == 50
    assert sched.requests == {} and sched.managers[0].num_free_blocks == 6


def test_abort_of_waiting_and_running_requests():
    sched = make(num_slots=1)
    sched.add(request("a", 4), seed=1)
    sched.add(request("b", 4), seed=1)
    driver = Driver(sched)
    driver.plan()
    assert sched.abort("b").finish_reason is FinishReason.ABORT and sched.num_waiting == 0
    assert sched.abort("a").finish_reason is FinishReason.ABORT
    assert sched.abort("a") is None and sched.abort("unknown") is None
    driver.drain()
    assert sched.requests == {} and not sched.has_work() and sched.managers[0].num_free_blocks == 64


def test_a_full_waiting_queue_refuses_new_requests():
    sched = make(num_slots=1, max_waiting=2)
    sched.add(request("a", 4), seed=1)
    sched.add(request("b", 4), seed=1)
    with pytest.raises(EngineOverloaded, match="max_waiting"):
        sched.add(request("c", 4), seed=1)
    Driver(sched).plan()                                       # a admitted: one place in the queue again
    sched.add(request("c", 4), seed=1)
    assert sched.num_waiting == 2


def test_requests_spread_over_workers_by_headroom():
    sched = make(num_workers=2)
    for rid in ("a", "b", "c", "d"):
        sched.add(request(rid, 20), seed=1)
    Driver(sched).plan()
    assert sorted(len(sched.running_on(w)) for w in range(2)) == [2, 2]


def test_speculative_decodes_cost_their_drafts_and_reserve_room_for_them():
    """With 3 speculative tokens a decode takes 1 + its drafts of the step's budget (as many drafts as fit, so no
    decode starves), the exchange size the workers are told counts them, and blocks are reserved for them past
    what the request's in-flight steps may have accepted."""
    sched = make(num_blocks=64, max_num_batched_tokens=10, max_prefill_chunk=32, speculative_tokens=3)
    for rid in ("a", "b", "c"):
        sched.add(request(rid, 14, max_tokens=500), seed=1)
    driver = Driver(sched)
    assert chunks_of(driver.plan()) == [("a", 10)]
    driver.return_oldest()
    assert chunks_of(driver.plan()) == [("a", 4), ("b", 6)]
    decodes = collections.Counter()
    for _ in range(40):
        plans = driver.step()
        if plans is None:
            continue
        chunks = plans.plans[0].chunks
        assert sum(c.num_tokens + c.max_drafts for c in chunks) == plans.plans[0].max_worker_tokens <= 10
        for c in chunks:
            assert c.max_drafts == 0 or c.num_tokens == 1
            if c.num_tokens == 1:
                decodes[c.request_id] += 1
                state = sched.requests[c.request_id]
                held = len(sched.managers[0].get(c.request_id).blocks) * BLOCK
                assert held >= state.num_computed + 3 * (state.inflight - 1) + c.max_drafts
    assert set(decodes) == {"a", "b", "c"} and min(decodes.values()) >= 5      # all three decode, none starves
    assert [c.max_drafts for c in plans.plans[0].chunks] == [3, 3, 1]         # 4 + 4 + 2 of the 10


def test_several_tokens_in_one_step_move_the_request_on_and_stop_where_they_must():
    """Accepted drafts: one step returns several tokens; the request advances by all of them (positions run and
    outputs held on the worker), and its next plan is one decode token again. max_tokens or a stop token inside
    the list end the request there; the tokens after it are dropped."""
    sched = make(speculative_tokens=4)
    sched.add(request("a", 5, max_tokens=7), seed=1)
    sched.add(GenerateRequest("b", (1, 2, 3), SamplingParams(max_tokens=50, stop_token_ids=(42,))), seed=1)
    driver = Driver(sched)
    driver.plan()
    driver.return_oldest()                                       # prompts done: one token each
    driver.plan()                                                # decode step
    out = sched.on_tokens("a", (11, 12, 13))                     # two drafts accepted, then the target's token
    state = sched.requests["a"]
    assert out.new_token_ids == (11, 12, 13) and state.output_ids[-3:] == [11, 12, 13]
    assert state.num_computed == 5 + 1 + 2 and state.scheduled_len - state.num_computed == 1
    assert sched.on_tokens("b", (7, 42, 8)).finish_reason is FinishReason.STOP
    sched.step_returned(driver.in_flight.popleft()[0])
    assert chunks_of(driver.plan()) == [("a", 1)]
    final = sched.on_tokens("a", (14, 15, 16, 17))               # 4 + 3 = 7 = max_tokens after 16
    assert final.finish_reason is FinishReason.LENGTH and final.new_token_ids == (14, 15, 16)
    assert sched.on_tokens("a", (18,)) is None


# ---------------------------------------------------------------------------------------------- state machine
class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, aborts and steps on two workers with small caches: the queues agree with the managers
    at every point, and everything drains to zero."""

    def __init__(self):
        super().__init__()
        self.scheduler = make(num_workers=2, num_slots=3, num_blocks=12, max_model_len=160,
                              max_num_batched_tokens=48, max_prefill_chunk=24)
        self.driver = Driver(self.scheduler)
        self.next_id = 0
        self.live: list[str] = []

    @rule(prompt_len=st.integers(1, 100), max_tokens=st.integers(1, 40))
    def arrive(self, prompt_len, max_tokens):
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.scheduler.add(request(rid, prompt_len, max_tokens), seed=self.next_id)
        self.live.append(rid)

    @rule(data=st.data())
    def abort(self, data):
        if self.live:
            self.scheduler.abort(self.live.pop(data.draw(st.integers(0, len(self.live) - 1))))

    @rule(steps=st.integers(1, 6))
    def run(self, steps):
        for _ in range(steps):
            self.driver.step()

    @invariant()
    def queues_agree_with_the_managers(self):
        sched = self.scheduler
        states = list(sched.requests.values())
        assert sched.num_waiting == sum(s.status in (Status.WAITING, Status.PREEMPTED) for s in states)
        for w, manager in enumerate(sched.managers):
            running = [s for s in states if s.status is Status.RUNNING and s.worker == w]
            listed = sched.running_on(w)
            assert {s.request_id for s in listed} == {s.request_id for s in running}
            assert [s.arrival for s in listed] == sorted(s.arrival for s in listed)
            assert set(manager.sequence_ids) == {s.request_id for s in running}
            assert len(running) <= 3
        for s in states:
            assert s.inflight >= 0 and s.num_computed <= s.scheduled_len
            assert s.status is not Status.FINISHED or s.inflight > 0       # finished ones linger only in flight
        assert sched.has_work() == any(s.status is not Status.FINISHED for s in states)

    def teardown(self):
        self.driver.drain()
        sched = self.scheduler
        assert sched.requests == {} and sched.num_waiting == 0 and not sched.has_work()
        assert all(m.num_free_blocks == m.num_total_blocks and not m.sequence_ids for m in sched.managers)
        for rid, outputs in self.driver.outputs.items():        # every request that ended says so exactly once
            assert sum(o.finished for o in outputs) <= 1, rid


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


class SpeculativeSchedulerMachine(SchedulerMachine):
    """The same with 2 speculative tokens: decode steps return 1 to 3 tokens."""

    def __init__(self):
        super().__init__()
        self.scheduler = make(num_workers=2, num_slots=3, num_blocks=12, max_model_len=160,
                              max_num_batched_tokens=48, max_prefill_chunk=24, speculative_tokens=2)
        self.driver = Driver(self.scheduler)


TestSpeculativeSchedulerMachine = SpeculativeSchedulerMachine.TestCase
TestSpeculativeSchedulerMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)



class PrefixSchedulerMachine(SchedulerMachine):
    """The same with prefix caching (every prompt is 1, 2, 3, ...: they all share prefixes) and 2 speculative
    tokens: prefixes are registered as their steps return, shared, evicted under pressure, dropped with aborted or
    preempted requests; a block's holders are the running requests listing it."""

    def __init__(self):
        super().__init__()
        self.scheduler = make(num_workers=2, num_slots=3, num_blocks=12, max_model_len=160,
                              max_num_batched_tokens=48, max_prefill_chunk=24, speculative_tokens=2, num_snapshots=3)
        self.driver = Driver(self.scheduler)

    @invariant()
    def blocks_are_held_by_those_listing_them(self):
        for m in self.scheduler.managers:
            listed = [b for rid in m.sequence_ids for b in m.get(rid).blocks]
            assert all(m.holders(b) == listed.count(b) for b in range(m.num_total_blocks))
            assert m.prefix.snapshots.num_used <= 3


TestPrefixSchedulerMachine = PrefixSchedulerMachine.TestCase
TestPrefixSchedulerMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


def test_a_prompt_resumes_from_the_cached_prefix_of_an_earlier_one():
    """Two prompts sharing 40 tokens (blocks of 16): the first snapshots where its chunks end on block
    boundaries (16, 32); once its step is back, the second is admitted with 32 tokens cached, the shared blocks
    and the snapshot in its plan, and is charged only for the rest."""
    sched = make(num_snapshots=4, max_prefill_chunk=16)
    sched.add(request("a", 45), seed=1)
    driver = Driver(sched)
    first = driver.plan()
    assert first.plans[0].chunks[0].save_snapshot is not None and first.prefix_saves[0].keys == tuple(
        sched.requests["a"].prefix_keys[:1])
    for _ in range(3):
        driver.step()
    while driver.in_flight:
        driver.return_oldest()
    sched.add(GenerateRequest("b", tuple(range(1, 41)) + (99,) * 10, SamplingParams(max_tokens=2)), seed=1)
    plans = driver.plan()
    new = next(n for n in plans.plans[0].new_requests if n.request_id == "b")
    assert new.num_cached_tokens == 32 and new.snapshot is not None
    assert new.prefix_block_ids == tuple(sched.managers[0].get("a").blocks[:2])
    assert ("b", 16) in chunks_of(plans) and sched.requests["b"].num_cached_tokens == 32
    driver.drain()
    assert sched.prefix_hits == 32 and sched.prefix_queries == 45 + 50

"""Prefix caching on the real engine step (reference numerics, one in-process worker and the scheduler): requests
sharing prompt prefixes resume from cached blocks and a snapshot of the slot state, and compute exactly — token for
token, log-probability for log-probability — what they compute from scratch: across block boundaries, CSA and HCA
windows and the 128-entry window ring, under eviction pressure and preemption, with speculative decoding, and
for multi-turn chats whose every turn extends the last."""

import pytest
import torch
from engine_loop import inprocess_engine, run_requests

from dsv4.wire.config import SchedulerConfig
from dsv4.wire.request import SamplingParams

SNAPSHOTS = 6
CHUNKS_OF_A_BLOCK = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_prefill_chunk=256)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(max_tokens: int, logprobs: int | None = 2) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)


def shared_prefix_requests() -> list[tuple[list[int], SamplingParams]]:
    """A 600-token system prompt (two full blocks and a ragged end) under several user turns, one request that
    shares only its first block, and one that shares nothing."""
    system = tokens(600, 1)
    return ([(system + tokens(n, 10 + n), greedy(8)) for n in (3, 40, 200)]
            + [(system[:300] + tokens(90, 2), greedy(8)), (tokens(520, 3), greedy(8))])


@pytest.fixture(scope="module")
def from_scratch(tiny_checkpoint):
    """Every request of the workloads below without prefix caching (what the cached runs must equal)."""
    requests = shared_prefix_requests()
    return {tuple(p): out for (p, _), out in zip(requests, run_requests(tiny_checkpoint, requests)[0].values(),
                                                  strict=True)}


def test_shared_prefixes_resume_from_the_cache_and_compute_the_same(tiny_checkpoint, from_scratch):
    """The first request fills the cache (snapshots where its prompt's last full block ends, 512, and where its
    256-token chunks end on block boundaries, 256); the later ones resume after 512 or 256 tokens, the unrelated
    one after none; outputs and log-probabilities equal the uncached run's bit for bit."""
    engine = inprocess_engine(tiny_checkpoint, prefix_cache_snapshots=SNAPSHOTS, scheduler=CHUNKS_OF_A_BLOCK)
    requests = shared_prefix_requests()
    first = run_requests(tiny_checkpoint, requests[:1], engine=engine)
    rest = run_requests(tiny_checkpoint, requests[1:], engine=engine)
    assert first[3] == {0: 0} and rest[3] == {0: 512, 1: 512, 2: 256, 3: 0}
    for (prompt, _), out in zip(requests, [first[0][0], *rest[0].values()], strict=True):
        assert out == from_scratch[tuple(prompt)]
    scheduler = engine[1]
    assert scheduler.prefix_hits == 512 + 512 + 256 and scheduler.prefix_queries == sum(len(p) for p, _ in requests)


def test_eviction_and_preemption_keep_outputs_exact(tiny_checkpoint, from_scratch, monkeypatch):
    """A cache of 5 blocks and 2 snapshots for 2 sequences, a long decode and the five shared-prefix requests at
    once: cached prefixes are evicted to make room, requests are preempted and resumed (from a cached prefix where
    one survives); the same outputs."""
    from dsv4.cache.spec import plan_cache
    from dsv4.cluster.scheduler import Scheduler
    from dsv4.model.config import ModelConfig
    from dsv4.model.numerics import Numerics

    preempted = []
    preempt = Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt", lambda self, state: (preempted.append(state.request_id),
                                                                      preempt(self, state)))
    config = ModelConfig.from_file(tiny_checkpoint / "config.json")
    plan = plan_cache(config, Numerics.parse("reference"), 1 << 30, 2, num_snapshots=2)
    cramped = dict(kv_cache_bytes=plan.total_bytes - (plan.num_blocks - 5) * plan.bytes_per_block,
                   prefix_cache_snapshots=2,
                   scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=256, max_prefill_chunk=256))
    engine = inprocess_engine(tiny_checkpoint, **cramped)
    assert engine[1].managers[0].num_total_blocks == 5
    # a long decode first: it needs its third block while the shared-prefix requests hold the rest
    requests = [(tokens(480, 5), greedy(40, None)), *shared_prefix_requests()]
    out, _, _, cached = run_requests(tiny_checkpoint, requests, engine=engine)
    expected = dict(from_scratch)
    expected[tuple(requests[0][0])] = run_requests(tiny_checkpoint, requests[:1])[0][0]
    assert {tuple(p): out[i] for i, (p, _) in enumerate(requests)} == expected
    assert preempted and sum(cached.values()) > 0


def test_speculation_from_a_cached_prefix(tiny_checkpoint, from_scratch):
    """MTP speculation on top of a cached prefix: the snapshot carries the MTP block's ring too."""
    engine = inprocess_engine(tiny_checkpoint, prefix_cache_snapshots=SNAPSHOTS, speculative_tokens=2)
    requests = shared_prefix_requests()
    run_requests(tiny_checkpoint, requests[:1], engine=engine)
    out, drafts, _, cached = run_requests(tiny_checkpoint, requests[1:3], engine=engine)
    assert drafts > 0 and cached == {0: 512, 1: 512}
    assert [out[0], out[1]] == [from_scratch[tuple(requests[1][0])], from_scratch[tuple(requests[2][0])]]


def test_multi_turn_chat_reuses_each_turn(tiny_checkpoint):
    """Five turns, each prompt the last one's prompt and answer plus a new message: each turn after the first
    resumes where the previous prompt's last full block ended, and answers as it would from scratch."""
    engine = inprocess_engine(tiny_checkpoint, prefix_cache_snapshots=SNAPSHOTS)
    prompt, transcript, expected_cache = tokens(300, 7), [], []
    for turn in range(5):
        out, _, _, cached = run_requests(tiny_checkpoint, [(prompt, greedy(20, None))], engine=engine)
        transcript.append((list(prompt), out[0][0], cached[0]))
        expected_cache.append(0 if turn == 0 else (len(transcript[-2][0]) - 1) // 256 * 256)
        prompt = prompt + out[0][0] + tokens(60, 20 + turn)
    assert [c for _, _, c in transcript] == expected_cache and expected_cache[-1] >= 512
    scratch = run_requests(tiny_checkpoint, [(p, greedy(20, None)) for p, _, _ in transcript])[0]
    assert [scratch[i][0] for i in range(5)] == [answer for _, answer, _ in transcript]


def test_the_service_reports_cached_tokens_and_flushes(ray_cluster, tiny_checkpoint, tiny_model):
    """The real service (two expert-parallel workers): a prompt that shares a 520-token prefix with an earlier
    one streams `cached_tokens` 512 and the single-process model's tokens; GetLoads counts the hits; after
    ResetPrefixCache nothing is found."""
    import grpc
    from api_fakes import TIMEOUT_S
    from conftest import start_test_engine
    from test_service import generate_ids, serve

    from dsv4.model.generate import greedy_generate
    from dsv4.model.numerics import Numerics
    from dsv4.protos import dsv4_pb2 as pb
    from dsv4.protos import dsv4_pb2_grpc

    engine = start_test_engine(tiny_checkpoint, prefix_cache_snapshots=4, max_model_len=1024,
                               scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512,
                                                         max_prefill_chunk=256))
    server = serve(engine, tiny_checkpoint)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = dsv4_pb2_grpc.Dsv4EngineStub(channel)
            shared = tokens(520, 30)
            first, complete = generate_ids(stub, shared + tokens(20, 31), 6)
            assert complete.cached_tokens == 0
            prompt = shared + tokens(50, 32)
            second, complete = generate_ids(stub, prompt, 6)
            assert complete.cached_tokens == 512
            assert second == greedy_generate(tiny_model, prompt, 6, Numerics.parse("reference"))
            extra = stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S).extra
            assert extra["prefix_cache_hits"] == 512 and extra["prefix_cache_queries"] == 540 + 570
            stub.ResetPrefixCache(pb.ResetPrefixCacheRequest(), timeout=TIMEOUT_S)
            assert generate_ids(stub, prompt, 6)[1].cached_tokens == 0
            # n samples: the first runs alone until its prompt is cached, the others start from it
            samples = list(stub.Generate(pb.GenerateRequest(
                tokenized=pb.TokenIds(token_ids=tokens(530, 33)), sampling_params=pb.SamplingParams(
                    n=3, seed=5, temperature=1.0, max_tokens=4, ignore_eos=True)), timeout=TIMEOUT_S))
            cached = {r.index: r.complete.cached_tokens for r in samples if r.WhichOneof("response") == "complete"}
            assert cached == {0: 0, 1: 512, 2: 512}
    finally:
        server.stop()
        engine.shutdown()

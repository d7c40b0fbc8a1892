"""The service end to end on a real local Ray cluster and a real gRPC server: two CPU worker actors with
expert parallelism (gloo all-to-all), the coordinator's continuous batching, streaming, abort and preemption,
all checked against the single-process model."""

from __future__ import annotations

import concurrent.futures

import grpc
import pytest
import torch
from api_fakes import TIMEOUT_S, ServerThread, wait_until

from dsv4.cache.spec import plan_cache
from dsv4.cluster.engine_ray import RayEngineClient
from dsv4.cluster.tokenizer import ModelTokenizer
from dsv4.model.generate import greedy_generate
from dsv4.model.numerics import Numerics
from dsv4.protos import dsv4_pb2 as pb
from dsv4.protos import dsv4_pb2_grpc
from dsv4.wire.config import SchedulerConfig

REFERENCE = Numerics.parse("reference")


def serve(engine, checkpoint):
    return ServerThread(RayEngineClient(engine.coordinator, engine.info), ModelTokenizer.from_dir(checkpoint)).start()


@pytest.fixture(scope="module")
def stub(ray_service, tiny_checkpoint):
    server = serve(ray_service, tiny_checkpoint)
    with grpc.insecure_channel(server.address) as channel:
        yield dsv4_pb2_grpc.Dsv4EngineStub(channel)
    server.stop()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 300, (n,), generator=g).tolist()
    return [torch.randint(2, 1024, (length,), generator=g).tolist() for length in lengths]


def generate_ids(stub, prompt, max_tokens, **params) -> tuple[list[int], pb.GenerateComplete]:
    params = {"temperature": 0.0, "ignore_eos": True, **params}
    responses = list(stub.Generate(pb.GenerateRequest(tokenized=pb.TokenIds(token_ids=prompt),
                                                      sampling_params=pb.SamplingParams(max_tokens=max_tokens,
                                                                                        **params)),
                                   timeout=TIMEOUT_S * 4))
    streamed = [t for r in responses[:-1] for t in r.chunk.token_ids]
    complete = responses[-1].complete
    assert streamed == list(complete.output_ids), (complete, responses[-3:])
    return streamed, complete


def test_expert_parallel_greedy_equals_the_single_process_model(stub, tiny_model, ray_service):
    assert ray_service.info.num_workers == 2
    for prompt in prompts(3, seed=1):
        got, complete = generate_ids(stub, prompt, 12)
        assert complete.finish_reason == pb.FINISH_REASON_LENGTH
        assert got == greedy_generate(tiny_model, prompt, 12, REFERENCE)


def test_sixteen_concurrent_streams_match_the_model(stub, tiny_model):
    cases = [(p, 4 + i % 13) for i, p in enumerate(prompts(16, seed=2))]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda c: generate_ids(stub, c[0], c[1])[0], cases))
    for (prompt, n), got in zip(cases, results, strict=True):
        assert got == greedy_generate(tiny_model, prompt, n, REFERENCE)
    loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)
    assert all(w.num_running_requests == 0 and w.free_blocks == w.total_blocks for w in loads.workers)
    pairs = sum(loads.expert_token_counts)        # every token routes num_experts_per_tok experts per MoE layer
    assert pairs > 0 and pairs % (4 * 6) == 0


def test_seeded_sampling_is_reproducible_under_any_batching(stub):
    prompt = prompts(1, seed=3)[0]
    params = dict(temperature=0.9, top_p=0.9, top_k=50, seed=77)
    alone, _ = generate_ids(stub, prompt, 10, **params)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:     # now next to other requests
        crowd = [pool.submit(generate_ids, stub, p, 8) for p in prompts(3, seed=4)]
        again = pool.submit(generate_ids, stub, prompt, 10, **params).result()[0]
        [f.result() for f in crowd]
    assert again == alone
    other, _ = generate_ids(stub, prompt, 10, **{**params, "seed": 78})
    assert other != alone


def test_abort_frees_the_blocks_at_once(stub):
    call = stub.Generate(pb.GenerateRequest(request_id="long-one", tokenized=pb.TokenIds(token_ids=prompts(1)[0]),
                                            sampling_params=pb.SamplingParams(ignore_eos=True, max_tokens=200)),
                         timeout=TIMEOUT_S * 4)
    assert next(call).WhichOneof("response") == "chunk"
    loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)
    assert sum(w.total_blocks - w.free_blocks for w in loads.workers) > 0
    assert stub.Abort(pb.AbortRequest(request_ids=["long-one"]), timeout=TIMEOUT_S).aborted_ids == ["long-one"]
    assert list(call)[-1].complete.finish_reason == pb.FINISH_REASON_ABORT
    loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)
    assert all(w.free_blocks == w.total_blocks and w.num_running_requests == 0 for w in loads.workers)


def test_random_cancellations_among_64_streams_leave_nothing_behind(stub, tiny_model):
    """64 concurrent streams, every other one cancelled by its client after a random number of chunks: the
    cancelled requests (asking for the rest of the context: hundreds of steps if they ran on) are freed (no running or
    waiting request, every block free) and the others' outputs are the single-process model's, as if alone."""
    g = torch.Generator().manual_seed(11)
    cases = [(torch.randint(2, 1024, (int(n),), generator=g).tolist(), int(k))
             for n, k in zip(torch.randint(1, 48, (64,), generator=g), torch.randint(0, 4, (64,), generator=g),
                             strict=True)]

    def run(i: int) -> list[int] | None:
        prompt, cancel_after = cases[i]
        params = (pb.SamplingParams(temperature=0.0, ignore_eos=True) if i % 2 else    # to the context's end
                  pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        call = stub.Generate(pb.GenerateRequest(request_id=f"cancel-{i}", tokenized=pb.TokenIds(token_ids=prompt),
                                                sampling_params=params), timeout=TIMEOUT_S * 4)
        if i % 2:                     # cancelled by the client, mid-stream (or before its first token)
            for _ in range(cancel_after):
                next(call)
            call.cancel()
            return None
        return [t for r in call if r.WhichOneof("response") == "chunk" for t in r.chunk.token_ids]

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(run, range(64)))
    for (prompt, _), got in zip(cases[::2], results[::2], strict=True):
        assert got == greedy_generate(tiny_model, prompt, 8, REFERENCE)

    def idle() -> bool:
        loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)
        return loads.num_waiting_requests == 0 and all(
            w.num_running_requests == 0 and w.free_blocks == w.total_blocks for w in loads.workers)

    wait_until(idle, "the cancelled requests to be freed")


@pytest.fixture(scope="module")
def cramped_stub(ray_cluster, tiny_checkpoint, tiny_model):
    """A second engine whose workers hold 3 blocks (768 positions) and 4 sequences each: running requests
    outgrow the cache and must be preempted and resumed."""
    from conftest import start_test_engine

    plan = plan_cache(tiny_model.config, REFERENCE, 1 << 30, 4)
    budget = 4 * plan.bytes_per_slot + 3 * plan.bytes_per_block
    engine = start_test_engine(tiny_checkpoint, kv_cache_bytes=budget, max_model_len=2048,
                               scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256,
                                                         max_prefill_chunk=128))
    server = serve(engine, tiny_checkpoint)
    with grpc.insecure_channel(server.address) as channel:
        yield dsv4_pb2_grpc.Dsv4EngineStub(channel)
    server.stop()
    engine.shutdown()


def test_preempted_requests_resume_and_match_the_model(cramped_stub, tiny_model):
    loads = cramped_stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)
    assert [w.total_blocks for w in loads.workers] == [3, 3]
    g = torch.Generator().manual_seed(5)
    cases = [(torch.randint(2, 1024, (200 + 40 * i,), generator=g).tolist(), 90) for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda c: generate_ids(cramped_stub, c[0], c[1]), cases))
    for (prompt, n), (got, complete) in zip(cases, results, strict=True):
        assert complete.finish_reason == pb.FINISH_REASON_LENGTH
        assert got == greedy_generate(tiny_model, prompt, n, REFERENCE)
    wait_until(lambda: all(w.free_blocks == 3 for w in
                           cramped_stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S).workers),
               "every block to come back")


def test_a_prompt_larger_than_any_cache_is_rejected_by_name(cramped_stub):
    info = cramped_stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S)
    assert info.max_context_length == 768      # what one worker's cache holds, not the configured 2048
    with pytest.raises(grpc.RpcError) as err:
        generate_ids(cramped_stub, [5] * 800, 4)     # fits the configured 2048 but no worker's 768 positions
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in err.value.details()
    assert generate_ids(cramped_stub, [5] * 10, 2)[1].finish_reason == pb.FINISH_REASON_LENGTH   # still serving


@pytest.fixture(scope="module")
def fast_stub(ray_cluster, tiny_checkpoint):
    """A third engine in fast numerics (the CPU twins of the fast kernels): two workers exchanging expert pairs
    through the fixed-capacity all-to-all sized by the plans."""
    from conftest import start_test_engine

    engine = start_test_engine(tiny_checkpoint, numerics="fast")
    server = serve(engine, tiny_checkpoint)
    with grpc.insecure_channel(server.address) as channel:
        yield dsv4_pb2_grpc.Dsv4EngineStub(channel)
    server.stop()
    engine.shutdown()


def test_fast_numerics_serve_over_two_workers(fast_stub, tiny_model):
    info = fast_stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT_S)
    assert info.numerics == "fast" and info.kv_cache_tokens > 0 and info.max_running_requests == 32
    cases = [(p, 6) for p in prompts(6, seed=6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:     # mixed prefill and decode steps, both workers busy
        results = list(pool.map(lambda c: generate_ids(fast_stub, c[0], c[1]), cases))
    fast = Numerics.parse("fast")
    firsts = 0
    for (prompt, n), (got, complete) in zip(cases, results, strict=True):
        assert complete.finish_reason == pb.FINISH_REASON_LENGTH and len(got) == n
        firsts += got[0] == greedy_generate(tiny_model, prompt, 1, fast)[0]
    assert firsts >= 5          # the first tokens (one prefill each) agree with the single-process fast model
    loads = fast_stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)
    assert all(w.num_running_requests == 0 and w.free_blocks == w.total_blocks for w in loads.workers)
    assert sum(loads.expert_token_counts) % (4 * 6) == 0


def test_outputs_come_back_one_batch_per_step(ray_service):
    """The coordinator streams one list of outputs per step to its subscribers, not a Ray object per token per
    request: four concurrent requests of 12 tokens come back in about 12 batches, not 48 objects."""
    import ray

    from dsv4.wire.request import GenerateRequest, SamplingParams

    coordinator = ray_service.coordinator
    batches = coordinator.output_batches.remote()
    assert ray.get(next(batches)) == []                       # subscribed: nothing submitted from here is missed
    ids = [f"batched-{i}" for i in range(4)]
    for i, rid in enumerate(ids):
        ray.get(coordinator.submit.remote(GenerateRequest(rid, tuple(range(2, 10 + i)), SamplingParams(
            max_tokens=12, temperature=0.0, ignore_eos=True))))
    finished, per_request, seen = set(), {rid: 0 for rid in ids}, []
    while finished != set(ids):
        batch = [o for o in ray.get(next(batches)) if o.request_id in per_request]
        seen.append({o.request_id for o in batch})
        for o in batch:
            per_request[o.request_id] += len(o.new_token_ids)
            if o.finished:
                finished.add(o.request_id)
    ray.cancel(batches)                                       # unsubscribe (the generator's finally runs)
    assert per_request == {rid: 12 for rid in ids}
    assert len(seen) <= 16 and max(len(s) for s in seen) == 4, seen


def test_step_failures_reach_clients_as_one_line(ray_cluster):
    """A worker's exception as Ray delivers it (traceback, pid, address, colour codes) becomes one line for
    clients: the worker's own exception type and first message line."""
    import ray

    from dsv4.cluster.coordinator import one_line_error

    @ray.remote
    def failing_step():
        raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling `cublasLtMatmul`\n  detail line")

    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(failing_step.remote())
    assert "pid=" in str(err.value)                                        # what Ray's own message carries
    assert one_line_error(err.value) == ("RuntimeError: CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling "
                                         "`cublasLtMatmul`")
    assert one_line_error(ValueError("\x1b[31mred\x1b[0m\nmore"), limit=12) == "ValueError: red"[:9] + "..."


def test_a_failed_step_fails_its_requests_and_the_engine_serves_on(ray_cluster, tiny_checkpoint, tiny_model):
    """One worker whose step raises (as a kernel would): the requests of that step end with one sanitized error
    line, their blocks come back, and the next requests are served as before; three failed steps in a row (a
    poisoned device) fail the engine, loudly."""
    import ray
    from conftest import start_test_engine

    from dsv4.cluster.coordinator import MAX_CONSECUTIVE_STEP_FAILURES

    engine = start_test_engine(tiny_checkpoint, num_workers=1)
    server = serve(engine, tiny_checkpoint)
    worker = engine.workers[0]

    def final(prompt, max_tokens=6):
        responses = list(stub.Generate(pb.GenerateRequest(tokenized=pb.TokenIds(token_ids=prompt),
                                                          sampling_params=pb.SamplingParams(
                                                              max_tokens=max_tokens, temperature=0.0,
                                                              ignore_eos=True)), timeout=TIMEOUT_S * 4))
        return responses[-1]

    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = dsv4_pb2_grpc.Dsv4EngineStub(channel)
            cases = prompts(3, seed=21)
            ray.get(worker.inject_step_faults.remote(["CUDA error: injected fault\n  at a kernel"]))
            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                failed = list(pool.map(final, cases))
            errors = [r.error.message for r in failed if r.WhichOneof("response") == "error"]
            assert errors and set(errors) == {"engine step failed: RuntimeError: CUDA error: injected fault"}
            for prompt, response in zip(cases, failed, strict=True):   # any the fault missed ran as usual
                if response.WhichOneof("response") == "complete":
                    assert list(response.complete.output_ids) == greedy_generate(tiny_model, prompt, 6, REFERENCE)
            for prompt in cases:                                           # the engine serves on
                assert list(final(prompt).complete.output_ids) == greedy_generate(tiny_model, prompt, 6, REFERENCE)
            loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)
            assert all(w.num_running_requests == 0 and w.free_blocks == w.total_blocks for w in loads.workers)

            # Failed steps in a row (a request's in-flight steps each count) until the engine gives up.
            ray.get(worker.inject_step_faults.remote(["poisoned"] * MAX_CONSECUTIVE_STEP_FAILURES))
            for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):
                assert final(cases[0]).WhichOneof("response") == "error"
                if not ray.get(engine.coordinator.is_healthy.remote()):
                    break
            assert not ray.get(engine.coordinator.is_healthy.remote())
            with pytest.raises(grpc.RpcError) as err:                       # new requests are refused
                final(cases[1])
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "engine failed: RuntimeError: poisoned"
    finally:
        server.stop()
        engine.shutdown()

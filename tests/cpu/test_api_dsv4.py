"""`dsv4.v1.Dsv4Engine` end to end: a real server on localhost, real gRPC clients, the `engine_client` engine.

Assertions compare the stream with what the server itself reports (complete.output_ids, GetLoads, GetModelInfo),
so they hold for any correct engine; the few tests that need the stand-in's extra knobs build their own engine
and say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from api_fakes import (  # noqa: F401
    TIMEOUT_S,
    FakeEngine,
    ServerThread,
    api_server,
    channel,
    engine_client,
    tokenizer,
    tokenizer_dir,
    wait_until,
)

from dsv4.cluster.tokenizer import REPLACEMENT_CHAR, ModelTokenizer
from dsv4.model.generate import forward_logits
from dsv4.model.numerics import Numerics
from dsv4.protos import dsv4_pb2 as pb
from dsv4.protos import dsv4_pb2_grpc

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> dsv4_pb2_grpc.Dsv4EngineStub:  # noqa: F811
    return dsv4_pb2_grpc.Dsv4EngineStub(channel)


@pytest.fixture(scope="module")
def model_info(stub: dsv4_pb2_grpc.Dsv4EngineStub) -> pb.GetModelInfoResponse:
    return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S)


def generate(stub: dsv4_pb2_grpc.Dsv4EngineStub, **request) -> list[pb.GenerateResponse]:
    return list(stub.Generate(pb.GenerateRequest(**request), timeout=TIMEOUT_S))


def greedy(max_tokens: int, **more) -> pb.SamplingParams:
    return pb.SamplingParams(temperature=0.0, seed=1234, max_tokens=max_tokens, **more)


def check_stream(responses: list[pb.GenerateResponse], tokenizer: ModelTokenizer) -> pb.GenerateComplete:  # noqa: F811
    """The invariants of every successful stream; returns its `complete` message."""
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds[-1] == "complete" and kinds.count("complete") == 1 and "error" not in kinds, kinds
    assert len({r.request_id for r in responses}) == 1 and responses[0].request_id
    complete = responses[-1].complete
    chunks = [r.chunk for r in responses[:-1]]
    assert [t for c in chunks for t in c.token_ids] == list(complete.output_ids)
    assert "".join(c.text for c in chunks) == complete.text
    assert complete.completion_tokens == len(complete.output_ids)
    counts = [c.completion_tokens for c in chunks]
    assert counts == sorted(counts) and all(c.prompt_tokens == complete.prompt_tokens for c in chunks)
    if chunks:
        assert counts[-1] == complete.completion_tokens
    if complete.WhichOneof("matched_stop") != "matched_stop_str":
        assert complete.text == tokenizer.decode(complete.output_ids)
    return complete


def running_requests(stub: dsv4_pb2_grpc.Dsv4EngineStub) -> int:
    loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)
    assert loads.num_running_requests == sum(w.num_running_requests for w in loads.workers)
    return loads.num_running_requests


def test_generate_streams_chunks_then_one_complete(stub, tokenizer) -> None:  # noqa: F811
    responses = generate(stub, text=PROMPT, sampling_params=greedy(12))
    complete = check_stream(responses, tokenizer)
    assert complete.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert len(responses) >= 2, "expected at least one chunk before the terminal message"
    if complete.finish_reason == pb.FINISH_REASON_LENGTH:
        assert complete.completion_tokens == 12
    else:  # the engine stopped on EOS
        assert complete.finish_reason == pb.FINISH_REASON_STOP
        assert complete.matched_token_id == complete.output_ids[-1]


def test_same_seed_same_tokens_and_tokenized_prompt(stub, tokenizer) -> None:  # noqa: F811
    by_text = check_stream(generate(stub, text=PROMPT, sampling_params=greedy(10)), tokenizer)
    by_ids = check_stream(generate(stub, tokenized=pb.TokenIds(token_ids=tokenizer.encode(PROMPT)),
                                   sampling_params=greedy(10)), tokenizer)
    assert by_ids.output_ids == by_text.output_ids and by_ids.text == by_text.text


def test_request_id_is_echoed(stub, tokenizer) -> None:  # noqa: F811
    responses = generate(stub, request_id="my-request-1", text=PROMPT, sampling_params=greedy(3))
    check_stream(responses, tokenizer)
    assert {r.request_id for r in responses} == {"my-request-1"}


def test_default_max_tokens_fills_the_context(stub, tokenizer, model_info) -> None:  # noqa: F811
    ids = [5] * (model_info.max_context_length - 4)
    complete = check_stream(generate(stub, tokenized=pb.TokenIds(token_ids=ids),
                                     sampling_params=pb.SamplingParams(temperature=0.0, ignore_eos=True)), tokenizer)
    assert complete.finish_reason == pb.FINISH_REASON_LENGTH and complete.completion_tokens == 4


def _first_chunk(call: Iterator[pb.GenerateResponse]) -> pb.GenerateResponse:
    first = next(call)
    assert first.WhichOneof("response") == "chunk"
    return first


def test_abort_mid_stream_ends_the_stream_and_frees_the_request(stub, tokenizer) -> None:  # noqa: F811
    call = stub.Generate(pb.GenerateRequest(request_id="to-abort", text=PROMPT,
                                            sampling_params=pb.SamplingParams(ignore_eos=True)), timeout=TIMEOUT_S)
    _first_chunk(call)
    assert running_requests(stub) == 1
    assert stub.Abort(pb.AbortRequest(request_ids=["to-abort"]), timeout=TIMEOUT_S).aborted_ids == ["to-abort"]
    rest = list(call)
    complete = rest[-1].complete
    assert complete.finish_reason == pb.FINISH_REASON_ABORT
    assert [r.WhichOneof("response") for r in rest].count("complete") == 1
    wait_until(lambda: running_requests(stub) == 0, "the aborted request to leave GetLoads")
    assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT_S).active_requests == 0


def test_n_samples_carry_their_index_and_abort_together(stub, tokenizer) -> None:  # noqa: F811
    params = pb.SamplingParams(temperature=0.9, seed=11, max_tokens=5, ignore_eos=True, n=2)
    responses = generate(stub, request_id="two", text=PROMPT, sampling_params=params)
    assert {r.request_id for r in responses} == {"two"}
    outputs = [check_stream([r for r in responses if r.index == i], tokenizer).output_ids for i in (0, 1)]
    second = generate(stub, text=PROMPT, sampling_params=pb.SamplingParams(temperature=0.9, seed=12, max_tokens=5,
                                                                           ignore_eos=True))
    assert check_stream(second, tokenizer).output_ids == outputs[1]            # sample 1 = seed + 1
    call = stub.Generate(pb.GenerateRequest(request_id="three", text=PROMPT, sampling_params=pb.SamplingParams(
        ignore_eos=True, n=3)), timeout=TIMEOUT_S)
    _first_chunk(call)
    wait_until(lambda: running_requests(stub) == 3, "the three samples to run")
    assert sorted(stub.Abort(pb.AbortRequest(request_ids=["three"]), timeout=TIMEOUT_S).aborted_ids) == \
        ["three/0", "three/1", "three/2"]
    rest = [r for r in call if r.WhichOneof("response") == "complete"]
    assert sorted(r.index for r in rest) == [0, 1, 2]
    assert all(r.complete.finish_reason == pb.FINISH_REASON_ABORT for r in rest)
    wait_until(lambda: running_requests(stub) == 0, "the aborted samples to leave GetLoads")


def test_structured_output_choice_and_a_bad_schema(stub, tokenizer) -> None:  # noqa: F811
    choices = ["alpha", "beta gamma"]
    for seed in range(3):
        complete = check_stream(generate(stub, text=PROMPT, sampling_params=pb.SamplingParams(
            seed=seed, max_tokens=40, choice=pb.ChoiceConstraint(choices=choices))), tokenizer)
        assert complete.finish_reason == pb.FINISH_REASON_STOP and complete.text in choices
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, text=PROMPT, sampling_params=pb.SamplingParams(json_schema='{"type": "nonsense"}'))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("sampling_params.json_schema: does not compile")


def test_a_full_engine_answers_resource_exhausted(tokenizer) -> None:  # noqa: F811
    """Builds its own stand-in engine that takes one request at a time: the second is refused with
    RESOURCE_EXHAUSTED (retryable), and the first still completes."""
    server = ServerThread(FakeEngine(tokenizer, max_running=1, step_delay_s=0.02), tokenizer).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = dsv4_pb2_grpc.Dsv4EngineStub(channel)
            first = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling_params=greedy(8)), timeout=TIMEOUT_S)
            _first_chunk(first)
            with pytest.raises(grpc.RpcError) as info:
                generate(stub, text=PROMPT, sampling_params=greedy(2))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, info.value
            assert list(first)[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
    finally:
        server.stop()


def test_an_api_key_is_required_on_every_call_but_health(tokenizer) -> None:  # noqa: F811
    """Builds its own server with --api-key: no key or a wrong one is UNAUTHENTICATED on unary and streaming calls
    of both protos; the key works; health checks need none."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from smg_grpc_proto.generated import vllm_engine_pb2, vllm_engine_pb2_grpc

    server = ServerThread(FakeEngine(tokenizer), tokenizer, api_key="s3cret").start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = dsv4_pb2_grpc.Dsv4EngineStub(channel)
            vllm = vllm_engine_pb2_grpc.VllmEngineStub(channel)
            calls = (lambda md: stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S, metadata=md),
                     lambda md: list(stub.Generate(pb.GenerateRequest(text=PROMPT, sampling_params=greedy(2)),
                                                   timeout=TIMEOUT_S, metadata=md)),
                     lambda md: vllm.GetModelInfo(vllm_engine_pb2.GetModelInfoRequest(), timeout=TIMEOUT_S,
                                                  metadata=md))
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)):
                for call in calls:
                    with pytest.raises(grpc.RpcError) as info:
                        call(metadata)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (metadata, info.value)
            key = (("authorization", "Bearer s3cret"),)
            assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=TIMEOUT_S, metadata=key).vocab_size > 0
            responses = list(stub.Generate(pb.GenerateRequest(text=PROMPT, sampling_params=greedy(2)),
                                           timeout=TIMEOUT_S, metadata=key))
            check_stream(responses, tokenizer)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop()


def test_metrics_agree_with_what_the_clients_saw(tokenizer) -> None:  # noqa: F811
    """Builds its own server with metrics: after 6 concurrent streams the token counters equal the streamed
    tokens exactly, each latency histogram counted every request (TTFT, e2e) or every later token (ITL), and the
    `/metrics` endpoint serves the same text; the engine gauges come from a load report."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from dsv4.cluster.metrics import ServerMetrics
    from dsv4.cluster.server import poll_loads

    engine = FakeEngine(tokenizer)
    metrics = ServerMetrics("dsv4-fake")
    server = ServerThread(engine, tokenizer, metrics=metrics).start()
    http = metrics.serve_http(0, "127.0.0.1")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = dsv4_pb2_grpc.Dsv4EngineStub(channel)
            with ThreadPoolExecutor(6) as pool:
                completes = list(pool.map(lambda n: check_stream(generate(stub, text=PROMPT * n,
                                                                          sampling_params=greedy(3 + n)), tokenizer),
                                          range(1, 7)))
        report = asyncio.run(engine.loads())
        with contextlib.suppress(TimeoutError):                # the feeder of serve_forever, a few rounds
            asyncio.run(asyncio.wait_for(poll_loads(engine, metrics, interval_s=0.01), 0.05))
        body = urllib.request.urlopen(f"http://127.0.0.1:{http.server_port}/metrics", timeout=10).read().decode()
    finally:
        http.shutdown()
        server.stop()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body) for s in family.samples}

    def value(name, **labels):
        return samples[(name, tuple(sorted({"model_name": "dsv4-fake", **labels}.items())))]

    outputs = sum(c.completion_tokens for c in completes)
    assert value("dsv4:generation_tokens_total") == outputs
    assert value("dsv4:prompt_tokens_total") == sum(c.prompt_tokens for c in completes)
    assert value("dsv4:request_success_total", finished_reason="length") == 6
    assert value("dsv4:time_to_first_token_seconds_count") == 6 == value("dsv4:e2e_request_latency_seconds_count")
    assert value("dsv4:inter_token_latency_seconds_count") == outputs - 6
    assert value("dsv4:num_requests_running") == report.num_running_requests
    used = sum(w.total_blocks - w.free_blocks for w in report.workers)
    assert value("dsv4:kv_cache_usage_perc") == used / sum(w.total_blocks for w in report.workers)


def test_each_finished_request_logs_one_line(stub, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="dsv4.requests"):
        responses = generate(stub, request_id="logged-1", text=PROMPT, sampling_params=greedy(3))
    lines = [r.getMessage() for r in caplog.records if "logged-1" in r.getMessage()]
    complete = responses[-1].complete
    assert len(lines) == 1 and lines[0].startswith("request logged-1 finished: length, "), lines
    assert f"{complete.prompt_tokens} prompt + 3 output tokens (1.00 per step), TTFT " in lines[0]
    assert "TPOT" in lines[0]


def test_abort_lists_are_bounded(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Abort(pb.AbortRequest(request_ids=[f"r{i}" for i in range(1025)]), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("request_ids:")


def test_abort_of_unknown_ids_is_not_an_error(stub) -> None:
    assert list(stub.Abort(pb.AbortRequest(request_ids=["no-such-request", ""]), timeout=TIMEOUT_S).aborted_ids) == []


def test_client_cancellation_aborts_the_engine_request(stub, engine_client) -> None:  # noqa: F811
    call = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling_params=pb.SamplingParams(ignore_eos=True)),
                         timeout=TIMEOUT_S)
    request_id = _first_chunk(call).request_id
    assert running_requests(stub) == 1
    call.cancel()
    wait_until(lambda: running_requests(stub) == 0, "the cancelled request to leave GetLoads")
    wait_until(lambda: stub.GetServerInfo(pb.GetServerInfoRequest()).active_requests == 0, "no active streams")
    if isinstance(engine_client, FakeEngine):  # the stand-in would also finish on its own: check it was told
        assert request_id in engine_client.abort_calls


def _bad_requests(vocab: int, context: int) -> list[tuple[str, dict]]:
    ok = {"text": PROMPT}
    return [
        ("prompt.text", {"text": ""}),
        ("prompt", {}),
        ("prompt", {"tokenized": pb.TokenIds()}),
        ("prompt.token_ids", {"tokenized": pb.TokenIds(token_ids=[0, vocab])}),
        ("prompt", {"tokenized": pb.TokenIds(token_ids=[5] * context)}),
        ("sampling_params.max_tokens", {**ok, "sampling_params": pb.SamplingParams(max_tokens=0)}),
        ("sampling_params.max_tokens", {**ok, "sampling_params": pb.SamplingParams(max_tokens=-3)}),
        ("sampling_params.max_tokens", {**ok, "sampling_params": pb.SamplingParams(max_tokens=1 << 40)}),
        ("sampling_params.temperature", {**ok, "sampling_params": pb.SamplingParams(temperature=-0.5)}),
        ("sampling_params.temperature", {**ok, "sampling_params": pb.SamplingParams(temperature=1e4)}),
        ("sampling_params.temperature", {**ok, "sampling_params": pb.SamplingParams(temperature=math.nan)}),
        ("sampling_params.top_p", {**ok, "sampling_params": pb.SamplingParams(top_p=0.0)}),
        ("sampling_params.top_p", {**ok, "sampling_params": pb.SamplingParams(top_p=1.5)}),
        ("sampling_params.top_k", {**ok, "sampling_params": pb.SamplingParams(top_k=-1)}),
        ("sampling_params.top_k", {**ok, "sampling_params": pb.SamplingParams(top_k=vocab + 1)}),
        ("sampling_params.seed", {**ok, "sampling_params": pb.SamplingParams(seed=-1)}),
        ("sampling_params.min_tokens", {**ok, "sampling_params": pb.SamplingParams(max_tokens=4, min_tokens=5)}),
        ("sampling_params.min_tokens", {**ok, "sampling_params": pb.SamplingParams(min_tokens=-1)}),
        ("sampling_params.stop_token_ids", {**ok, "sampling_params": pb.SamplingParams(stop_token_ids=[vocab])}),
        ("sampling_params.stop", {**ok, "sampling_params": pb.SamplingParams(stop=[""])}),
        ("sampling_params.stop", {**ok, "sampling_params": pb.SamplingParams(stop=["x"] * 33)}),
        ("sampling_params.stop", {**ok, "sampling_params": pb.SamplingParams(stop=["x" * 1025])}),
        ("sampling_params.stop_token_ids", {**ok, "sampling_params": pb.SamplingParams(stop_token_ids=[3] * 257)}),
        ("request_id", {**ok, "request_id": "r" * 257}),
        ("sampling_params.logprobs", {**ok, "sampling_params": pb.SamplingParams(logprobs=-1)}),
        ("sampling_params.logprobs", {**ok, "sampling_params": pb.SamplingParams(logprobs=21)}),
    ]


def check_logprobs(responses: list[pb.GenerateResponse], num_logprobs: int) -> list[pb.TokenLogprobs]:
    """The invariants of a stream that asked for `num_logprobs`; returns the logprobs, one per output token."""
    complete, chunks = responses[-1].complete, [r.chunk for r in responses[:-1]]
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    streamed = [lp for c in chunks for lp in c.logprobs]
    assert streamed == list(complete.logprobs) and len(streamed) == len(complete.output_ids)
    for token, lp in zip(complete.output_ids, streamed, strict=True):
        assert lp.logprob <= 0.0 and len(lp.top_token_ids) == len(lp.top_logprobs) == num_logprobs
        assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
        if token in lp.top_token_ids:
            assert lp.top_logprobs[list(lp.top_token_ids).index(token)] == lp.logprob
        elif num_logprobs:
            assert lp.logprob <= lp.top_logprobs[-1]
    return streamed


def test_logprobs_are_the_models_log_softmax(stub, tokenizer, tiny_model) -> None:  # noqa: F811
    prompt = tokenizer.encode(PROMPT)
    responses = generate(stub, tokenized=pb.TokenIds(token_ids=prompt),
                         sampling_params=greedy(8, ignore_eos=True, logprobs=5))
    complete = check_stream(responses, tokenizer)
    got = check_logprobs(responses, 5)
    output = list(complete.output_ids)
    # The single-process model's distribution at each output position: the engine reproduces its logits bit for
    # bit, and the fp32 log-softmax of a row does not depend on the rows around it, so the values are equal.
    logits = forward_logits(tiny_model, prompt + output, Numerics.parse("reference"))[len(prompt) - 1:-1]
    expected = torch.log_softmax(logits.float(), dim=-1)
    for i, (token, lp) in enumerate(zip(output, got, strict=True)):
        assert lp.top_token_ids[0] == token and lp.top_logprobs[0] == lp.logprob     # greedy: the most likely
        assert lp.logprob == float(expected[i, token])
        assert list(lp.top_token_ids) == expected[i].topk(5).indices.tolist()
        assert list(lp.top_logprobs) == expected[i].topk(5).values.tolist()
    plain = generate(stub, tokenized=pb.TokenIds(token_ids=prompt), sampling_params=greedy(8, ignore_eos=True))
    assert plain[-1].complete.output_ids == complete.output_ids             # asking changes no token
    assert not plain[-1].complete.logprobs and not any(r.chunk.logprobs for r in plain[:-1])


def test_logprobs_are_of_the_raw_distribution_whatever_the_sampling(stub, tokenizer) -> None:  # noqa: F811
    def run(**params) -> tuple[list[int], list[pb.TokenLogprobs]]:
        responses = generate(stub, text=PROMPT, sampling_params=pb.SamplingParams(max_tokens=6, ignore_eos=True,
                                                                                    **params))
        return list(check_stream(responses, tokenizer).output_ids), check_logprobs(responses, params["logprobs"])

    greedy_ids, greedy_lps = run(temperature=0.0, logprobs=20)
    hot_ids, hot_lps = run(temperature=1.8, top_k=100, seed=5, logprobs=20)
    chosen_ids, chosen_lps = run(temperature=1.8, top_k=100, seed=5, logprobs=0)
    assert chosen_ids == hot_ids and [lp.logprob for lp in chosen_lps] == [lp.logprob for lp in hot_lps]
    # the first position's distribution depends on the prompt only: not on temperature or top-k
    assert hot_lps[0].top_token_ids == greedy_lps[0].top_token_ids
    assert hot_lps[0].top_logprobs == greedy_lps[0].top_logprobs
    assert hot_ids != greedy_ids, "a hot temperature should leave the greedy path"


def test_every_bad_request_is_invalid_argument_naming_the_field(stub, tokenizer, model_info) -> None:  # noqa: F811
    for field, request in _bad_requests(model_info.vocab_size, model_info.max_context_length):
        with pytest.raises(grpc.RpcError) as info:
            generate(stub, **request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, request)
        assert info.value.details().startswith(field + ":"), (field, info.value.details())
        check_stream(generate(stub, text=PROMPT, sampling_params=greedy(2)), tokenizer)  # still serving


def test_a_text_longer_than_the_context_can_hold_is_rejected_before_tokenizing(stub, tokenizer,  # noqa: F811
                                                                               model_info) -> None:
    """More characters than max_context_length tokens of the byte-level tokenizer can stand for: INVALID_ARGUMENT
    naming prompt.text at once (no tokenization), and the server keeps serving."""
    import time

    text = "a" * (tokenizer.max_chars_per_token * model_info.max_context_length + 1)
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, text=text, sampling_params=greedy(2))
    assert time.perf_counter() - start < 1.0
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("prompt.text:") and "cannot fit" in info.value.details()
    check_stream(generate(stub, text=PROMPT, sampling_params=greedy(2)), tokenizer)


def test_a_running_request_id_cannot_be_reused(stub, tokenizer) -> None:  # noqa: F811
    call = stub.Generate(pb.GenerateRequest(request_id="dup", text=PROMPT,
                                            sampling_params=pb.SamplingParams(ignore_eos=True)), timeout=TIMEOUT_S)
    _first_chunk(call)
    with pytest.raises(grpc.RpcError) as info:
        generate(stub, request_id="dup", text=PROMPT, sampling_params=greedy(2))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("request_id:")
    stub.Abort(pb.AbortRequest(request_ids=["dup"]), timeout=TIMEOUT_S)
    assert list(call)[-1].complete.finish_reason == pb.FINISH_REASON_ABORT


def _per_token_texts(tokenizer: ModelTokenizer, ids: list[int]) -> list[str]:  # noqa: F811
    detokenizer = tokenizer.detokenizer()
    return [detokenizer.add(t) for t in ids]


def test_stop_string_across_token_boundaries(stub, tokenizer) -> None:  # noqa: F811
    reference = check_stream(generate(stub, text=PROMPT, sampling_params=greedy(40, ignore_eos=True)), tokenizer)
    ids = list(reference.output_ids)
    pieces = _per_token_texts(tokenizer, ids)
    k = next(i for i in range(len(pieces) // 2, len(pieces) - 1) if pieces[i] and pieces[i + 1])
    stop = pieces[k][-1] + pieces[k + 1][0]  # straddles the boundary between tokens k and k+1
    first_end = next(j for j in range(len(ids)) if stop in tokenizer.decode(ids[:j + 1]))
    responses = generate(stub, text=PROMPT, sampling_params=greedy(40, ignore_eos=True, stop=["@@never@@", stop]))
    complete = check_stream(responses, tokenizer)
    assert complete.finish_reason == pb.FINISH_REASON_STOP and complete.matched_stop_str == stop
    assert complete.text == reference.text[:reference.text.index(stop)]
    assert list(complete.output_ids) == ids[:first_end + 1]
    assert all(stop not in r.chunk.text for r in responses[:-1])


def test_streamed_text_is_whole_characters(stub, tokenizer) -> None:  # noqa: F811
    for seed in range(4):
        responses = generate(stub, text="Grüße, 世界", sampling_params=pb.SamplingParams(seed=seed, max_tokens=30))
        complete = check_stream(responses, tokenizer)
        if REPLACEMENT_CHAR not in complete.text:
            assert all(REPLACEMENT_CHAR not in r.chunk.text for r in responses[:-1])


@pytest.fixture
def scripted_server(tokenizer) -> Iterator[tuple[ServerThread, list[int], str]]:  # noqa: F811
    """STAND-IN ONLY: the fake engine replays multi-byte text as single-byte tokens, then EOS."""
    text = "héllo wörld 你好 🙂"
    script = tokenizer.encode(text)[1:] + [1]
    server = ServerThread(FakeEngine(tokenizer, script=script), tokenizer).start()
    yield server, script, text
    server.stop()


def test_utf8_characters_split_across_tokens(scripted_server, tokenizer) -> None:  # noqa: F811
    server, script, text = scripted_server
    with grpc.insecure_channel(server.address) as chan:
        responses = generate(dsv4_pb2_grpc.Dsv4EngineStub(chan), text="x", sampling_params=greedy(100))
    complete = check_stream(responses, tokenizer)
    assert list(complete.output_ids) == script
    assert complete.finish_reason == pb.FINISH_REASON_STOP and complete.matched_token_id == 1
    assert complete.text == text
    chunk_texts = [r.chunk.text for r in responses[:-1]]
    assert all(REPLACEMENT_CHAR not in t for t in chunk_texts)
    assert any(not t for t in chunk_texts), "some chunk should end inside a character and carry no text"


def test_sixteen_concurrent_streams(stub, tokenizer) -> None:  # noqa: F811
    def one(i: int) -> pb.GenerateComplete:
        return check_stream(generate(stub, request_id=f"concurrent-{i}", text=f"{PROMPT} {i}",
                                     sampling_params=pb.SamplingParams(seed=i, max_tokens=8 + i)), tokenizer)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16
    for i, complete in enumerate(results):
        assert complete.completion_tokens <= 8 + i
    wait_until(lambda: running_requests(stub) == 0, "all requests to finish")


def test_model_server_info_and_loads(stub, model_info, tokenizer_dir) -> None:  # noqa: F811
    assert model_info.vocab_size > 0 and model_info.max_context_length > 1
    assert model_info.eos_token_ids and model_info.tokenizer_path == str(tokenizer_dir)
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=TIMEOUT_S)
    assert "dsv4.v1.Dsv4Engine" in info.services and "vllm.grpc.engine.VllmEngine" in info.services
    loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)
    assert len(loads.workers) == model_info.num_workers
    assert all(w.free_blocks <= w.total_blocks for w in loads.workers)


@pytest.fixture
def failing_server(tokenizer) -> Iterator[ServerThread]:  # noqa: F811
    """STAND-IN ONLY: an engine that raises after 4 tokens of every request."""
    server = ServerThread(FakeEngine(tokenizer, fail_after_tokens=4), tokenizer).start()
    yield server
    server.stop()


def test_engine_failure_becomes_an_error_message(failing_server, tokenizer) -> None:  # noqa: F811
    with grpc.insecure_channel(failing_server.address) as chan:
        failing = dsv4_pb2_grpc.Dsv4EngineStub(chan)
        responses = generate(failing, text=PROMPT, sampling_params=greedy(20))
        assert responses[-1].WhichOneof("response") == "error"
        assert "fake engine failure" in responses[-1].error.message
        assert [r.WhichOneof("response") for r in responses[:-1]] == ["chunk"] * (len(responses) - 1)
        check_stream(generate(failing, text=PROMPT, sampling_params=greedy(3)), tokenizer)  # still serving
        assert running_requests(failing) == 0

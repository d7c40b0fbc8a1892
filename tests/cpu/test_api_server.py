"""The server as a whole: grpc.health.v1, reflection, and the blocking client behind `dsv4 generate`."""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import ctypes
import gc
import io
import os
from collections.abc import Iterator

import grpc
import pytest
from api_fakes import (  # noqa: F401
    TIMEOUT_S,
    EventLoopThread,
    FakeEngine,
    ServerThread,
    api_server,
    channel,
    engine_client,
    free_port,
    tokenizer,
    tokenizer_dir,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from dsv4.cluster import client
from dsv4.cluster.server import serve_forever
from dsv4.protos import dsv4_pb2 as pb
from dsv4.protos import dsv4_pb2_grpc

SERVICES = ("dsv4.v1.Dsv4Engine", "vllm.grpc.engine.VllmEngine", "grpc.health.v1.Health")


def test_health_is_serving(channel) -> None:  # noqa: F811
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", *SERVICES[:2]):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


@pytest.fixture
def unhealthy_server(tokenizer) -> Iterator[ServerThread]:  # noqa: F811
    """STAND-IN ONLY: an engine that reports itself unhealthy."""
    engine = FakeEngine(tokenizer)
    engine.healthy = False
    server = ServerThread(engine, tokenizer).start()
    yield server
    server.stop()


def test_health_follows_the_engine(unhealthy_server) -> None:
    with grpc.insecure_channel(unhealthy_server.address) as chan:
        response = health_pb2_grpc.HealthStub(chan).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING


def _reflect(channel: grpc.Channel, request: reflection_pb2.ServerReflectionRequest  # noqa: F811
             ) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return next(iter(stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT_S)))


def test_reflection_lists_and_describes_every_service(channel) -> None:  # noqa: F811
    listed = _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert set(SERVICES) <= names and "grpc.reflection.v1alpha.ServerReflection" in names
    for service in SERVICES:
        found = _reflect(channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol=service))
        assert found.file_descriptor_response.file_descriptor_proto, service


def test_reflection_is_off_by_default(tokenizer) -> None:  # noqa: F811
    server = ServerThread(FakeEngine(tokenizer), tokenizer).start()
    try:
        with grpc.insecure_channel(server.address) as chan:
            with pytest.raises(grpc.RpcError) as off:
                _reflect(chan, reflection_pb2.ServerReflectionRequest(list_services=""))
            assert off.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop()


def test_stream_generate_yields_the_completion_text(api_server, channel, tokenizer) -> None:  # noqa: F811
    sampling = dict(temperature=0.0, seed=5, max_tokens=16)
    pieces = list(client.stream_generate(api_server.address, "Hello there", timeout_s=TIMEOUT_S, **sampling))
    responses = list(dsv4_pb2_grpc.Dsv4EngineStub(channel).Generate(
        pb.GenerateRequest(text="Hello there", sampling_params=pb.SamplingParams(**sampling)), timeout=TIMEOUT_S))
    assert pieces and all(pieces)
    assert "".join(pieces) == responses[-1].complete.text


def test_generate_main_prints_the_stream_and_reports_errors(api_server, capsys) -> None:  # noqa: F811
    parser = client.add_generate_arguments(argparse.ArgumentParser())
    out = io.StringIO()
    args = parser.parse_args(["Hi", "--address", api_server.address, "--max-tokens", "5", "--temperature", "0"])
    assert client.generate_main(args, out) == 0
    expected = "".join(client.stream_generate(api_server.address, "Hi", max_tokens=5, temperature=0.0))
    assert out.getvalue() == expected + "\n"
    bad = parser.parse_args(["Hi", "--address", api_server.address, "--top-p", "2"])
    assert client.generate_main(bad, io.StringIO()) == 1
    assert "INVALID_ARGUMENT: sampling_params.top_p" in capsys.readouterr().err


def test_generate_main_prints_logprobs_after_the_text(api_server, channel) -> None:  # noqa: F811
    parser = client.add_generate_arguments(argparse.ArgumentParser())
    out, err = io.StringIO(), io.StringIO()
    args = parser.parse_args(["Hi", "--address", api_server.address, "--max-tokens", "4", "--temperature", "0",
                              "--ignore-eos", "--logprobs", "2"])
    assert client.generate_main(args, out, err) == 0
    complete = list(dsv4_pb2_grpc.Dsv4EngineStub(channel).Generate(pb.GenerateRequest(
        text="Hi", sampling_params=pb.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=2)),
        timeout=TIMEOUT_S))[-1].complete
    assert out.getvalue() == complete.text + "\n"
    assert err.getvalue() == client.format_logprobs(complete.output_ids, complete.logprobs)
    lines = err.getvalue().splitlines()
    assert len(lines) == 4 and all(len(line.split("\t")) == 3 and len(line.split("\t")[2].split()) == 2
                                   for line in lines)
    assert lines[0].split("\t")[0] == str(complete.output_ids[0])


def test_serve_forever_serves_until_cancelled(engine_client, tokenizer) -> None:  # noqa: F811
    port, loop = free_port(), EventLoopThread()
    serving = loop.submit(serve_forever(engine_client, tokenizer, "127.0.0.1", port, shutdown_grace_s=0.1))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            grpc.channel_ready_future(chan).result(TIMEOUT_S)
            health = health_pb2_grpc.HealthStub(chan)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status == \
                health_pb2.HealthCheckResponse.SERVING
        serving.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            serving.result(TIMEOUT_S)
    finally:
        loop.stop()


def test_a_stop_drains_running_streams_and_refuses_new_ones(ray_service, tokenizer) -> None:  # noqa: F811
    """SIGTERM's path (`stop` set): health turns NOT_SERVING and a new Generate gets UNAVAILABLE at once, the
    stream already running completes every token, then serve_forever returns (well inside the grace)."""
    from dsv4.cluster.engine_ray import RayEngineClient

    port, loop = free_port(), EventLoopThread()
    stop = asyncio.Event()
    engine = RayEngineClient(ray_service.coordinator, ray_service.info)    # its output fan-out on this loop
    serving = loop.submit(serve_forever(engine, tokenizer, "127.0.0.1", port, shutdown_grace_s=60.0, stop=stop))
    request = pb.GenerateRequest(request_id="drained", text="Hello",
                                 sampling_params=pb.SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            grpc.channel_ready_future(chan).result(TIMEOUT_S)
            stub, health = dsv4_pb2_grpc.Dsv4EngineStub(chan), health_pb2_grpc.HealthStub(chan)
            stream = stub.Generate(request, timeout=TIMEOUT_S)
            first = next(stream)
            loop.call_soon(stop.set)
            while health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                pass
            late = pb.GenerateRequest(request_id="late", text="Hi", sampling_params=pb.SamplingParams(max_tokens=2))
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(late, timeout=TIMEOUT_S))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            rest = [first, *stream]
        complete = rest[-1].complete
        assert rest[-1].WhichOneof("response") == "complete" and complete.completion_tokens == 64
        serving.result(TIMEOUT_S)        # returned by itself once the stream ended
    finally:
        loop.stop()


def _resident_bytes() -> int:
    """This process's resident memory after a collection, with glibc's free arena pages given back (malloc_trim)
    where available, so what remains is memory still referenced, not the allocator's cache."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
def test_rejected_large_requests_keep_no_memory(channel) -> None:  # noqa: F811
    """Prompts of 1.5M token ids (6 MB messages, under the 8 MiB limit) are rejected for the context before the
    ids are copied, and the server (in this process) keeps nothing of them: after 20 rejections have warmed the
    allocator and gRPC's threads, 40 more grow resident memory by less than 2 MB each (a kept request would be
    6 MB of message plus ~40 MB of Python ints; observed: no trend, +-30 MB)."""
    stub = dsv4_pb2_grpc.Dsv4EngineStub(channel)
    request = pb.GenerateRequest(tokenized=pb.TokenIds(token_ids=range(1000, 1000 + 1_500_000)),
                                 sampling_params=pb.SamplingParams(max_tokens=1))

    def reject(times: int) -> None:
        for _ in range(times):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, timeout=TIMEOUT_S))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "context" in err.value.details()

    reject(20)
    before = _resident_bytes()
    reject(40)
    grown = _resident_bytes() - before
    print(f"\nresident memory after 40 more rejected 6 MB requests: {grown / 2**20:+.1f} MiB")
    assert grown < 80 << 20, grown

"""`vllm.grpc.engine.VllmEngine` (the smg gateway's worker API) end to end against the `engine_client` engine."""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import re
import zipfile
from collections.abc import Iterator

import grpc
import jsonschema
import pytest
import tokenizers
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
from smg_grpc_proto.generated import common_pb2, vllm_engine_pb2_grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb

from dsv4.cluster.tokenizer import ModelTokenizer
from dsv4.protos import dsv4_pb2 as pb
from dsv4.protos import dsv4_pb2_grpc

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> vllm_engine_pb2_grpc.VllmEngineStub:  # noqa: F811
    return vllm_engine_pb2_grpc.VllmEngineStub(channel)


@pytest.fixture(scope="module")
def model_info(stub: vllm_engine_pb2_grpc.VllmEngineStub) -> vpb.GetModelInfoResponse:
    return stub.GetModelInfo(vpb.GetModelInfoRequest(), timeout=TIMEOUT_S)


def tokenized(tokenizer: ModelTokenizer, text: str = PROMPT) -> vpb.TokenizedInput:  # noqa: F811
    return vpb.TokenizedInput(original_text=text, input_ids=tokenizer.encode(text))


def generate(stub: vllm_engine_pb2_grpc.VllmEngineStub, **request) -> list[vpb.GenerateResponse]:
    return list(stub.Generate(vpb.GenerateRequest(**request), timeout=TIMEOUT_S))


def greedy(max_tokens: int, **more) -> vpb.SamplingParams:
    return vpb.SamplingParams(temperature=0.0, seed=99, max_tokens=max_tokens, **more)


def check_stream(responses: list[vpb.GenerateResponse]) -> vpb.GenerateComplete:
    """vLLM's streaming semantics: chunks carry new tokens and their count, then exactly one complete."""
    kinds = [r.WhichOneof("response") for r in responses]
    assert kinds[-1] == "complete" and kinds.count("complete") == 1, kinds
    complete = responses[-1].complete
    chunks = [r.chunk for r in responses[:-1]]
    assert all(len(c.token_ids) == c.completion_tokens > 0 for c in chunks)
    if chunks:
        assert [t for c in chunks for t in c.token_ids] == list(complete.output_ids)
    assert complete.completion_tokens == len(complete.output_ids)
    return complete


def running_requests(stub: vllm_engine_pb2_grpc.VllmEngineStub) -> int:
    return stub.GetLoads(vpb.GetLoadsRequest(), timeout=TIMEOUT_S).loads[0].num_running_reqs


def test_streaming_generate(stub, tokenizer) -> None:  # noqa: F811
    responses = generate(stub, request_id="v1", tokenized=tokenized(tokenizer), sampling_params=greedy(10),
                         stream=True)
    complete = check_stream(responses)
    assert len(responses) >= 2
    assert complete.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert complete.finish_reason in ("length", "stop")
    if complete.finish_reason == "length":
        assert complete.completion_tokens == 10


def test_non_streaming_generate_sends_only_complete(stub, tokenizer) -> None:  # noqa: F811
    streamed = check_stream(generate(stub, request_id="v2", tokenized=tokenized(tokenizer),
                                     sampling_params=greedy(10), stream=True))
    responses = generate(stub, request_id="v3", tokenized=tokenized(tokenizer), sampling_params=greedy(10))
    assert [r.WhichOneof("response") for r in responses] == ["complete"]
    assert responses[0].complete.output_ids == streamed.output_ids


def test_text_input_is_tokenized_by_the_server(stub, tokenizer) -> None:  # noqa: F811
    by_ids = check_stream(generate(stub, request_id="v4", tokenized=tokenized(tokenizer), sampling_params=greedy(6),
                                   stream=True))
    by_text = check_stream(generate(stub, request_id="v5", text=PROMPT, sampling_params=greedy(6), stream=True))
    assert by_text.output_ids == by_ids.output_ids


def test_stop_string_is_matched_by_the_server(stub, tokenizer) -> None:  # noqa: F811
    reference = check_stream(generate(stub, request_id="v6", tokenized=tokenized(tokenizer),
                                      sampling_params=greedy(30, ignore_eos=True), stream=True))
    text = tokenizer.decode(reference.output_ids)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    complete = check_stream(generate(stub, request_id="v7", tokenized=tokenized(tokenizer),
                                     sampling_params=greedy(30, ignore_eos=True, stop=[stop]), stream=True))
    assert complete.finish_reason == "stop" and complete.matched_stop_str == stop
    ids = list(complete.output_ids)
    assert stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])


def test_abort_mid_stream(stub, tokenizer) -> None:  # noqa: F811
    call = stub.Generate(vpb.GenerateRequest(request_id="v-abort", tokenized=tokenized(tokenizer), stream=True,
                                             sampling_params=vpb.SamplingParams(ignore_eos=True)), timeout=TIMEOUT_S)
    assert next(call).WhichOneof("response") == "chunk"
    assert running_requests(stub) == 1
    stub.Abort(vpb.AbortRequest(request_ids=["v-abort", "unknown-id"]), timeout=TIMEOUT_S)
    assert list(call)[-1].complete.finish_reason == "abort"
    wait_until(lambda: running_requests(stub) == 0, "the aborted request to leave GetLoads")


def _bad_requests(tokenizer: ModelTokenizer, vocab: int, context: int) -> list[tuple[str, dict]]:  # noqa: F811
    ok = {"tokenized": tokenized(tokenizer)}
    return [
        ("prompt", {"tokenized": vpb.TokenizedInput()}),
        ("prompt.text", {"text": ""}),
        ("prompt.token_ids", {"tokenized": vpb.TokenizedInput(input_ids=[0, vocab + 7])}),
        ("prompt", {"tokenized": vpb.TokenizedInput(input_ids=[5] * context)}),
        ("sampling_params.max_tokens", {**ok, "sampling_params": vpb.SamplingParams(max_tokens=0)}),
        ("sampling_params.max_tokens", {**ok, "sampling_params": vpb.SamplingParams(max_tokens=(1 << 32) - 1)}),
        ("sampling_params.temperature", {**ok, "sampling_params": vpb.SamplingParams(temperature=500.0)}),
        ("sampling_params.top_p", {**ok, "sampling_params": vpb.SamplingParams(top_p=1.5)}),
        ("sampling_params.top_k", {**ok, "sampling_params": vpb.SamplingParams(top_k=vocab + 1)}),
        ("sampling_params.seed", {**ok, "sampling_params": vpb.SamplingParams(seed=-5)}),
        ("sampling_params.n", {**ok, "sampling_params": vpb.SamplingParams(n=129)}),
        ("sampling_params.max_tokens", {**ok, "sampling_params": vpb.SamplingParams(max_tokens=context)}),
        ("sampling_params.min_p", {**ok, "sampling_params": vpb.SamplingParams(min_p=1.5)}),
        ("sampling_params.presence_penalty", {**ok, "sampling_params": vpb.SamplingParams(presence_penalty=2.5)}),
        ("sampling_params.frequency_penalty", {**ok, "sampling_params": vpb.SamplingParams(frequency_penalty=-9)}),
        ("sampling_params.logit_bias", {**ok, "sampling_params": vpb.SamplingParams(logit_bias={vocab: 1.0})}),
        ("sampling_params.logit_bias", {**ok, "sampling_params": vpb.SamplingParams(logit_bias={3: 200.0})}),
        ("sampling_params.logprobs", {**ok, "sampling_params": vpb.SamplingParams(logprobs=-1)}),  # vLLM: all
        ("sampling_params.logprobs", {**ok, "sampling_params": vpb.SamplingParams(logprobs=21)}),
        ("sampling_params.prompt_logprobs", {**ok, "sampling_params": vpb.SamplingParams(prompt_logprobs=1)}),
        ("sampling_params.prompt_logprobs", {**ok, "sampling_params": vpb.SamplingParams(prompt_logprobs=0)}),
        ("sampling_params.repetition_penalty", {**ok, "sampling_params": vpb.SamplingParams(repetition_penalty=2.5)}),
        ("sampling_params.json_schema", {**ok, "sampling_params": vpb.SamplingParams(json_schema="{not json")}),
        ("sampling_params.regex", {**ok, "sampling_params": vpb.SamplingParams(regex="([a-")}),
        ("sampling_params.choice", {**ok, "sampling_params": vpb.SamplingParams(choice=vpb.ChoiceConstraint())}),
        ("sampling_params.structural_tag", {**ok, "sampling_params": vpb.SamplingParams(structural_tag="{}")}),
        ("sampling_params.stop_token_ids", {**ok, "sampling_params": vpb.SamplingParams(stop_token_ids=[vocab])}),
    ]


def check_output_logprobs(logprobs: vpb.OutputLogProbs, token_ids, num_logprobs: int) -> None:
    """vLLM's layout: the sampled tokens' ids and logprobs, and one TopLogProbs per position if alternatives were
    asked for (most likely first)."""
    assert list(logprobs.token_ids) == list(token_ids) and len(logprobs.token_logprobs) == len(token_ids)
    assert all(lp <= 0.0 for lp in logprobs.token_logprobs)
    if not num_logprobs:
        assert not logprobs.top_logprobs
        return
    assert len(logprobs.top_logprobs) == len(token_ids)
    for top in logprobs.top_logprobs:
        assert len(top.values) == len(top.token_ids) == num_logprobs
        assert list(top.values) == sorted(top.values, reverse=True)


def test_logprobs_in_chunks_and_complete(stub, channel, tokenizer) -> None:  # noqa: F811
    params = greedy(8, ignore_eos=True, logprobs=2)
    streamed = generate(stub, request_id="v-lp", tokenized=tokenized(tokenizer), sampling_params=params, stream=True)
    complete = check_stream(streamed)
    chunks = [r.chunk for r in streamed[:-1]]
    for chunk in chunks:
        check_output_logprobs(chunk.output_logprobs, chunk.token_ids, 2)
    everything = complete.output_logprobs
    check_output_logprobs(everything, complete.output_ids, 2)               # all of them, as output_ids
    assert [v for c in chunks for v in c.output_logprobs.token_logprobs] == list(everything.token_logprobs)
    assert [t for c in chunks for t in c.output_logprobs.top_logprobs] == list(everything.top_logprobs)
    for token, value, top in zip(complete.output_ids, everything.token_logprobs, everything.top_logprobs,
                                 strict=True):
        assert top.token_ids[0] == token and top.values[0] == value          # greedy: the most likely token
    unstreamed = generate(stub, request_id="v-lp2", tokenized=tokenized(tokenizer), sampling_params=params)
    assert unstreamed[0].complete.output_logprobs == complete.output_logprobs
    # the same numbers as the dsv4 API's for the same prompt
    ours = list(dsv4_pb2_grpc.Dsv4EngineStub(channel).Generate(pb.GenerateRequest(
        tokenized=pb.TokenIds(token_ids=tokenizer.encode(PROMPT)),
        sampling_params=pb.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)),
        timeout=TIMEOUT_S))[-1].complete
    assert [lp.logprob for lp in ours.logprobs] == list(complete.output_logprobs.token_logprobs)
    only_chosen = check_stream(generate(stub, request_id="v-lp3", tokenized=tokenized(tokenizer), stream=True,
                                        sampling_params=greedy(8, ignore_eos=True, logprobs=0)))
    check_output_logprobs(only_chosen.output_logprobs, complete.output_ids, 0)
    assert only_chosen.output_logprobs.token_logprobs == complete.output_logprobs.token_logprobs
    plain = generate(stub, request_id="v-lp4", tokenized=tokenized(tokenizer), sampling_params=greedy(8), stream=True)
    assert not any(r.chunk.HasField("output_logprobs") for r in plain[:-1])
    assert not plain[-1].complete.HasField("output_logprobs")


def test_n_samples_stream_with_their_index_each_reproducible(stub, tokenizer) -> None:  # noqa: F811
    params = vpb.SamplingParams(temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, n=3)
    responses = generate(stub, request_id="v-n", tokenized=tokenized(tokenizer), sampling_params=params, stream=True)
    outputs = []
    for index in range(3):
        mine = [r for r in responses if getattr(r, r.WhichOneof("response")).index == index]
        outputs.append(list(check_stream(mine).output_ids))
    for index, output in enumerate(outputs):   # sample i is the request with seed + i
        alone = generate(stub, request_id=f"v-n{index}", tokenized=tokenized(tokenizer),
                         sampling_params=vpb.SamplingParams(temperature=1.0, seed=5 + index, max_tokens=6,
                                                            ignore_eos=True))
        assert list(alone[-1].complete.output_ids) == output
    assert len({tuple(o) for o in outputs}) == 3, outputs
    unstreamed = generate(stub, request_id="v-n2", tokenized=tokenized(tokenizer), sampling_params=params)
    assert sorted(r.complete.index for r in unstreamed) == [0, 1, 2]
    assert {r.complete.index: list(r.complete.output_ids) for r in unstreamed} == dict(enumerate(outputs))


def test_logit_bias_min_p_and_penalties_reach_the_sampler(stub, tokenizer) -> None:  # noqa: F811
    def run(request_id, **more):
        return generate(stub, request_id=request_id, tokenized=tokenized(tokenizer),
                        sampling_params=greedy(12, ignore_eos=True, logprobs=20, **more))[-1].complete

    plain = run("v-adj0")
    first = plain.output_ids[0]
    banned = run("v-adj1", logit_bias={first: -100.0})
    assert banned.output_ids[0] != first and first not in banned.output_ids
    forced = run("v-adj2", logit_bias={7: 100.0})
    assert list(forced.output_ids) == [7] * 12
    sampled_min_p = generate(stub, request_id="v-adj3", tokenized=tokenized(tokenizer),
                             sampling_params=vpb.SamplingParams(temperature=1.0, seed=3, max_tokens=12,
                                                                ignore_eos=True, min_p=1.0))[-1].complete
    assert sampled_min_p.output_ids == plain.output_ids          # min_p = 1 keeps the most likely token only
    # frequency + presence under greedy: each choice is the argmax of the raw logprobs (the logits shifted per
    # position) minus the penalties of the outputs so far, over the top 20 the server returns and the chosen
    # token's own. Negative penalties: the random model rarely repeats itself, so make it.
    frequency, presence = -1.0, -0.5
    penalized = run("v-adj4", frequency_penalty=frequency, presence_penalty=presence)
    lps = penalized.output_logprobs
    changed = 0
    for position, token in enumerate(penalized.output_ids):
        before = list(penalized.output_ids[:position])
        top = lps.top_logprobs[position]
        raw = dict(zip(top.token_ids, top.values, strict=True)) | {token: lps.token_logprobs[position]}
        scores = {t: v - frequency * before.count(t) - presence * (t in before) for t, v in raw.items()}
        assert scores[token] >= max(scores.values()) - 1e-4, (position, token, scores)
        changed += token != top.token_ids[0]
    assert changed > 0, "the penalties never moved a choice: the check above proved nothing"


def test_structured_output_json_schema_regex_and_choice(stub, tokenizer) -> None:  # noqa: F811
    """20 seeds of a JSON-schema-constrained completion on the random-weight model: each ends (EOS, once the
    object is complete) and parses and validates; a regex and a choice constrain likewise."""
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "color", "n"],
              "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "dark blue"]},
                             "n": {"type": "integer", "minimum": 0, "maximum": 999}}}

    def run(i: int, **constraint) -> str:
        complete = generate(stub, request_id=f"v-so{i}-{next(iter(constraint))}", tokenized=tokenized(tokenizer),
                            sampling_params=vpb.SamplingParams(temperature=1.0, seed=i, max_tokens=400,
                                                               **constraint))[-1].complete
        assert complete.finish_reason == "stop", (i, complete.finish_reason, tokenizer.decode(complete.output_ids))
        return tokenizer.decode(complete.output_ids)

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        texts = list(pool.map(lambda i: run(i, json_schema=json.dumps(schema)), range(20)))
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    assert len(set(texts)) > 1
    for i in range(3):
        assert re.fullmatch(r"[a-z]{2,6}@[0-9]{1,3}", run(i, regex=r"[a-z]{2,6}@[0-9]{1,3}"))
        assert run(i, choice=vpb.ChoiceConstraint(choices=["left", "right", "up and down"])) in \
            ("left", "right", "up and down")


def test_every_bad_request_is_invalid_argument_naming_the_field(stub, tokenizer, model_info) -> None:  # noqa: F811
    for field, request in _bad_requests(tokenizer, model_info.vocab_size, model_info.max_context_length):
        with pytest.raises(grpc.RpcError) as info:
            generate(stub, request_id="bad", stream=True, **request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, request)
        assert info.value.details().startswith(field + ":"), (field, info.value.details())
        check_stream(generate(stub, request_id="good", tokenized=tokenized(tokenizer), sampling_params=greedy(2),
                              stream=True))


def test_health_check_and_info(stub, model_info, tokenizer_dir) -> None:  # noqa: F811
    assert stub.HealthCheck(vpb.HealthCheckRequest(), timeout=TIMEOUT_S).healthy
    assert model_info.is_generation and model_info.max_context_length > 1 and model_info.vocab_size > 0
    assert model_info.tokenizer_path == str(tokenizer_dir) and list(model_info.eos_token_ids)
    server = stub.GetServerInfo(vpb.GetServerInfoRequest(), timeout=TIMEOUT_S)
    assert server.active_requests == 0 and server.uptime_seconds >= 0
    loads = stub.GetLoads(vpb.GetLoadsRequest(), timeout=TIMEOUT_S)
    assert loads.dp_rank_count == 1 and 0.0 <= loads.loads[0].token_usage <= 1.0


def test_get_tokenizer_streams_a_loadable_bundle(stub, tokenizer) -> None:  # noqa: F811
    chunks = list(stub.GetTokenizer(common_pb2.GetTokenizerRequest(), timeout=TIMEOUT_S))
    data = b"".join(c.data for c in chunks)
    assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
    assert all(not c.sha256 for c in chunks[:-1])
    with zipfile.ZipFile(io.BytesIO(data)) as bundle:
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(bundle.namelist())
        remote = tokenizers.Tokenizer.from_str(bundle.read("tokenizer.json").decode())
    assert remote.encode(PROMPT, add_special_tokens=False).ids == tokenizer.encode(PROMPT)[1:]


def test_flush_cache_resets_the_prefix_cache(tokenizer) -> None:  # noqa: F811
    """STAND-IN ONLY for the call path (the real engine's flush: tests/cpu/test_prefix_cache.py)."""
    engine = FakeEngine(tokenizer)
    server = ServerThread(engine, tokenizer).start()
    try:
        with grpc.insecure_channel(server.address) as chan:
            reply = vllm_engine_pb2_grpc.VllmEngineStub(chan).FlushCache(common_pb2.FlushCacheRequest(),
                                                                          timeout=TIMEOUT_S)
        assert reply.success and engine.prefix_cache_resets == 1
    finally:
        server.stop()


def test_unsupported_rpcs_are_unimplemented(stub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest(), timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(vpb.EmbedRequest(), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.fixture
def failing_server(tokenizer) -> Iterator[ServerThread]:  # noqa: F811
    """STAND-IN ONLY: an engine that raises after 4 tokens of every request."""
    server = ServerThread(FakeEngine(tokenizer, fail_after_tokens=4), tokenizer).start()
    yield server
    server.stop()


def test_engine_failure_is_an_internal_status(failing_server, tokenizer) -> None:  # noqa: F811
    with grpc.insecure_channel(failing_server.address) as chan:
        failing = vllm_engine_pb2_grpc.VllmEngineStub(chan)
        with pytest.raises(grpc.RpcError) as info:
            generate(failing, request_id="f1", tokenized=tokenized(tokenizer), sampling_params=greedy(20), stream=True)
        assert info.value.code() == grpc.StatusCode.INTERNAL and "fake engine failure" in info.value.details()
        check_stream(generate(failing, request_id="f2", tokenized=tokenized(tokenizer), sampling_params=greedy(3),
                              stream=True))

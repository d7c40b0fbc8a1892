"""The smg gateway in front of our server: OpenAI chat completions over SSE, served from the VllmEngine API.

smg (pip `smg`, a Rust binary) registers a `grpc://` worker by calling VllmEngine.HealthCheck, GetModelInfo and
GetServerInfo, loads the tokenizer and chat template from the model info's tokenizer_path (or, when that path does
not exist on the gateway's host, through GetTokenizer), then renders and tokenizes chats itself and sends token
ids to VllmEngine.Generate. Details in protos/README.md.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import pytest
from api_fakes import (  # noqa: F401
    TIMEOUT_S,
    RecordingEngine,
    ServerThread,
    engine_client,
    free_port,
    tokenizer,
    tokenizer_dir,
    wait_until,
)

from dsv4.protos import dsv4_pb2 as pb
from dsv4.protos import dsv4_pb2_grpc
from dsv4.wire.request import TokenLogprobs

SMG = shutil.which("smg") or shutil.which("smg", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(SMG is None, reason="the smg gateway is not installed (pip install smg)")

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]


class Gateway:
    def __init__(self, worker_address: str, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log_path = log_path
        command = [SMG, "launch", "--host", "127.0.0.1", "--port", str(self.port),
                   "--worker-urls", f"grpc://{worker_address}",
                   "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
                   "--shutdown-grace-period-secs", "1", "--log-level", "warn"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}  # never reach for the hub
        self._log = open(log_path, "wb")
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log_tail(self) -> str:
        return self._log_path.read_bytes()[-4000:].decode(errors="replace")

    def _get(self, path: str) -> dict:
        if self._process.poll() is not None:
            pytest.fail(f"smg exited with {self._process.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:  # 503 while not ready
            return json.load(exc)
        except (urllib.error.URLError, ConnectionError, ValueError):
            return {}

    def serves(self, model: str) -> bool:
        # /readiness turns "ready" once a worker is healthy *and* its tokenizer is registered; /v1/models
        # lists the model earlier, when requests would still get 503 tokenizer_not_ready.
        models = [m["id"] for m in self._get("/v1/models").get("data", [])]
        return model in models and self._get("/readiness").get("status") == "ready"

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._log.close()


@pytest.fixture(scope="module")
def recorder(engine_client) -> RecordingEngine:  # noqa: F811
    return RecordingEngine(engine_client)


@pytest.fixture(scope="module")
def api_server(recorder, tokenizer) -> Iterator[ServerThread]:  # noqa: F811
    server = ServerThread(recorder, tokenizer).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(api_server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(api_server.address) as channel:
        grpc.channel_ready_future(channel).result(TIMEOUT_S)
        yield channel


@pytest.fixture(scope="module")
def served_model(channel) -> str:  # noqa: F811
    return dsv4_pb2_grpc.Dsv4EngineStub(channel).GetModelInfo(pb.GetModelInfoRequest()).served_model_name


@pytest.fixture(scope="module")
def gateway(api_server, served_model, tmp_path_factory) -> Iterator[Gateway]:  # noqa: F811
    gateway = Gateway(api_server.address, tmp_path_factory.mktemp("smg") / "smg.log")
    try:
        wait_until(lambda: gateway.serves(served_model), "smg to register the worker", timeout_s=60)
        yield gateway
    finally:
        gateway.stop()


def open_chat(gateway: Gateway, model: str, **body) -> urllib.request.addinfourl:
    request = urllib.request.Request(
        f"{gateway.url}/v1/chat/completions", headers={"Content-Type": "application/json"},
        data=json.dumps({"model": model, "messages": MESSAGES, "stream": True, **body}).encode())
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        pytest.fail(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}\n{gateway.log_tail()}")


def sse_events(response: urllib.request.addinfourl) -> Iterator[str]:
    for line in response:
        line = line.decode().strip()
        if line.startswith("data:"):
            yield line[len("data:"):].strip()


def last_request(recorder: RecordingEngine) -> tuple[tuple[int, ...], list[int]]:
    """The prompt (as smg rendered and tokenized it) and output ids of the newest request the engine saw."""
    request_id = list(recorder.prompts)[-1]
    return recorder.prompts[request_id], recorder.outputs[request_id]


def engine_greedy(channel, prompt_ids, **params) -> pb.GenerateComplete:  # noqa: F811
    """A fresh run of the same prompt ids straight through our own API."""
    responses = list(dsv4_pb2_grpc.Dsv4EngineStub(channel).Generate(
        pb.GenerateRequest(tokenized=pb.TokenIds(token_ids=prompt_ids), sampling_params=pb.SamplingParams(**params)),
        timeout=TIMEOUT_S))
    return responses[-1].complete


def test_streaming_chat_completion_through_smg(gateway, served_model, channel, tokenizer, recorder) -> None:  # noqa: F811
    with open_chat(gateway, served_model, max_tokens=24, temperature=0.0, seed=11, ignore_eos=True) as response:
        assert response.headers.get_content_type() == "text/event-stream"
        events = list(sse_events(response))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 3, "expected the role chunk, content chunks and the finish chunk"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    prompt_ids, output_ids = last_request(recorder)
    assert len(output_ids) == 24 and finish == ["length"]
    assert content == tokenizer.decode(output_ids)                  # the gateway streamed the engine's tokens
    again = engine_greedy(channel, prompt_ids, max_tokens=24, temperature=0.0, ignore_eos=True)
    assert list(again.output_ids) == output_ids                     # and greedy decoding is reproducible


def test_stop_string_through_smg(gateway, served_model, channel, tokenizer, recorder) -> None:  # noqa: F811
    with open_chat(gateway, served_model, max_tokens=24, temperature=0.0, seed=3, ignore_eos=True) as response:
        list(sse_events(response))
    prompt_ids, output_ids = last_request(recorder)
    full = tokenizer.decode(output_ids)
    stop = full[10:12]
    with open_chat(gateway, served_model, max_tokens=24, temperature=0.0, seed=3, ignore_eos=True,
                   stop=[stop]) as response:
        chunks = [json.loads(e) for e in sse_events(response) if e != "[DONE]"]
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == full[:full.index(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_closing_the_http_stream_aborts_the_request(gateway, served_model, channel) -> None:  # noqa: F811
    loads = dsv4_pb2_grpc.Dsv4EngineStub(channel).GetLoads
    with open_chat(gateway, served_model, ignore_eos=True) as response:
        events = sse_events(response)
        while not json.loads(next(events))["choices"][0]["delta"].get("content"):
            pass  # read up to the first content, so the request is running in the engine
        assert loads(pb.GetLoadsRequest(), timeout=TIMEOUT_S).num_running_requests == 1
    wait_until(lambda: loads(pb.GetLoadsRequest()).num_running_requests == 0, "smg to abort the request")


def _f32(value: float) -> bytes:
    """Both sides carry float32 (the engine's proto, smg's Rust f32); JSON prints it shortest, so compare bits."""
    return struct.pack("<f", value)


def _engine_entries(engine_logprobs: list[TokenLogprobs]) -> list[tuple[bytes, list[bytes]]]:
    return [(_f32(lp.logprob), [_f32(v) for v in lp.top_logprobs]) for lp in engine_logprobs]


def _received_entries(content: list[dict]) -> list[tuple[bytes, list[bytes]]]:
    return [(_f32(c["logprob"]), [_f32(t["logprob"]) for t in c["top_logprobs"]]) for c in content]


def test_openai_logprobs_through_smg(gateway, served_model, recorder) -> None:  # noqa: F811
    body = dict(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3)
    with open_chat(gateway, served_model, stream=False, **body) as response:
        choice = json.load(response)["choices"][0]
    request_id = list(recorder.prompts)[-1]
    assert recorder.requests[request_id].sampling.logprobs == 3                # top_logprobs reached the engine
    engine = _engine_entries(recorder.logprobs[request_id])
    content = choice["logprobs"]["content"]
    assert len(content) == len(recorder.outputs[request_id]) == 12
    assert _received_entries(content) == engine                                # every value, to the bit
    assert all(c["top_logprobs"][0]["token"] == c["token"] for c in content)   # greedy: the most likely token

    with open_chat(gateway, served_model, **body) as response:
        chunks = [json.loads(e) for e in sse_events(response) if e != "[DONE]"]
    streamed = [c for chunk in chunks if chunk["choices"]
                for c in ((chunk["choices"][0].get("logprobs") or {}).get("content") or [])]
    request_id = list(recorder.prompts)[-1]
    assert _engine_entries(recorder.logprobs[request_id]) == engine            # the same greedy run
    # smg streams a chunk's logprobs with that chunk's text, and drops both when a chunk adds no text (the first
    # byte of a split character): what arrives is the engine's in order, possibly with gaps.
    received, remaining = _received_entries(streamed), iter(engine)
    assert received and all(entry in remaining for entry in received)         # a subsequence of the engine's


def test_sampling_options_and_n_through_smg(gateway, served_model, tokenizer, recorder) -> None:  # noqa: F811
    """n, seed, the penalties and min_p travel from the OpenAI body to the engine's requests. (smg 0.4 drops
    `logit_bias` before it reaches the worker: the README says so; the vLLM-proto test covers it.)"""
    body = dict(max_tokens=6, temperature=0.8, seed=7, n=2, presence_penalty=0.5, frequency_penalty=-0.25,
                repetition_penalty=1.1, min_p=0.05, ignore_eos=True)
    before = set(recorder.requests)
    with open_chat(gateway, served_model, stream=False, **body) as response:
        answer = json.load(response)
    assert sorted(c["index"] for c in answer["choices"]) == [0, 1]
    new = [recorder.requests[i] for i in recorder.requests if i not in before]
    assert len(new) == 2
    for request in new:
        sampling = request.sampling
        assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.max_tokens) == (0.5, -0.25, 6)
        assert abs(sampling.min_p - 0.05) < 1e-6 and abs(sampling.repetition_penalty - 1.1) < 1e-6
    assert sorted(r.sampling.seed for r in new) == [7, 8]                   # sample i: seed + i
    assert [c["message"]["content"] for c in sorted(answer["choices"], key=lambda c: c["index"])] == \
        [tokenizer.decode(recorder.outputs[r.request_id]) for r in sorted(new, key=lambda r: r.request_id)]


def test_response_format_json_schema_through_smg(gateway, served_model, recorder) -> None:  # noqa: F811
    schema = {"type": "object", "additionalProperties": False, "required": ["ok", "size"],
              "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "XL"]}}}
    for seed in range(3):
        body = dict(max_tokens=190, temperature=1.0, seed=seed, stream=False,   # the chat prompt takes 317
                    response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
        with open_chat(gateway, served_model, **body) as response:
            content = json.load(response)["choices"][0]["message"]["content"]
        jsonschema.validate(json.loads(content), schema)
        structured = recorder.requests[list(recorder.requests)[-1]].sampling.structured
        assert structured.kind == "json_schema" and json.loads(structured.spec) == schema

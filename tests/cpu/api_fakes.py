"""Test harness for the gRPC API: a STAND-IN engine, a real server on a background thread, and fixtures.

Every API test gets its engine from the `engine_client` fixture below: the real dsv4 engine (a local Ray
cluster, the coordinator and two CPU workers on the tiny synthetic checkpoint). Assertions hold for any correct
engine (they compare the stream with what the server reports).

`FakeEngine` is NOT the dsv4 engine: a small deterministic `EngineClient` used only by the few tests that need
fault injection the real engine cannot be asked for (scripted multi-byte tokens, an engine that fails mid-stream,
an unhealthy engine); those tests build their own and say so.

The test modules import the fixtures from here (`from api_fakes import ...`), so the API tests need no changes to
the conftest files the whole suite shares.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import socket
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from dsv4.cluster.engine_client import EngineClient, LoadReport, WorkerLoad
from dsv4.cluster.generation_service import GenerationService
from dsv4.cluster.server import build_server
from dsv4.cluster.tokenizer import ModelTokenizer
from dsv4.model.tokenizer_file import write_tokenizer_files
from dsv4.wire.model_info import ModelInfo
from dsv4.wire.request import (
    EngineOverloaded,
    FinishReason,
    GenerateRequest,
    InvalidRequest,
    RequestOutput,
    TokenLogprobs,
)
from dsv4.workers.grammar import ConstraintCheck

VOCAB_SIZE = 512
MAX_MODEL_LEN = 256
TIMEOUT_S = 30.0  # against hangs only; nothing asserts on speed
BLOCK_SIZE = 16
NUM_EXPERTS = 8


@dataclass
class _Running:
    request: GenerateRequest
    rank: int
    output_ids: list[int] = field(default_factory=list)
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)  # RequestOutput, or the exception that ended it
    task: asyncio.Task | None = None


class FakeEngine:
    """A deterministic stand-in `EngineClient` (see the module docstring). Not a model of anything."""

    def __init__(self, tokenizer: ModelTokenizer, *, model_path: str = "", max_model_len: int = MAX_MODEL_LEN,
                 step_delay_s: float = 0.002, script: Sequence[int] = (), fail_after_tokens: int | None = None,
                 num_workers: int = 2, max_running: int | None = None):
        self._vocab_size = tokenizer.vocab_size
        self._max_model_len = max_model_len
        self._model_path = model_path or str(tokenizer.path)
        self._delay = step_delay_s
        self._script = tuple(script)          # emitted first, in order, whatever the prompt
        self._fail_after = fail_after_tokens  # raise RuntimeError after this many tokens
        self._num_workers = num_workers
        self._max_running = max_running       # refuse more concurrent requests (EngineOverloaded), like a full queue
        # Generated tokens decode to printable ASCII, so every text is easy to read in a failing test.
        self._printable_ids = [i for i in range(self._vocab_size)
                               if (text := tokenizer.decode([i])) and text.isascii() and text.isprintable()]
        self._running: dict[str, _Running] = {}
        self._expert_token_counts = [0] * NUM_EXPERTS
        self.healthy = True
        self.abort_calls: list[str] = []  # for tests of the stand-in only
        self.prefix_cache_resets = 0

    def model_info(self) -> ModelInfo:
        return ModelInfo(model_path=self._model_path, served_model_name="dsv4-fake", vocab_size=self._vocab_size,
                         max_model_len=self._max_model_len, bos_token_id=0, eos_token_ids=(1,),
                         num_workers=self._num_workers, numerics="reference", num_hidden_layers=2,
                         num_routed_experts=NUM_EXPERTS, num_experts_per_tok=2, hidden_size=64)

    def _next_token(self, request: GenerateRequest, output_ids: list[int]) -> int:
        if len(output_ids) < len(self._script):
            return self._script[len(output_ids)]
        last = output_ids[-1] if output_ids else request.prompt_token_ids[-1]
        return self._printable_ids[(last * 7 + 3 + (request.sampling.seed or 0)) % len(self._printable_ids)]

    def _finish(self, request: GenerateRequest, output_ids: list[int]) -> tuple[FinishReason | None, int | None]:
        token, sampling = output_ids[-1], request.sampling
        if len(output_ids) >= sampling.min_tokens:
            if token in sampling.stop_token_ids or (token == 1 and not sampling.ignore_eos):
                return FinishReason.STOP, token
        if len(output_ids) >= sampling.max_tokens or len(request.prompt_token_ids) + len(output_ids) >= \
                self._max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        if request.request_id in self._running:
            raise InvalidRequest("request_id", f"{request.request_id!r} is already running")
        if self._max_running is not None and len(self._running) >= self._max_running:
            raise EngineOverloaded(f"{len(self._running)} requests are running (the stand-in's limit)")
        state = _Running(request, zlib.crc32(request.request_id.encode()) % self._num_workers)
        self._running[request.request_id] = state
        # The request runs on its own, like in a real engine: a consumer that goes away frees nothing.
        state.task = asyncio.get_running_loop().create_task(self._run(state))
        while True:
            output = await state.outputs.get()
            if isinstance(output, Exception):
                raise output
            yield output
            if output.finished:
                return

    async def _run(self, state: _Running) -> None:
        request, num_prompt = state.request, len(state.request.prompt_token_ids)
        try:
            for step in range(1 << 30):
                try:  # one "decode step"; an abort wakes it at once
                    await asyncio.wait_for(state.aborted.wait(), self._delay)
                except asyncio.TimeoutError:
                    pass
                if state.aborted.is_set():
                    state.outputs.put_nowait(RequestOutput(request.request_id, (), num_prompt,
                                                           len(state.output_ids), FinishReason.ABORT))
                    return
                output = self._step(state, step)
                state.outputs.put_nowait(output)
                if output.finished:
                    return
        except Exception as exc:  # surfaces in generate() like an engine-side failure
            state.outputs.put_nowait(exc)
        finally:
            if self._running.get(request.request_id) is state:
                del self._running[request.request_id]

    def _step(self, state: _Running, step: int) -> RequestOutput:
        new_ids, reason, stop_id = [], None, None
        for _ in range(step % 3 + 1):  # 1, 2 or 3 tokens per delta, like a multi-step scheduler
            if self._fail_after is not None and len(state.output_ids) >= self._fail_after:
                raise RuntimeError("fake engine failure (requested by the test)")
            token = self._next_token(state.request, state.output_ids)
            state.output_ids.append(token)
            new_ids.append(token)
            self._expert_token_counts[token % NUM_EXPERTS] += 1
            reason, stop_id = self._finish(state.request, state.output_ids)
            if reason is not None:
                break
        return RequestOutput(state.request.request_id, tuple(new_ids), len(state.request.prompt_token_ids),
                             len(state.output_ids), reason, stop_id)

    async def abort(self, request_id: str) -> bool:
        self.abort_calls.append(request_id)
        state = self._running.pop(request_id, None)  # freed at once, as the contract asks
        if state is None:
            return False
        state.aborted.set()
        return True

    async def loads(self) -> LoadReport:
        total_blocks = 1024
        workers = []
        for rank in range(self._num_workers):
            contexts = [len(s.request.prompt_token_ids) + len(s.output_ids)
                        for s in self._running.values() if s.rank == rank]
            used_blocks = sum(math.ceil(n / BLOCK_SIZE) for n in contexts)
            workers.append(WorkerLoad(rank, len(contexts), sum(contexts), total_blocks - used_blocks, total_blocks,
                                      tuple(range(rank, NUM_EXPERTS, self._num_workers))))
        return LoadReport(0, len(self._running), tuple(workers), tuple(self._expert_token_counts))

    async def reset_prefix_cache(self) -> None:
        self.prefix_cache_resets += 1

    async def is_healthy(self) -> bool:
        return self.healthy


class RecordingEngine:
    """Passes everything to a real engine and keeps each request's prompt and outputs, so a test can compare a
    gateway's text with what the engine produced for the exact prompt the gateway rendered. Observes only."""

    def __init__(self, engine: EngineClient):
        self._engine = engine
        self.prompts: dict[str, tuple[int, ...]] = {}
        self.requests: dict[str, GenerateRequest] = {}
        self.outputs: dict[str, list[int]] = {}
        self.logprobs: dict[str, list[TokenLogprobs]] = {}   # aligned with outputs when the request asked

    def model_info(self) -> ModelInfo:
        return self._engine.model_info()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        self.prompts[request.request_id] = request.prompt_token_ids
        self.requests[request.request_id] = request
        self.outputs[request.request_id] = []
        self.logprobs[request.request_id] = []
        async for output in self._engine.generate(request):
            self.outputs[request.request_id].extend(output.new_token_ids)
            self.logprobs[request.request_id].extend(output.new_logprobs)
            yield output

    async def abort(self, request_id: str) -> bool:
        return await self._engine.abort(request_id)

    async def loads(self) -> LoadReport:
        return await self._engine.loads()

    async def reset_prefix_cache(self) -> None:
        await self._engine.reset_prefix_cache()

    async def is_healthy(self) -> bool:
        return await self._engine.is_healthy()


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    """Poll `predicate` until true; fail (not hang) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EventLoopThread:
    """An asyncio event loop running on a daemon thread, for driving async code from blocking tests."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dsv4-api-loop", daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.submit(coro).result(TIMEOUT_S)

    def call_soon(self, callback: Callable[[], Any]) -> None:
        self._loop.call_soon_threadsafe(callback)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUT_S)


class ServerThread:
    """`build_server` on its own event loop, so tests can use plain blocking gRPC clients."""

    def __init__(self, engine: EngineClient, tokenizer: ModelTokenizer, api_key: str | None = None,
                 metrics=None, reflection_on: bool = False, tls: tuple[bytes, bytes] | None = None):
        self._engine, self._tokenizer, self._api_key, self._metrics = engine, tokenizer, api_key, metrics
        self._reflection_on, self._tls = reflection_on, tls
        self._loop: EventLoopThread | None = None
        self._server: grpc.aio.Server | None = None
        self.address = ""

    def start(self) -> ServerThread:
        port = free_port()

        async def start() -> None:
            info = self._engine.model_info()   # the server's structured-output check, as `dsv4 serve` wires it
            check = ConstraintCheck(self._tokenizer.path, info.vocab_size, info.eos_token_ids)
            service = GenerationService(self._engine, self._tokenizer, self._metrics, check)
            self._server = build_server(service, "127.0.0.1", port, self._api_key, self._reflection_on, self._tls)
            await self._server.start()

        self._loop = EventLoopThread()
        self._loop.run(start())
        self.address = f"127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._server is not None:
            try:
                self._loop.run(self._server.stop(grace=None))
            except concurrent.futures.TimeoutError:
                pass
        self._loop.stop()


def make_tokenizer_dir(path: Path) -> Path:
    write_tokenizer_files(path, VOCAB_SIZE, MAX_MODEL_LEN)
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_checkpoint: Path) -> Path:
    """The served model's directory (its tokenizer files come with the checkpoint)."""
    return tiny_checkpoint


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> ModelTokenizer:
    return ModelTokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def engine_client(ray_service) -> Iterator[EngineClient]:
    """THE engine for API tests: the real one (Ray coordinator + 2 CPU workers, see tests/conftest.py)."""
    from dsv4.cluster.engine_ray import RayEngineClient

    yield RayEngineClient(ray_service.coordinator, ray_service.info)


@pytest.fixture(scope="module")
def api_server(engine_client: EngineClient, tokenizer: ModelTokenizer) -> Iterator[ServerThread]:
    server = ServerThread(engine_client, tokenizer, reflection_on=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(api_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(api_server.address) as channel:
        grpc.channel_ready_future(channel).result(TIMEOUT_S)
        yield channel

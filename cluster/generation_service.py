"""What every gRPC servicer on the server shares: building and validating requests, and running them.

The servicers only translate their own protobuf messages to and from the types here, so validation, stop
strings, abort-on-cancel and engine-error handling behave the same on every API.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from dsv4.cluster.engine_client import EngineClient
from dsv4.cluster.metrics import RequestTimer, ServerMetrics
from dsv4.cluster.text_stream import StreamEvent, TextStream
from dsv4.cluster.tokenizer import ModelTokenizer
from dsv4.wire.model_info import ModelInfo
from dsv4.wire.request import (
    EngineFailed,
    EngineOverloaded,
    GenerateRequest,
    InvalidRequest,
    SamplingParams,
    StructuredOutput,
    check_prompt_length,
)

logger = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 1 << 24  # SamplingParams.validate's upper bound
MAX_ABORT_IDS = 1024
MAX_SAMPLES = 128           # n: OpenAI's bound on choices per request


class ServerDraining(RuntimeError):
    """The server is shutting down: new requests are refused (the servicers answer UNAVAILABLE: retry elsewhere)."""


def proto_adjustments(params: Any) -> dict[str, Any]:
    """The SamplingParams fields both protos' sampling messages spell alike: the penalties but repetition (whose
    unset value differs), min-p, logit bias and the constraint oneof (None when unset)."""
    return dict(presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                min_p=params.min_p, logit_bias=tuple(sorted(params.logit_bias.items())),
                structured=_structured_output(params))


def _structured_output(params: Any) -> StructuredOutput | None:
    kind = params.WhichOneof("constraint")
    value = getattr(params, kind) if kind else None
    if kind is None or (kind == "json_object" and not value):
        return None
    if kind not in StructuredOutput.KINDS:
        raise InvalidRequest(f"sampling_params.{kind}", "is not supported (json_schema, json_object, regex, "
                                                        "grammar and choice are)")
    if kind == "choice":
        return StructuredOutput("choice", choices=tuple(value.choices))
    return StructuredOutput(kind, "" if kind == "json_object" else value)


class RequestBuilder:
    """Requests built and checked against one model's limits (vocabulary, context, sampling): what the servicers
    and `dsv4 batch` share; `dsv4 batch` runs one on the checkpoint's config before any worker starts."""

    def __init__(self, model_info: ModelInfo, tokenizer: ModelTokenizer,
                 check_constraint: Callable[[StructuredOutput], None] | None = None):
        self.model_info = model_info
        self.tokenizer = tokenizer
        # Structured output: compiles a request's constraint, raising InvalidRequest naming its field. Given by
        # the composition root (`cli.py`: workers/grammar.py's compiler); without it a constraint that does not
        # compile fails on its worker instead.
        self.check_constraint = check_constraint

    def prompt_token_ids(self, text: str | None, token_ids: Sequence[int] | None) -> tuple[int, ...]:
        """The prompt as token ids: `text` is tokenized (BOS first), `token_ids` are taken as given. A text longer
        than the context's tokens can come from is rejected before it is tokenized, token ids too many for the
        context before they are copied (servicers call this off the event loop: `build_off_loop`)."""
        if text is not None:
            if not text:
                raise InvalidRequest("prompt.text", "must not be empty")
            per_token = self.tokenizer.max_chars_per_token
            if per_token is not None and len(text) > per_token * self.model_info.max_model_len:
                raise InvalidRequest("prompt.text", f"{len(text)} characters cannot fit the context of "
                                                    f"{self.model_info.max_model_len} tokens")
            return tuple(self.tokenizer.encode(text))
        if token_ids is None:
            raise InvalidRequest("prompt", "set either text or token ids")
        check_prompt_length(len(token_ids), self.model_info.max_model_len)    # before a tuple of them is made
        return tuple(token_ids)

    def build_request(self, request_id: str, prompt_token_ids: tuple[int, ...], max_tokens: int | None,
                      **sampling: Any) -> GenerateRequest:
        """A validated request. `max_tokens=None` fills the rest of the context; `sampling` are SamplingParams
        fields. Raises InvalidRequest naming the offending field."""
        if max_tokens is None:
            max_tokens = min(self.model_info.max_model_len - len(prompt_token_ids), MAX_TOKENS_LIMIT)
        request = GenerateRequest(request_id or f"dsv4-{uuid.uuid4().hex}", prompt_token_ids,
                                  SamplingParams(max_tokens=max_tokens, **sampling))
        request.validate(self.model_info.vocab_size, self.model_info.max_model_len)
        if request.sampling.structured is not None and self.check_constraint is not None:
            self.check_constraint(request.sampling.structured)   # a schema that does not compile: the client's
        return request

    @staticmethod
    def samples(request: GenerateRequest, n: int) -> list[GenerateRequest]:
        """`n` samples of one request: the request itself when n = 1, else n requests `<id>/<i>`, the i-th with
        seed + i when seeded (as vLLM seeds its child requests), so each is reproducible and they differ."""
        if not 1 <= n <= MAX_SAMPLES:
            raise InvalidRequest("sampling_params.n", f"must be in [1, {MAX_SAMPLES}], got {n}")
        if n == 1:
            return [request]
        seed = request.sampling.seed
        return [dataclasses.replace(request, request_id=f"{request.request_id}/{i}", sampling=dataclasses.replace(
            request.sampling, seed=None if seed is None else (seed + i) % (1 << 63))) for i in range(n)]


class GenerationService(RequestBuilder):
    """Requests checked against the served model and run on its engine, for every servicer."""

    def __init__(self, engine: EngineClient, tokenizer: ModelTokenizer, metrics: ServerMetrics | None = None,
                 check_constraint: Callable[[StructuredOutput], None] | None = None):
        super().__init__(engine.model_info(), tokenizer, check_constraint)
        self.engine = engine
        self.metrics = metrics      # request latencies and token counts, observed on every stream
        self.start_time = time.time()
        self._active: set[str] = set()  # ids of requests streaming through this server
        self._sample_ids: dict[str, tuple[str, ...]] = {}   # a request with n > 1 -> its samples' ids (Abort)
        self.draining = False           # set by `start_draining`: no new requests, the running ones finish

    @property
    def num_active(self) -> int:
        return len(self._active)

    @property
    def uptime_seconds(self) -> float:
        return time.time() - self.start_time

    def start_draining(self) -> None:
        """Refuse every new request from now on (ServerDraining); the streams already running go on."""
        self.draining = True

    async def healthy(self) -> bool:
        """Serving: not draining, and the engine says it is healthy."""
        return not self.draining and await self.engine.is_healthy()

    async def build_off_loop(self, build: Callable[..., GenerateRequest], *args: Any) -> GenerateRequest:
        """Run a servicer's request builder (tokenization included) in a worker thread, so a long text never
        stalls the event loop's other streams and health checks."""
        return await asyncio.to_thread(build, self, *args)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamEvent]:
        """Run `request` on the engine: text deltas, then exactly one `TextFinal`.

        Raises InvalidRequest if the engine rejects the request before its first output. If the consumer stops
        early (the client cancelled, the stream was closed), the engine request is aborted. Use with
        `contextlib.aclosing` so that happens at once rather than when the generator is collected.
        """
        if self.draining:
            raise ServerDraining("the server is shutting down: retry on another replica")
        if request.request_id in self._active:
            raise InvalidRequest("request_id", f"{request.request_id!r} is already running")
        self._active.add(request.request_id)
        timer = RequestTimer(self.metrics, request.request_id)
        text = TextStream(self.tokenizer, request)
        outputs = self.engine.generate(request)
        engine_done = False  # the engine finished the request, or we aborted it after a stop string
        started = False
        try:
            async for output in outputs:
                started = True
                events = text.on_output(output)
                if text.stop_matched and not output.finished:
                    await self._abort_quietly(request.request_id)
                engine_done = output.finished or text.stop_matched
                for event in events:
                    timer.on_event(event)
                    yield event
                if engine_done:
                    return
            final_events = text.on_error("the engine stream ended without a finished output")
        except (InvalidRequest, EngineOverloaded, EngineFailed) as exc:
            if not started:  # rejected up front: INVALID_ARGUMENT / RESOURCE_EXHAUSTED / UNAVAILABLE
                raise
            final_events = text.on_error(str(exc))
        except Exception as exc:  # the engine failed: the client gets an error result, the server keeps going
            logger.exception("engine failed request %s", request.request_id)
            final_events = text.on_error(f"{type(exc).__name__}: {exc}")
        finally:
            self._active.discard(request.request_id)
            if not engine_done:
                await self._abort_quietly(request.request_id)
            await _close(outputs)
        for event in final_events:
            timer.on_event(event)
            yield event

    async def stream_samples(self, request: GenerateRequest, n: int) -> AsyncIterator[tuple[int, StreamEvent]]:
        """Run `n` samples of `request` (`samples()`): each one's events with its index, as they come; each
        sample ends with its own `TextFinal`. An up-front rejection of any sample raises (the others are aborted),
        as does closing the stream. With the prefix cache on, the first sample runs alone until its first output,
        so its prompt is cached when the others are admitted: they share its prefill."""
        samples, request_id = self.samples(request, n), request.request_id
        if len(samples) == 1:
            async with contextlib.aclosing(self.stream(samples[0])) as events:
                async for event in events:
                    yield 0, event
            return
        if request_id in self._sample_ids:
            raise InvalidRequest("request_id", f"{request_id!r} is already running")
        self._sample_ids[request_id] = tuple(s.request_id for s in samples)
        queue: asyncio.Queue = asyncio.Queue()
        first_output = asyncio.Event()
        if not self.model_info.prefix_caching:
            first_output.set()

        async def run(index: int, sample: GenerateRequest) -> None:
            try:
                if index:
                    await first_output.wait()
                async with contextlib.aclosing(self.stream(sample)) as events:
                    async for event in events:
                        first_output.set()
                        await queue.put((index, event, None))
            except Exception as exc:   # given to the consumer, which raises it
                await queue.put((index, None, exc))
            finally:
                first_output.set()
                await queue.put((index, None, None))

        tasks = [asyncio.create_task(run(i, s)) for i, s in enumerate(samples)]
        try:
            running = len(tasks)
            while running:
                index, event, error = await queue.get()
                if error is not None:
                    raise error
                if event is None:
                    running -= 1
                else:
                    yield index, event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)   # each sample's stream aborts its request
            del self._sample_ids[request_id]

    async def abort(self, request_ids: Sequence[str]) -> list[str]:
        """Cancel requests (a request with n > 1: all its samples); returns the ids the engine was running.
        Unknown ids are ignored; more than MAX_ABORT_IDS in one call is an InvalidRequest (each is a round trip
        to the coordinator)."""
        if len(request_ids) > MAX_ABORT_IDS:
            raise InvalidRequest("request_ids", f"at most {MAX_ABORT_IDS} ids per Abort, got {len(request_ids)}")
        engine_ids = [i for request_id in request_ids for i in self._sample_ids.get(request_id, (request_id,))]
        return [request_id for request_id in engine_ids if await self.engine.abort(request_id)]

    async def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (an operator's flush; running requests keep theirs)."""
        await self.engine.reset_prefix_cache()

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        except Exception:  # cleanup after a cancelled or failed stream must not mask the original outcome
            logger.exception("engine.abort(%s) failed", request_id)


async def _close(outputs: AsyncIterator[Any]) -> None:
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            logger.exception("closing the engine stream failed")

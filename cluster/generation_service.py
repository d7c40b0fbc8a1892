"""What every gRPC servicer on the server shares: building and validating requests, and running them.

The servicers only translate their own protobuf messages to and from the types here, so validation, stop
strings, abort-on-cancel and engine-error handling behave the same on every API.
"""

from __future__ import annotations

import asyncio
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
    check_prompt_length,
)

logger = logging.getLogger(__name__)

MAX_TOKENS_LIMIT = 1 << 24  # SamplingParams.validate's upper bound
MAX_ABORT_IDS = 1024


class ServerDraining(RuntimeError):
    """The server is shutting down: new requests are refused (the servicers answer UNAVAILABLE: retry elsewhere)."""


class RequestBuilder:
    """Requests built and checked against one model's limits (vocabulary, context, sampling): what the servicers
    and `dsv4 batch` share; `dsv4 batch` runs one on the checkpoint's config before any worker starts."""

    def __init__(self, model_info: ModelInfo, tokenizer: ModelTokenizer):
        self.model_info = model_info
        self.tokenizer = tokenizer

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
        return request


class GenerationService(RequestBuilder):
    """Requests checked against the served model and run on its engine, for every servicer."""

    def __init__(self, engine: EngineClient, tokenizer: ModelTokenizer, metrics: ServerMetrics | None = None):
        super().__init__(engine.model_info(), tokenizer)
        self.engine = engine
        self.metrics = metrics      # request latencies and token counts, observed on every stream
        self.start_time = time.time()
        self._active: set[str] = set()  # ids of requests streaming through this server
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

    async def abort(self, request_ids: Sequence[str]) -> list[str]:
        """Cancel requests; returns the ids the engine was running. Unknown ids are ignored; more than
        MAX_ABORT_IDS in one call is an InvalidRequest (each is a round trip to the coordinator)."""
        if len(request_ids) > MAX_ABORT_IDS:
            raise InvalidRequest("request_ids", f"at most {MAX_ABORT_IDS} ids per Abort, got {len(request_ids)}")
        return [request_id for request_id in request_ids if await self.engine.abort(request_id)]

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

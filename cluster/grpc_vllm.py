"""vLLM's gRPC engine service (`vllm.grpc.engine.VllmEngine`, from smg-grpc-proto) on top of `GenerationService`.

This is the API the smg gateway speaks to a gRPC worker: the gateway applies the chat template, tokenizes and
detokenizes, and sends token ids. The message semantics follow vLLM's own servicer, which the gateway is written
against: in a streamed Generate each chunk carries the *new* tokens and their *count* (the gateway sums them),
then one `complete`; a request the engine fails ends with a gRPC status, not a message.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import zipfile
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from pathlib import Path

import grpc
from smg_grpc_proto.generated import common_pb2, vllm_engine_pb2, vllm_engine_pb2_grpc

from dsv4.cluster.generation_service import GenerationService, ServerDraining, proto_adjustments
from dsv4.cluster.text_stream import TextDelta, TextFinal
from dsv4.wire.request import (
    EngineFailed,
    EngineOverloaded,
    FinishReason,
    GenerateRequest,
    InvalidRequest,
    TokenLogprobs,
)

SERVICE_NAME = vllm_engine_pb2.DESCRIPTOR.services_by_name["VllmEngine"].full_name

TOKENIZER_CHUNK_BYTES = 64 * 1024  # the gateway's chunk size for GetTokenizer
# What a gateway needs to rebuild the tokenizer and chat template (the files vLLM's servicer sends).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.json", "chat_template.jinja")


def _reject_unsupported(params: vllm_engine_pb2.SamplingParams, message: vllm_engine_pb2.GenerateRequest) -> None:
    """Refuse what the engine cannot do rather than silently ignore it."""
    checks = (
        # vLLM's -1 ("the whole vocabulary") is left to SamplingParams.validate, which names the allowed range.
        # Prompt logprobs would need the logits of every prompt position, which the engine step does not keep;
        # any value (0 too: vLLM then returns the prompt tokens' own logprobs) is refused rather than ignored.
        ("sampling_params.prompt_logprobs", params.HasField("prompt_logprobs"),
         "prompt log-probabilities are not supported (output `logprobs` are)"),
        ("sampling_params.truncate_prompt_tokens", params.HasField("truncate_prompt_tokens"), "is not supported"),
        ("mm_inputs", message.HasField("mm_inputs") or len(message.extra_mm_inputs) > 0
         or message.HasField("media_refs"), "the model takes text only"),
    )
    for field, bad, why in checks:
        if bad:
            raise InvalidRequest(field, why)


def request_from_proto(service: GenerationService, message: vllm_engine_pb2.GenerateRequest) -> GenerateRequest:
    """Validated `GenerateRequest`; raises InvalidRequest naming the field."""
    params = message.sampling_params
    _reject_unsupported(params, message)
    prompt = message.WhichOneof("input")
    prompt_ids = service.prompt_token_ids(
        message.text if prompt == "text" else None,
        message.tokenized.input_ids if prompt == "tokenized" else None)
    return service.build_request(
        message.request_id, prompt_ids,
        max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
        temperature=params.temperature if params.HasField("temperature") else 1.0,
        top_p=params.top_p if params.top_p != 0.0 else 1.0,  # proto3 zero = unset, as in vLLM's servicer
        top_k=params.top_k,
        seed=params.seed if params.HasField("seed") else None,
        min_tokens=params.min_tokens,
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs if params.HasField("logprobs") else None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 0.0 else 1.0,  # 0 = unset
        **proto_adjustments(params))


def _output_logprobs(token_ids: tuple[int, ...], logprobs: tuple[TokenLogprobs, ...] | None,
                     num_logprobs: int | None) -> vllm_engine_pb2.OutputLogProbs | None:
    """vLLM's per-position layout: the sampled tokens' logprobs and ids, and (only when the request asked for
    alternatives, as vLLM's servicer does) one TopLogProbs per position. None when not asked or no tokens."""
    if logprobs is None or not token_ids:
        return None
    top = ([vllm_engine_pb2.TopLogProbs(values=lp.top_logprobs, token_ids=lp.top_token_ids) for lp in logprobs]
           if num_logprobs else [])
    return vllm_engine_pb2.OutputLogProbs(token_logprobs=[lp.logprob for lp in logprobs], token_ids=token_ids,
                                          top_logprobs=top)


def _chunk(delta: TextDelta, num_logprobs: int | None, index: int) -> vllm_engine_pb2.GenerateResponse:
    return vllm_engine_pb2.GenerateResponse(chunk=vllm_engine_pb2.GenerateStreamChunk(index=index,
        token_ids=delta.token_ids, prompt_tokens=delta.num_prompt_tokens,
        completion_tokens=len(delta.token_ids),  # a delta count: the gateway accumulates it
        cached_tokens=delta.num_cached_tokens,
        output_logprobs=_output_logprobs(delta.token_ids, delta.logprobs, num_logprobs)))


def _complete(final: TextFinal, num_logprobs: int | None, index: int) -> vllm_engine_pb2.GenerateResponse:
    # All output ids and all their logprobs, streaming or not: the gateway reads them from here when not
    # streaming, and takes the chunks' when streaming (vLLM's servicer sends the last delta here then).
    complete = vllm_engine_pb2.GenerateComplete(
        index=index, output_ids=final.output_ids, finish_reason=final.finish_reason.value,
        prompt_tokens=final.num_prompt_tokens, completion_tokens=final.num_output_tokens,
        cached_tokens=final.num_cached_tokens,
        output_logprobs=_output_logprobs(final.output_ids, final.output_logprobs, num_logprobs))
    if final.matched_stop_str is not None:
        complete.matched_stop_str = final.matched_stop_str
    elif final.matched_stop_token_id is not None:
        complete.matched_token_id = final.matched_stop_token_id
    return vllm_engine_pb2.GenerateResponse(complete=complete)


def _hf_config(model_path: str) -> dict:
    # model_type / architectures come from the checkpoint's config.json when the server can read it.
    try:
        return json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def tokenizer_zip(tokenizer_dir: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                archive.write(tokenizer_dir / name, name)
    return buffer.getvalue()


class VllmEngineServicer(vllm_engine_pb2_grpc.VllmEngineServicer):
    def __init__(self, service: GenerationService):
        self._service = service

    async def Generate(self, request: vllm_engine_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        try:
            gen_request = await self._service.build_off_loop(request_from_proto, request)
            num_logprobs = gen_request.sampling.logprobs
            samples = self._service.stream_samples(gen_request, request.sampling_params.n or 1)   # proto 0: unset
            async with contextlib.aclosing(samples) as events:
                async for index, event in events:
                    if isinstance(event, TextDelta):
                        if request.stream and event.token_ids:
                            await context.write(_chunk(event, num_logprobs, index))
                    elif event.finish_reason == FinishReason.ERROR:
                        await context.abort(grpc.StatusCode.INTERNAL, event.error or "engine error")
                    else:
                        await context.write(_complete(event, num_logprobs, index))
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EngineOverloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except (ServerDraining, EngineFailed) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def HealthCheck(self, request: vllm_engine_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                          ) -> vllm_engine_pb2.HealthCheckResponse:
        healthy = await self._service.healthy()
        return vllm_engine_pb2.HealthCheckResponse(healthy=healthy, message="ok" if healthy else "engine unhealthy")

    async def Abort(self, request: vllm_engine_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> vllm_engine_pb2.AbortResponse:
        try:
            await self._service.abort(list(request.request_ids))
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return vllm_engine_pb2.AbortResponse()

    async def GetModelInfo(self, request: vllm_engine_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
                           ) -> vllm_engine_pb2.GetModelInfoResponse:
        info = self._service.model_info
        hf_config = _hf_config(info.model_path)
        return vllm_engine_pb2.GetModelInfoResponse(
            model_path=info.model_path, is_generation=True, max_context_length=info.max_model_len,
            vocab_size=info.vocab_size, supports_vision=False, served_model_name=info.served_model_name,
            tokenizer_path=str(self._service.tokenizer.path), model_type=hf_config.get("model_type", ""),
            architectures=hf_config.get("architectures", []), eos_token_ids=info.eos_token_ids,
            pad_token_id=info.eos_token_ids[0] if info.eos_token_ids else 0, bos_token_id=info.bos_token_id,
            max_req_input_len=info.max_model_len - 1)

    async def GetServerInfo(self, request: vllm_engine_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
                            ) -> vllm_engine_pb2.GetServerInfoResponse:
        return vllm_engine_pb2.GetServerInfoResponse(
            active_requests=self._service.num_active, uptime_seconds=self._service.uptime_seconds,
            server_type="dsv4-grpc", data_parallel_size=1)

    async def GetLoads(self, request: vllm_engine_pb2.GetLoadsRequest, context: grpc.aio.ServicerContext
                       ) -> vllm_engine_pb2.GetLoadsResponse:
        report = await self._service.engine.loads()
        total_blocks = sum(w.total_blocks for w in report.workers)
        free_blocks = sum(w.free_blocks for w in report.workers)
        load = vllm_engine_pb2.SchedulerLoad(
            dp_rank=0, num_running_reqs=report.num_running_requests, num_waiting_reqs=report.num_waiting_requests,
            num_total_reqs=report.num_running_requests + report.num_waiting_requests,
            num_used_tokens=sum(w.num_cached_tokens for w in report.workers),
            token_usage=1.0 - free_blocks / total_blocks if total_blocks else 0.0)
        return vllm_engine_pb2.GetLoadsResponse(
            timestamp=datetime.now(timezone.utc).isoformat(), version="dsv4", dp_rank_count=1, loads=[load])

    # Not offered by this engine: a clean UNIMPLEMENTED (the generated base raises NotImplementedError, which
    # grpc logs as a server error). The gateway turns KV-event subscription off when it sees UNIMPLEMENTED.
    async def SubscribeKvEvents(self, request: common_pb2.SubscribeKvEventsRequest,
                                context: grpc.aio.ServicerContext) -> AsyncIterator[common_pb2.KvEventBatch]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "KV cache events are not published by dsv4")
        yield common_pb2.KvEventBatch()  # unreachable; makes this an async generator like the RPC

    async def Embed(self, request: vllm_engine_pb2.EmbedRequest, context: grpc.aio.ServicerContext
                    ) -> vllm_engine_pb2.EmbedResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "dsv4 serves generation only")

    async def FlushCache(self, request: common_pb2.FlushCacheRequest, context: grpc.aio.ServicerContext
                         ) -> common_pb2.FlushCacheResponse:
        """Forget every cached prompt prefix (running requests keep theirs; timeout_s is not needed)."""
        await self._service.reset_prefix_cache()
        return common_pb2.FlushCacheResponse(success=True, message="prefix cache reset")

    async def StartProfile(self, request: common_pb2.StartProfileRequest, context: grpc.aio.ServicerContext
                           ) -> common_pb2.ProfileResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "profiling is not supported")

    async def StopProfile(self, request: common_pb2.StopProfileRequest, context: grpc.aio.ServicerContext
                          ) -> common_pb2.ProfileResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "profiling is not supported")

    async def GetTokenizer(self, request: common_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[common_pb2.GetTokenizerChunk]:
        data = tokenizer_zip(self._service.tokenizer.path)
        digest = hashlib.sha256(data).hexdigest()
        for start in range(0, len(data), TOKENIZER_CHUNK_BYTES):
            end = min(start + TOKENIZER_CHUNK_BYTES, len(data))
            yield common_pb2.GetTokenizerChunk(data=data[start:end], sha256=digest if end == len(data) else "")

"""The project's own gRPC service, `dsv4.v1.Dsv4Engine`: protobuf <-> `GenerationService` translation only."""

from __future__ import annotations

import contextlib

import grpc

from dsv4.cluster import package_version
from dsv4.cluster.engine_client import LoadReport
from dsv4.cluster.generation_service import GenerationService, ServerDraining, proto_adjustments
from dsv4.cluster.text_stream import StreamEvent, TextDelta, TextFinal
from dsv4.protos import dsv4_pb2, dsv4_pb2_grpc
from dsv4.wire.model_info import ModelInfo
from dsv4.wire.request import (
    EngineFailed,
    EngineOverloaded,
    FinishReason,
    GenerateRequest,
    InvalidRequest,
    TokenLogprobs,
)

SERVICE_NAME = dsv4_pb2.DESCRIPTOR.services_by_name["Dsv4Engine"].full_name

_FINISH_REASONS = {
    FinishReason.STOP: dsv4_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: dsv4_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: dsv4_pb2.FINISH_REASON_ABORT,
}


def request_from_proto(service: GenerationService, message: dsv4_pb2.GenerateRequest) -> GenerateRequest:
    """Validated `GenerateRequest`; raises InvalidRequest naming the field."""
    prompt = message.WhichOneof("prompt")
    prompt_ids = service.prompt_token_ids(
        message.text if prompt == "text" else None,
        message.tokenized.token_ids if prompt == "tokenized" else None)
    params = message.sampling_params
    return service.build_request(
        message.request_id, prompt_ids,
        max_tokens=params.max_tokens if params.HasField("max_tokens") else None,
        temperature=params.temperature if params.HasField("temperature") else 1.0,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        top_k=params.top_k,
        seed=params.seed if params.HasField("seed") else None,
        min_tokens=params.min_tokens,
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs if params.HasField("logprobs") else None,
        repetition_penalty=params.repetition_penalty if params.HasField("repetition_penalty") else 1.0,
        **proto_adjustments(params))


def _logprobs_to_proto(logprobs: tuple[TokenLogprobs, ...] | None) -> list[dsv4_pb2.TokenLogprobs]:
    return [dsv4_pb2.TokenLogprobs(logprob=lp.logprob, top_token_ids=lp.top_token_ids, top_logprobs=lp.top_logprobs)
            for lp in logprobs or ()]


def response_from_event(request_id: str, event: StreamEvent, index: int = 0) -> dsv4_pb2.GenerateResponse:
    if isinstance(event, TextDelta):
        return dsv4_pb2.GenerateResponse(request_id=request_id, index=index, chunk=dsv4_pb2.GenerateChunk(
            token_ids=event.token_ids, text=event.text, prompt_tokens=event.num_prompt_tokens,
            completion_tokens=event.num_output_tokens, logprobs=_logprobs_to_proto(event.logprobs),
            cached_tokens=event.num_cached_tokens))
    return _terminal_response(request_id, event, index)


def _terminal_response(request_id: str, final: TextFinal, index: int) -> dsv4_pb2.GenerateResponse:
    if final.finish_reason == FinishReason.ERROR:
        return dsv4_pb2.GenerateResponse(request_id=request_id, index=index, error=dsv4_pb2.GenerateError(
            message=final.error or "engine error", prompt_tokens=final.num_prompt_tokens,
            completion_tokens=final.num_output_tokens))
    complete = dsv4_pb2.GenerateComplete(
        finish_reason=_FINISH_REASONS[final.finish_reason], output_ids=final.output_ids, text=final.text,
        prompt_tokens=final.num_prompt_tokens, completion_tokens=final.num_output_tokens,
        logprobs=_logprobs_to_proto(final.output_logprobs), cached_tokens=final.num_cached_tokens)
    if final.matched_stop_str is not None:
        complete.matched_stop_str = final.matched_stop_str
    elif final.matched_stop_token_id is not None:
        complete.matched_token_id = final.matched_stop_token_id
    return dsv4_pb2.GenerateResponse(request_id=request_id, index=index, complete=complete)


def model_info_to_proto(info: ModelInfo, tokenizer_path: str) -> dsv4_pb2.GetModelInfoResponse:
    return dsv4_pb2.GetModelInfoResponse(
        model_path=info.model_path, served_model_name=info.served_model_name, vocab_size=info.vocab_size,
        max_context_length=info.max_model_len, bos_token_id=info.bos_token_id, eos_token_ids=info.eos_token_ids,
        num_workers=info.num_workers, numerics=info.numerics, num_hidden_layers=info.num_hidden_layers,
        num_routed_experts=info.num_routed_experts, num_experts_per_tok=info.num_experts_per_tok,
        hidden_size=info.hidden_size, tokenizer_path=tokenizer_path)


def loads_to_proto(report: LoadReport) -> dsv4_pb2.GetLoadsResponse:
    workers = [dsv4_pb2.WorkerLoad(
        rank=w.rank, num_running_requests=w.num_running_requests, num_cached_tokens=w.num_cached_tokens,
        free_blocks=w.free_blocks, total_blocks=w.total_blocks, local_expert_ids=w.local_expert_ids)
        for w in report.workers]
    return dsv4_pb2.GetLoadsResponse(
        num_waiting_requests=report.num_waiting_requests, num_running_requests=report.num_running_requests,
        workers=workers, expert_token_counts=report.expert_token_counts, extra=report.extra)


class Dsv4EngineServicer(dsv4_pb2_grpc.Dsv4EngineServicer):
    def __init__(self, service: GenerationService, hosted_services: tuple[str, ...] = ()):
        self._service = service
        self._hosted_services = hosted_services

    async def Generate(self, request: dsv4_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        # Written with context.write rather than as an async generator: a cancelled call then raises
        # CancelledError right here, and `aclosing` aborts the engine request at once.
        try:
            gen_request = await self._service.build_off_loop(request_from_proto, request)
            samples = self._service.stream_samples(gen_request, request.sampling_params.n or 1)
            async with contextlib.aclosing(samples) as events:
                async for index, event in events:
                    await context.write(response_from_event(gen_request.request_id, event, index))
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EngineOverloaded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except (ServerDraining, EngineFailed) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def Abort(self, request: dsv4_pb2.AbortRequest, context: grpc.aio.ServicerContext
                    ) -> dsv4_pb2.AbortResponse:
        try:
            return dsv4_pb2.AbortResponse(aborted_ids=await self._service.abort(list(request.request_ids)))
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def GetModelInfo(self, request: dsv4_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
                           ) -> dsv4_pb2.GetModelInfoResponse:
        return model_info_to_proto(self._service.model_info, str(self._service.tokenizer.path))

    async def GetServerInfo(self, request: dsv4_pb2.GetServerInfoRequest, context: grpc.aio.ServicerContext
                            ) -> dsv4_pb2.GetServerInfoResponse:
        return dsv4_pb2.GetServerInfoResponse(
            server_version=package_version(), uptime_seconds=self._service.uptime_seconds,
            active_requests=self._service.num_active, services=self._hosted_services,
            numerics=self._service.model_info.numerics, kv_cache_tokens=self._service.model_info.kv_cache_tokens,
            max_running_requests=self._service.model_info.max_running_requests)

    async def GetLoads(self, request: dsv4_pb2.GetLoadsRequest, context: grpc.aio.ServicerContext
                       ) -> dsv4_pb2.GetLoadsResponse:
        return loads_to_proto(await self._service.engine.loads())

    async def ResetPrefixCache(self, request: dsv4_pb2.ResetPrefixCacheRequest, context: grpc.aio.ServicerContext
                               ) -> dsv4_pb2.ResetPrefixCacheResponse:
        await self._service.reset_prefix_cache()
        return dsv4_pb2.ResetPrefixCacheResponse()

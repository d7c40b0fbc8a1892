"""API-key authentication of the gRPC server: every call carries `authorization: Bearer <key>` metadata, as
vLLM's and OpenAI's clients send it (and the smg gateway forwards it); health checks are exempt, so load balancers
and Kubernetes probes need no key. Without a configured key the server is open (bind it to 127.0.0.1)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str):
        if not api_key:
            raise ValueError("--api-key must not be empty")
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if handler is None or (handler_call_details.method or "").startswith(HEALTH_PREFIX) or \
                hmac.compare_digest(given.encode(), self._expected):
            return handler
        return _denied_like(handler, "missing or wrong API key: send 'authorization: Bearer <key>' metadata")


def _denied_like(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that answers UNAUTHENTICATED."""
    async def abort(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # never reached: abort raises

    kinds = {(False, False): grpc.unary_unary_rpc_method_handler,
             (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler,
             (True, True): grpc.stream_stream_rpc_method_handler}
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(abort_stream if handler.response_streaming else abort,
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

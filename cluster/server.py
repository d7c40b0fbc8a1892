"""The dsv4 gRPC server: every API on one port, in front of one `EngineClient`.

Hosted services:
  * `dsv4.v1.Dsv4Engine`          the project's own API (protos/dsv4.proto)
  * `vllm.grpc.engine.VllmEngine` vLLM's worker API, so the smg gateway can serve OpenAI requests from us
  * `grpc.health.v1.Health`       SERVING while `engine.is_healthy()`
  * server reflection             for grpcurl and friends, with `--enable-reflection` only
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from smg_grpc_proto.generated import vllm_engine_pb2_grpc

from dsv4.cluster import grpc_dsv4, grpc_vllm
from dsv4.cluster.auth import ApiKeyInterceptor
from dsv4.cluster.engine_client import EngineClient
from dsv4.cluster.generation_service import GenerationService
from dsv4.cluster.metrics import ServerMetrics
from dsv4.cluster.tokenizer import ModelTokenizer
from dsv4.protos import dsv4_pb2_grpc
from dsv4.wire.request import StructuredOutput

logger = logging.getLogger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_WATCH_INTERVAL_S = 1.0
# Long prompts as packed token ids exceed gRPC's 4 MiB default (a 1M-token prompt is up to 5 MB); beyond 8 MiB a
# message is refused by gRPC itself (RESOURCE_EXHAUSTED) before it is parsed.
MAX_MESSAGE_BYTES = 8 << 20
DRAINED_GRACE_S = 1.0       # after the drain: for the last responses to leave


class EngineHealthServicer(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 backed by `GenerationService.healthy()` (the engine's health, NOT_SERVING once draining),
    asked afresh on every Check."""

    def __init__(self, service: GenerationService, services: tuple[str, ...]):
        self._service = service
        self._services = frozenset(("", *services))  # "" is the whole server

    async def _status(self) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        try:
            healthy = await self._service.healthy()
        except Exception:  # an engine that cannot answer is not serving
            logger.exception("engine.is_healthy() failed")
            healthy = False
        return health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> health_pb2.HealthCheckResponse:
        if request.service not in self._services:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"service: unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=await self._status())

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        if request.service not in self._services:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        last = None
        while True:  # ends when the client cancels
            status = await self._status()
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_WATCH_INTERVAL_S)


def tls_files(certfile: str | None, keyfile: str | None) -> tuple[bytes, bytes] | None:
    """`--ssl-certfile` / `--ssl-keyfile` -> (key, certificate chain) PEM for `build_server`, or None when neither
    is given. Raises ValueError / FileNotFoundError naming the flag."""
    if not certfile and not keyfile:
        return None
    if not (certfile and keyfile):
        raise ValueError("--ssl-certfile and --ssl-keyfile go together: give both or neither")
    pems = []
    for flag, path, marker in (("--ssl-keyfile", keyfile, b"PRIVATE KEY-----"),
                               ("--ssl-certfile", certfile, b"-----BEGIN CERTIFICATE-----")):
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"{flag} {path}: no such file") from None
        if marker not in data:
            raise ValueError(f"{flag} {path}: not a PEM {'private key' if 'key' in flag else 'certificate'}")
        pems.append(data)
    return pems[0], pems[1]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def build_server(service: GenerationService, host: str = "127.0.0.1", port: int = 50051,
                 api_key: str | None = None, reflection_on: bool = False,
                 tls: tuple[bytes, bytes] | None = None) -> grpc.aio.Server:
    """A server with every service registered over `service` and `host:port` bound; `await server.start()` to
    serve.

    Port 0 binds a free port (logged). Must be called inside the event loop the engine runs on. With `api_key`,
    every call but health checks needs `authorization: Bearer <api_key>` metadata (`auth.ApiKeyInterceptor`).
    reflection_on: gRPC server reflection (for grpcurl; off by default: it lists every method to anyone who can
    connect). tls: (private key, certificate chain), PEM: the port speaks TLS only (`tls_files`).
    """
    names = (grpc_dsv4.SERVICE_NAME, grpc_vllm.SERVICE_NAME, HEALTH_SERVICE_NAME) \
        + ((reflection.SERVICE_NAME,) if reflection_on else ())
    interceptors = [ApiKeyInterceptor(api_key)] if api_key is not None else []
    server = grpc.aio.server(interceptors=interceptors,
                             options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    dsv4_pb2_grpc.add_Dsv4EngineServicer_to_server(grpc_dsv4.Dsv4EngineServicer(service, names), server)
    vllm_engine_pb2_grpc.add_VllmEngineServicer_to_server(grpc_vllm.VllmEngineServicer(service), server)
    health_pb2_grpc.add_HealthServicer_to_server(EngineHealthServicer(service, names[:2]), server)
    if reflection_on:
        reflection.enable_server_reflection(names, server)
    address = _address(host, port)
    bound_port = (server.add_secure_port(address, grpc.ssl_server_credentials([tls])) if tls is not None
                  else server.add_insecure_port(address))
    logger.info("dsv4 gRPC server bound to %s (%s)%s%s", _address(host, bound_port), ", ".join(names),
                "" if tls is None else ", TLS", "" if api_key is None else ", API key required")
    return server


async def serve_forever(engine: EngineClient, tokenizer: ModelTokenizer, host: str = "127.0.0.1", port: int = 50051,
                        shutdown_grace_s: float = 30.0, api_key: str | None = None, metrics_port: int = 0,
                        stop: asyncio.Event | None = None, reflection_on: bool = False,
                        check_constraint: Callable[[StructuredOutput], None] | None = None,
                        tls: tuple[bytes, bytes] | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or `stop` is set, or cancellation), then drain: health NOT_SERVING and new
    requests UNAVAILABLE at once, the running streams finish (at most `shutdown_grace_s` more seconds; then they
    are cut), and return. metrics_port > 0: Prometheus `/metrics` there (`dsv4.cluster.metrics`)."""
    metrics = ServerMetrics(engine.model_info().served_model_name) if metrics_port else None
    service = GenerationService(engine, tokenizer, metrics, check_constraint)
    server = build_server(service, host, port, api_key, reflection_on, tls)
    await server.start()
    poller = http = None
    if metrics is not None:
        try:
            http = metrics.serve_http(metrics_port, host)
        except OSError as e:          # e.g. a second server on this machine: serve on, without metrics
            logger.warning("dsv4 metrics off: port %d: %s (pass --metrics-port)", metrics_port, e)
        else:
            logger.info("dsv4 metrics at http://%s/metrics", _address(host, metrics_port))
            poller = asyncio.get_running_loop().create_task(poll_loads(engine, metrics))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals on this platform
            pass
    try:
        await stop.wait()
        await drain(service, shutdown_grace_s)
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        if poller is not None:
            poller.cancel()
            http.shutdown()
        await server.stop(DRAINED_GRACE_S)


async def drain(service: GenerationService, grace_s: float, poll_s: float = 0.02) -> None:
    """Refuse new requests and wait up to grace_s for the running streams to end (logged either way)."""
    service.start_draining()
    logger.info("dsv4 draining: %d streams running, %.0f s to finish", service.num_active, grace_s)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while service.num_active and loop.time() < deadline:
        await asyncio.sleep(poll_s)
    if service.num_active:
        logger.warning("dsv4 shutdown: %d streams still running after %.0f s are cut", service.num_active, grace_s)
    else:
        logger.info("dsv4 shutdown: every stream finished")


async def poll_loads(engine: EngineClient, metrics: ServerMetrics, interval_s: float = 1.0) -> None:
    """The engine gauges from the coordinator's load report, once per interval (a failed poll is skipped)."""
    while True:
        try:
            metrics.observe_loads(await engine.loads())
        except Exception:
            logger.debug("load poll failed", exc_info=True)
        await asyncio.sleep(interval_s)

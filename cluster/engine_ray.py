"""The coordinator Ray actor: starting it over loaded workers (`start_coordinator`), and `EngineClient` over it,
what the gRPC server calls."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
from ray.exceptions import RayTaskError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dsv4.cluster.coordinator import Coordinator, one_line_error
from dsv4.cluster.engine_client import LoadReport
from dsv4.wire.config import ServeConfig
from dsv4.wire.messages import WorkerInfo
from dsv4.wire.model_info import ModelInfo
from dsv4.wire.placement import ExpertPlacement
from dsv4.wire.request import (
    EngineFailed,
    EngineOverloaded,
    FinishReason,
    GenerateRequest,
    InvalidRequest,
    RequestOutput,
)

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """A running engine: the coordinator actor, the worker actors it drives, and what they serve."""

    coordinator: ray.actor.ActorHandle
    workers: list[ray.actor.ActorHandle]
    info: ModelInfo
    placement_group: PlacementGroup | None = None   # the workers' reserved resources

    def shutdown(self) -> None:
        """Stop the coordinator and the workers, and give their reserved resources back to the cluster (killed
        actors alone would leave their placement group holding them)."""
        for actor in (self.coordinator, *self.workers):
            ray.kill(actor)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)


def start_coordinator(config: ServeConfig, workers: list[ray.actor.ActorHandle], infos: list[WorkerInfo],
                      info: ModelInfo, placement: ExpertPlacement, num_hash_layers: int,
                      placement_group: PlacementGroup | None = None) -> Engine:
    """The coordinator actor over workers already loaded and wired (`dsv4.workers.launch.start_workers`), healthy.
    It lives beside the driver (the gRPC server): on KubeRay that is the head pod, without a GPU."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    coordinator = ray.remote(Coordinator).options(num_cpus=0, max_concurrency=10_000, scheduling_strategy=here).remote(
        config, workers, infos, info, placement, num_hash_layers)
    ray.get(coordinator.is_healthy.remote())
    return Engine(coordinator, workers, info, placement_group)


def _unwrap(error: RayTaskError) -> Exception:
    """The coordinator's own exception (e.g. InvalidRequest naming a field) rather than Ray's wrapper."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error


class RayEngineClient:
    """The server's side of the coordinator: one subscription to its per-step output batches, fanned out to a
    queue per request stream (no Ray object per token). If the subscription breaks (the coordinator died), every
    open stream ends with an ERROR output naming the cause, and the next request subscribes again."""

    def __init__(self, coordinator: ray.actor.ActorHandle, model_info: ModelInfo):
        self._coordinator = coordinator
        self._info = model_info
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._fan_out: asyncio.Task | None = None
        self._subscribed: asyncio.Future | None = None

    def model_info(self) -> ModelInfo:
        return self._info

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        if request.request_id in self._streams:
            raise InvalidRequest("request_id", f"{request.request_id!r} is already running")
        await self._subscribe()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request.request_id] = queue           # before submitting: no output can be missed
        try:
            try:
                await self._coordinator.submit.remote(request)
            except RayTaskError as e:
                cause = _unwrap(e)
                if isinstance(cause, (InvalidRequest, EngineOverloaded, EngineFailed)):
                    raise cause from None
                raise
            while True:
                output = await queue.get()
                yield output
                if output.finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)

    async def _subscribe(self) -> None:
        if self._fan_out is None or self._fan_out.done():
            loop = asyncio.get_running_loop()
            self._subscribed = loop.create_future()
            self._fan_out = loop.create_task(self._run_fan_out(self._subscribed))
        await asyncio.shield(self._subscribed)

    async def _run_fan_out(self, subscribed: asyncio.Future) -> None:
        try:
            async for ref in self._coordinator.output_batches.remote():
                batch = await ref
                if not subscribed.done():
                    subscribed.set_result(None)
                for output in batch:
                    queue = self._streams.get(output.request_id)
                    if queue is not None:
                        queue.put_nowait(output)
            raise RuntimeError("the coordinator's output stream ended")
        except Exception as e:                     # the coordinator died: end every open stream, loudly
            if not subscribed.done():
                subscribed.set_exception(e)
            error = one_line_error(e)
            log.error("the coordinator's output stream failed", exc_info=e)
            for request_id, queue in list(self._streams.items()):
                queue.put_nowait(RequestOutput(request_id, (), 0, 0, FinishReason.ERROR, error=error))

    async def abort(self, request_id: str) -> bool:
        return await self._coordinator.abort.remote(request_id)

    async def loads(self) -> LoadReport:
        return await self._coordinator.loads.remote()

    async def reset_prefix_cache(self) -> None:
        await self._coordinator.reset_prefix_cache.remote()

    async def is_healthy(self) -> bool:
        try:
            return await self._coordinator.is_healthy.remote()
        except ray.exceptions.RayError:
            return False

"""The coordinator Ray actor: starting it over loaded workers (`start_coordinator`), and `EngineClient` over it,
what the gRPC server calls."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
from ray.exceptions import RayTaskError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from dsv4.cluster.coordinator import Coordinator
from dsv4.cluster.engine_client import LoadReport
from dsv4.wire.config import ServeConfig
from dsv4.wire.messages import WorkerInfo
from dsv4.wire.model_info import ModelInfo
from dsv4.wire.placement import ExpertPlacement
from dsv4.wire.request import GenerateRequest, InvalidRequest, RequestOutput


@dataclass
class Engine:
    """A running engine: the coordinator actor, the worker actors it drives, and what they serve."""

    coordinator: ray.actor.ActorHandle
    workers: list[ray.actor.ActorHandle]
    info: ModelInfo


def start_coordinator(config: ServeConfig, workers: list[ray.actor.ActorHandle], infos: list[WorkerInfo],
                      info: ModelInfo, placement: ExpertPlacement, num_hash_layers: int) -> Engine:
    """The coordinator actor over workers already loaded and wired (`dsv4.workers.launch.start_workers`), healthy.
    It lives beside the driver (the gRPC server): on KubeRay that is the head pod, without a GPU."""
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    coordinator = ray.remote(Coordinator).options(num_cpus=0, max_concurrency=10_000, scheduling_strategy=here).remote(
        config, workers, infos, info, placement, num_hash_layers)
    ray.get(coordinator.is_healthy.remote())
    return Engine(coordinator, workers, info)


def _unwrap(error: RayTaskError) -> Exception:
    """The coordinator's own exception (e.g. InvalidRequest naming a field) rather than Ray's wrapper."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error


class RayEngineClient:
    def __init__(self, coordinator: ray.actor.ActorHandle, model_info: ModelInfo):
        self._coordinator = coordinator
        self._info = model_info

    def model_info(self) -> ModelInfo:
        return self._info

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        try:
            async for ref in self._coordinator.generate.remote(request):
                yield await ref
        except RayTaskError as e:
            cause = _unwrap(e)
            if isinstance(cause, InvalidRequest):
                raise cause from None
            raise

    async def abort(self, request_id: str) -> bool:
        return await self._coordinator.abort.remote(request_id)

    async def loads(self) -> LoadReport:
        return await self._coordinator.loads.remote()

    async def is_healthy(self) -> bool:
        try:
            return await self._coordinator.is_healthy.remote()
        except ray.exceptions.RayError:
            return False

"""`EngineClient` over the coordinator Ray actor: what the gRPC server calls."""

from __future__ import annotations

from collections.abc import AsyncIterator

import ray
from ray.exceptions import RayTaskError

from dsv4.cluster.engine_client import LoadReport, ModelInfo
from dsv4.cluster.request import GenerateRequest, InvalidRequest, RequestOutput


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

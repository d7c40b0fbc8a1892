"""What the gRPC server needs from the engine (the coordinator), as a typed protocol.

The server owns text: tokenization, detokenization, stop strings. The engine owns tokens: scheduling, sampling,
stop token ids, max_tokens, cancellation. The real implementation is a handle on the coordinator Ray actor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from dsv4.wire.model_info import ModelInfo
from dsv4.wire.request import GenerateRequest, RequestOutput


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    rank: int
    num_running_requests: int
    num_cached_tokens: int          # context tokens held in this worker's KV pools
    free_blocks: int
    total_blocks: int
    local_expert_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class LoadReport:
    num_waiting_requests: int
    num_running_requests: int
    workers: tuple[WorkerLoad, ...]
    expert_token_counts: tuple[int, ...] = ()   # tokens routed to each expert, summed over MoE layers
    extra: dict[str, float] = field(default_factory=dict)


class EngineClient(Protocol):
    def model_info(self) -> ModelInfo: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        """Stream deltas until one with `finish_reason` set. Raises `InvalidRequest` before the first delta if
        the engine rejects the request (e.g. its prompt can never fit the KV cache)."""
        ...

    async def abort(self, request_id: str) -> bool:
        """Cancel a request; its blocks are freed at once. False if it was unknown or already finished."""
        ...

    async def loads(self) -> LoadReport: ...

    async def reset_prefix_cache(self) -> None:
        """Forget every cached prompt prefix (running requests keep theirs)."""
        ...

    async def is_healthy(self) -> bool: ...

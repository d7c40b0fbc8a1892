"""The worker's cache tensors, allocated on its device from a `CachePlan` (the one module that touches torch)."""

from __future__ import annotations

import torch

from dsv4.cache.spec import CachePlan
from dsv4.model.config import ModelConfig
from dsv4.model.kv_cache import KVStorage
from dsv4.model.numerics import Numerics


def allocate_pools(config: ModelConfig, numerics: Numerics, plan: CachePlan, device: torch.device | str
                   ) -> KVStorage:
    storage = KVStorage(config, numerics, plan.num_slots, plan.num_blocks, plan.block_size, device,
                        plan.num_snapshots)
    if storage.nbytes != plan.total_bytes:
        raise AssertionError(f"allocated {storage.nbytes} bytes, planned {plan.total_bytes}")
    return storage

"""Typed ops used by the model. Each runs its CUDA kernel (`dsv4.kernels.cuda_ops`) when its tensors are on a GPU,
the data is in a production format the kernel supports, and `DSV4_KERNELS` is not 0; otherwise its PyTorch
reference (the CPU path, exact-fp32 storage, and the kernels' test oracle). The first kernel call compiles the
extension (`dsv4.kernels.build`); a failed build raises rather than silently running the slow path.

Shapes, dtypes and byte layouts are documented on the references: `dsv4.kernels.routing` (routers),
`dsv4.kernels.cache_ops` (window append/gather, compressor flush, indexer top-k, entry gather, sparse attention)
and `dsv4.kernels.kv_format` (entry bytes); the kernel wrappers add their exactness notes.
"""

from __future__ import annotations

import torch

from dsv4.kernels import cache_ops, cuda_ops, routing
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.kv_format import EntryCodec

sparse_attention = cache_ops.sparse_attention   # no kernel yet (FlashMLA-style sparse decode is a later issue)


class Workspace:
    """Zero-filled int32 device scratch that one caller (a model layer) lends to the kernels needing it (the
    decode router's completion ticket). The kernels leave it zeroed, so it is allocated once, grown when a larger
    call needs more, and never cleared again: no memset per call or graph replay. Warm up before capturing a
    graph (growth allocates). One per layer and stream: concurrent calls must not share one."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def get(self, numel: int, device: torch.device) -> torch.Tensor:
        buf = self._buffer
        if buf is None or buf.device != device or buf.numel() < numel:
            buf = self._buffer = torch.zeros(max(numel, 1), dtype=torch.int32, device=device)
        return buf


def hash_route(x: torch.Tensor, gate_weight: torch.Tensor, tid2eid: torch.Tensor, token_ids: torch.Tensor,
               route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    if cuda_ops.enabled(x, gate_weight, tid2eid, token_ids) and cuda_ops.supports_route(x, gate_weight,
                                                                                         tid2eid.shape[1]):
        return cuda_ops.hash_route(x, gate_weight, tid2eid, token_ids, route_scale)
    return routing.hash_route(x, gate_weight, tid2eid, token_ids, route_scale)


def dense_route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, topk: int, route_scale: float,
                workspace: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if cuda_ops.enabled(x, gate_weight, bias) and cuda_ops.supports_route(x, gate_weight, topk):
        ws = workspace.get(cuda_ops.ROUTER_WORKSPACE_INTS, x.device) if workspace is not None else None
        return cuda_ops.dense_route(x, gate_weight, bias, topk, route_scale, ws)
    return routing.dense_route(x, gate_weight, bias, topk, route_scale)


def window_append(ring: torch.Tensor, codec: EntryCodec, values: torch.Tensor, layout: BatchLayout) -> None:
    if cuda_ops.enabled(ring, values) and cuda_ops.supports_main_codec(codec, ring) and values.dtype in (
            torch.bfloat16, torch.float32):
        return cuda_ops.window_append(ring, codec, values, layout)
    return cache_ops.window_append(ring, codec, values, layout)


def window_gather(ring: torch.Tensor, codec: EntryCodec, chunk_values: torch.Tensor, layout: BatchLayout
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    if (cuda_ops.enabled(ring, chunk_values) and cuda_ops.supports_main_codec(codec, ring)
            and chunk_values.dtype == torch.bfloat16):
        return cuda_ops.window_gather(ring, codec, chunk_values, layout)
    return cache_ops.window_gather(ring, codec, chunk_values, layout)


def compress_flush(a: torch.Tensor, z: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
                   layout: BatchLayout, ratio: int, norm_weight: torch.Tensor, eps: float, inv_freq: torch.Tensor,
                   rotate: bool, pool: torch.Tensor, codec: EntryCodec, act_dtype: torch.dtype) -> None:
    if (cuda_ops.enabled(a, z, state_kv, state_score, pool, norm_weight, inv_freq)
            and cuda_ops.supports_flush(a, ratio, norm_weight, inv_freq, rotate, pool, codec, act_dtype)):
        return cuda_ops.compress_flush(a, z, state_kv, state_score, layout, ratio, norm_weight, eps, inv_freq,
                                       rotate, pool, codec, act_dtype)
    return cache_ops.compress_flush(a, z, state_kv, state_score, layout, ratio, norm_weight, eps, inv_freq, rotate,
                                    pool, codec, act_dtype)


def indexer_topk(q: torch.Tensor, weights: torch.Tensor, pool: torch.Tensor, codec: EntryCodec,
                 layout: BatchLayout, ratio: int, topk: int, act_dtype: torch.dtype) -> torch.Tensor:
    if cuda_ops.enabled(q, weights, pool) and cuda_ops.supports_indexer(q, weights, pool, codec, layout, ratio,
                                                                        topk, act_dtype):
        return cuda_ops.indexer_topk(q, weights, pool, codec, layout, ratio, topk, act_dtype)
    return cache_ops.indexer_topk(q, weights, pool, codec, layout, ratio, topk, act_dtype)


def gather_entries(pool: torch.Tensor, codec: EntryCodec, layout: BatchLayout, entries: torch.Tensor, ratio: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    if cuda_ops.enabled(pool, entries) and cuda_ops.supports_main_codec(codec, pool):
        return cuda_ops.gather_entries(pool, codec, layout, entries, ratio)
    return cache_ops.gather_entries(pool, codec, layout, entries, ratio)

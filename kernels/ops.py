"""Typed ops used by the model. Each runs its CUDA kernel when its tensors are on a GPU and the kernel extension
is available, and its PyTorch reference otherwise (the CPU path, and the kernels' test oracle).

Shapes, dtypes and byte layouts are documented on the references: `dsv4.kernels.routing` (routers),
`dsv4.kernels.cache_ops` (window append/gather, compressor flush, indexer top-k, entry gather, sparse attention)
and `dsv4.kernels.kv_format` (entry bytes).
"""

from __future__ import annotations

from dsv4.kernels import cache_ops, routing

hash_route = routing.hash_route
dense_route = routing.dense_route
window_append = cache_ops.window_append
window_gather = cache_ops.window_gather
compress_flush = cache_ops.compress_flush
indexer_topk = cache_ops.indexer_topk
gather_entries = cache_ops.gather_entries
sparse_attention = cache_ops.sparse_attention

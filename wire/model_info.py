"""What is being served: the model's shape and limits and the engine's capacity. The workers' launcher builds it
from the checkpoint's config and the loaded workers' cache geometry; the coordinator and the server hand it out
(GetModelInfo, request validation)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model_path: str                 # the checkpoint directory being served
    served_model_name: str
    vocab_size: int
    max_model_len: int              # prompt + output tokens per request
    bos_token_id: int
    eos_token_ids: tuple[int, ...]
    num_workers: int
    numerics: str                   # "reference", "exact-fp32" or "fast"
    num_hidden_layers: int
    num_routed_experts: int
    num_experts_per_tok: int
    hidden_size: int
    kv_cache_tokens: int = 0        # positions of context all workers' KV caches hold together
    max_running_requests: int = 0   # sequence slots over all workers
    prefix_caching: bool = False    # the engine reuses cached prompt prefixes (`--enable-prefix-caching`)

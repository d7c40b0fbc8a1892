"""The served model's description (`ModelInfo`) from the serve config, the checkpoint's config and, once they are
loaded, the workers' cache geometry. Light (no torch, no Ray): `dsv4 batch` checks its prompts with it before any
worker starts."""

from __future__ import annotations

from pathlib import Path

from dsv4.model.config import ModelConfig
from dsv4.wire.config import ServeConfig
from dsv4.wire.messages import WorkerInfo
from dsv4.wire.model_info import ModelInfo


def model_info(config: ServeConfig, model: ModelConfig, workers: list[WorkerInfo] = ()) -> ModelInfo:
    max_len = min(config.max_model_len or model.max_position_embeddings, model.max_position_embeddings)
    if workers:   # a sequence lives on one worker: no longer than the smallest worker's cache holds
        max_len = min(max_len, *(w.num_blocks * w.block_size for w in workers))
    return ModelInfo(model_path=config.model_dir,
                     served_model_name=config.served_model_name or Path(config.model_dir).name,
                     vocab_size=model.vocab_size, max_model_len=max_len, bos_token_id=model.bos_token_id,
                     eos_token_ids=(model.eos_token_id,), num_workers=config.num_workers, numerics=config.numerics,
                     num_hidden_layers=model.num_hidden_layers, num_routed_experts=model.n_routed_experts,
                     num_experts_per_tok=model.num_experts_per_tok, hidden_size=model.hidden_size,
                     kv_cache_tokens=sum(w.num_blocks * w.block_size for w in workers),
                     max_running_requests=sum(w.num_slots for w in workers),
                     prefix_caching=config.prefix_cache_snapshots > 0)

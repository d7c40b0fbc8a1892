"""Serving configuration: one typed, validated root for the coordinator, the workers and the server (all three
read it, so it lives here, below them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DEFAULT_PORT = 50051
NUMERICS = ("reference", "exact-fp32", "fast")   # dsv4.model.numerics.NumericsMode (wire imports no model code)


def default_numerics(device: str) -> str:
    """`fast` on GPUs (what serving is for), `reference` on CPUs (the exact oracle)."""
    return "fast" if device == "cuda" else "reference"


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 32                 # running sequences per worker (its cache slots)
    max_num_batched_tokens: int = 512      # tokens per worker per step (prefill chunks + decode tokens)
    max_prefill_chunk: int = 256           # tokens of one prompt per step (chunked prefill)
    max_waiting: int = 4096                # requests queued for admission; beyond it new ones are refused

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"scheduler.{f.name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class ServeConfig:
    model_dir: str
    num_workers: int = 2
    numerics: str = "reference"
    device: str = "cpu"                    # "cpu" or "cuda" (one GPU per worker)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    served_model_name: str = ""            # default: the model directory's name
    kv_cache_bytes: int = 256 << 20        # per worker, for the paged KV blocks and the slots; 0 = size from the
                                           # GPU's memory (CUDA only): gpu_memory_utilization of it, less weights,
                                           # activations and CUDA graphs
    gpu_memory_utilization: float = 0.9    # fraction of each GPU's memory dsv4 may use (vLLM's convention)
    block_size: int = 256                  # positions per KV block
    max_model_len: int = 0                 # 0: the model's max_position_embeddings
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)
    seed: int = 0                          # base of the per-request sampling seeds when a request has none
    enforce_eager: bool = False            # no CUDA graphs (fast numerics on GPUs capture decode graphs)
    speculative_tokens: int = 0            # drafts per decoding sequence per step from the MTP block; 0 = off
    prefix_cache_snapshots: int = 0        # per worker: prefix ends it can resume from; 0 = no prefix caching

    MAX_SPECULATIVE_TOKENS = 4             # dsv4.workers.speculative.MAX_SPECULATIVE_TOKENS

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, got {self.numerics!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.kv_cache_bytes < 0 or self.block_size <= 0 or self.max_model_len < 0:
            raise ValueError("kv_cache_bytes must be >= 0, block_size positive, max_model_len >= 0")
        if self.kv_cache_bytes == 0 and self.device != "cuda":
            raise ValueError("kv_cache_bytes 0 (size the cache from GPU memory) needs device 'cuda'")
        if self.prefix_cache_snapshots < 0:
            raise ValueError(f"prefix_cache_snapshots must be >= 0, got {self.prefix_cache_snapshots}")
        if not 0 <= self.speculative_tokens <= self.MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_tokens must be in [0, {self.MAX_SPECULATIVE_TOKENS}], got "
                             f"{self.speculative_tokens}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")

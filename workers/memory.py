"""How much of a GPU's memory the KV cache may take (vLLM's convention): `gpu_memory_utilization` of the device,
less what the weights hold, less the activation peak of the largest step (measured by running one on a scratch
cache), less a reserve for the CUDA graphs' memory pool. Measured after the weights are resident, so the cache
is sized from what is really left.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.model.batch import Chunk
from dsv4.model.kv_cache import KVStorage
from dsv4.model.numerics import Numerics
from dsv4.model.transformer import Transformer
from dsv4.workers.model_runner import ModelRunner, RunnerConfig

GRAPH_RESERVE_BYTES = 2 << 30     # the decode graphs' private pool (the largest decode step's activations)


@dataclass(frozen=True, slots=True)
class MemoryReport:
    total_bytes: int              # the device's memory
    weight_bytes: int             # allocated once the model is resident
    activation_peak_bytes: int    # above the weights, during the profiled step (its scratch cache included)
    reserve_bytes: int            # kept for the CUDA graphs
    kv_cache_bytes: int           # what the cache may take

    def describe(self) -> str:
        gib = 2 ** 30
        return (f"GPU memory {self.total_bytes / gib:.1f} GiB: weights {self.weight_bytes / gib:.1f}, activation "
                f"peak {self.activation_peak_bytes / gib:.2f}, graph reserve {self.reserve_bytes / gib:.1f}, "
                f"KV cache {self.kv_cache_bytes / gib:.1f} GiB")


def profile_step_peak(model: Transformer, numerics: Numerics, num_tokens: int, block_size: int) -> int:
    """Peak bytes above what is allocated now while an eager prefill of `num_tokens` runs on a scratch cache of one
    sequence."""
    device = model.embed.weight.device
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    blocks = -(-num_tokens // block_size)
    storage = KVStorage(model.config, numerics, 1, blocks, block_size, device)
    runner = ModelRunner(model, storage, numerics, RunnerConfig(1, num_tokens, blocks, ()))
    tokens = torch.randint(0, model.config.vocab_size, (num_tokens,), generator=torch.Generator().manual_seed(0))
    runner.step([Chunk(0, range(blocks), 0, tokens.tolist())])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del runner, storage
    torch.cuda.empty_cache()
    return peak


def kv_cache_budget(model: Transformer, numerics: Numerics, utilization: float, max_step_tokens: int,
                    block_size: int, use_graphs: bool) -> MemoryReport:
    device = model.embed.weight.device
    total = torch.cuda.get_device_properties(device).total_memory
    weights = torch.cuda.memory_allocated(device)
    peak = profile_step_peak(model, numerics, max_step_tokens, block_size)
    reserve = GRAPH_RESERVE_BYTES if use_graphs else 0
    budget = int(total * utilization) - weights - peak - reserve
    if budget <= 0:
        raise RuntimeError(f"no memory left for the KV cache: {utilization:.2f} of {total / 2**30:.1f} GiB minus "
                           f"weights {weights / 2**30:.1f} GiB and activations {peak / 2**30:.2f} GiB; raise "
                           "--gpu-memory-utilization, lower --max-num-batched-tokens or use more GPUs")
    return MemoryReport(total, weights, peak, reserve, budget)

"""Cache sizing from a memory budget: how many blocks and slots fit, and how many tokens of context that is.

Per token of context a V4-Flash worker stores, per CSA layer, a quarter of a 584-byte entry and a quarter of a
68-byte indexer key, and per HCA layer 1/128 of an entry: 21 * 652 / 4 + 20 * 584 / 128 = 3514.25 bytes. Each
running sequence also holds fixed per-slot state: its window rings (128 entries per layer) and the fp32 pooling
state of every compressor. With prefix caching, snapshots of that state at cached prefixes' ends take their share.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv4.model.config import ModelConfig
from dsv4.model.kv_cache import (
    DEFAULT_BLOCK_SIZE,
    bytes_per_block,
    bytes_per_slot,
    bytes_per_snapshot,
    check_block_size,
)
from dsv4.model.numerics import Numerics


@dataclass(frozen=True, slots=True)
class CachePlan:
    block_size: int          # positions per block
    num_blocks: int
    num_slots: int           # sequences that can run at once
    bytes_per_block: int
    bytes_per_slot: int
    num_snapshots: int = 0   # prefix-cache snapshots (the per-slot state at a cached prefix's end)
    bytes_per_snapshot: int = 0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_per_block / self.block_size

    @property
    def max_context_tokens(self) -> int:
        """Positions of context all blocks together hold."""
        return self.num_blocks * self.block_size

    @property
    def total_bytes(self) -> int:
        return (self.num_blocks * self.bytes_per_block + self.num_slots * self.bytes_per_slot
                + self.num_snapshots * self.bytes_per_snapshot)


def plan_cache(config: ModelConfig, numerics: Numerics, budget_bytes: int, max_num_seqs: int,
               block_size: int = DEFAULT_BLOCK_SIZE, num_snapshots: int = 0) -> CachePlan:
    """Fit `max_num_seqs` slots and `num_snapshots` prefix snapshots, then as many blocks as the rest holds."""
    check_block_size(config, block_size)
    per_block = bytes_per_block(config, numerics, block_size)
    per_slot = bytes_per_slot(config, numerics, block_size)
    per_snapshot = bytes_per_snapshot(config, numerics, block_size)
    left = budget_bytes - max_num_seqs * per_slot - num_snapshots * per_snapshot
    if max_num_seqs < 1 or left < per_block:
        raise ValueError(f"a cache budget of {budget_bytes / 2**20:.1f} MiB cannot hold {max_num_seqs} sequence "
                         f"slots ({per_slot / 2**20:.2f} MiB each), {num_snapshots} prefix snapshots "
                         f"({per_snapshot / 2**20:.2f} MiB each) and at least one block ({per_block / 2**20:.2f} MiB)")
    return CachePlan(block_size, left // per_block if per_block else 0, max_num_seqs, per_block, per_slot,
                     num_snapshots, per_snapshot)

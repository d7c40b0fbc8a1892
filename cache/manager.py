"""Which slot and blocks each sequence holds (pure Python).

A sequence gets one slot (its window rings and compressor states) for life, and one block per `block_size`
positions of context (its compressed entries and indexer keys in every layer). Before each step the scheduler
calls `reserve` for the positions the step will write; allocation never happens inside a step (so never inside a
captured CUDA graph). Running out is a value (None / False), never an exception: the scheduler queues or
preempts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv4.cache.allocator import IdAllocator


@dataclass
class SequenceBlocks:
    slot: int
    blocks: list[int] = field(default_factory=list)


class KVCacheManager:
    def __init__(self, num_slots: int, num_blocks: int, block_size: int):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.slots = IdAllocator(num_slots)
        self.blocks = IdAllocator(num_blocks)
        self._seqs: dict[str, SequenceBlocks] = {}

    def blocks_needed(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def can_admit(self, num_positions: int) -> bool:
        return self.slots.num_free > 0 and self.blocks.num_free >= self.blocks_needed(num_positions)

    def admit(self, seq_id: str, num_positions: int) -> SequenceBlocks | None:
        """A slot and blocks for positions [0, num_positions), or None (nothing taken) if they do not fit."""
        if seq_id in self._seqs:
            raise AssertionError(f"sequence {seq_id} is already admitted")
        if not self.can_admit(num_positions):
            return None
        slot = self.slots.allocate(1)[0]
        self._seqs[seq_id] = SequenceBlocks(slot, self.blocks.allocate(self.blocks_needed(num_positions)))
        return self._seqs[seq_id]

    def reserve(self, seq_id: str, num_positions: int) -> bool:
        """Grow a sequence's blocks to cover positions [0, num_positions). False (nothing taken) if out of blocks."""
        seq = self._seqs[seq_id]
        missing = self.blocks_needed(num_positions) - len(seq.blocks)
        if missing <= 0:
            return True
        new = self.blocks.allocate(missing)
        if new is None:
            return False
        seq.blocks.extend(new)
        return True

    def release(self, seq_id: str) -> None:
        seq = self._seqs.pop(seq_id)
        self.blocks.free(seq.blocks)
        self.slots.free([seq.slot])

    def get(self, seq_id: str) -> SequenceBlocks:
        return self._seqs[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    @property
    def sequence_ids(self) -> list[str]:
        return list(self._seqs)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    @property
    def num_total_blocks(self) -> int:
        return self.blocks.num_total

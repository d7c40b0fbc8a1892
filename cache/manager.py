"""Which slot and blocks each sequence holds (pure Python, shared with the coordinator).

A sequence gets one slot (its window rings and compressor states) for life, and one block per `block_size`
positions of context (its compressed entries and indexer keys in every layer). Before each step the scheduler
calls `reserve` for the positions the step will write; allocation never happens inside a step (so never inside a
captured CUDA graph). Running out is a value (None / False), never an exception: the scheduler queues or
preempts.

With prefix caching (`num_snapshots` > 0) a block may be held by several sequences (a shared prompt prefix,
`dsv4.cache.prefix`): each block counts the sequences that hold it, and a cached block no sequence holds stays
registered until the free list runs short and it is taken back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dsv4.cache.allocator import IdAllocator
from dsv4.cache.prefix import PrefixCache


@dataclass
class SequenceBlocks:
    slot: int
    blocks: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0          # leading blocks shared from the prefix cache
    snapshot: int | None = None         # the snapshot the sequence's slot starts from (with cached blocks)


class KVCacheManager:
    def __init__(self, num_slots: int, num_blocks: int, block_size: int, num_snapshots: int = 0):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.slots = IdAllocator(num_slots)
        self.blocks = IdAllocator(num_blocks)
        self.prefix = PrefixCache(num_snapshots) if num_snapshots else None
        self._holders = [0] * num_blocks            # sequences holding each block
        self._seqs: dict[str, SequenceBlocks] = {}

    def blocks_needed(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    def can_admit(self, num_positions: int) -> bool:
        return self.slots.num_free > 0 and self.num_free_blocks >= self.blocks_needed(num_positions)

    def admit(self, seq_id: str, num_positions: int, prefix_keys: Sequence[int] = ()) -> SequenceBlocks | None:
        """A slot and blocks for positions [0, num_positions), or None (nothing taken) if they do not fit. With
        prefix keys, the longest resumable cached prefix among them is shared first (`num_cached_blocks`, and the
        `snapshot` to start the slot from)."""
        if seq_id in self._seqs:
            raise AssertionError(f"sequence {seq_id} is already admitted")
        shared, snapshot = self.prefix.lookup(prefix_keys) if self.prefix and prefix_keys else ([], None)
        unused = sum(1 for b in shared if self._holders[b] == 0)    # cached blocks this would take off the LRU
        need = max(0, self.blocks_needed(num_positions) - len(shared))
        if self.slots.num_free == 0 or self.num_free_blocks - unused < need:
            return None
        for block in shared:
            self._hold(block)
        if snapshot is not None:
            self.prefix.touch(snapshot)
        slot = self.slots.allocate(1)[0]
        seq = SequenceBlocks(slot, shared + self._take(need), len(shared), snapshot)
        self._seqs[seq_id] = seq
        return seq

    def reserve(self, seq_id: str, num_positions: int) -> bool:
        """Grow a sequence's blocks to cover positions [0, num_positions). False (nothing taken) if out of blocks."""
        seq = self._seqs[seq_id]
        missing = self.blocks_needed(num_positions) - len(seq.blocks)
        if missing <= 0:
            return True
        if self.num_free_blocks < missing:
            return False
        seq.blocks.extend(self._take(missing))
        return True

    def release(self, seq_id: str) -> None:
        seq = self._seqs.pop(seq_id)
        free = []
        for block in seq.blocks:
            self._holders[block] -= 1
            if self._holders[block] == 0:
                if self.prefix is not None and self.prefix.is_cached(block):
                    self.prefix.unhold(block)
                else:
                    free.append(block)
        self.blocks.free(free)
        self.slots.free([seq.slot])

    # ------------------------------------------------------------------------------------------ prefix cache
    def cache_prefix(self, seq_id: str, keys: Sequence[int], snapshot: int) -> bool:
        """The sequence's first len(keys) blocks hold those prefixes and `snapshot` the state at their end (both
        written by a step that has completed): make them resumable. False (the snapshot freed) if the sequence no
        longer holds those blocks (it ended or was preempted meanwhile) or the prefix had a snapshot already."""
        seq = self._seqs.get(seq_id)
        if seq is None or len(seq.blocks) < len(keys):
            self.prefix.snapshots.free([snapshot])
            return False
        return self.prefix.register(keys, seq.blocks[:len(keys)], snapshot)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks held by running sequences stay theirs)."""
        if self.prefix is not None:
            self.blocks.free(self.prefix.clear())

    # ------------------------------------------------------------------------------------------ views
    def get(self, seq_id: str) -> SequenceBlocks:
        return self._seqs[seq_id]

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self._seqs

    @property
    def sequence_ids(self) -> list[str]:
        return list(self._seqs)

    @property
    def num_free_blocks(self) -> int:
        """Blocks a sequence can take: free ones and cached ones no sequence holds."""
        return self.blocks.num_free + (self.prefix.num_unused if self.prefix is not None else 0)

    @property
    def num_total_blocks(self) -> int:
        return self.blocks.num_total

    def holders(self, block: int) -> int:
        return self._holders[block]

    # ------------------------------------------------------------------------------------------ internals
    def _hold(self, block: int) -> None:
        if self._holders[block] == 0 and self.prefix is not None:
            self.prefix.hold(block)
        self._holders[block] += 1

    def _take(self, n: int) -> list[int]:
        """n blocks, free ones first, then cached unused ones taken back (the caller checked there are enough)."""
        short = n - self.blocks.num_free
        if short > 0:
            self.blocks.free(self.prefix.evict(short))
        blocks = self.blocks.allocate(n)
        for block in blocks:
            self._holders[block] = 1
        return blocks

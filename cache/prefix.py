"""Prefix caching, the accounting side (pure Python, kept by the coordinator): which blocks hold which prompt
prefixes, and where a sequence can resume from one.

A prompt's full blocks are named by chained keys: block i's key hashes block i-1's key and block i's tokens, so a
key names a whole prefix. The compressed entries and indexer keys a block holds depend only on that prefix, so a
block is shared, read-only, by every sequence whose prompt starts with it. Resuming also needs the per-slot state
at the prefix's end (the window ring, the CSA pooling states): a *snapshot* the worker saved there
(`KVStorage.save_snapshot`). Only prefixes whose end has a snapshot are resumable.

A block is free (in the allocator), held (by the sequences whose tables list it: a reference count), or cached
and unused (registered under its key, held by none): those are kept in least-recently-used order and taken back
when the allocator runs short. Evicting a block drops its key and the snapshot at its end; the keys chained after
it can no longer be reached and age out the same way. Snapshots are few: when all are taken, the one used least
recently is dropped (its prefix stays cached, resumable only at an earlier snapshot).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from dsv4.cache.allocator import IdAllocator


def prefix_keys(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained key of each full block of `token_ids` (Python's tuple hash of ints: stable across processes)."""
    keys, key = [], 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        key = hash((key, tuple(token_ids[start:start + block_size])))
        keys.append(key)
    return keys


class PrefixCache:
    def __init__(self, num_snapshots: int):
        self.snapshots = IdAllocator(num_snapshots)
        self._block_of: dict[int, int] = {}          # key -> the block holding that prefix's last block
        self._key_of: dict[int, int] = {}            # block -> key
        self._snapshot_of: dict[int, int] = {}       # key -> snapshot of the state at that prefix's end
        self._snapshot_lru: collections.OrderedDict[int, int] = collections.OrderedDict()   # snapshot -> key
        self._unused: collections.OrderedDict[int, None] = collections.OrderedDict()        # blocks, LRU first

    # ------------------------------------------------------------------------------------------ queries
    def lookup(self, keys: Sequence[int]) -> tuple[list[int], int | None]:
        """The blocks of the longest resumable prefix among `keys` (its first blocks), and its snapshot."""
        blocks, best, snapshot = [], 0, None
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
            if key in self._snapshot_of:
                best, snapshot = len(blocks), self._snapshot_of[key]
        return blocks[:best], snapshot

    def touch(self, snapshot: int) -> None:
        """A sequence resumes from the snapshot: it is the most recently used."""
        self._snapshot_lru.move_to_end(snapshot)

    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    @property
    def num_unused(self) -> int:
        """Cached blocks no sequence holds: free for the taking."""
        return len(self._unused)

    @property
    def num_cached(self) -> int:
        return len(self._key_of)

    # ------------------------------------------------------------------------------------------ changes
    def hold(self, block: int) -> None:
        """A sequence starts holding a cached block."""
        self._unused.pop(block, None)

    def unhold(self, block: int) -> None:
        """No sequence holds the cached block any more."""
        self._unused[block] = None

    def register(self, keys: Sequence[int], blocks: Sequence[int], snapshot: int) -> bool:
        """blocks[i] holds the prefix keys[i] (blocks held by the registering sequence); `snapshot` (allocated
        from `snapshots`) holds the state at the last one's end. Keys already cached keep their block; the
        snapshot is dropped if that prefix already has one. True if the snapshot was kept."""
        for key, block in zip(keys, blocks, strict=True):
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key], self._key_of[block] = block, key
        last = keys[-1]
        if last in self._snapshot_of or last not in self._block_of:
            self.snapshots.free([snapshot])
            return False
        self._snapshot_of[last] = snapshot
        self._snapshot_lru[snapshot] = last
        return True

    def new_snapshot(self) -> int | None:
        """A snapshot id for a prefix about to be saved: a free one, else the least recently used one's."""
        got = self.snapshots.allocate(1)
        if got is None and self._snapshot_lru:
            snapshot, key = self._snapshot_lru.popitem(last=False)
            del self._snapshot_of[key]
            return snapshot
        return got[0] if got else None

    def evict(self, n: int) -> list[int]:
        """Take n unused cached blocks back (least recently used first): their keys and snapshots are dropped."""
        out = []
        for _ in range(n):
            block, _ = self._unused.popitem(last=False)
            self._forget(block)
            out.append(block)
        return out

    def clear(self) -> list[int]:
        """Forget every prefix; returns the unused blocks, which go back to the free list."""
        unused = list(self._unused)
        self._unused.clear()
        for block in list(self._key_of):
            self._forget(block)
        return unused

    def _forget(self, block: int) -> None:
        key = self._key_of.pop(block)
        del self._block_of[key]
        snapshot = self._snapshot_of.pop(key, None)
        if snapshot is not None:
            del self._snapshot_lru[snapshot]
            self.snapshots.free([snapshot])

"""A free list of fixed-size ids (KV blocks, or per-sequence slots). Pure Python: the coordinator keeps the
logical accounting with it while the worker holds the tensors those ids index.

Allocation is all-or-nothing and returns None when there is not enough; the caller decides what to do (wait,
preempt). Ids are handed out lowest first, which keeps a lightly loaded pool compact.
"""

from __future__ import annotations

import heapq


class IdAllocator:
    def __init__(self, num_ids: int):
        if num_ids < 0:
            raise ValueError(f"num_ids must be >= 0, got {num_ids}")
        self.num_total = num_ids
        self._free = list(range(num_ids))          # a min-heap (already sorted)
        self._in_use = bytearray(num_ids)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n ids, or None (and nothing taken) if fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} ids")
        if n > len(self._free):
            return None
        ids = [heapq.heappop(self._free) for _ in range(n)]
        for i in ids:
            self._in_use[i] = 1
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if not (0 <= i < self.num_total and self._in_use[i]):
                raise AssertionError(f"freeing id {i}, which is not allocated")
            self._in_use[i] = 0
            heapq.heappush(self._free, i)

    def is_allocated(self, i: int) -> bool:
        return 0 <= i < self.num_total and bool(self._in_use[i])

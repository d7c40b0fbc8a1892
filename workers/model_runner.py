"""The engine step: one forward over a mix of prefill chunks and decode tokens of many sequences, reading and
writing only the paged cache.

The scheduler (or a test) decides which tokens of which sequences run, and reserves their slots and blocks with a
`dsv4.cache.manager.KVCacheManager` beforehand; the runner only executes. A chunk that starts at position 0 is
a new sequence (or one restarted after preemption): its slot is reset first, so nothing of the slot's previous
sequence can reach it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.model.batch import Chunk, ForwardBatch
from dsv4.model.kv_cache import KVStorage
from dsv4.model.numerics import Numerics
from dsv4.model.transformer import Transformer


@dataclass(frozen=True, slots=True)
class SequenceStep:
    """One sequence's tokens in a step: positions start .. start+len(token_ids)-1."""

    slot: int
    block_table: Sequence[int]
    start: int
    token_ids: Sequence[int]


class ModelRunner:
    def __init__(self, model: Transformer, storage: KVStorage, numerics: Numerics):
        self.model, self.storage, self.numerics = model, storage, numerics

    @torch.inference_mode()
    def step(self, seqs: Sequence[SequenceStep]) -> torch.Tensor:
        """Run one step; returns the next-token logits after each sequence's last token, [len(seqs), vocab]."""
        for s in seqs:
            if s.start == 0:
                self.storage.reset_slot(s.slot)
        batch = ForwardBatch.build(self.storage, [Chunk(s.slot, s.block_table, s.start, s.token_ids) for s in seqs],
                                   self.numerics)
        return self.model(batch).logits

"""One forward call's worth of tokens: chunks of one or more sequences, flattened, with where their cache lives.

A chunk is a run of consecutive positions of one sequence (a prefill chunk of any length, or one decode token).
Projections and MoE run on the flat [T, ...] batch; the cache ops use the `BatchLayout` to find each token's
window slot and blocks. A sequence appears at most once per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.kernels.cache_ops import BatchLayout
from dsv4.model.kv_cache import KVStorage
from dsv4.model.numerics import Numerics


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens of one sequence at positions start .., held in window/state slot `slot` and the listed blocks."""

    slot: int
    block_table: Sequence[int]
    start: int
    token_ids: Sequence[int] | torch.Tensor


def check_chunks(storage: KVStorage, chunks: Sequence[Chunk], vocab_size: int | None = None) -> None:
    """The host-side checks of a step's chunks (the device code masks instead of checking): ValueError naming the
    chunk and what is wrong. With vocab_size, token ids are checked too."""
    if not chunks:
        raise ValueError("a forward batch needs at least one chunk")
    for s, chunk in enumerate(chunks):
        n = len(chunk.token_ids)
        if n == 0 or chunk.start < 0:
            raise ValueError(f"chunk {s}: needs >= 1 token and start >= 0 (got {n} tokens, start {chunk.start})")
        if not 0 <= chunk.slot < storage.num_slots:
            raise ValueError(f"chunk {s}: slot {chunk.slot} outside [0, {storage.num_slots})")
        if len(chunk.block_table) < storage.blocks_for(chunk.start + n):
            raise ValueError(f"chunk {s}: {len(chunk.block_table)} blocks cannot hold positions up to "
                             f"{chunk.start + n} (block_size {storage.block_size})")
        if vocab_size is not None:
            ids = chunk.token_ids.tolist() if isinstance(chunk.token_ids, torch.Tensor) else chunk.token_ids
            if min(ids) < 0 or max(ids) >= vocab_size:
                bad = next(i for i in ids if not 0 <= i < vocab_size)
                raise ValueError(f"chunk {s}: token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len({c.slot for c in chunks}) != len(chunks):
        raise ValueError("a sequence (slot) may appear only once per forward batch")


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    token_ids: torch.Tensor    # [T] int64, chunks concatenated in order
    layout: BatchLayout
    storage: KVStorage
    numerics: Numerics
    # when given, every compressor leaves its projections here, (layer id, name) -> (a, z) [T, coff*d] fp32: what
    # `dsv4.model.speculative` replays to take a verify step's state back to its accepted tokens
    recorder: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def build(cls, storage: KVStorage, chunks: Sequence[Chunk], numerics: Numerics) -> ForwardBatch:
        device = storage.layers[0].window.device
        check_chunks(storage, chunks)
        ids = [torch.as_tensor(c.token_ids, dtype=torch.int64).flatten() for c in chunks]
        layout = BatchLayout.from_chunks([(c.slot, c.start, t.numel(), c.block_table) for c, t in zip(chunks, ids,
                                                                                                       strict=True)],
                                         storage.block_size, device)
        return cls(torch.cat(ids).to(device), layout, storage, numerics)

    @property
    def positions(self) -> torch.Tensor:
        return self.layout.positions

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def last_rows(self) -> torch.Tensor:
        """Row index of each chunk's last token (where next-token logits are read)."""
        return self.layout.seq_first_row + self.layout.seq_len - 1

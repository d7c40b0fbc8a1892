"""One forward call's worth of tokens: chunks of one or more sequences, flattened, with their caches.

A chunk is a run of consecutive positions of one sequence (a prefill chunk of any length, or one decode token).
Projections and MoE run on the flat [T, ...] batch; attention loops over the chunks, each reading and writing its
own sequence's cache. A sequence appears at most once per batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dsv4.model.kv_state import SequenceCache
from dsv4.model.numerics import Numerics


@dataclass(frozen=True, slots=True)
class SequenceChunk:
    cache: SequenceCache
    start: int    # absolute position of the chunk's first token
    length: int


@dataclass(frozen=True, slots=True)
class ForwardBatch:
    token_ids: torch.Tensor    # [T] int64, chunks concatenated in order
    positions: torch.Tensor    # [T] int64
    chunks: tuple[SequenceChunk, ...]
    numerics: Numerics

    @classmethod
    def build(cls, chunks: Sequence[tuple[SequenceCache, int, Sequence[int] | torch.Tensor]], numerics: Numerics,
              device: torch.device | str = "cpu") -> ForwardBatch:
        """chunks: (cache, start position, token ids) per sequence."""
        ids, positions, out = [], [], []
        for cache, start, tokens in chunks:
            tokens = torch.as_tensor(tokens, dtype=torch.int64)
            if tokens.dim() != 1 or tokens.numel() == 0:
                raise ValueError(f"a chunk needs a non-empty 1-D list of token ids, got shape {tuple(tokens.shape)}")
            if start < 0:
                raise ValueError(f"chunk start position must be >= 0, got {start}")
            ids.append(tokens)
            positions.append(torch.arange(start, start + tokens.numel()))
            out.append(SequenceChunk(cache, start, tokens.numel()))
        if len({id(c.cache) for c in out}) != len(out):
            raise ValueError("a sequence may appear only once per forward batch")
        return cls(torch.cat(ids).to(device), torch.cat(positions).to(device), tuple(out), numerics)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    def spans(self) -> Iterator[tuple[SequenceChunk, slice]]:
        """Each chunk with its rows in the flat batch."""
        offset = 0
        for chunk in self.chunks:
            yield chunk, slice(offset, offset + chunk.length)
            offset += chunk.length

    def last_rows(self) -> torch.Tensor:
        """Row index of each chunk's last token (where next-token logits are read)."""
        ends = torch.tensor([c.length for c in self.chunks]).cumsum(0) - 1
        return ends.to(self.token_ids.device)

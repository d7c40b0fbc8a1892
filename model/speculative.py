"""Taking a verify step back to its accepted tokens (speculative decoding with the MTP block, spec §2.5).

A verify step runs a sequence's last token and its drafts d_1..d_n at positions p..p+n as one chunk and writes the
cache as any step does: the ring rows of positions p..p+n, the compressor states advanced by n+1 tokens, the
entries of the windows those tokens complete. When only d_1..d_k are accepted, the state must be what running
positions p..p+k alone leaves:
- the ring rows of positions p+k+1..p+n held the positions 128 (the window) earlier, which the next queries still
  attend to: they are put back from the checkpoint taken before the step;
- the compressor states are put back whole, then advanced again by the accepted tokens' projections, which the
  verify step recorded (`ForwardBatch.recorder`): no layer is recomputed;
- the entries of windows that a rejected token completed stay as they are: an entry is read only by queries at
  or after the position that completes its window, and that position's real token rewrites it first (in every
  layer the compressor runs before attention).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from dsv4.kernels.cache_ops import BatchLayout
from dsv4.model.compressor import Compressor
from dsv4.model.kv_cache import KVStorage, SlotCheckpoint
from dsv4.model.numerics import Numerics
from dsv4.model.transformer import Transformer

Recorder = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, slots=True)
class Rejection:
    """A verified sequence whose drafts were not all accepted: `saved` is its index in the step's checkpoint; it
    keeps `num_kept` of the chunk's tokens (the last known token and the accepted drafts), which start at
    position `start`, flat row `first_row` of the verify batch."""

    saved: int
    slot: int
    start: int
    first_row: int
    num_kept: int
    block_table: Sequence[int]


def compressors(model: Transformer) -> Iterator[Compressor]:
    """Every compressor of the main layers (the MTP block has none)."""
    for block in model.layers:
        attn = block.attn
        if attn.compressor is not None:
            yield attn.compressor
        if attn.indexer is not None:
            yield attn.indexer.compressor


def rollback(model: Transformer, storage: KVStorage, numerics: Numerics, saved: SlotCheckpoint, recorder: Recorder,
             rejections: Sequence[Rejection]) -> None:
    """Leave each rejected sequence's cache as if the verify step had run only its kept tokens (module doc)."""
    if not rejections:
        return
    storage.restore(saved, [r.saved for r in rejections], [r.start + r.num_kept for r in rejections])
    device = saved.slots.device
    layout = BatchLayout.from_chunks([(r.slot, r.start, r.num_kept, r.block_table) for r in rejections],
                                     storage.block_size, device)
    rows = torch.cat([torch.arange(r.first_row, r.first_row + r.num_kept) for r in rejections]).to(device)
    for compressor in compressors(model):
        a, z = recorder[(compressor.layer_id, compressor.name)]
        compressor.store(a.index_select(0, rows), z.index_select(0, rows), storage, layout, numerics)

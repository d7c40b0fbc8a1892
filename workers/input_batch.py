"""The step's inputs in persistent device buffers: filled from one pinned host buffer with one copy per step, and
viewed as the `BatchLayout` the model reads. CUDA graphs capture these views, so a replay sees each new step.

One int64 host buffer holds every field (token ids, positions, token -> sequence row, per-sequence slot / start /
length / first row, and the block table of fixed width); it is copied to the device buffer of the same layout in
one `copy_`. Decode steps padded to a graph's batch size fill the extra rows with a *padding sequence*: the spare
slot the runner keeps out of the scheduler's hands, no blocks (-1: the kernels skip missing blocks), position 0,
token 0. Its outputs are discarded and it can touch no real sequence's cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.kernels.cache_ops import BatchLayout
from dsv4.model.batch import Chunk


@dataclass(frozen=True, slots=True)
class BatchShape:
    num_tokens: int        # rows of the flat batch (padding included)
    num_seqs: int          # sequences (padding included)
    table_width: int       # block-table columns


class InputBatch:
    FIELDS_PER_TOKEN = 3   # token id, position, sequence row
    FIELDS_PER_SEQ = 4     # slot, start, length, first row

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_table_width: int, pad_slot: int, block_size: int,
                 device: torch.device | str):
        self.max_num_tokens, self.max_num_seqs, self.max_table_width = max_num_tokens, max_num_seqs, max_table_width
        self.pad_slot, self.block_size, self.device = pad_slot, block_size, torch.device(device)
        size = self.FIELDS_PER_TOKEN * max_num_tokens + (self.FIELDS_PER_SEQ + max_table_width) * max_num_seqs
        pin = self.device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=pin)
        self.host_np = self.host.numpy()          # element writes through numpy cost ~100 ns, through torch ~1 us
        self.buffer = torch.zeros(size, dtype=torch.int64, device=self.device)
        self.rows = torch.arange(max_num_tokens, dtype=torch.int64, device=self.device)   # logits rows of decode

    def _views(self, buf: torch.Tensor, shape: BatchShape) -> dict[str, torch.Tensor]:
        """Field views of a buffer: [tokens: ids | positions | seq rows][seqs: slot | start | len | first row]
        [seqs x table width]."""
        t, s, w = self.max_num_tokens, self.max_num_seqs, self.max_table_width
        n, m = shape.num_tokens, shape.num_seqs
        seq = buf[3 * t:3 * t + 4 * s]
        table = buf[3 * t + 4 * s:].view(s, w)
        return {"token_ids": buf[:n], "positions": buf[t:t + n], "token_seq": buf[2 * t:2 * t + n],
                "seq_slot": seq[:m], "seq_start": seq[s:s + m], "seq_len": seq[2 * s:2 * s + m],
                "seq_first_row": seq[3 * s:3 * s + m], "block_table": table[:m, :shape.table_width]}

    def shape_for(self, chunks: Sequence[Chunk], pad_to: int | None = None, table_width: int | None = None
                  ) -> BatchShape:
        num_tokens = sum(len(c.token_ids) for c in chunks)
        num_seqs = len(chunks)
        if pad_to is not None:   # decode padded to a graph size: one token per sequence
            num_tokens = num_seqs = pad_to
        width = table_width if table_width is not None else max([len(c.block_table) for c in chunks] + [1])
        if num_tokens > self.max_num_tokens or num_seqs > self.max_num_seqs or width > self.max_table_width:
            raise ValueError(f"step of {num_tokens} tokens, {num_seqs} sequences, {width} blocks exceeds the input "
                             f"buffers ({self.max_num_tokens}, {self.max_num_seqs}, {self.max_table_width})")
        return BatchShape(num_tokens, num_seqs, width)

    def fill(self, chunks: Sequence[Chunk], shape: BatchShape) -> tuple[torch.Tensor, BatchLayout]:
        """Write the chunks (then padding sequences up to `shape`) into the buffers; one host -> device copy.
        Returns the token ids [T] and the layout, views of the device buffer. The host buffer is reused by the next
        step: the caller synchronises with the device once per step (it reads the sampled tokens) before that."""
        t, s_max, w = self.max_num_tokens, self.max_num_seqs, self.max_table_width
        host = self.host_np
        seq_base, table_base = 3 * t, 3 * t + 4 * s_max
        spans, row = [], 0
        for s, c in enumerate(chunks):
            n = len(c.token_ids)
            host[row:row + n] = c.token_ids if not isinstance(c.token_ids, torch.Tensor) else c.token_ids.numpy()
            host[t + row:t + row + n] = range(c.start, c.start + n)
            host[2 * t + row:2 * t + row + n] = s
            host[seq_base + s:seq_base + 4 * s_max:s_max] = (c.slot, c.start, n, row)
            table = host[table_base + s * w:table_base + (s + 1) * w]
            table[:] = -1
            table[:len(c.block_table)] = c.block_table
            spans.append((c.slot, c.start, n, row))
            row += n
        for s in range(len(chunks), shape.num_seqs):   # padding sequences: one token each
            host[row], host[t + row], host[2 * t + row] = 0, 0, s
            host[seq_base + s:seq_base + 4 * s_max:s_max] = (self.pad_slot, 0, 1, row)
            host[table_base + s * w:table_base + (s + 1) * w] = -1
            spans.append((self.pad_slot, 0, 1, row))
            row += 1
        self.buffer.copy_(self.host, non_blocking=True)
        dev = self._views(self.buffer, shape)
        layout = BatchLayout(dev["positions"], dev["token_seq"], dev["seq_slot"], dev["seq_start"], dev["seq_len"],
                             dev["seq_first_row"], dev["block_table"], self.block_size, tuple(spans))
        return dev["token_ids"], layout

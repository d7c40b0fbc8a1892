"""Fixed cache slots for a few sequences, and single-sequence helpers on top of `Transformer.forward`: the
simplest correct way to run the model, used as the reference the batched engine and the service are checked
against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsv4.model.batch import Chunk, ForwardBatch
from dsv4.model.kv_cache import DEFAULT_BLOCK_SIZE, KVStorage
from dsv4.model.numerics import Numerics
from dsv4.model.transformer import Transformer


class StaticCaches:
    """Cache storage for `num_seqs` sequences of up to `max_len` positions: sequence i owns slot i and a fixed
    run of blocks. (The serving engine hands slots and blocks out dynamically instead: `dsv4.cache`.)"""

    def __init__(self, model: Transformer, numerics: Numerics, max_len: int, num_seqs: int = 1,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        self.numerics = numerics
        self.blocks_per_seq = -(-max_len // block_size)
        self.storage = KVStorage(model.config, numerics, num_seqs, num_seqs * self.blocks_per_seq, block_size,
                                 model.embed.weight.device)

    def chunk(self, seq: int, start: int, token_ids: Sequence[int] | torch.Tensor) -> Chunk:
        first = seq * self.blocks_per_seq
        return Chunk(seq, range(first, first + self.blocks_per_seq), start, token_ids)

    def batch(self, chunks: Sequence[Chunk]) -> ForwardBatch:
        return ForwardBatch.build(self.storage, chunks, self.numerics)


def forward_logits(model: Transformer, token_ids: Sequence[int] | torch.Tensor, numerics: Numerics,
                   chunk_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Logits [T, vocab] for every position of one sequence, fed as one prefill or as the given chunks."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64)
    caches = StaticCaches(model, numerics, ids.numel() + 1)
    sizes = list(chunk_sizes) if chunk_sizes else [ids.numel()]
    if sum(sizes) != ids.numel():
        raise ValueError(f"chunk sizes {sizes} do not add up to {ids.numel()} tokens")
    out, start = [], 0
    for size in sizes:
        batch = caches.batch([caches.chunk(0, start, ids[start:start + size])])
        out.append(model(batch, logits_rows=torch.arange(size, device=batch.token_ids.device)).logits)
        start += size
    return torch.cat(out)


def greedy_generate(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int, numerics: Numerics,
                    stop_token_ids: Sequence[int] = ()) -> list[int]:
    """Prefill the prompt, then decode one token at a time, always taking the argmax."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
    caches = StaticCaches(model, numerics, ids.numel() + max_new_tokens)
    logits = model(caches.batch([caches.chunk(0, 0, ids)])).logits
    out: list[int] = []
    for position in range(ids.numel(), ids.numel() + max_new_tokens):
        token = int(logits[-1].argmax())
        out.append(token)
        if token in stop_token_ids or len(out) == max_new_tokens:
            break
        logits = model(caches.batch([caches.chunk(0, position, [token])])).logits
    return out

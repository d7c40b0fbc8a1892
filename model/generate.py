"""Single-sequence helpers on top of `Transformer.forward`: the simplest correct way to run the model, used as
the reference the batched engine and the service are compared against."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dsv4.model.batch import ForwardBatch
from dsv4.model.kv_state import DenseSequenceCache
from dsv4.model.numerics import Numerics
from dsv4.model.transformer import Transformer


def forward_logits(model: Transformer, token_ids: Sequence[int] | torch.Tensor, numerics: Numerics,
                   chunk_sizes: Sequence[int] | None = None) -> torch.Tensor:
    """Logits [T, vocab] for every position of one sequence, fed as one prefill or as the given chunks."""
    ids = torch.as_tensor(token_ids, dtype=torch.int64)
    cache = DenseSequenceCache(model.config, ids.numel() + 1, numerics.act_dtype, ids.device)
    sizes = list(chunk_sizes) if chunk_sizes else [ids.numel()]
    if sum(sizes) != ids.numel():
        raise ValueError(f"chunk sizes {sizes} do not add up to {ids.numel()} tokens")
    out, start = [], 0
    for size in sizes:
        batch = ForwardBatch.build([(cache, start, ids[start:start + size])], numerics, ids.device)
        out.append(model(batch, logits_rows=torch.arange(size, device=ids.device)).logits)
        start += size
    return torch.cat(out)


def greedy_generate(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int, numerics: Numerics,
                    stop_token_ids: Sequence[int] = ()) -> list[int]:
    """Prefill the prompt, then decode one token at a time, always taking the argmax."""
    ids = torch.as_tensor(prompt_ids, dtype=torch.int64)
    cache = DenseSequenceCache(model.config, ids.numel() + max_new_tokens, numerics.act_dtype, ids.device)
    logits = model(ForwardBatch.build([(cache, 0, ids)], numerics, ids.device)).logits
    out: list[int] = []
    for position in range(ids.numel(), ids.numel() + max_new_tokens):
        token = int(logits[-1].argmax())
        out.append(token)
        if token in stop_token_ids or len(out) == max_new_tokens:
            break
        logits = model(ForwardBatch.build([(cache, position, [token])], numerics, ids.device)).logits
    return out

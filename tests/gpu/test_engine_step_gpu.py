"""The batched engine step on the GPU (fast numerics, V4-Flash widths): sequences joining and leaving, random
prefill chunks beside decode tokens, after the runner's warm-up. `fast` is not batch invariant, so a sequence's
logits inside the mixed batches differ from its own single-sequence run (teacher-forced on the same tokens); the
difference must stay well inside the tolerance the mode is judged by, that run's distance from the reference."""

import random

import pytest
import torch
from engine_loop import Seq, serve
from numerics_compare import logit_distance

from dsv4.model.config import preset
from dsv4.model.generate import forward_logits
from dsv4.model.numerics import Numerics
from dsv4.model.synthetic import synthetic_model

pytestmark = pytest.mark.gpu
REFERENCE, FAST = Numerics.parse("reference"), Numerics.parse("fast")


def test_flash_width_batch_composition_moves_logits_less_than_the_fast_numerics_do():
    config = preset("v4-flash").replace(num_hidden_layers=2, num_hash_layers=1, compress_ratios=(4, 128, 0),
                                        max_position_embeddings=4096)
    model = synthetic_model(config, "cuda", seed=5, expert_ids=list(range(64)), progress=None)
    rng, gen = random.Random(3), torch.Generator().manual_seed(4)
    lengths = [1, 3, 17, 128, 300, 381, 1001, 2100]
    seqs = [Seq(f"s{i}", torch.randint(0, config.vocab_size, (n,), generator=gen).tolist(), rng.randint(8, 24),
                join_step=rng.randint(0, 6)) for i, n in enumerate(lengths)]
    FAST.prepare(model)
    with torch.inference_mode():
        serve(model, FAST, seqs, num_slots=6, num_blocks=80, rng=rng, device="cuda", max_chunk=700,
              warm_up=(7, 300))
        batched, single, reference = [], [], []
        for s in seqs:
            batched.append(torch.stack(s.logits))
            single.append(forward_logits(model, s.tokens[:-1], FAST)[len(s.prompt) - 1:].float().cpu())
            reference.append(forward_logits(model, s.tokens[:-1], REFERENCE)[len(s.prompt) - 1:].float().cpu())
            FAST.prepare(model)
    batched, single, reference = torch.cat(batched), torch.cat(single), torch.cat(reference)
    moved, tolerance = logit_distance(single, batched), logit_distance(reference, single)
    rows = (batched - single).norm(dim=-1) / single.norm(dim=-1)
    print(f"\nbatched vs single (fast): {moved}, rows: median {rows.median():.2e}, max {rows.max():.2e}\n"
          f"single (fast) vs reference: {tolerance}")
    assert moved.rel_l2 <= tolerance.rel_l2 / 2 and moved.kl <= tolerance.kl / 2, (moved, tolerance)
    assert moved.top1 >= tolerance.top1, (moved, tolerance)

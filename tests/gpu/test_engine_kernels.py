"""The engine step on CUDA with the kernels equals the engine step on CUDA with the references (DSV4_KERNELS=0):
the tiny model serving sequences that join and leave, with random prefill chunks and decode tokens, produces the
same greedy tokens (and, in practice, the same logits)."""

from __future__ import annotations

import random

import pytest
import torch

from dsv4.cache.manager import KVCacheManager
from dsv4.model.batch import Chunk
from dsv4.model.checkpoint import load_model
from dsv4.model.kv_cache import KVStorage
from dsv4.model.numerics import Numerics
from dsv4.workers.model_runner import ModelRunner

pytestmark = pytest.mark.gpu


def serve(model, numerics, prompts, max_new, seed, num_slots=4, num_blocks=24):
    """Admit every prompt (up to num_slots at once), feed random-sized chunks, sample greedily.
    The chunking depends only on `seed` and the lengths, so two runs see the same steps."""
    rng = random.Random(seed)
    manager = KVCacheManager(num_slots, num_blocks, block_size=256)
    runner = ModelRunner(model, KVStorage(model.config, numerics, num_slots, num_blocks, device="cuda"), numerics)
    tokens = {i: list(p) for i, p in enumerate(prompts)}
    fed = {i: 0 for i in tokens}
    logits = {i: [] for i in tokens}
    waiting, running = list(tokens), []
    while waiting or running:
        while waiting and manager.admit(str(waiting[0]), 1) is not None:
            running.append(waiting.pop(0))
        plan = []
        for i in running:
            n = rng.randint(1, len(tokens[i]) - fed[i])
            assert manager.reserve(str(i), fed[i] + n)
            plan.append((i, n))
        steps = [Chunk(manager.get(str(i)).slot, manager.get(str(i)).blocks, fed[i],
                              tokens[i][fed[i]:fed[i] + n]) for i, n in plan]
        for (i, n), row in zip(plan, runner.step(steps), strict=True):
            fed[i] += n
            if fed[i] == len(tokens[i]):
                logits[i].append(row.float().cpu())
                tokens[i].append(int(row.argmax()))
                if len(tokens[i]) - len(prompts[i]) == max_new:
                    manager.release(str(i))
                    running.remove(i)
    return {i: tokens[i][len(prompts[i]):] for i in tokens}, {i: torch.stack(v) for i, v in logits.items()}


@pytest.mark.parametrize("mode", ["reference", "exact-fp32"])
def test_tiny_model_greedy_tokens_with_kernels_equal_the_references(tiny_checkpoint, mode, monkeypatch):
    model = load_model(tiny_checkpoint, progress=None, device="cuda")
    numerics = Numerics.parse(mode)
    gen = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, 1024, (n,), generator=gen).tolist() for n in (1, 5, 17, 130, 300, 3)]
    monkeypatch.setenv("DSV4_KERNELS", "0")
    ref_tokens, ref_logits = serve(model, numerics, prompts, max_new=12, seed=5)
    monkeypatch.setenv("DSV4_KERNELS", "1")
    got_tokens, got_logits = serve(model, numerics, prompts, max_new=12, seed=5)
    worst = max(float((got_logits[i] - ref_logits[i]).abs().max()) for i in ref_logits)
    same = sum(int(torch.equal(got_logits[i], ref_logits[i])) for i in ref_logits)
    print(f"{mode}: max |logit difference| {worst:.3g}; {same}/{len(ref_logits)} sequences bit-identical")
    assert got_tokens == ref_tokens

"""The batched engine step on the paged cache: many sequences joining and leaving, random prefill chunks, decode
tokens mixed in — token for token (and bit for bit) what the single-sequence model computes."""

import random
from dataclasses import dataclass, field

import pytest
import torch

from dsv4.cache.manager import KVCacheManager
from dsv4.model.batch import Chunk
from dsv4.model.generate import forward_logits
from dsv4.model.kv_cache import KVStorage
from dsv4.model.numerics import Numerics
from dsv4.workers.model_runner import ModelRunner


@dataclass
class Seq:
    seq_id: str
    prompt: list[int]
    max_new: int
    join_step: int
    tokens: list[int] = field(default_factory=list)             # prompt + generated so far
    fed: int = 0                                                  # tokens already run through the model
    logits: list[torch.Tensor] = field(default_factory=list)     # the logits each generated token came from

    def __post_init__(self):
        self.tokens = list(self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]


def serve(model, numerics, seqs, num_slots, num_blocks, rng):
    """A minimal continuous-batching loop: admit when a sequence's join step comes and a slot is free, feed a
    random-sized prefill chunk or one decode token per running sequence, sample greedily, release when done."""
    manager = KVCacheManager(num_slots, num_blocks, block_size=256)
    runner = ModelRunner(model, KVStorage(model.config, numerics, num_slots, num_blocks), numerics)
    waiting, running, step, max_running = sorted(seqs, key=lambda s: s.join_step), [], 0, 0
    while waiting or running:
        for s in [s for s in waiting if s.join_step <= step]:
            if manager.admit(s.seq_id, 1) is not None:
                waiting.remove(s)
                running.append(s)
        plan = []
        for s in running:
            remaining = len(s.tokens) - s.fed
            n = rng.randint(1, remaining)                    # decode when remaining == 1
            assert manager.reserve(s.seq_id, s.fed + n)
            plan.append((s, n))
        max_running = max(max_running, len(plan))
        if plan:
            steps = [Chunk(manager.get(s.seq_id).slot, manager.get(s.seq_id).blocks, s.fed,
                                  s.tokens[s.fed:s.fed + n]) for s, n in plan]
            for (s, n), row in zip(plan, runner.step(steps), strict=True):
                s.fed += n
                if s.fed == len(s.tokens):                   # the chunk reached the end: sample the next token
                    s.logits.append(row)
                    s.tokens.append(int(row.argmax()))
                    if len(s.generated) == s.max_new:
                        manager.release(s.seq_id)
                        running.remove(s)
        step += 1
    assert manager.num_free_blocks == num_blocks and manager.slots.num_free == num_slots
    return max_running


@pytest.mark.parametrize("mode", ["reference", "exact-fp32"])
def test_joining_and_leaving_sequences_match_the_single_sequence_model(tiny_model, mode):
    numerics = Numerics.parse(mode)
    rng = random.Random(7 if mode == "reference" else 8)
    gen = torch.Generator().manual_seed(3)
    lengths = [1, 2, 3, 4, 5, 17, 60, 127, 128, 129, 200, 300]
    seqs = [Seq(f"s{i}", torch.randint(0, 1024, (n,), generator=gen).tolist(), rng.randint(4, 24),
                join_step=rng.randint(0, 12)) for i, n in enumerate(lengths)]
    max_running = serve(tiny_model, numerics, seqs, num_slots=8, num_blocks=24, rng=rng)
    assert max_running >= 8                                  # 8 sequences ran together; slots were reused
    for s in seqs:
        single = forward_logits(tiny_model, s.tokens[:-1], numerics)[len(s.prompt) - 1:]
        assert s.generated == single.argmax(-1).tolist(), s.seq_id          # greedy tokens, token for token
        ours = torch.stack(s.logits)
        assert (ours - single).abs().max() <= 1e-5, s.seq_id
        assert torch.equal(ours, single), s.seq_id                          # and in fact bit for bit


def test_a_reused_slot_carries_nothing_over(tiny_model):
    """A 2-token prompt (shorter than a CSA window: the official code leaks the previous request's state into
    it) admitted into the slot a long sequence just left computes exactly what it computes alone."""
    numerics = Numerics.parse("reference")
    manager = KVCacheManager(1, 4, 256)
    runner = ModelRunner(tiny_model, KVStorage(tiny_model.config, numerics, 1, 4), numerics)
    long = torch.randint(0, 1024, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    seq = manager.admit("long", len(long))
    runner.step([Chunk(seq.slot, seq.blocks, 0, long)])
    manager.release("long")
    short = [5, 9]
    seq = manager.admit("short", 3)
    first = runner.step([Chunk(seq.slot, seq.blocks, 0, short)])
    nxt = int(first[0].argmax())
    second = runner.step([Chunk(seq.slot, seq.blocks, 2, [nxt])])
    alone = forward_logits(tiny_model, short + [nxt], numerics)
    assert torch.equal(first[0], alone[1]) and torch.equal(second[0], alone[2])

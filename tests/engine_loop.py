"""A minimal continuous-batching loop over the engine step (shared by the CPU and GPU engine-step tests)."""

from dataclasses import dataclass, field

import torch

from dsv4.cache.manager import KVCacheManager
from dsv4.model.batch import Chunk
from dsv4.model.kv_cache import KVStorage
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


def serve(model, numerics, seqs, num_slots, num_blocks, rng, device="cpu", max_chunk=None, warm_up=()):
    """A minimal continuous-batching loop: admit when a sequence's join step comes and a slot is free, feed a
    random-sized prefill chunk (at most `max_chunk` tokens) or one decode token per running sequence, sample
    greedily, release when done. `warm_up`: sizes the runner warms up with first."""
    manager = KVCacheManager(num_slots, num_blocks, block_size=256)
    runner = ModelRunner(model, KVStorage(model.config, numerics, num_slots, num_blocks, device=device), numerics)
    if warm_up:
        runner.warm_up(warm_up)
    waiting, running, step, max_running = sorted(seqs, key=lambda s: s.join_step), [], 0, 0
    while waiting or running:
        for s in [s for s in waiting if s.join_step <= step]:
            if manager.admit(s.seq_id, 1) is not None:
                waiting.remove(s)
                running.append(s)
        plan = []
        for s in running:
            remaining = len(s.tokens) - s.fed
            n = rng.randint(1, min(remaining, max_chunk or remaining))   # decode when remaining == 1
            assert manager.reserve(s.seq_id, s.fed + n)
            plan.append((s, n))
        max_running = max(max_running, len(plan))
        if plan:
            steps = [Chunk(manager.get(s.seq_id).slot, manager.get(s.seq_id).blocks, s.fed, s.tokens[s.fed:s.fed + n])
                     for s, n in plan]
            for (s, n), row in zip(plan, runner.step(steps), strict=True):
                s.fed += n
                if s.fed == len(s.tokens):                   # the chunk reached the end: sample the next token
                    s.logits.append(row.float().cpu())
                    s.tokens.append(int(row.argmax()))
                    if len(s.generated) == s.max_new:
                        manager.release(s.seq_id)
                        running.remove(s)
        step += 1
    assert manager.num_free_blocks == num_blocks and manager.slots.num_free == num_slots
    return max_running
